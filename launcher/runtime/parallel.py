"""How the model is spread over the processes (--data_parallel): two siblings under `Parallel`,
`Replicated` (DDP, Accelerate's: a whole copy of the model, its gradients and optimizer state on
each process) and `Sharded` (FSDP2, launcher/runtime/sharding.py: 1/N of each). The trainer calls
`Parallel`'s methods on either, so the loop has no `if fsdp:` branches.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from launcher.config import ConfigError, TrainConfig, size_in_bytes
from launcher.runtime import export, meta_build, sharding
from launcher.runtime.distributed import ReplicaChecksums, rewrap_ddp


class Parallel(abc.ABC):
    """What the trainer asks of a way of spreading the model: `place` it as built (FSDP shards it,
    before it has values: launcher/runtime/meta_build.py), `setup` it before the optimizer exists;
    the rest each sibling answers."""

    sharded: bool  # each process holds 1/N of the parameters (checkpoints then hold shards)

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.units: list[tuple[str, nn.Module]] = []  # shard and activation-checkpointing units, from `place`
        # a PEFT model's base: not in checkpoints (launcher/train/adapters.py), set by build_parts
        self.frozen_base: frozenset[str] = frozenset()
        self.memory = MemoryReport(accelerator.device, accelerator.num_processes)

    @abc.abstractmethod
    def place(self, model: nn.Module, units: list[tuple[str, nn.Module]]) -> None:
        """The model as built, with its shard and activation-checkpointing units (build_parts)."""

    @abc.abstractmethod
    def setup(self, model: nn.Module, ema: nn.Module | None) -> None:
        """Before the optimizer exists, in place: what `place` left to do, and the EMA."""

    @abc.abstractmethod
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, AcceleratedOptimizer]:
        """The model as trained (wrapped or sharded) and the optimizer, wrapped as Accelerate's."""

    @abc.abstractmethod
    def register_ema(self, ema: nn.Module | None) -> None:
        """Make checkpoints keep the EMA's weights."""

    @abc.abstractmethod
    def gradient_sync(self, model: nn.Module, sync: bool):
        """A context for one micro-batch's backward: `sync` False holds the gradients' reduction
        (every micro-batch of a step but the last)."""

    @abc.abstractmethod
    def grad_norm(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm of the averaged gradients, clipped to max_norm when > 0."""

    @abc.abstractmethod
    def after_unfreeze(self, model: nn.Module) -> nn.Module:
        """The model to train once more parameters require grad."""

    def before_evaluation(self, model: nn.Module, ema: nn.Module | None) -> None:
        """Make every rank's buffers (BatchNorm statistics) agree before an evaluation."""

    def write_shards(self, path: str, model, optimizer, ema):
        """Write what the state files do not hold into checkpoint `path`; a pending write or None."""
        return None

    def read_shards(self, path: str, model, optimizer, ema) -> None:
        """Load what `write_shards` wrote."""

    def export(self, model: nn.Module, ema: nn.Module | None, hf: export.HFLayout | None = None) -> dict:
        """The final weights (launcher/runtime/export.py), whole or sharded alike: model.safetensors or
        its shards, the EMA's, and OUTPUT_DIR/hf/; the main process writes. A collective: under FSDP
        one gathered parameter at a time."""
        return export.write_final_weights(
            self.cfg.output_dir,
            self.accelerator.unwrap_model(model),
            ema.module if ema is not None else None,
            hf,
            size_in_bytes(self.cfg.max_shard_size),
            self.accelerator.is_main_process,
        )

    @abc.abstractmethod
    def load_checkpoint_weights(self, model: nn.Module, path: str) -> None:
        """The model's weights from checkpoint `path`, on every rank (--final_weights=best)."""

    def replica_checksums(self, model: nn.Module) -> list[str] | None:
        """Each rank's parameter checksum (a collective), or None where ranks hold different shards."""
        return None

    def release(self) -> None:
        """Drop every reference to the prepared model and optimizer (Accelerate's too), now."""
        self.units = []
        self.accelerator.free_memory()  # its lists of models and optimizers, then gc.collect()

    def close(self) -> None:
        """After the trackers ended: leave a process group this object started."""


class Replicated(Parallel):
    """DDP through Accelerate: checkpoints (state_files.write) hold the prepared model and optimizer."""

    sharded = False

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        self.checksums = ReplicaChecksums(accelerator.device, accelerator.num_processes)

    def place(self, model: nn.Module, units: list[tuple[str, nn.Module]]) -> None:
        """The model as built, on its device: DDP wraps it later (`prepare`)."""
        self.units = units

    def setup(self, model: nn.Module, ema: nn.Module | None) -> None:
        """Activation checkpointing and compilation, in place."""
        if self.cfg.activation_checkpointing:
            sharding.checkpoint_activations(self.units)
        if self.cfg.compile:
            model.compile()  # in place: DDP then wraps the compiled module, state_dict keys unchanged

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def register_ema(self, ema: nn.Module | None) -> None:
        if ema is not None:
            self.accelerator.register_for_checkpointing(ema)

    def gradient_sync(self, model: nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)  # DDP's no_sync

    def grad_norm(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Without clipping no pass multiplies every gradient by 1. fp16: the norm of the unscaled
        gradients. (torch's own functions: Accelerate's clip_grad_norm_ sorts every parameter by
        device mesh at every call, for DTensors DDP has none.)"""
        self.accelerator.unscale_gradients()
        return sharding.grad_norm(parameters, max_norm)

    def after_unfreeze(self, model: nn.Module) -> nn.Module:
        return rewrap_ddp(self.accelerator, model)  # DDP rebuilt to all-reduce the new gradients

    def before_evaluation(self, model: nn.Module, ema: nn.Module | None) -> None:
        pass  # DDP broadcasts rank 0's buffers at each forward

    def load_checkpoint_weights(self, model: nn.Module, path: str) -> None:
        """From the checkpoint's model.safetensors, as save_state wrote it (`module.` in front under DDP)."""
        state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"), device="cpu")
        state = {key.removeprefix("module."): value for key, value in state.items()}
        # tied weights: saved once
        result = self.accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        if result.unexpected_keys:
            unexpected = ", ".join(result.unexpected_keys[:3])
            raise ConfigError(f"checkpoint {path} does not fit the model (unexpected {unexpected})")

    def replica_checksums(self, model: nn.Module) -> list[str] | None:
        return self.checksums(self.accelerator.unwrap_model(model))


class Sharded(Parallel):
    """FSDP2: the model and the EMA sharded in place, the optimizer built over the shards, DCP
    checkpoints beside the state files (which then hold the LR schedule, RNG states and the rest)."""

    sharded = True

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        self.own_group = sharding.ensure_process_group(accelerator.device)
        self.checkpointer = sharding.ShardedCheckpointer(cfg.async_checkpoint)
        # gradients that gloo summed are divided here (docs/known-problems.md#fsdp-over-gloo-sums-gradients)
        self.summed = sharding.summed_gradients(accelerator.device)

    def place(self, model: nn.Module, units: list[tuple[str, nn.Module]]) -> None:
        """Activation checkpointing, compilation and sharding, in place, before the model has values
        (launcher/runtime/meta_build.py) or after it was built on the host."""
        self.units = units
        sharding.prepare(model, units, self.cfg, self.accelerator.device)

    def setup(self, model: nn.Module, ema: nn.Module | None) -> None:
        """The EMA (built from the model before sharding, without values) sharded by the same units,
        then given the model's values, shard by shard."""
        if ema is not None:
            ema_units = [(name, ema.module.get_submodule(name)) for name, _ in self.units]
            sharding.shard(ema.module, ema_units, self.cfg, self.accelerator.device)
            meta_build.copy_values(ema.module, model, self.accelerator.device)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        # Not accelerator.prepare: that would wrap the model in DDP, and state_files.write would
        # write one rank's optimizer shards. The wrapper still steps only on the last micro-batch.
        return model, AcceleratedOptimizer(optimizer, device_placement=False)

    def register_ema(self, ema: nn.Module | None) -> None:
        pass  # its shards are in the DCP checkpoint (sharding.sharded_state)

    def gradient_sync(self, model: nn.Module, sync: bool):
        model.set_requires_gradient_sync(sync)  # no reduce-scatter on non-final micro-batches
        return contextlib.nullcontext()

    def grad_norm(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        if self.summed:  # the average, as DDP's
            grads = [sharding.local(p.grad) for p in parameters if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, float(self.accelerator.num_processes))
        return sharding.grad_norm(parameters, max_norm)

    def after_unfreeze(self, model: nn.Module) -> nn.Module:
        return model  # FSDP2 reduces whatever requires grad at each backward

    def before_evaluation(self, model: nn.Module, ema: nn.Module | None) -> None:
        sharding.sync_buffers(model)
        if ema is not None:
            sharding.sync_buffers(ema)

    def write_shards(self, path: str, model, optimizer, ema):
        self.before_evaluation(model, ema)  # one rank's buffers are saved: make them everyone's
        return self.checkpointer.save(
            path, sharding.sharded_state(model, optimizer.optimizer, ema, self.frozen_base)
        )

    def read_shards(self, path: str, model, optimizer, ema) -> None:
        self.checkpointer.load(path, model, optimizer.optimizer, ema, self.frozen_base)

    def load_checkpoint_weights(self, model: nn.Module, path: str) -> None:
        raise ConfigError("--final_weights=best needs --data_parallel=ddp")  # refused by TrainConfig.validate

    def close(self) -> None:
        if self.own_group and torch.distributed.is_initialized():  # Accelerate's end_training may have
            torch.distributed.destroy_process_group()


def build_parallel(cfg: TrainConfig, accelerator: Accelerator) -> Parallel:
    return (Sharded if cfg.data_parallel == "fsdp" else Replicated)(cfg, accelerator)


def optimizer_slots(factory) -> float:
    """Optimizer state per trained parameter element, in elements (AdamW: 2, SGD with momentum: 1),
    measured by one step of the optimizer on a tiny parameter."""
    param = nn.Parameter(torch.zeros(64))
    optimizer = factory([{"params": [param], "lr": 0.0}])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    return (
        sum(
            t.numel()
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.numel() == param.numel()
        )
        / param.numel()
    )


def memory_per_rank(
    model: nn.Module, trained: list[nn.Parameter], slots: float, world: int, sharded: bool
) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on each process (FSDP: its shards, each
    parameter split on its first dimension into `world` equal, padded parts)."""

    def size(p: torch.Tensor) -> int:
        if not sharded or p.ndim == 0:
            return p.numel() * p.element_size()
        per_row = p.numel() // max(p.shape[0], 1)
        return -(-p.shape[0] // world) * per_row * p.element_size()

    trained_bytes = sum(size(p) for p in trained)
    return {
        "params": sum(size(p) for p in model.parameters()),
        "grads": trained_bytes,
        "optimizer": int(trained_bytes * slots),
    }


# peak resident MB before the model is built
BUILD_FIELDS = ("baseline_rss_mb", "load_peak_rss_mb", "build_s")
# and once it is built and loaded (before the pre-flight), and the seconds that took
MEMORY_FIELDS = ("params_mb", "optimizer_mb", "peak_rss_mb", "peak_gpu_mb", *BUILD_FIELDS)


class MemoryReport:
    """Each process's MB of parameters (its shards under FSDP) and optimizer state, its peak
    resident memory (since the process started: at the end, before the model was built, and once it
    was built and loaded, before the pre-flight), the seconds building and loading took and, on a GPU,
    its peak allocated GPU memory, from every rank. The gathered tensors are held for the life of this object
    (docs/known-problems.md#the-gil-at-shutdown)."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.mine = torch.zeros(len(MEMORY_FIELDS), dtype=torch.float64, device=device)
        self.everyone = [torch.zeros_like(self.mine) for _ in range(world_size)]
        self.build = dict.fromkeys(BUILD_FIELDS, 0.0)

    def before_build(self) -> None:
        self.build["baseline_rss_mb"], self.build["build_s"] = meta_build.peak_rss_mb(), time.perf_counter()

    def after_build(self) -> None:
        self.build["load_peak_rss_mb"] = meta_build.peak_rss_mb()
        self.build["build_s"] = time.perf_counter() - self.build["build_s"]

    def __call__(self, model: nn.Module, optimizer) -> list[dict[str, float]]:
        """A collective: every rank calls it."""

        def mb(tensors) -> float:
            return sum(sharding.local(t).numel() * t.element_size() for t in tensors) / 2**20

        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        self.mine.copy_(
            torch.tensor(
                [mb(model.parameters()), mb(state), meta_build.peak_rss_mb(), gpu, *self.build.values()]
            )
        )
        if self.world_size > 1:
            torch.distributed.all_gather(self.everyone, self.mine)
        else:
            self.everyone[0].copy_(self.mine)
        return [dict(zip(MEMORY_FIELDS, row.tolist())) for row in self.everyone]
