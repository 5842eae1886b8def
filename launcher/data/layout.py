"""Epoch layouts and stream positions: which shards each rank and worker reads in an epoch, and
where a rank stands in it. Pure functions of (index, seed, epoch, ranks, workers), so every
process (and every DataLoader worker) computes the same layout on its own, and a position is a
few integers per worker (see launcher/data/loader.py for how the stream uses them)."""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field

from launcher.config import ConfigError
from launcher.data.index import ShardIndex


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process (unlike hash()). A tar member name
    that is not UTF-8 reaches here with its bytes as surrogates (surrogateescape), and is encoded
    back to those bytes: its sample is seeded like any other, and valid UTF-8 seeds are unchanged."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- epoch layout ---------------------------------------------------------------------------


@dataclass
class WorkerShare:
    shards: list[str]
    counts: list[int]
    batches: int | None = None  # training: whole batches this worker yields; validation: None (all)

    @property
    def samples(self) -> int:
        return sum(self.counts)


@dataclass
class EpochLayout:
    """Which shards each rank's workers read in one epoch, and how many batches each yields."""

    epoch: int
    batch_size: int
    batches_per_rank: int | None  # None: validation
    ranks: list[list[WorkerShare]]  # [rank][worker]

    def _planned(self) -> list[tuple[int, int]]:
        return [(s.samples, s.batches * self.batch_size) for shares in self.ranks for s in shares
                if s.batches is not None]

    @property
    def dropped(self) -> int:
        """Samples left unread this epoch because their worker's quota was full."""
        return sum(max(have - used, 0) for have, used in self._planned())

    @property
    def repeated(self) -> int:
        """Samples read a second time this epoch to fill a short worker's quota."""
        return sum(max(used - have, 0) for have, used in self._planned())

    def rank_samples(self) -> list[int]:
        return [sum(s.samples for s in shares) for shares in self.ranks]

    def idle_workers(self) -> int:
        return sum(not s.shards for shares in self.ranks for s in shares)


def layout_epoch(index: ShardIndex, *, epoch: int, seed: int, world: int, workers: int, batch_size: int,
                 batches_per_rank: int | None) -> EpochLayout:
    """The epoch's assignment; `batches_per_rank` None lays out validation (in order, read fully)."""
    order = list(range(len(index.urls)))
    if batches_per_rank is not None:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    ranks = []
    for rank, rank_shards in enumerate(_balance(order, index.counts, world)):
        shares = [WorkerShare([index.urls[i] for i in mine], [index.counts[i] for i in mine])
                  for mine in _balance(rank_shards, index.counts, workers)]
        if batches_per_rank is not None:
            if not any(s.samples for s in shares):
                raise ConfigError(f"rank {rank} has no training samples in epoch {epoch} (its shards are empty); "
                                  "write fewer empty shards or use fewer processes")
            for share, quota in zip(shares, apportion(batches_per_rank, [s.samples for s in shares])):
                share.batches = quota
        ranks.append(shares)
    return EpochLayout(epoch, batch_size, batches_per_rank, ranks)


@dataclass
class EpochLayouts:
    """`layout_epoch` for one split, remembering the last epoch's layout. Small and picklable:
    DataLoader workers compute their epoch's layout themselves."""

    index: ShardIndex
    seed: int
    world: int
    workers: int
    batch_size: int
    batches_per_rank: int | None
    last: EpochLayout | None = None

    def __call__(self, epoch: int) -> EpochLayout:
        if self.last is None or self.last.epoch != epoch:
            self.last = layout_epoch(self.index, epoch=epoch, seed=self.seed, world=self.world, workers=self.workers,
                                     batch_size=self.batch_size, batches_per_rank=self.batches_per_rank)
        return self.last


def _balance(items: list[int], counts: list[int], bins: int) -> list[list[int]]:
    """Largest first, each to the bin holding the fewest samples (then fewest items, then lowest).
    The sort is stable, so equal-sized shards keep the epoch's shuffled order."""
    out: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0, 0, b) for b in range(bins)]  # (samples, items, bin): a heap, O(log bins) per shard
    for item in sorted(items, key=lambda i: -counts[i]):
        load, size, target = heap[0]
        out[target].append(item)
        heapq.heapreplace(heap, (load + counts[item], size + 1, target))
    return out


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainders get the rest)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


# ---- position -------------------------------------------------------------------------------


@dataclass
class Position:
    """Where one rank stands in an epoch: all a mid-epoch checkpoint needs to resume exactly."""

    epoch: int = 0
    batches: int = 0  # micro-batches this rank has consumed in the epoch
    # worker -> [batches, pass, samples read in pass]
    workers: dict[int, list[int]] = field(default_factory=dict)
    # worker -> its dataset's state_dict after that batch (HF)
    states: dict[int, dict] = field(default_factory=dict)
    last_worker: int = -1  # the worker whose batch came last (the round-robin goes on after it)
    repeated: int = 0  # samples seen a second time this epoch
    corrupt: dict[str, int] = field(default_factory=dict)  # shard -> samples skipped this epoch, unreadable
    # shard -> samples lost this epoch, not downloaded
    unreachable: dict[str, int] = field(default_factory=dict)

    def advance(self, batch) -> None:
        """Past one `launcher.data.batch.Batch`."""
        if batch.worker is not None:
            self.workers[batch.worker] = [batch.worker_batches, *batch.position]
            if batch.state is not None:
                self.states[batch.worker] = batch.state
            else:  # a state older than the worker's place would resume it too early
                self.states.pop(batch.worker, None)
            self.last_worker = batch.worker
        self.batches += 1
        self.repeated += batch.repeated
        tally_errors(batch.errors, self.corrupt)
        tally_errors(batch.errors, self.unreachable, "unreachable")

    def next_worker(self, quotas: list[int]) -> int:
        """The worker the DataLoader's round-robin serves next."""
        for i in range(1, len(quotas) + 1):
            worker = (self.last_worker + i) % len(quotas)
            if self.workers.get(worker, [0])[0] < quotas[worker]:
                return worker
        return 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "workers": self.workers, "states": self.states,
                "last_worker": self.last_worker, "repeated": self.repeated, "corrupt": self.corrupt,
                "unreachable": self.unreachable}

    @classmethod
    def from_dict(cls, state: dict) -> "Position":
        state = dict(state)
        state["workers"] = {int(w): list(p) for w, p in state.get("workers", {}).items()}
        state["states"] = {int(w): s for w, s in state.get("states", {}).items()}  # JSON keys are strings
        return cls(**state)


def tally_errors(errors: list[dict], counts: dict[str, int], kind: str = "unreadable") -> None:
    """Add the lost samples of error records of `kind` to per-shard counts (records without a kind
    are unreadable samples; launcher/data/stream.py, `lost_kind`)."""
    for error in errors:
        if error.get("kind", "unreadable") == kind:
            counts[error["shard"]] = counts.get(error["shard"], 0) + error["samples"]
