"""Iterable splits: a `torch.utils.data.IterableDataset`, or a Hugging Face `datasets.IterableDataset`
(`load_dataset(..., streaming=True)`), read as one rank's batches (`IterableStream`).

How it is split. Each of the world x num_workers readers (the rank's DataLoader workers, or the
rank itself with --num_workers=0) reads its own slice of the stream, so the dataset's `__iter__`
must not split by rank or worker itself:

- a torch IterableDataset: rank r takes every world-th item (r, r + world, ...), and its worker w
  every num_workers-th of those, as `datasets.distributed.split_dataset_by_node` and WebDataset's
  `split_by_node`/`split_by_worker` do: every reader iterates the whole stream and keeps its items;
- a Hugging Face IterableDataset: rank r takes `split_dataset_by_node(dataset, r, world)` (whole
  shards when their count is a multiple of world, else every world-th example), and its worker w
  every num_workers-th example of that. Its `set_epoch(epoch)` reshuffles each epoch (so does any
  dataset's `set_epoch`, called before each epoch's pass).

Epoch length. One epoch is `len(dataset)` samples if the dataset has a length, else
`DataSpec(train_samples=N)`, else --max_steps optimizer steps (one epoch). Every rank takes the
same number of batches (that length split into whole optimizer steps; the rest is dropped), each
worker an equal share of them: a reader whose slice runs out first starts its slice again (those
samples are counted as repeated), so no rank waits in an all-reduce for one that ran out. A slice
with no item at all is a DataError. Validation reads each reader's slice once, all of it.

Resume. A batch carries its reader's place ([batches, pass, items read in the pass]) as a shard
batch does (launcher/data/layout.py, `Position`); a run resumed mid-epoch reads each slice again
from the epoch's start and drops the items read before the checkpoint, undecoded by the loader.
That is exact for a dataset that yields the same items in the same order for the same epoch (a
file reader, a seeded shuffle such as HF's); its cost is the re-reading. A Hugging Face dataset's
own `state_dict` is not used: under DataLoader workers it lives in each worker's copy (HF points
to torchdata's StatefulDataLoader, which this launcher does not use).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from launcher.config import ConfigError, DataError
from launcher.data.batch import Batch, BatchBuilder, Collate
from launcher.data.layout import Position, apportion


def is_hugging_face(source: Any, kind: str = "IterableDataset") -> bool:
    """Whether `source` is a Hugging Face `datasets` object of that class (duck-typed: `datasets` is optional)."""
    return type(source).__name__ == kind and type(source).__module__.split(".")[0] == "datasets"


def is_iterable(source: Any) -> bool:
    """A torch IterableDataset, or a Hugging Face streaming dataset."""
    return isinstance(source, IterableDataset) or is_hugging_face(source)


def epoch_samples(source: Any, train_samples: int | None, max_steps: int, split: str) -> int | None:
    """Samples in one epoch of an iterable split: `train_samples`, else `len(source)`, else None:
    the training split's epoch is then --max_steps steps (validation reads everything)."""
    if train_samples is not None:
        return train_samples
    try:
        return len(source)
    except TypeError:  # no __len__: a stream
        if split == "training" and not max_steps:
            raise ConfigError(f"the training split is a {type(source).__name__} without a length, so an epoch has "
                              "no end: set DataSpec(train_samples=N) (samples in one epoch) or --max_steps") from None
        return None


class IterableStream(IterableDataset):
    """One rank's batches of an iterable split for one epoch (see the module docstring). `epoch` is
    an int, or a shared one-element tensor the main process sets (persistent workers)."""

    def __init__(self, source: Any, *, rank: int, world: int, workers: int, batch_size: int,
                 batches_per_rank: int | None, epoch: int | torch.Tensor, start: Position | None = None,
                 collate_fn: Collate | None = None):
        self.source, self.rank, self.world, self.workers = source, rank, world, workers
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank  # None: validation, read it all
        self.epoch_source, self.start, self.collate_fn = epoch, start, collate_fn

    @property
    def training(self) -> bool:
        return self.batches_per_rank is not None

    def __iter__(self) -> Iterator[Batch]:
        epoch = int(self.epoch_source)
        start = self.start if self.start is not None and self.start.epoch == epoch else Position(epoch)
        info = torch.utils.data.get_worker_info()
        slot = info.id if info else 0
        if not self.training:
            return self._batches(epoch, slot, None, start)
        quotas = apportion(self.batches_per_rank, [1] * self.workers)
        # Rotate worker ids so the DataLoader's round-robin (which starts at slot 0) continues
        # with the worker that was next when the position was taken.
        worker = (slot + start.next_worker(quotas)) % self.workers
        return self._batches(epoch, worker, quotas[worker], start)

    def _batches(self, epoch: int, worker: int, quota: int | None, start: Position) -> Iterator[Batch]:
        done, first_pass, skip = start.workers.get(worker, [0, 0, 0])
        if quota is not None and done >= quota:
            return
        batch = BatchBuilder(worker, self.batch_size, None, self.collate_fn)
        for repeat in itertools.count(first_pass) if quota is not None else range(1):
            read = 0
            for read, (key, item) in enumerate(self._items(epoch, worker), start=1):
                if (repeat, read) <= (first_pass, skip):  # read before the checkpoint
                    continue
                batch.add(item, key, repeated=repeat > 0)
                if batch.count == self.batch_size:
                    done += 1
                    yield batch.emit(done, [repeat, read])
                    if done == quota:
                        return
            if quota is not None and read == 0:
                raise DataError(f"rank {self.rank}, worker {worker}: its slice of the training "
                                f"{type(self.source).__name__} is empty (the stream has fewer items than "
                                f"{self.world} process(es) x {self.workers} worker(s)); use fewer, or more data")
        if batch.count:  # validation: the last, partial batch
            yield batch.emit(done, [0, 0])

    def _items(self, epoch: int, worker: int) -> Iterator[tuple[str, Any]]:
        """(key, item) of this reader's slice, from the epoch's start."""
        if is_hugging_face(self.source):
            from datasets.distributed import split_dataset_by_node

            rank_items = split_dataset_by_node(self.source, rank=self.rank, world_size=self.world)
            rank_items.set_epoch(epoch)
            # `iter(batch_size=1)`, not `iter(dataset)`: in a DataLoader worker the latter splits by
            # worker itself, by whole shards (a worker past the shard count gets nothing)
            examples = ({name: values[0] for name, values in one.items()} for one in rank_items.iter(batch_size=1))
            mine = itertools.islice(examples, worker, None, self.workers)
            return ((f"{self.rank}/{worker + self.workers * n}", item) for n, item in enumerate(mine))
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        # rank r's items, worker w's of those
        first, readers = self.rank + self.world * worker, self.world * self.workers
        return ((str(first + readers * n), item)
                for n, item in enumerate(itertools.islice(self.source, first, None, readers)))


def first_items(source: Any, count: int) -> list:
    """The dataset's first `count` items, read in this process (for the pre-flight check)."""
    return list(itertools.islice(iter(source), count))
