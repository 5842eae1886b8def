"""The stream of one rank's share of the tar shards in a DataLoader worker (`ShardStream`): its
shards in the epoch's layout, a shuffle buffer, per-sample seeded augmentation, whole batches
assembled in the worker, unreadable samples skipped and recorded; and the RNG helpers that keep
augmentation seeds from touching the model's random stream."""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Iterable, Iterator

import numpy
import torch
from torch.utils.data import IterableDataset

from launcher.config import DataError
from launcher.data.batch import Batch, BatchBuilder, BufferRing, Collate
from launcher.data.device_decode import EncodedBatch
from launcher.data.layout import EpochLayout, Position, WorkerShare, derive_seed
from launcher.data.remote import Unreachable
from launcher.data.spec import Shards
from launcher.data.tar_reader import shard_samples


class ShardStream(IterableDataset):
    """One rank's batches for one epoch: each DataLoader worker reads its share of the layout.

    `epoch` is an int, or a shared one-element tensor that the main process sets before each
    epoch (persistent workers keep their copy of this object across epochs); each worker then
    computes that epoch's layout itself, a pure function of the epoch."""

    def __init__(self, layouts: Callable[[int], EpochLayout], spec: Shards, *, rank: int, seed: int,
                 training: bool, epoch: int | torch.Tensor, start: Position | None = None, data_on_gpu: bool = False,
                 released: torch.Tensor | None = None, ring: int = 0, collate_fn: Collate | None = None,
                 num_classes: int | None = None):
        self.layouts, self.spec, self.epoch_source = layouts, spec, epoch
        # class labels outside 0..num_classes-1 make a sample unreadable (check_label)
        self.num_classes = num_classes
        self.collate_fn = collate_fn
        self.rank, self.seed, self.training = rank, seed, training
        self.start = start
        # pass images on undecoded (decoded on the device: launcher/data/device_decode.py)
        self.data_on_gpu = data_on_gpu
        self.released, self.ring = released, ring  # see BufferRing; ring 0: a new buffer per batch
        self._buffers: BufferRing | None = None  # made in each worker, kept by persistent ones

    def __iter__(self) -> Iterator[Batch]:
        layout = self.layouts(int(self.epoch_source))
        self.shares, self.batch_size, self.epoch = layout.ranks[self.rank], layout.batch_size, layout.epoch
        start = self.start if self.start is not None and self.start.epoch == self.epoch else Position(self.epoch)
        info = torch.utils.data.get_worker_info()
        slot = info.id if info else 0
        # Rotate worker ids so the DataLoader's round-robin (which starts at slot 0) continues
        # with the worker that was next when the position was taken.
        offset = start.next_worker([s.batches for s in self.shares]) if self.training else 0
        if info and self.ring and self.released is not None and self._buffers is None:
            self._buffers = BufferRing(self.ring, self.released, slot)
        batches = self._batches((slot + offset) % len(self.shares), start)
        yield from batches if info else keeping_rngs(batches)

    def _batches(self, worker: int, start: Position) -> Iterator[Batch]:
        share = self.shares[worker]
        done, first_pass, skip = start.workers.get(worker, [0, 0, 0])
        if self.training and done >= share.batches:
            return
        batch = (EncodedBatch(worker, self.batch_size) if self.data_on_gpu else
                 BatchBuilder(worker, self.batch_size, self._buffers, self.collate_fn))
        reasons: list[str] = []  # the first few, for the error when nothing is readable
        for repeat in itertools.count(first_pass) if self.training else range(1):
            usable = 0
            for n, sample, errors in self._pass(share, worker, repeat):
                if (repeat, n) < (first_pass, skip):  # read before the checkpoint: skip undecoded
                    usable += 1
                    continue
                # Errors count once per epoch: a repeat pass re-reads the same shards.
                reported = batch.errors if repeat == 0 else []
                reported += errors
                item = self._decode(sample, repeat, reported) if sample is not None else None
                if item is None:
                    if reported and len(reasons) < 3:
                        reasons.append(reported[-1]["reason"])
                    continue
                usable += 1
                batch.add(*item, repeated=repeat > 0)
                if batch.count == self.batch_size:
                    done += 1
                    yield batch.emit(done, [repeat, n + 1])
                    if self.training and done == share.batches:
                        return
            if self.training and usable == 0:
                shown = ", ".join(share.shards[:3]) + (" ..." if len(share.shards) > 3 else "")
                raise DataError(f"no readable sample in {shown} (rank {self.rank}, worker {worker}); first "
                                f"reasons: {'; '.join(dict.fromkeys(reasons)) or 'none given'}. Check the "
                                "shards, or the split's decode and transform")
        if batch.count or batch.errors:  # validation: the last, partial batch
            yield batch.emit(done, [0, 0])

    def _pass(self, share: WorkerShare, worker: int, repeat: int) -> Iterator[tuple[int, dict | None, list]]:
        """(index in pass, raw sample, errors met while reading it); errors at the end come with None."""
        pending: list[dict] = []

        def raw_samples() -> Iterator[dict]:
            for url, count in zip(share.shards, share.counts):
                failures: list[Exception] = []
                seen = 0
                try:  # shard_samples hands its errors over; this also catches what grouping raises
                    for sample in shard_samples(url, handler=lambda e: failures.append(e) or True):
                        seen += 1
                        yield sample
                except Exception as error:  # noqa: BLE001 - the shard's rest is counted, the stream goes on
                    failures.append(error)
                if failures:  # truncated, unreadable or unreachable tar: the rest of the shard is lost
                    pending.append({"shard": url, "key": None, "reason": error_reason(failures[0]),
                                    "samples": max(count - seen, 0), **lost_kind(failures[0])})

        samples: Iterable[dict] = raw_samples()
        if self.training:  # shuffled within a pass: one full pass comes before any repeat
            rng = random.Random(derive_seed(self.seed, "samples", self.epoch, self.rank, worker, repeat))
            samples = shuffle_buffer(samples, self.spec.shuffle_buffer, rng)
        n = -1
        for n, sample in enumerate(samples):
            errors, pending[:] = pending[:], []
            yield n, sample, errors
        if pending:
            yield n + 1, None, list(pending)

    def _decode(self, sample: dict, repeat: int, errors: list) -> tuple | None:
        """(sample, key), or with `data_on_gpu` ((bytes, label, key, shard, augmentation seed),); None if unreadable.
        A sample whose decode or transform raises, or whose class label is out of range, is unreadable:
        skipped and counted."""
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            if self.data_on_gpu:
                decoder = self.spec.decoder
                image_key = decoder.image_key(sample)
                seed = derive_seed(self.seed, "augment", self.epoch, key, repeat) if self.training else None
                label = int(sample[decoder.label])
                check_label((None, label), self.num_classes)
                return ((sample[image_key], label, key, url, seed),)
            if self.training:
                seed_augmentation(derive_seed(self.seed, "augment", self.epoch, key, repeat))
            prepared = self.spec.prepare(sample)
            check_label(prepared, self.num_classes)
            return prepared, key
        except Exception as error:  # noqa: BLE001 - PIL and recipes' decoders raise many types for bad bytes
            errors.append({"shard": url, "key": key, "reason": error_reason(error), "samples": 1})
            return None


