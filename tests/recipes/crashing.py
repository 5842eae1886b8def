"""A test recipe that fails where `--fail` says, for the pre-flight errors: `forward` (the model
raises), `collate` (variable-length samples without a collate function), `loss` (build_loss's
loss raises)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from launcher import DataSpec, TrainConfig


@dataclass
class Config(TrainConfig):
    fail: str = "forward"  # where to fail: forward, collate, loss
    output_dir: str = "runs/crashing"
    batch_size: int = 4
    num_workers: int = 0
    wandb_mode: str = "disabled"


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x.view(x.shape[0], 3, 3))  # a shape mistake, as users make them


def build_model(cfg: Config) -> nn.Module:
    return Broken() if cfg.fail == "forward" else nn.Linear(8, 3)


def build_data(cfg: Config) -> DataSpec:
    lengths = [8, 5, 8, 7] * 4 if cfg.fail == "collate" else [8] * 16
    samples = [(torch.randn(n), i % 3) for i, n in enumerate(lengths)]
    return DataSpec(train=samples, val=samples[:8])


def build_loss(cfg: Config):
    def loss(outputs, targets):
        if cfg.fail == "loss":
            return outputs["loss"]  # a tensor has no keys
        return nn.functional.cross_entropy(outputs, targets)

    return loss
