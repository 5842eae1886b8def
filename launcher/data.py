"""Training and validation data: WebDataset tar shards, or any map-style torch Dataset.

Shards are split by rank and by DataLoader worker inside our own IterableDataset, never through
Accelerate's iterable-dataset dispatch (which either reads everything on rank 0 or shards a
second time). Shard order and the sample shuffle buffer are seeded from
(seed, epoch, rank, worker), so every epoch has a new order and a rerun repeats it.

Epoch length is a property of the run, computed from the shard index: every rank takes the
same number of batches, so no rank waits forever in an all-reduce for one that ran out.
Training streams therefore cycle through their shards if a rank's share is short.
Validation reads each sample exactly once across ranks (no padding, no drop).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from launcher.config import ConfigError

INDEX_NAME = "index.json"


@dataclass
class Shards:
    """A split stored as WebDataset tar shards, each sample an image and its `cls` label."""

    urls: str | Sequence[str]  # paths, brace patterns, `pipe:` commands, or a directory with index.json
    transform: Callable[[Image.Image], torch.Tensor]  # decoded PIL image -> input tensor
    shuffle_buffer: int = 1000  # samples held for shuffling (training only)
    image_keys: Sequence[str] = ("png", "jpg", "jpeg", "webp")  # first present one is the image
    index: str = ""  # index.json for remote (`pipe:`) shards; local shards use the one beside them


@dataclass
class DataSpec:
    """What a recipe's build_data returns."""

    train: Shards | Dataset
    val: Shards | Dataset | None = None
    classes: Sequence[str] | None = None  # class names; None: from the shard index


@dataclass
class ShardIndex:
    urls: list[str]
    counts: list[int]
    classes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- index ---------------------------------------------------------------------------------


def read_index(urls: str | Sequence[str], index_file: str = "") -> ShardIndex:
    """Resolve a shard source to its shard URLs and sample counts (from index.json, else a scan)."""
    if isinstance(urls, str) and os.path.isdir(urls):
        path = os.path.join(urls, INDEX_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"shard directory {urls} has no {INDEX_NAME}; write shards with "
                              "scripts/make_demo_data.py or list the .tar files instead")
        index = _load_index_file(path)
        names = list(index["shards"])
        return ShardIndex([os.path.join(urls, n) for n in names], [index["shards"][n] for n in names],
                          list(index.get("classes", [])))
    expanded = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        expanded.extend(expand_urls(url))
    if not expanded:
        raise ConfigError(f"no shards in {urls!r}")
    local = [u for u in expanded if not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(expanded)} shard files missing, first {missing[0]}; "
                          "build them (e.g. `make demo` writes data/digits) or fix the path")
    index_path = index_file or (os.path.join(os.path.dirname(local[0]), INDEX_NAME) if local else None)
    index = _load_index_file(index_path) if index_path and os.path.isfile(index_path) else {"shards": {}}
    counts = []
    for url in expanded:
        name = os.path.basename(url)
        if name in index["shards"]:
            counts.append(index["shards"][name])
        elif url.startswith("pipe:"):
            raise ConfigError(f"no sample count for {url}: pipe: sources need an index; pass "
                              f"Shards(..., index=PATH/{INDEX_NAME}) with the one written beside the shards")
        else:
            counts.append(_count_samples(url))
    return ShardIndex(expanded, counts, list(index.get("classes", [])))


def _load_index_file(path: str) -> dict:
    try:
        with open(path) as f:
            index = json.load(f)
        assert isinstance(index.get("shards"), dict)
        return index
    except (OSError, ValueError, AssertionError) as error:
        raise ConfigError(f"unreadable shard index {path} ({error}); rewrite it with the shard writer")


def _count_samples(path: str) -> int:
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


# ---- streaming ------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """Samples (input, label, key) from this rank's share of the shards, split across workers."""

    def __init__(self, index: ShardIndex, spec: Shards, *, rank: int, world: int, seed: int,
                 training: bool):
        self.index, self.spec = index, spec
        self.rank, self.world, self.seed, self.training = rank, world, seed, training
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self) -> list[str]:
        order = list(range(len(self.index.urls)))
        if self.training:
            random.Random(derive_seed(self.seed, "shards", self.epoch)).shuffle(order)
        return [self.index.urls[i] for i in order[self.rank::self.world]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.rank_shards()[worker::workers]
        if not shards:
            return
        passes = itertools.count() if self.training else range(1)
        for repeat in passes:  # training cycles so a short share never ends a rank's epoch early
            samples = tarfile_samples([{"url": url} for url in shards])
            if self.training:  # shuffled within a pass: one full pass comes before any repeat
                rng = random.Random(derive_seed(self.seed, "samples", self.epoch, self.rank, worker, repeat))
                samples = shuffle_buffer(samples, self.spec.shuffle_buffer, rng)
            for sample in samples:
                yield self._decode(sample)

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int, str]:
        image_key = next((k for k in self.spec.image_keys if k in sample), None)
        if image_key is None or "cls" not in sample:
            raise ValueError(f"sample {sample['__key__']} in {sample['__url__']} lacks an image "
                             f"({'/'.join(self.spec.image_keys)}) or cls")
        image = Image.open(io.BytesIO(sample[image_key]))
        image.load()
        return self.spec.transform(image), int(sample["cls"]), sample["__key__"]


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: fill `size` items, then emit a random one per new item."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class KeyedDataset(Dataset):
    """A map-style dataset whose items also carry their index as the sample key."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i][:2]
        return x, y, str(i)


# ---- loaders ----------------------------------------------------------------------------------


class SplitLoader:
    """One split of a recipe's data as seen by one rank: sizes, and a DataLoader per epoch."""

    def __init__(self, source: Shards | Dataset, *, rank: int, world: int, seed: int,
                 batch_size: int, num_workers: int, training: bool):
        self.source, self.training = source, training
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        if isinstance(source, Shards):
            self.index = read_index(source.urls, source.index)
            self.total = self.index.total
            if training and len(self.index.urls) < world:
                raise ConfigError(f"{len(self.index.urls)} training shards for {world} processes: "
                                  "each process needs at least one; write more, smaller shards")
        else:
            self.index = None
            self.total = len(source)

    @property
    def classes(self) -> list[str]:
        return self.index.classes if self.index else list(getattr(self.source, "classes", []))

    def loader(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, "loader", epoch, self.rank, self.training))
        common = dict(batch_size=self.batch_size, generator=generator,
                      pin_memory=torch.cuda.is_available())
        if isinstance(self.source, Shards):
            stream = ShardStream(self.index, self.source, rank=self.rank, world=self.world,
                                 seed=self.seed, training=self.training)
            stream.set_epoch(epoch)
            workers = min(self.num_workers, len(stream.rank_shards()))
            return DataLoader(stream, num_workers=workers, **common)
        dataset = KeyedDataset(self.source)
        if self.training:
            sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            return DataLoader(dataset, sampler=sampler, num_workers=self.num_workers,
                              drop_last=True, **common)
        # Validation: every sample exactly once across ranks, so no DistributedSampler padding.
        mine = Subset(dataset, range(self.rank, len(dataset), self.world))
        return DataLoader(mine, num_workers=self.num_workers, **common)
