"""A torchvision classifier on ImageNet-style JPEG shards: what scripts/bench_gpu.py times.

    python -m launcher recipes/resnet_bench --data_dir=DIR --mixed_precision=bf16 --channels_last=True

Training only (no validation split); RandomResizedCrop + flip per sample on uint8 tensors in the
DataLoader workers, normalisation per batch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision

from launcher import DataSpec, Shards, TrainConfig
from launcher.presets import normalize, train_transform


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/bench"  # JPEG shards with an index.json (scripts/bench_gpu.py writes them)
    arch: str = "resnet50"  # a torchvision classification model
    image_size: int = 224  # RandomResizedCrop size
    num_classes: int = 1000  # the model's outputs
    output_dir: str = "runs/resnet_bench"
    batch_size: int = 256
    num_workers: int = 8
    wandb_mode: str = "disabled"
    checkpoint_epoch_end: bool = False


def build_model(cfg: Config):
    return torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)


def build_data(cfg: Config):
    return DataSpec(
        train=Shards(
            cfg.data_dir, train_transform(cfg.image_size), batch_transform=normalize(), shuffle_buffer=256
        )
    )
