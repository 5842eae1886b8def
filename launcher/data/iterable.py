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
batch does (launcher/data/layout.py, `Position`). A Hugging Face IterableDataset (datasets >= 2.18)
resumes through its own `state_dict`, as torchdata's StatefulDataLoader does it: each worker's copy
has its own state, so a training batch also carries its worker's state right after it, the main
process keeps per worker the state of the last batch it consumed, and the checkpoint stores those
(as JSON, in rank-N.json); on resume each worker loads its state and reads on from there: the
consumed items do not go through the dataset's pipeline again (HF skips whole shards, and within
one drops the rows before its place ahead of any map()); a worker passes again only over what the
other workers took after its place. A dataset with a `.shuffle(buffer_size=...)` does not: its
state does not hold the buffer (`why_no_state`). Such a dataset, any other iterable, a state JSON
cannot hold, or a checkpoint without states (either kind of checkpoint is read by either kind of
dataset) resumes by reading each slice again from the epoch's start and dropping the items read
before the checkpoint, undecoded by the loader: exact for a dataset that yields the same items in
the same order for the same epoch (a file reader, a seeded shuffle such as HF's), at the cost of
the re-reading. The line a resume prints says which, and why (`resume_note`).
"""

from __future__ import annotations

import itertools
import json
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
        stateful = self.training and has_state(self.source)  # its batches carry its state, for a checkpoint
        saved = start.states.get(worker) if stateful else None
        batch = BatchBuilder(worker, self.batch_size, None, self.collate_fn)
        for repeat in itertools.count(first_pass) if quota is not None else range(1):
            # the dataset continues after its last consumed batch
            resumed = saved if repeat == first_pass else None
            reader = SliceReader(self, epoch, worker, resumed, skip if resumed else 0)
            read = reader.first
            for read, (key, item) in enumerate(reader, start=reader.first + 1):
                if resumed is None and (repeat, read) <= (first_pass, skip):  # read before the checkpoint
                    continue
                batch.add(item, key, repeated=repeat > 0)
                if batch.count == self.batch_size:
                    done += 1
                    yield batch.emit(done, [repeat, read], reader.state() if stateful else None)
                    if done == quota:
                        return
            if quota is not None and read == 0:
                raise DataError(f"rank {self.rank}, worker {worker}: its slice of the training "
                                f"{type(self.source).__name__} is empty (the stream has fewer items than "
                                f"{self.world} process(es) x {self.workers} worker(s)); use fewer, or more data")
        if batch.count:  # validation: the last, partial batch
            yield batch.emit(done, [0, 0])


def has_state(source: Any) -> bool:
    """Whether `source` resumes through its own `state_dict` (a Hugging Face IterableDataset)."""
    return is_hugging_face(source) and why_no_state(source) is None


def why_no_state(source: Any) -> str | None:
    """Why a Hugging Face IterableDataset cannot resume through its state_dict, or None if it can."""
    if not hasattr(source, "load_state_dict"):
        return "this datasets version has no state_dict (it came in 2.18)"
    # A `.shuffle(buffer_size=...)`: its state does not hold the buffer, so each worker would refill
    # its own at a different place and the workers' slices, cut from one shuffled order, would
    # overlap (items twice in the epoch, others never). Found in the datasets' chain of example
    # iterables (private: a chain that cannot be walked counts as shuffled, the exact way).
    pending = [getattr(source, "_ex_iterable", None)]
    if pending[0] is None:
        return "its shuffle cannot be seen (this datasets version's example iterables are unknown)"
    while pending:
        node = pending.pop()
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return "it shuffles through a buffer (.shuffle(buffer_size=...)), which its state does not hold"
        inner = (getattr(node, "ex_iterable", None), *getattr(node, "ex_iterables", ()))
        pending += [n for n in inner if n is not None]
    return None


class SliceReader:
    """(key, item) of one reader's slice of the stream for one epoch: from the start, or (`resumed`,
    a Hugging Face state_dict) after the slice's item number `first`, without reading again what
    came before it. `state()` is the dataset's state after the last item read: None for a dataset
    without one, or for one that JSON cannot hold (a checkpoint stores it as JSON; nothing is unpickled)."""

    def __init__(self, stream: IterableStream, epoch: int, worker: int, resumed: dict | None, first: int):
        self.first, self.rank_items = first, None
        self.resumable: bool | None = None  # whether its state can go into a checkpoint (`state`)
        if is_hugging_face(stream.source):
            from datasets.distributed import split_dataset_by_node

            self.rank_items = split_dataset_by_node(stream.source, rank=stream.rank, world_size=stream.world)
            self.rank_items.set_epoch(epoch)
            if resumed is not None:
                self.rank_items.load_state_dict(resumed)
            self.items = self._hugging_face_items(stream, worker, resumed is not None)
        else:
            if hasattr(stream.source, "set_epoch"):
                stream.source.set_epoch(epoch)
            # rank r's items, and worker w's of those
            first_item, readers = stream.rank + stream.world * worker, stream.world * stream.workers
            self.items = ((str(first_item + readers * n), item)
                          for n, item in enumerate(itertools.islice(stream.source, first_item, None, readers)))

    def _hugging_face_items(self, stream: IterableStream, worker: int, resumed: bool) -> Iterator[tuple[str, Any]]:
        readers = stream.workers
        # `iter(batch_size=1)`, not `iter(dataset)`: in a DataLoader worker the latter splits by
        # worker itself, by whole shards (a worker past the shard count gets nothing)
        examples = ({name: values[0] for name, values in one.items()} for one in self.rank_items.iter(batch_size=1))
        # resumed right after this worker's last item: the other workers' next items come first
        mine = itertools.islice(examples, readers - 1 if resumed else worker, None, readers)
        return ((f"{stream.rank}/{worker + readers * n}", item) for n, item in enumerate(mine, start=self.first))

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self.items

    def state(self) -> dict | None:
        if self.rank_items is None or not hasattr(self.rank_items, "state_dict"):
            return None
        state = self.rank_items.state_dict()
        if self.resumable is None:  # its structure is the same after every item: checked once
            try:
                self.resumable = bool(json.dumps(state))
            except (TypeError, ValueError):
                self.resumable = False
        return state if self.resumable else None  # None: a resume reads the slice again (`resume_note`)


def check_states_fit(source: Any, start: Position, rank: int, world: int) -> None:
    """A checkpoint's dataset states against this dataset's own: a DataError, before any worker
    starts, if they come from another pipeline (a map() added or removed, another format), which
    the dataset would fail to load (a KeyError deep in a worker) or load into the wrong steps."""
    if not (start.states and has_state(source)):
        return
    from datasets.distributed import split_dataset_by_node

    rank_items = split_dataset_by_node(source, rank=rank, world_size=world)
    rank_items.set_epoch(start.epoch)
    # private: builds, reads nothing
    prepare = getattr(rank_items, "_prepare_ex_iterable_for_iteration", None)
    if prepare is None:
        return  # an unknown datasets version: the dataset's own load_state_dict is the check
    prepare(batch_size=1)
    expected = pipeline_steps(rank_items.state_dict())
    for worker, state in sorted(start.states.items()):
        if pipeline_steps(state) != expected:
            raise DataError(f"the checkpoint's state of the training {type(source).__name__} (worker {worker}: "
                            f"{' > '.join(pipeline_steps(state))}) does not fit this dataset's "
                            f"({' > '.join(expected)}): resume with the dataset the checkpoint was written with, "
                            "or from a checkpoint at an epoch's end")


def pipeline_steps(state: Any) -> list[str]:
    """The types of a Hugging Face state's chain of example iterables, outermost first, and its epoch."""
    steps = [f"epoch {state.get('epoch')}"] if isinstance(state, dict) else []
    while isinstance(state, dict):
        steps += [state["type"]] if "type" in state else []
        state = state.get("examples_iterable")
    return steps


def resume_note(source: Any, start: Position) -> str:
    """The line a mid-epoch resume prints: how each reader finds its place, and why."""
    name = f"the {type(source).__name__} {start.batches} batches into epoch {start.epoch}"
    if has_state(source) and start.states:
        return (f"resuming {name} through its state_dict: each reader continues after the last batch "
                "the run consumed from it")
    if not is_hugging_face(source):
        why = "it has no state_dict"
    else:
        why = why_no_state(source) or "the checkpoint holds no dataset state (written without one, or it was not JSON)"
    return (f"resuming {name}: {why}, so each reader reads its slice again from the epoch's start and drops "
            "what it had read (exact if the dataset gives the same items in the same order each time)")


def first_items(source: Any, count: int) -> list:
    """The dataset's first `count` items, read in this process (for the pre-flight check)."""
    return list(itertools.islice(iter(source), count))
