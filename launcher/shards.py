"""Writing WebDataset tar shards plus the index.json that loaders read their sizes from."""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import webdataset as wds

from launcher.data import INDEX_NAME


def write_shards(samples: Iterable[dict], out_dir: str, *, max_count: int,
                 max_bytes: int = 1 << 30, classes: Sequence[str] = (),
                 prefix: str = "shard") -> dict:
    """Write samples (dicts with __key__, an image extension and cls) to out_dir/PREFIX-NNNNNN.tar.

    Returns the index written beside them: {"shards": {name: count}, "classes": [...]}.
    """
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, int] = {}
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise ValueError(f"no samples to write to {out_dir}")
    index = {"shards": counts, "classes": list(classes)}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=1)
    return index
