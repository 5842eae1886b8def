"""A test recipe: recipes/char_lm_tiny's model and collate on a map-style dataset of variable-length
byte sequences (lines of a standard-library module), for the token-weighting equivalences. With
`--per_batch_mean=True` each micro-batch's loss is its own per-token mean instead (the
gradient-accumulation bug of transformers #34191), which the tests show differs."""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass

import torch

from launcher import DataSpec, variant
from recipes.char_lm import build_model, collate  # noqa: F401
from recipes.char_lm import compute_loss as summed_loss
from recipes.char_lm_tiny import Config as Tiny


@dataclass
class Config(
    variant(
        Tiny, batch_size=16, max_steps=3, lr=1e-2, warmup_steps=0, log_every=1, output_dir="runs/token_counts"
    )
):
    per_batch_mean: bool = False  # divide each micro-batch by its own tokens (wrong under accumulation)


def build_data(cfg: Config) -> DataSpec:
    lines = [line.encode() for line in inspect.getsource(json.decoder).splitlines() if len(line.strip()) > 3]
    samples = [{"tokens": torch.tensor(list(line[:33]), dtype=torch.uint8)} for line in lines[:192]]
    return DataSpec(
        train=samples, val=samples[:32], collate=functools.partial(collate, max_tokens=cfg.block_size + 1)
    )


def compute_loss(model, batch, cfg: Config):
    out = summed_loss(model, batch)
    return out.loss / out.count if cfg.per_batch_mean else out
