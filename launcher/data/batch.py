"""What a batch is: the collated samples of one loader step, and what travels with them.

A sample, and so a batch, may be a tensor, a tuple or list, or a (nested) dict of tensors and
other values. Collation is torch's `default_collate`, or the recipe's own `DataSpec(collate=...)`
(padding variable-length sequences, say); it runs in the DataLoader workers for shards and
map-style datasets alike. `Batch` carries the collated `data` with the sample keys, the error
records of unreadable samples, and where its worker stands in the epoch (for exact resume).

With the default collation a shard worker fills each tensor field of a batch sample by sample
into a shared-memory buffer that it reuses (`BatchBuilder`), so a batch crosses to the main
process without another copy and the kernel does not zero-fill a new segment per batch.

`to_device` moves every tensor of a batch (non-blocking; channels-last for 4-D image tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils.data import default_collate
from torch.utils.data._utils.pin_memory import pin_memory as _pin

from launcher.config import DataError

Collate = Callable[[list], Any]


@dataclass
class Batch:
    data: Any = None  # the collated samples; None when none of them could be read
    size: int = 0  # samples in it
    keys: list[str] = field(default_factory=list)  # each sample's key (shard key or dataset index)
    # unreadable samples or shard ends: shard, key, reason, samples
    errors: list[dict] = field(default_factory=list)
    repeated: int = 0  # samples read a second time this epoch
    worker: int | None = None  # the shard worker that made it, and where that worker stands:
    worker_batches: int = 0  # its batches done this epoch,
    position: list[int] = field(default_factory=list)  # [pass, samples read in the pass]
    state: dict | None = None  # the worker's dataset state_dict right after this batch (HF streaming; JSON)
    buffer: tuple[int, int] | None = None  # (worker, batch number) of a reused shared-memory buffer
    # --data_on_gpu: encoded images, decoded on the device (launcher/data/device_decode.py)
    encoded: dict | None = None

    def pin_memory(self) -> "Batch":
        """The DataLoader's pinning thread calls this: page-locked copies of every tensor."""
        return replace(self, data=_pin(self.data))

    def tensors(self) -> list[torch.Tensor]:
        return [leaf for leaf in pytree.tree_leaves(self.data) if isinstance(leaf, torch.Tensor)]


