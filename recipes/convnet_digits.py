"""A small ConvNet trained from scratch on the digits shards with Adam and StepLR, the way a
hand-written PyTorch script would: every choice below is a Config field.

    python -m launcher recipes/convnet_digits
    python -m launcher recipes/convnet_digits --lr_schedule=multistep --lr_milestones=[4,8]

At each evaluation a callback logs the 8 validation images it gets most wrong (`val/worst`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from launcher import TrainConfig
from recipes.digits import WorstClassified, digit_shards


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits"  # demo shards (scripts/make_demo_data.py)
    image_size: int = 16  # digits are resized from 8x8 to this many pixels square
    channels: int = 32  # channels of the first convolution (the second has twice as many)
    dropout: float = 0.25  # before the classifier
    output_dir: str = "runs/convnet_digits"
    epochs: int = 6
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "step"
    lr_step_size: int = 2  # epochs
    lr_gamma: float = 0.5
    weight_init: str = "kaiming_normal"


def build_model(cfg: Config) -> nn.Module:
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(2 * c, 10),
    )


def build_data(cfg: Config):
    return digit_shards(cfg.data_dir, "train", "val", cfg.image_size)


def callbacks(cfg: Config) -> list:
    return [WorstClassified(build_data(cfg))]
