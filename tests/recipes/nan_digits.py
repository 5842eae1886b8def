"""A test recipe: mlp_digits whose loss is NaN at one optimizer step (for --nonfinite)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from mlp_digits import Config as Base
from mlp_digits import build_data, build_model  # noqa: F401


@dataclass
class Config(Base):
    nan_step: int = 5  # the loss of this optimizer step (1-based, one micro-batch per step) is NaN
    output_dir: str = "runs/nan_digits"


def build_loss(cfg: Config):
    calls = 0

    def loss(logits, targets):
        nonlocal calls
        calls += 1
        value = F.cross_entropy(logits, targets)
        return value * float("nan") if calls == cfg.nan_step else value

    return loss