def check_label(sample: Any, num_classes: int | None) -> None:
    """Raise ValueError if `sample` is an (input, integer class label) pair whose label is outside
    0..num_classes-1. The loss would index past its logits with it (an IndexError on the CPU, a
    device-side assert that ends the process on CUDA), so it is checked here, per sample, where the
    sample can still be skipped and counted like any unreadable one: one comparison a sample, in
    the DataLoader workers. Other samples (dicts, float labels, sequences) pass unchecked."""
    if num_classes is None or not isinstance(sample, (tuple, list)) or len(sample) != 2:
        return
    label = sample[1]
    if isinstance(label, torch.Tensor):
        if label.ndim != 0 or label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
            return
        label = int(label)
    elif isinstance(label, bool) or not isinstance(label, int):
        return
    if not 0 <= label < num_classes:
        raise ValueError(f"class label {label} is outside the task's {num_classes} classes (0..{num_classes - 1})")


def lost_kind(error: Exception) -> dict:
    """An error record's kind: samples of a shard still failing to download after its retries
    are "unreachable", counted apart from unreadable (corrupt) ones; others need no kind."""
    return {"kind": "unreachable"} if isinstance(error, Unreachable) else {}


def error_reason(error: Exception) -> str:
    text = str(error.args[0]) if error.args else ""
    return f"{type(error).__name__}: {text}"[:200]


def seed_augmentation(seed: int) -> None:
    """Seed torch's CPU generator, `random` and numpy's global RNG for one sample's (or batch's)
    augmentation. (Not torch.manual_seed: it also queues a seed call, with a formatted stack, for
    each uninitialised accelerator backend: slow, and a list that grows per sample.)"""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed % 2**32)


class kept_rngs:
    """In the main process, restore torch's CPU generator on exit, so seeding augmentations leaves
    the model's stream (dropout, initialisation on the CPU) alone; with `everything`, Python's
    `random` and numpy's global generator too. Training batches read in the main process
    (--num_workers=0) leave those two re-seeded for each batch, as every DataLoader worker's are:
    saving and restoring them (numpy's above all) would cost about 0.1 ms a batch, and neither the
    launcher nor torch draws from them. In a DataLoader worker: nothing to keep."""

    def __init__(self, everything: bool = False):
        self.everything = everything

    def __enter__(self):
        self.saved = None
        if torch.utils.data.get_worker_info() is None:
            self.saved = (torch.default_generator.get_state(),
                          *((random.getstate(), numpy.random.get_state()) if self.everything else ()))

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.default_generator.set_state(self.saved[0])
            if self.everything:
                random.setstate(self.saved[1])
                numpy.random.set_state(self.saved[2])


def keeping_rngs(batches: Iterator[Batch]) -> Iterator[Batch]:
    """`batches`, each made inside `kept_rngs` (a generator in the main process runs between training steps)."""
    while True:
        with kept_rngs():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: fill `size` items, then emit a random one per new item; `size` 0
    (or 1): the samples in order."""
    if size <= 1:
        yield from samples
        return
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
