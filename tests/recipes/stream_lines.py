"""A test recipe: recipes/char_lm_tiny's model and collate on a torch IterableDataset of byte
sequences (lines of a standard-library module) with no __len__: 101 lines, so 2 ranks get 51 and
50, and DataSpec(train_samples=101) gives the epoch its length; validation is a stream too."""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from launcher import DataSpec, variant
from recipes.char_lm import build_model, collate, compute_loss  # noqa: F401
from recipes.char_lm_tiny import Config as Tiny


@dataclass
class Config(variant(Tiny, batch_size=8, max_steps=0, epochs=2, log_every=2,
                     output_dir="runs/stream_lines")):
    lines: int = 101  # items in the stream


class Lines(IterableDataset):
    """The first `count` lines of json/decoder.py (longer than 3 characters) as {"tokens": uint8 bytes}."""

    def __init__(self, count: int, skip: int = 0):
        self.count, self.skip = count, skip

    def __iter__(self):
        lines = [line.encode() for line in inspect.getsource(json.decoder).splitlines() if len(line.strip()) > 3]
        for line in lines[self.skip:self.skip + self.count]:
            yield {"tokens": torch.tensor(list(line[:33]), dtype=torch.uint8)}


def build_data(cfg: Config) -> DataSpec:
    return DataSpec(train=Lines(cfg.lines), val=Lines(21, skip=cfg.lines), train_samples=cfg.lines,
                    collate=functools.partial(collate, max_tokens=cfg.block_size + 1))
