"""Crops and resizes of a whole batch in one kernel, for `--data_on_gpu` on an accelerator: the
per-sample transform becomes per-sample boxes, drawn exactly as the transform draws them, and
one `roi_align`.

A transform is taken apart when it is (or, for `launcher.presets`' crops, its `full_size` is) a
torchvision Compose (nested ones flattened) of steps that do nothing to a uint8 tensor
(`presets.to_rgb`, PILToTensor, ToImage) followed by either
- RandomResizedCrop (bilinear, antialiased) and optionally RandomHorizontalFlip (the training
  preset), or
- Resize(int, bilinear) and CenterCrop (the evaluation preset).
Anything else (ColorJitter, a function of the user's, another interpolation) keeps the
per-sample path: `batch_crops(transform)` is None for it.

Randomness: before each sample, the caller seeds torch's CPU generator as for the per-sample
path; `draw` then calls RandomResizedCrop's own `make_params` and draws the flip with
`torch.rand(1) < p`, the calls the transform makes in that order, so the crops and flips are the
ones the per-sample path takes (and resume stays bitwise).

Resampling: `roi_align(aligned=True)` samples each output pixel's bin on a grid of
ceil(crop / output) x ceil(crop / output) bilinear points and averages them (`sampling_ratio=0`,
chosen per box). Downscaling, that is a box filter of the bin's width over bilinear samples where
torchvision's antialiased resize uses a triangle filter twice that wide: slightly sharper, within a
few grey levels on photos (tests/unit/test_device_decode.py states the tolerance). Upscaling, both
are plain bilinear. Unlike a crop then resize, pixels at the crop's border read their neighbours
just outside it (up to half a pixel away), as a resize of the whole image would.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from launcher.data.scaled_decode import to_rgb

# per roi_align call, n x H x W of the padded images: ~0.4 GB as float, 0.27 GB of indices
CANVAS_PIXELS = 1 << 25


@dataclass
class BatchCrops:
    """What a recognised transform does to each sample: a box of the image, resized to `size`
    (height, width), flipped or not."""
    size: tuple[int, int]
    random_crop: object | None = None  # v2.RandomResizedCrop (training), or None
    flip: float = 0.0  # probability of a horizontal flip
    resize: int = 0  # evaluation: the shorter side's length before the centre crop

    def draw(self, image: torch.Tensor) -> tuple[tuple[float, float, float, float], bool]:
        """The box (x1, y1, x2, y2, in pixel edges) the transform would crop from `image` (C, H, W),
        and whether it would flip it; draws from torch's CPU generator as the transform does."""
        height, width = image.shape[-2:]
        if self.random_crop is not None:
            crop = self.random_crop.make_params([image])
            box = (crop["left"], crop["top"], crop["left"] + crop["width"], crop["top"] + crop["height"])
        else:
            box = self._centre_box(height, width)
        flipped = bool(self.flip) and bool(torch.rand(1) < self.flip)
        return tuple(float(v) for v in box), flipped

    def _centre_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """Resize(shorter side -> resize) then CenterCrop(size), as a box of the original image
        (torchvision's rounding: the longer side truncated, the crop's offset rounded)."""
        short, long = sorted((height, width))
        resized_long = int(self.resize * long / short)
        new_h, new_w = (self.resize, resized_long) if height <= width else (resized_long, self.resize)
        top, left = int(round((new_h - self.size[0]) / 2.0)), int(round((new_w - self.size[1]) / 2.0))
        sy, sx = height / new_h, width / new_w
        return left * sx, top * sy, (left + self.size[1]) * sx, (top + self.size[0]) * sy


def batch_crops(transform) -> BatchCrops | None:
    """`transform` as a BatchCrops, or None when it does anything else (see the module docstring)."""
    from torchvision.transforms import v2

    transform = getattr(transform, "full_size", transform)  # presets.TrainCrop/EvalCrop: their tensor path
    if not isinstance(transform, v2.Compose):
        return None
    steps = _flat_steps(transform, v2.Compose)
    while steps and (steps[0] is to_rgb or isinstance(steps[0], (v2.PILToTensor, v2.ToImage))):
        steps.pop(0)
    # torchvision keeps `interpolation` as an InterpolationMode or (0.29) its string value
    bilinear = lambda t: getattr(t.interpolation, "value", t.interpolation) == "bilinear" and t.antialias  # noqa: E731
    if steps and isinstance(steps[0], v2.RandomResizedCrop) and bilinear(steps[0]):
        crop = BatchCrops(tuple(steps[0].size), random_crop=steps[0])
        if len(steps) == 2 and type(steps[1]) is v2.RandomHorizontalFlip:
            crop.flip = steps[1].p
            return crop
        return crop if len(steps) == 1 else None
    if (len(steps) == 2 and isinstance(steps[0], v2.Resize) and isinstance(steps[1], v2.CenterCrop)
            and bilinear(steps[0]) and len(steps[0].size) == 1 and steps[0].max_size is None
            and steps[1].size[0] <= steps[0].size[0] and steps[1].size[1] <= steps[0].size[0]):
        return BatchCrops(tuple(steps[1].size), resize=steps[0].size[0])
    return None


