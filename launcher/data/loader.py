"""Training and validation data: WebDataset tar shards, any map-style torch Dataset, or an
IterableDataset (split by rank and worker in launcher/data/iterable.py).

Shards are split by rank and by DataLoader worker inside our own IterableDataset, never through
Accelerate's iterable-dataset dispatch (which either reads everything on rank 0 or shards a
second time). Each epoch has a layout, a pure function of (index, seed, epoch, ranks, workers):

- shard order is shuffled per epoch, then, largest first, each shard goes to the rank, and
  within it to the worker, holding the fewest samples so far: uneven shards give even shares;
- every rank takes the same number of batches (from the index, so no rank waits forever in an
  all-reduce for one that ran out); each worker's quota of whole batches is its share of that,
  proportional to its samples. A worker with more samples than its quota drops the rest, one
  with fewer starts a new, reshuffled pass: both are counted and reported;
- samples pass a shuffle buffer seeded from (seed, epoch, rank, worker, pass), and random
  augmentations are seeded per sample, so a rerun or a resumed run sees the same inputs.

Workers assemble whole batches and tag each with where the worker stands (batches done, pass,
samples read in the pass). The DataLoader returns workers' batches round-robin, so a rank's
position (`Position`: those tags plus the last worker served) is enough to restart the stream
mid-epoch exactly where it stopped: workers skip what was read without decoding it, and the
round-robin restarts at the worker that was next. (Layouts and positions: launcher/data/layout.py.)

Undecodable samples, class labels outside the task's classes, and unreadable or truncated tars
(any error while reading one ends it) are skipped, never retried or slept on (only a remote
shard's failed download is retried, launcher/data/remote.py; the samples it still loses then are
counted as unreachable), and travel with the batch as error records (shard, key, reason, samples
lost, and for those the kind "unreachable") for the trainer
to count, log, and stop on above a threshold. Validation reads each sample exactly once across
ranks (no padding, no drop).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from launcher.config import ConfigError, DataError
from launcher.global_batch import GlobalBatch
from launcher.data.batch import Batch, Collate, collate
from launcher.data.device_decode import decode_batch
from launcher.data.index import read_index
from launcher.data.iterable import (IterableStream, check_states_fit, epoch_samples, first_items, is_iterable,
                                    resume_note)
from launcher.data.layout import EpochLayout, EpochLayouts, Position, derive_seed
from launcher.data.spec import Shards, Synthetic
from launcher.data.stream import ShardStream, check_label, error_reason, kept_rngs, seed_augmentation
from launcher.data.tar_reader import shard_samples


class EpochBatches:
    """A batch sampler whose batches the loader replaces each epoch (a persistent DataLoader keeps it)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def set(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class KeyedDataset(Dataset):
    """A map-style dataset whose items carry their index as the sample key. Training augmentations
    are seeded from (seed, epoch, index), so a resumed run sees the same inputs: torch's CPU
    generator per sample, Python's `random` and numpy per batch (seeded from its first index;
    seeding them per sample costs more than a small sample does). In the main process torch's
    generator is saved and restored once per batch, so the model's dropout stream is left alone
    (`kept_rngs`).

    Seeding torch's generator costs about 1 us a sample, as much as reading a row of an in-memory
    tensor. A batch is therefore first read with its first sample's seed alone; if torch's
    generator is then where that seed left it, no sample drew from it, and the items are what
    per-sample seeds would have given. Otherwise the batch is read again with a seed per sample,
    and so is every later batch (`draws_random`). Either way a sample's augmentation depends only
    on (seed, epoch, index), never on the batch it lands in."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int | torch.Tensor, training: bool):
        self.dataset, self.seed, self.training = dataset, seed, training
        self.epoch_source = epoch  # an int, or a shared tensor the main process sets (persistent workers)
        self._base_seed: tuple[int, int] | None = None  # (epoch, its seed)
        self.draws_random = False  # a sample drew from torch's generator: seed each one from now on

    @property
    def base_seed(self) -> int:
        epoch = int(self.epoch_source)
        if self._base_seed is None or self._base_seed[0] != epoch:
            self._base_seed = (epoch, derive_seed(self.seed, "augment", epoch))
        return self._base_seed[1]

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def _seed(i: int, base_seed: int) -> int:
        return (base_seed + (i + 1) * 0x9E3779B97F4A7C15) & (2**63 - 1)  # golden-ratio stride

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> "KeyedItems":
        """One batch (the DataLoader calls this with a batch's indices)."""
        dataset = self.dataset
        if not self.training:
            return KeyedItems([dataset[i] for i in indices], indices)
        base_seed = self.base_seed
        first = self._seed(indices[0], base_seed)
        with kept_rngs():
            seed_augmentation(first)  # `random` and numpy: once per batch
            if not self.draws_random:
                seeded = torch.default_generator.get_state()
                items = [dataset[i] for i in indices]
                if torch.equal(torch.default_generator.get_state(), seeded):
                    return KeyedItems(items, indices)
                self.draws_random = True
                seed_augmentation(first)  # `random` and numpy as the first read found them
            items = []
            for i in indices:
                torch.default_generator.manual_seed(self._seed(i, base_seed))
                items.append(dataset[i])
        return KeyedItems(items, indices)


class KeyedItems(list):
    """A batch's samples from a `KeyedDataset`, with their dataset indices (the sample keys)."""

    def __init__(self, samples: list, indices: list[int]):
        super().__init__(samples)
        self.indices = indices


class MapCollate:
    """A map-style dataset's batch: its keyed items collated (by the recipe's function, or
    default_collate) into a `Batch`, as shard streams yield it. Items whose class label is out of
    range (`check_label`) are left out and travel as error records, named by `source` and index
    (a map-style batch is one read of fixed indices: it is not refilled, so it is smaller)."""

    def __init__(self, collate_fn: Collate | None = None, num_classes: int | None = None, source: str = "dataset"):
        self.collate_fn, self.num_classes, self.source = collate_fn, num_classes, source

    def __call__(self, items: KeyedItems) -> Batch:
        kept, keys, errors = [], [], []
        for item, index in zip(items, items.indices):
            try:
                check_label(item, self.num_classes)
            except ValueError as error:
                errors.append({"shard": self.source, "key": str(index), "reason": error_reason(error), "samples": 1})
                continue
            kept.append(item)
            keys.append(str(index))
        return Batch(data=collate(kept, self.collate_fn) if kept else None, size=len(kept), keys=keys, errors=errors)


class BufferReturns:
    """Hands workers' ring buffers (`BufferRing`) back: a buffer goes back to its worker once
    nothing in this process refers to its memory (a kept batch, a view or a numpy array of it all
    hold it), in each worker's order; so a consumer may keep batches (`list()`), at the cost of new
    buffers while it does. It lives as long as its DataLoader: a persistent one's last batches of
    an epoch are handed back during the next epoch."""

    def __init__(self, workers: int):
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()  # per worker, read by it
        # oldest first
        self.waiting: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def track(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            ticket, batch.buffer = batch.buffer, None
            if ticket is not None:
                worker, number = ticket
                storages = [StorageWeakRef(t.untyped_storage()) for t in batch.tensors()]
                self.waiting[worker].append((number, storages))
            for worker, queue in self.waiting.items():
                while queue and all(ref.expired() for ref in queue[0][1]):
                    self.released[worker] = queue.popleft()[0] + 1
            yield batch


# ---- loaders ----------------------------------------------------------------------------------


@dataclass
class EpochLoader:
    """A DataLoader and what lives as long as it: a map-style dataset's per-epoch batches, or
    the shard workers' buffer returns."""

    data_loader: DataLoader
    batches: EpochBatches | None = None
    returns: BufferReturns | None = None


class SplitLoader:
    """One split of a recipe's data as seen by one rank: sizes, layout, and a DataLoader per epoch."""

    def __init__(self, source: Shards | Dataset, *, rank: int, world: int, seed: int,
                 batch_size: int, num_workers: int, training: bool, batches_per_epoch: int | None = None,
                 grad_accum_steps: int = 1, batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 pin_memory: bool = True, prefetch_factor: int = 2, persistent_workers: bool = False,
                 data_on_gpu: bool = False, collate_fn: Collate | None = None,
                 device: torch.device = torch.device("cpu"), train_samples: int | None = None, max_steps: int = 0):
        self.source, self.training = source, training
        self.collate_fn = collate_fn  # the recipe's (DataSpec.collate), or None: default_collate
        split = "training" if training else "validation"
        if data_on_gpu and not isinstance(source, (Shards, Synthetic)):
            raise ConfigError(f"--data_on_gpu decodes shard images on the device, but this recipe's {split} data is "
                              f"a {type(source).__name__} (it decodes in __getitem__); write it to shards "
                              "(`launcher shards`) or drop the flag")
        if data_on_gpu and isinstance(source, Shards) and (not source.images or collate_fn is not None):
            raise ConfigError(f"--data_on_gpu decodes (image, cls) samples, but this recipe's {split} shards have "
                              "their own decode or collate; drop the flag")
        self.data_on_gpu = data_on_gpu and isinstance(source, Shards)
        self.device = device  # where --data_on_gpu decodes: the training device
        # page-locked batches: async copies to the GPU
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor  # batches each worker prepares ahead
        self._batch_transform = batch_transform  # for a Dataset (Shards carry their own)
        self.rank, self.world, self.seed = rank, world, seed
        self.global_batch = GlobalBatch(batch_size, world, grad_accum_steps)  # training: one optimizer step's
        self.batch_size, self.num_workers = batch_size, num_workers
        self._layout_maker: EpochLayouts | None = None  # keeps the last layout (loader and report share it)
        self.persistent_workers = persistent_workers and num_workers > 0
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # read by persistent workers
        self._kept: EpochLoader | None = None  # the persistent loader
        self.worker_pids: dict[int, int] = {}  # the running DataLoader's workers: pid -> worker index
        # Set once the pre-flight knows the task (launcher/train/build.py): the classes an (input, label)
        # sample's label must lie in; samples outside are unreadable (check_label). None: unchecked.
        self.num_classes: int | None = None
        if isinstance(source, Synthetic):
            self.index = None
            self.total = source.length
        elif isinstance(source, Shards):
            self.index = read_index(source.urls, source.index)
            self.total = self.index.total
            if training and len(self.index.urls) < world:
                raise ConfigError(f"{len(self.index.urls)} training shards for {world} processes: each process "
                                  f"needs at least one; rewrite them with `launcher shards SOURCE OUT "
                                  f"--num_shards={world * max(num_workers, 1)}` or use fewer processes")
        elif is_iterable(source):  # launcher/data/iterable.py: its epoch length, else --max_steps
            self.index = None
            length = epoch_samples(source, train_samples, max_steps, split)
            if length is None and training:  # a stream without a length: one epoch of --max_steps steps
                batches_per_epoch = self.global_batch.micro_batches_in_steps(max_steps)
            self.total = (length if length is not None
                          else self.global_batch.samples_in_micro_batches(batches_per_epoch or 0))
        else:
            self.index = None
            self.total = len(source)
        # Training, per rank: whole optimizer steps of the global batch (0 when the split is smaller
        # than one; the plan refuses that); unless given.
        steps = self.global_batch.steps_in_samples(self.total)
        self.batches_per_epoch = (batches_per_epoch if batches_per_epoch is not None
                                  else self.global_batch.micro_batches_in_steps(steps)) if training else None

    @property
    def classes(self) -> list[str]:
        return self.index.classes if self.index else list(getattr(self.source, "classes", []))

    @property
    def batch_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.source.batch_transform if isinstance(self.source, (Shards, Synthetic)) else self._batch_transform

    @property
    def workers_per_rank(self) -> int:
        """Logical workers: DataLoader processes, or the main process when num_workers is 0."""
        return max(self.num_workers, 1)

    def layout(self, epoch: int) -> EpochLayout:
        return self._layouts()(epoch)

    def _layouts(self) -> EpochLayouts:
        batches = self.batches_per_epoch if self.training else None
        if self._layout_maker is None or self._layout_maker.batches_per_rank != batches:
            self._layout_maker = EpochLayouts(self.index, self.seed, self.world, self.workers_per_rank,
                                              self.batch_size, batches)
        return self._layout_maker

    def example_samples(self, count: int) -> list:
        """The split's first `count` readable samples (per-sample decode and transform done, not
        collated), read in this process, for the pre-flight check and the plan. The global RNGs
        are left as they were. What the recipe's dataset or transform raises propagates."""
        with kept_rngs(everything=True):
            seed_augmentation(derive_seed(self.seed, "example"))
            if is_iterable(self.source):
                return first_items(self.source, count)
            if not isinstance(self.source, Shards):
                return [self.source[i] for i in range(min(count, len(self.source)))]
            samples, reasons = [], []
            for url in self.index.urls[:3]:
                for raw in shard_samples(url, handler=lambda error: True):
                    if len(samples) == count:
                        return samples
                    try:
                        samples.append(self.source.prepare(raw))
                    except Exception as error:  # noqa: BLE001 - an unreadable sample is skipped, as in training
                        reasons.append(error_reason(error))
            if not samples:
                shown = ", ".join(self.index.urls[:3])
                raise DataError(f"no readable sample in the first shards ({shown}); first reasons: "
                                f"{'; '.join(dict.fromkeys(reasons[:3])) or 'none (empty shards)'}. Check the "
                                "shards, or the split's decode and transform")
            return samples

    def planned_dropped(self, epoch: int) -> int:
        """Training samples an epoch leaves unread so every rank takes the same whole batches."""
        if self.index is not None:
            return self.layout(epoch).dropped
        return self.total - self.global_batch.samples_in_micro_batches(self.batches_per_epoch)

    def loader(self, epoch: int, start: Position | None = None) -> Iterable[Batch]:
        """This rank's batches for `epoch`, from `start` (a position taken earlier) or the beginning.

        With persistent workers, every epoch that starts at its beginning reuses one DataLoader
        whose workers stay alive and read the epoch from shared memory; an epoch resumed midway
        gets a DataLoader of its own, once."""
        start = start if start is not None and start.epoch == epoch else Position(epoch)
        if isinstance(self.source, Synthetic):
            return self._synthetic(start)
        if start.batches and is_iterable(self.source):
            check_states_fit(self.source, start, self.rank, self.world)
            if self.rank == 0:
                print(resume_note(self.source, start), flush=True)
        if not self.persistent_workers or start.batches:
            loader = self._data_loader(epoch, start)
        else:
            if self._kept is None:
                self._kept = self._data_loader(self._epoch, None)
            self._epoch.fill_(epoch)
            loader = self._kept
        if loader.batches is not None:
            loader.batches.set(self._batches(epoch, start))
        batches = self._watched(loader.data_loader) if self.num_workers else loader.data_loader
        if self.data_on_gpu:
            return self._decoded(batches)
        return batches if loader.returns is None else loader.returns.track(batches)

    def _watched(self, data_loader: DataLoader) -> Iterator[Batch]:
        """The DataLoader's batches, noting its workers' pids -> worker index while they run: a
        worker's death is reported by pid (launcher/runtime/failures.py names the worker)."""
        iterator = iter(data_loader)
        self.worker_pids = {worker.pid: index for index, worker in enumerate(getattr(iterator, "_workers", ()))}
        yield from iterator

    def _decoded(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Batches of encoded images, decoded and transformed on `self.device`."""
        for batch in batches:
            with kept_rngs():  # seeding each sample's augmentation leaves the model's RNG alone
                batch = decode_batch(batch, self.source.transform, self.device, seed_augmentation)
            yield batch

    def close(self) -> None:
        """Stop persistent workers (they also stop when the loader is garbage-collected)."""
        self._kept = None

    def _data_loader(self, epoch: int | torch.Tensor, start: Position | None) -> "EpochLoader":
        """A DataLoader for one epoch from `start`, or (start None) a persistent one following `epoch`, a shared cell."""
        options = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=start is None,
                       prefetch_factor=self.prefetch_factor if self.num_workers else None,
                       # The DataLoader draws its workers' base seed from this, not from the model's global RNG.
                       generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader", int(epoch), self.rank)))
        if isinstance(self.source, Shards):
            reuse = self.num_workers > 0 and not self.data_on_gpu  # workers' batch buffers: BufferRing
            returns = BufferReturns(self.num_workers) if reuse else None
            # A worker gets its task k + prefetch_factor when the main process takes its batch k; the
            # consumer drops batch k when it takes the next one, and `BufferReturns` sees that one
            # batch later: 2 slots beyond prefetch_factor cover that with 2+ workers, 3 with one.
            ring = self.prefetch_factor + (3 if self.num_workers == 1 else 2)
            stream = ShardStream(self._layouts(), self.source, rank=self.rank, seed=self.seed,
                                 training=self.training, epoch=epoch, start=start, data_on_gpu=self.data_on_gpu,
                                 released=returns.released if returns else None, ring=ring, collate_fn=self.collate_fn,
                                 num_classes=self.num_classes)
            return EpochLoader(DataLoader(stream, batch_size=None, **options), returns=returns)
        if is_iterable(self.source):
            stream = IterableStream(self.source, rank=self.rank, world=self.world, workers=self.workers_per_rank,
                                    batch_size=self.batch_size, batches_per_rank=self.batches_per_epoch,
                                    epoch=epoch, start=start, collate_fn=self.collate_fn)
            return EpochLoader(DataLoader(stream, batch_size=None, **options))
        batches = EpochBatches()
        dataset = KeyedDataset(self.source, self.seed, epoch, self.training)
        collate_items = MapCollate(self.collate_fn, self.num_classes, type(self.source).__name__)
        return EpochLoader(DataLoader(dataset, batch_sampler=batches, collate_fn=collate_items, **options),
                           batches=batches)

    def _batches(self, epoch: int, start: Position) -> list[list[int]]:
        """A map-style dataset's batches of indices for this rank in `epoch`, from `start`."""
        if self.training:
            sampler = DistributedSampler(range(self.total), num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            order = list(sampler)[start.batches * self.batch_size:]
            return list(BatchSampler(order, self.batch_size, drop_last=True))
        # every sample exactly once across ranks, so no DistributedSampler padding
        return list(BatchSampler(range(self.rank, self.total, self.world), self.batch_size, drop_last=False))

    def _synthetic(self, start: Position) -> Iterator[Batch]:
        """The same random batch again and again (pinned once on a GPU machine)."""
        source = self.source
        batch = source.batch(self.batch_size, derive_seed(self.seed, "synthetic", self.rank))
        if self.pin_memory:
            batch = batch.pin_memory()
        if self.training:
            count = self.batches_per_epoch - start.batches
            yield from itertools.repeat(batch, count)
            return
        mine = len(range(self.rank, source.length, self.world))  # each sample once across ranks
        for first in range(0, mine, self.batch_size):
            size = min(self.batch_size, mine - first)
            yield batch if size == self.batch_size else Batch(
                data=pytree.tree_map(lambda x: x[:size] if isinstance(x, torch.Tensor) else x, batch.data), size=size)
