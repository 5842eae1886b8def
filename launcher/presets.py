"""Standard image transform presets (torchvision.transforms.v2), as ImageNet training uses them.

Per sample, in the DataLoader workers, images stay uint8 tensors (4x less to collate and copy
than float); `normalize` runs per batch on the training device (`batch_transform`).

    train: RandomResizedCrop(size, scale) -> horizontal flip -> [ColorJitter] -> [rotation]
    eval:  Resize(resize_size) -> CenterCrop(size)        (resize_size 0: size / 0.875, as timm)

Shard images reach them undecoded (`Shards.prepare` calls their `from_bytes`): they pick the crop
from the header's size first, then decode a JPEG at the smallest scale that covers it, or, where
none does, only the crop's rows and columns (launcher/data/scaled_decode.py): 3.7x fewer CPU
seconds than torchvision's reference on a 12 MP photo, 1.7x on an ImageNet-sized JPEG
(BENCHMARKS.md). PIL images and tensors (image folders, `--data_on_gpu`) take the full-size path,
as any recipe's own transform does.

torchvision is imported where a transform is built: importing it takes seconds (it pulls in
torch._dynamo), which a run without images never needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from launcher.data.scaled_decode import (
    MIN_FACTOR,
    covering_size,
    decode_region,
    decode_rgb,
    image_size,
    to_rgb,
)

if TYPE_CHECKING:
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    rotation: float = 0.0,
) -> TrainCrop:
    return TrainCrop(size, scale=scale, hflip=hflip, color_jitter=color_jitter, rotation=rotation)


def eval_transform(size: int, resize_size: int = 0) -> EvalCrop:
    return EvalCrop(size, resize_size)


class TrainCrop:
    """RandomResizedCrop(size, scale) -> horizontal flip -> [ColorJitter] -> [rotation], on a PIL
    image or a uint8 tensor; `from_bytes` decodes a shard's encoded image at the scale its crop needs.

    `from_bytes` draws the crop from the header's size with RandomResizedCrop's own `make_params`
    (the same draws from torch's generator, seeded per sample, as on the full-size path), decodes
    at the smallest JPEG scale at which the crop still spans `size` pixels both ways, maps the crop
    to that scale (to the nearest pixel) and resizes it as RandomResizedCrop does: bilinear with
    antialias. The output is close to the full-size path's, not equal: the DCT-domain downscale
    averages differently from the bilinear antialias filter (tests/unit/test_scaled_decode.py).
    Where no scale covers the crop, only the crop's rows and columns are decoded
    (`scaled_decode.decode_region`), and the output is the full-size path's exactly."""

    def __init__(
        self, size: int, *, scale: Sequence[float], hflip: float, color_jitter: float, rotation: float
    ):
        from torchvision.transforms import v2

        self.size = size
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
        self.after = []  # the random steps after the crop, in the order they draw
        if hflip:
            self.after.append(v2.RandomHorizontalFlip(hflip))
        if color_jitter:
            self.after.append(
                v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            )
        if rotation:
            self.after.append(v2.RandomRotation(rotation))
        self.full_size = v2.Compose([to_rgb, v2.PILToTensor(), self.crop, *self.after])

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.full_size(image)

    def from_bytes(self, data: bytes) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        height, width = image_size(data)
        box = self.crop.make_params([torch.empty(0, height, width)])  # only the size is read
        min_height = covering_size(self.size, box["height"], height)
        min_width = covering_size(self.size, box["width"], width)
        if min_height * MIN_FACTOR > height or min_width * MIN_FACTOR > width:  # no DCT scale covers it
            crop = decode_region(data, box["top"], box["left"], box["height"], box["width"])
            if crop is not None:
                return self._finish(functional.resize(crop, [self.size, self.size], antialias=True))
        image = decode_rgb(data, min_height, min_width)
        y, x = image.shape[1] / height, image.shape[2] / width  # decoded pixels per full-size pixel
        top, left = round(box["top"] * y), round(box["left"] * x)
        bottom, right = round((box["top"] + box["height"]) * y), round((box["left"] + box["width"]) * x)
        image = functional.resized_crop(
            image,
            top,
            left,
            max(bottom - top, 1),
            max(right - left, 1),
            [self.size, self.size],
            antialias=True,
        )
        return self._finish(image)

    def _finish(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.after:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"train_transform: {self.full_size!r}"


class EvalCrop:
    """Resize(resize_size) -> CenterCrop(size) (resize_size 0: size / 0.875, as timm); `from_bytes`
    decodes at the smallest JPEG scale whose shorter side is still at least resize_size, then
    resizes and crops that as the full-size path does (bilinear with antialias)."""

    def __init__(self, size: int, resize_size: int = 0):
        from torchvision.transforms import v2

        self.resize_size = resize_size or round(size / 0.875)
        self.resize_crop = v2.Compose([v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(size)])
        self.full_size = v2.Compose([to_rgb, v2.PILToTensor(), self.resize_crop])

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.full_size(image)

    def from_bytes(self, data: bytes) -> torch.Tensor:
        height, width = image_size(data)
        shorter = min(height, width)
        image = decode_rgb(
            data,
            covering_size(self.resize_size, shorter, height),
            covering_size(self.resize_size, shorter, width),
        )
        return self.resize_crop(image)

    def __repr__(self) -> str:
        return f"eval_transform: {self.full_size!r}"


def normalize(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 batch -> float in [0, 1] -> (x - mean) / std per channel; for `batch_transform`."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