def _flat_steps(transform, compose: type) -> list:
    """The steps of a Compose, those of Composes inside it in their place."""
    return [step for outer in transform.transforms
            for step in (_flat_steps(outer, compose) if isinstance(outer, compose) else [outer])]


def crop_batch(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, *size): each image's box (N x (x1, y1, x2, y2), float) resized to `size`, and
    flipped where `flips` (N, bool): one roi_align per CANVAS_PIXELS of images, not N resizes."""
    from torchvision.ops import roi_align

    device = images[0].device
    outputs = []
    for start, stop in _chunks(images):
        canvas = padded(images[start:stop])
        rois = torch.cat([torch.arange(stop - start, dtype=torch.float32)[:, None], boxes[start:stop]], 1)
        outputs.append(roi_align(canvas, rois.to(device), output_size=size, spatial_scale=1.0, sampling_ratio=0,
                                 aligned=True))
    crops = torch.cat(outputs)
    crops = torch.where(flips.to(device)[:, None, None, None], crops.flip(-1), crops)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def _chunks(images: list[torch.Tensor]):
    """(start, stop) runs of images whose padded canvas stays under CANVAS_PIXELS (one image at least)."""
    start, tallest, widest = 0, 0, 0
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        tallest, widest = max(tallest, height), max(width, widest)
        if i > start and (i + 1 - start) * tallest * widest > CANVAS_PIXELS:
            yield start, i
            start, tallest, widest = i, height, width
    yield start, len(images)


def padded(images: list[torch.Tensor]) -> torch.Tensor:
    """float (n, C, H, W) of images of any sizes, each padded to the largest by repeating its last row
    and column (so bilinear samples at its edge read its own pixels, not zeros): one gather from the
    images laid end to end, not one copy per image."""
    device = images[0].device
    shapes = [image.shape[-2:] for image in images]  # read on the host: no wait for the device
    heights = torch.tensor([h for h, _ in shapes]).to(device, non_blocking=True)
    widths = torch.tensor([w for _, w in shapes]).to(device, non_blocking=True)
    flat = torch.cat([image.reshape(image.shape[0], -1) for image in images], 1)
    starts = torch.cumsum(heights * widths, 0) - heights * widths
    rows = torch.arange(max(h for h, _ in shapes), device=device)
    columns = torch.arange(max(w for _, w in shapes), device=device)
    heights, widths, starts = heights[:, None, None], widths[:, None, None], starts[:, None, None]
    index = (starts + torch.minimum(rows[None, :, None], heights - 1) * widths
             + torch.minimum(columns[None, None, :], widths - 1))
    canvas = flat[:, index]  # (C, n, H, W)
    return canvas.permute(1, 0, 2, 3).float().contiguous()


def output_side(transform) -> int:
    """The longer side, in pixels, of what a transform outputs: its (last) crop's or resize's size;
    0 when it has none that says (a function, a transform of the user's)."""
    transform = getattr(transform, "full_size", transform)  # presets.TrainCrop/EvalCrop: their Compose
    if "torchvision" not in sys.modules:  # then it is no torchvision Compose: no need to import it (seconds)
        return 0
    from torchvision.transforms import v2

    if not isinstance(transform, v2.Compose):
        return 0
    side = 0
    for step in _flat_steps(transform, v2.Compose):
        if isinstance(step, (v2.RandomResizedCrop, v2.CenterCrop, v2.RandomCrop)):
            side = max(step.size)
        elif isinstance(step, v2.Resize) and step.size and not side:
            side = max(step.size)
    return side


def shrink_target(side: int) -> int:
    """A `--max_side` for a transform that outputs `side` px: twice that, rounded up to 64 px."""
    return math.ceil(2 * side / 64) * 64
