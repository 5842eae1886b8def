"""A test recipe in the Hugging Face style: dict samples {"pixel_values", "labels"} from
scikit-learn's digits (map-style), and a model whose forward(pixel_values, labels) returns a dict
with its own loss and the logits; no build_loss, no compute_loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from launcher import DataSpec, TrainConfig


@dataclass
class Config(TrainConfig):
    hidden: int = 32  # hidden units
    output_dir: str = "runs/hf_style_digits"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    num_workers: int = 0
    log_every: int = 5
    wandb_mode: str = "disabled"


class DigitsModel(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(pixel_values)
        return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}


def build_model(cfg: Config) -> nn.Module:
    return DigitsModel(cfg.hidden)


def build_data(cfg: Config) -> DataSpec:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = [
        {"pixel_values": torch.tensor(x / 16.0, dtype=torch.float32), "labels": int(y)}
        for x, y in zip(digits.data, digits.target)
    ]
    return DataSpec(train=samples[:1400], val=samples[1400:], classes=[str(i) for i in range(10)])
