"""Data pieces shared by the digit recipes (not a recipe itself): shards and transforms.

The shards come from `python scripts/make_demo_data.py --out data/digits` (run by `make demo`).
"""

from __future__ import annotations

import os

import torch
from torchvision.transforms import v2

from launcher import DataSpec, Shards
from launcher.presets import to_rgb  # PIL -> RGB; tensors decoded on the device (--data_on_gpu) pass through

MEAN, STD = [0.5] * 3, [0.5] * 3  # digits are grey on black: map [0, 1] to [-1, 1]


# Per sample, in the DataLoader workers: uint8 tensors (4x less to stack and move than float).
def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(image_size, antialias=True),
                       v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))])


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(image_size, antialias=True)])


# Per batch, on the training device.
def normalize() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def digit_shards(data_dir: str, train_split: str, val_split: str, image_size: int) -> DataSpec:
    def split(name: str, transform: v2.Compose) -> Shards:
        return Shards(os.path.join(data_dir, name), transform, batch_transform=normalize())

    return DataSpec(train=split(train_split, train_transform(image_size)),
                    val=split(val_split, eval_transform(image_size)))
