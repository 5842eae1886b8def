"""A test recipe: mlp_digits whose loss is NaN at one optimizer step (for --nonfinite)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
        """Training steps counted: not the pre-flight check's batch of 2, nor evaluations (no gradients)."""
        nonlocal calls
        value = F.cross_entropy(logits, targets)
        if not torch.is_grad_enabled() or len(targets) != cfg.batch_size:
            return value
        calls += 1
        return value * float("nan") if calls == cfg.nan_step else value

    return loss
