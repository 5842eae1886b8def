"""Standard image transform presets (torchvision.transforms.v2), as ImageNet training uses them.

Per sample, in the DataLoader workers, images stay uint8 tensors (4x less to collate and copy
than float); `normalize` runs per batch on the training device (`batch_transform`).

    train: RandomResizedCrop(size, scale) -> horizontal flip -> [ColorJitter] -> [rotation]
    eval:  Resize(resize_size) -> CenterCrop(size)        (resize_size 0: size / 0.875, as timm)

torchvision is imported where a transform is built: importing it takes seconds (it pulls in
torch._dynamo), which a run without images never needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

if TYPE_CHECKING:
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """PIL image -> RGB; a tensor (decoded on the device as RGB, `--data_on_gpu`) passes through."""
    return image.convert("RGB") if isinstance(image, Image.Image) else image


def train_transform(size: int, *, scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5,
                    color_jitter: float = 0.0, rotation: float = 0.0) -> v2.Compose:
    from torchvision.transforms import v2

    steps = [to_rgb, v2.PILToTensor(), v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if rotation:
        steps.append(v2.RandomRotation(rotation))
    return v2.Compose(steps)


def eval_transform(size: int, resize_size: int = 0) -> v2.Compose:
    from torchvision.transforms import v2

    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(resize_size or round(size / 0.875), antialias=True),
                       v2.CenterCrop(size)])


def normalize(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 batch -> float in [0, 1] -> (x - mean) / std per channel; for `batch_transform`."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
