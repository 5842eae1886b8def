"""A test recipe: an MLP (no BatchNorm, no dropout) on the digits shards, deterministic input."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from launcher import DataSpec, Shards, TrainConfig
from recipes.digits import eval_transform, normalize


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits"  # demo shards
    hidden: int = 64  # hidden units
    output_dir: str = "runs/mlp_digits"
    epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    num_workers: int = 0
    log_every: int = 5
    wandb_mode: str = "disabled"


def build_model(cfg: Config):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))


def build_data(cfg: Config):
    transform = eval_transform(8)  # no random augmentation: the data order alone decides the result
    return DataSpec(
        train=Shards(os.path.join(cfg.data_dir, "train"), transform, batch_transform=normalize()),
        val=Shards(os.path.join(cfg.data_dir, "val"), transform, batch_transform=normalize()),
    )
