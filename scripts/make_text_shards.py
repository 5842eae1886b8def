"""Write byte-level text shards for recipes/char_lm from the source of standard-library modules
(text that ships with Python: code, comments and docstrings; no network).

    python scripts/make_text_shards.py --out data/text

Each module's source, as UTF-8 bytes, is cut into consecutive chunks of a random length between
`min_len` and `max_len` bytes (ending at the chunk's last newline when there is one past
`min_len`); a seeded draw holds `val_fraction` of the chunks out. Each sample is
{"__key__": "MODULE-NNNNN", "tokens.npy": uint8 array of the chunk's bytes}:
  OUT/train/  the training chunks, in a seeded shuffled order, `train_shards` shards
  OUT/val/    the held-out chunks, `val_shards` shards
with an index.json each. The same Python and arguments give the same bytes every run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import fire
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher.data.writer import write_shards  # noqa: E402
from recipes.stdlib_text import SOURCE_MODULES  # noqa: E402


def chunks(text: bytes, min_len: int, max_len: int, rng: np.random.Generator):
    """Consecutive pieces of `text`, each min_len..max_len bytes, cut after a newline where possible."""
    start = 0
    while len(text) - start >= min_len:
        piece = text[start : start + int(rng.integers(min_len, max_len + 1))]
        newline = piece.rfind(b"\n")
        if newline + 1 >= min_len and newline + 1 < len(piece):
            piece = piece[: newline + 1]
        yield piece
        start += len(piece)


def split_chunks(modules, min_len: int, max_len: int, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for name in modules:
        source = inspect.getsource(importlib.import_module(name)).encode("utf-8")
        for i, piece in enumerate(chunks(source, min_len, max_len, rng)):
            sample = {
                "__key__": f"{name.replace('.', '_')}-{i:05d}",
                "tokens.npy": np.frombuffer(piece, np.uint8),
            }
            splits["val" if rng.random() < val_fraction else "train"].append(sample)
    return splits


def main(
    out: str = "data/text",
    min_len: int = 32,
    max_len: int = 129,
    val_fraction: float = 0.1,
    train_shards: int = 8,
    val_shards: int = 2,
    seed: int = 0,
) -> None:
    """max_len: bytes per chunk at most (a recipe's block_size + 1 uses every byte of the longest)."""
    if not 2 <= min_len <= max_len:
        raise SystemExit(
            f"--min_len and --max_len must satisfy 2 <= min_len <= max_len, got {min_len}, {max_len}"
        )
    splits = split_chunks(SOURCE_MODULES, min_len, max_len, val_fraction, seed)
    for (name, samples), num_shards in zip(splits.items(), (train_shards, val_shards)):
        order = np.random.default_rng(seed + 1).permutation(len(samples))  # each shard mixes all modules
        index = write_shards(
            (samples[i] for i in order), os.path.join(out, name), max_count=-(-len(samples) // num_shards)
        )
        tokens = sum(len(s["tokens.npy"]) for s in samples)
        print(
            f"{name}: {len(samples)} chunks, {tokens} bytes in {len(index['shards'])} shards "
            f"-> {os.path.join(out, name)}"
        )


if __name__ == "__main__":
    fire.Fire(main)
