"""A test recipe: recipes/char_lm_tiny's model and collate on a torch IterableDataset of byte
sequences (lines of a standard-library module) with no __len__: 101 lines, so 2 ranks get 51 and
50, and DataSpec(train_samples=101) gives the epoch its length; validation is a stream too.
`--source=hf`: the same lines as Hugging Face datasets, a streaming training split read from a JSON
lines file and a map-style validation split."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from launcher import DataSpec, variant
from recipes.char_lm import build_model, collate, compute_loss  # noqa: F401
from recipes.char_lm_tiny import Config as Tiny


@dataclass
class Config(variant(Tiny, batch_size=8, max_steps=0, epochs=2, log_every=2, output_dir="runs/stream_lines")):
    lines: int = 101  # items in the stream
    # "torch": torch IterableDatasets; "hf": Hugging Face datasets (streaming, map-style)
    source: str = "torch"


class Lines(IterableDataset):
    """The first `count` lines of json/decoder.py (longer than 3 characters) as {"tokens": uint8 bytes}."""

    def __init__(self, count: int, skip: int = 0):
        self.count, self.skip = count, skip

    def __iter__(self):
        for line in source_lines()[self.skip : self.skip + self.count]:
            yield {"tokens": torch.tensor(list(line[:33]), dtype=torch.uint8)}


def source_lines() -> list[bytes]:
    return [line.encode() for line in inspect.getsource(json.decoder).splitlines() if len(line.strip()) > 3]


def collate_lists(samples: list[dict], max_tokens: int) -> dict:
    """Hugging Face datasets give {"tokens": [int, ...]}: char_lm's collate takes tensors."""
    return collate([{"tokens": torch.tensor(s["tokens"], dtype=torch.uint8)} for s in samples], max_tokens)


def hf_splits(cfg: Config) -> tuple:
    """The training lines streamed from a JSON lines file (written once, atomically: every rank may
    write it), the validation lines as a map-style Dataset."""
    import datasets  # a dev dependency

    lines = [list(line[:33]) for line in source_lines()]
    text = "".join(json.dumps({"tokens": tokens}) + "\n" for tokens in lines[: cfg.lines])
    path = os.path.join(
        tempfile.gettempdir(), f"stream_lines_{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    )
    if not os.path.isfile(path):
        draft = f"{path}.{os.getpid()}"
        with open(draft, "w") as f:
            f.write(text)
        os.replace(draft, path)
    train = datasets.load_dataset("json", data_files=path, streaming=True, split="train")
    val = datasets.Dataset.from_dict({"tokens": lines[cfg.lines : cfg.lines + 21]})
    return train, val


def build_data(cfg: Config) -> DataSpec:
    if cfg.source == "hf":
        train, val = hf_splits(cfg)
        return DataSpec(
            train=train,
            val=val,
            train_samples=cfg.lines,
            collate=functools.partial(collate_lists, max_tokens=cfg.block_size + 1),
        )
    return DataSpec(
        train=Lines(cfg.lines),
        val=Lines(21, skip=cfg.lines),
        train_samples=cfg.lines,
        collate=functools.partial(collate, max_tokens=cfg.block_size + 1),
    )