def to_device(data: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Every tensor of `data` on `device` (non-blocking: pinned batches copy asynchronously)."""
    if device.type == "cpu" and not channels_last:
        return data  # already there (DataLoaders give CPU tensors)

    def move(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        leaf = leaf.to(device, non_blocking=True)
        if channels_last and leaf.ndim == 4:
            leaf = leaf.contiguous(memory_format=torch.channels_last)
        return leaf

    return pytree.tree_map(move, data)


def collate(samples: list, collate_fn: Collate | None = None) -> Any:
    return (collate_fn or default_collate)(samples)


def describe(data: Any, batch_dim: bool = True) -> str:
    """The structure of `data` with tensor shapes, `N` for the batch dimension: `((N, 3, 8, 8), (N,))`."""
    if isinstance(data, torch.Tensor):
        dims = ["N", *map(str, data.shape[1:])] if batch_dim and data.ndim else list(map(str, data.shape))
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if isinstance(data, dict):
        return "{" + ", ".join(f"{k}: {describe(v, batch_dim)}" for k, v in data.items()) + "}"
    if isinstance(data, (list, tuple)):
        return "(" + ", ".join(describe(v, batch_dim) for v in data) + ")"
    # model output objects (Hugging Face's ModelOutput)
    if hasattr(data, "to_tuple") or hasattr(data, "keys"):
        try:
            return describe(dict(data), batch_dim)
        except (TypeError, ValueError):
            pass
    return type(data).__name__


class BatchBuilder:
    """A shard worker's batch, filled sample by sample. With the default collation each tensor
    field goes into one buffer per batch, in a DataLoader worker a shared-memory one from the
    worker's `BufferRing`, and each sample is freed as soon as it is copied; with the recipe's
    collate the samples are kept and collated when the batch is full."""

    def __init__(self, worker: int, size: int, buffers: "BufferRing | None" = None, collate_fn: Collate | None = None):
        self.worker, self.size, self.buffers, self.collate_fn = worker, size, buffers, collate_fn
        self._reset()

    def _reset(self) -> None:
        self.samples: list = []  # with the recipe's collate
        self.spec: pytree.TreeSpec | None = None
        self.leaves: list = []  # default collation: per field, a buffer tensor or a list of values
        self.ticket: tuple[int, int] | None = None
        self.count = 0
        self.keys: list[str] = []
        self.errors: list[dict] = []
        self.repeated = 0

    def add(self, sample: Any, key: str, repeated: bool) -> None:
        if self.collate_fn is not None:
            self.samples.append(sample)
        else:
            self._copy(sample, key)
        self.count += 1
        self.keys.append(key)
        self.repeated += repeated

    def _copy(self, sample: Any, key: str) -> None:
        leaves, spec = pytree.tree_flatten(sample)
        if self.spec is None:
            self.spec = spec
            tensors = [(i, leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            shapes = [((self.size, *leaf.shape), leaf) for _, leaf in tensors]
            if self.buffers is not None and tensors:  # in a DataLoader worker
                buffers, self.ticket = self.buffers.take(shapes)
            else:
                buffers = [like.new_empty(shape) for shape, like in shapes]
            self.leaves = [[] for _ in leaves]
            for (i, _), buffer in zip(tensors, buffers):
                self.leaves[i] = buffer
        elif spec != self.spec:
            raise DataError(f"sample {key} has the structure {describe(sample, False)}, others in its batch "
                            f"{describe(pytree.tree_unflatten(self._shapes(), self.spec), False)}; give every "
                            "sample one structure")
        for i, (leaf, slot) in enumerate(zip(leaves, self.leaves)):
            if isinstance(slot, torch.Tensor):
                if not isinstance(leaf, torch.Tensor) or leaf.shape != slot.shape[1:] or leaf.dtype != slot.dtype:
                    raise DataError(_mismatch(key, leaf, slot, len(leaves)))
                slot[self.count].copy_(leaf)
            else:
                slot.append(leaf)

    def _shapes(self) -> list:
        return [slot[:1] if isinstance(slot, torch.Tensor) else (slot[0] if slot else None) for slot in self.leaves]

    def emit(self, worker_batches: int, position: list[int], state: dict | None = None) -> Batch:
        data = None
        if self.count:
            if self.collate_fn is not None:
                data = self.collate_fn(self.samples)
            else:
                data = pytree.tree_unflatten([slot[:self.count] if isinstance(slot, torch.Tensor) else default_collate(slot)
                                              for slot in self.leaves], self.spec)
        batch = Batch(data=data, size=self.count, keys=self.keys, errors=self.errors, repeated=self.repeated,
                      worker=self.worker, worker_batches=worker_batches, position=position, state=state,
                      buffer=self.ticket)
        self._reset()
        return batch


def _mismatch(key: str, leaf: Any, slot: torch.Tensor, fields: int) -> str:
    got = f"a {leaf.dtype} {tuple(leaf.shape)} tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
    what = "is" if fields <= 2 else "has a field that is"
    hint = ("make the transform resize or crop every image to one size" if slot.ndim == 4 else
            "pad variable-length samples with a collate function (DataSpec(collate=...))")
    return f"sample {key} {what} {got}, others in its batch {slot.dtype} {tuple(slot.shape[1:])}; {hint}"


def shared_empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """As torch's default_collate does in workers: a new tensor whose storage is shared memory."""
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).resize_(shape)


class BufferRing:
    """A DataLoader worker's batch buffers in shared memory, reused once the main process is done
    with them. A new shared segment per batch costs the worker a kernel zero-fill of every page
    (about 7 ms for 64 images of 224 px on one core) and the main process a new mapping; a
    reused one costs neither. The main process counts in `released` (shared memory, one cell per
    worker) the batches it has finished with, in order: this worker's batch k goes into slot
    k % len only when batch k - len has been released, and into new buffers otherwise, so reuse
    never waits and never overwrites a batch in use. (The ring's length is chosen in
    `SplitLoader._data_loader` so that a consumer that drops each batch at the next one never
    meets the fallback.)"""

    def __init__(self, length: int, released: torch.Tensor, worker_id: int):
        self.slots: list[list[torch.Tensor] | None] = [None] * length
        self.released, self.worker_id = released, worker_id
        self.made = 0  # batches started over the worker's life (all epochs, with persistent workers)

    def take(self, shapes: list[tuple[tuple[int, ...], torch.Tensor]]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """One buffer per (shape, like) tensor field of the next batch, and its ticket."""
        number, length = self.made, len(self.slots)
        self.made += 1
        ticket = (self.worker_id, number)
        if number >= length and int(self.released[self.worker_id]) <= number - length:
            # slot still in use: new ones
            return [shared_empty(shape, like) for shape, like in shapes], ticket
        slot = number % length
        buffers = self.slots[slot]
        if buffers is None or [(b.shape, b.dtype) for b in buffers] != [(torch.Size(s), like.dtype) for s, like in shapes]:
            buffers = self.slots[slot] = [shared_empty(shape, like) for shape, like in shapes]
        return buffers, ticket
