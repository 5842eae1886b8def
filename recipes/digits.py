"""Data pieces shared by the digit recipes (not a recipe itself): shards and transforms.

The shards come from `python scripts/make_demo_data.py --out data/digits` (run by `make demo`).
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from torchvision.transforms import v2

from launcher import DataSpec, Shards

MEAN, STD = [0.5] * 3, [0.5] * 3  # digits are grey on black: map [0, 1] to [-1, 1]


def to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(image_size, antialias=True),
                       v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(image_size, antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def digit_shards(data_dir: str, train_split: str, val_split: str, image_size: int) -> DataSpec:
    return DataSpec(train=Shards(os.path.join(data_dir, train_split), train_transform(image_size)),
                    val=Shards(os.path.join(data_dir, val_split), eval_transform(image_size)))
