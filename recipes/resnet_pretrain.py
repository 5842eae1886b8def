"""Pretrain a torchvision ResNet from scratch on digits 0-4: the demo's upstream task.

    python -m launcher recipes/resnet_pretrain --output_dir=runs/pretrain

Its output_dir is what recipes/resnet_finetune loads with --weights=runs/pretrain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision

from launcher import TrainConfig
from recipes.digits import digit_shards


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits"  # demo shards (scripts/make_demo_data.py)
    image_size: int = 32  # digits are resized from 8x8 to this many pixels square
    arch: str = "resnet18"  # a torchvision classification model name
    num_classes: int = 5  # digits 0-4
    output_dir: str = "runs/resnet_pretrain"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    max_grad_norm: float = 1.0


def build_model(cfg: Config):
    return torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)


def build_data(cfg: Config):
    return digit_shards(cfg.data_dir, "pretrain", "pretrain_val", cfg.image_size)
