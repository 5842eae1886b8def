"""How the model is spread over the processes (--data_parallel): two siblings under `Parallel`,
`Replicated` (DDP, Accelerate's: a whole copy of the model, its gradients and optimizer state on
each process) and `Sharded` (FSDP2, launcher/runtime/sharding.py: 1/N of each). The trainer calls
`Parallel`'s methods on either, so the loop has no `if fsdp:` branches.
"""

from __future__ import annotations

import abc
import contextlib
import os

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from launcher import durable
from launcher.config import ConfigError, TrainConfig
from launcher.runtime import sharding
from launcher.runtime.distributed import ReplicaChecksums, rewrap_ddp


EXPORT_STAGING = ".export"  # OUTPUT_DIR/.export: the final weights written in full before they are moved in place


class Parallel(abc.ABC):
    """What the trainer asks of a way of spreading the model. `setup` (public) applies activation
    checkpointing, then the sibling's `_compile` and `_shard` hooks; the rest each sibling answers."""

    sharded: bool  # each process holds 1/N of the parameters (checkpoints then hold shards)

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, units):
        self.cfg, self.accelerator, self.units = cfg, accelerator, units
        self.memory = MemoryReport(accelerator.device, accelerator.num_processes)

    def setup(self, model: nn.Module, ema: nn.Module | None) -> None:
        """Before the optimizer exists: activation checkpointing, compilation and sharding, in place."""
        if self.cfg.activation_checkpointing:
            sharding.checkpoint_activations(self.units)
        if self.cfg.compile:
            self._compile(model)
        self._shard(model, ema)

    def _compile(self, model: nn.Module) -> None:
        model.compile()  # in place: a wrapper then wraps the compiled module, state_dict keys unchanged

    def _shard(self, model: nn.Module, ema: nn.Module | None) -> None:
        pass

    @abc.abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, AcceleratedOptimizer]:
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

    @abc.abstractmethod
    def export(self, model: nn.Module, ema: nn.Module | None) -> None:
        """model.safetensors (and model_ema.safetensors) in the output dir, in full."""

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

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, units):
        super().__init__(cfg, accelerator, units)
        self.checksums = ReplicaChecksums(accelerator.device, accelerator.num_processes)

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

    def export(self, model: nn.Module, ema: nn.Module | None) -> None:
        """Written by the main process: every rank holds the same weights."""
        acc, out = self.accelerator, self.cfg.output_dir
        if not acc.is_main_process:
            return
        staging = os.path.join(out, EXPORT_STAGING)
        with durable.no_space_left(out):
            acc.save_model(model, staging)  # one file, or shards and an index above 10 GB
            if ema is not None:
                safetensors.torch.save_model(ema.module, os.path.join(staging, "model_ema.safetensors"))
        durable.publish_files(staging, out)

    def load_checkpoint_weights(self, model: nn.Module, path: str) -> None:
        """From the checkpoint's model.safetensors, as save_state wrote it (`module.` in front under DDP)."""
        state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"), device="cpu")
        state = {key.removeprefix("module."): value for key, value in state.items()}
        result = self.accelerator.unwrap_model(model).load_state_dict(state, strict=False)  # tied weights: saved once
        if result.unexpected_keys:
            raise ConfigError(f"checkpoint {path} does not fit the model (unexpected {', '.join(result.unexpected_keys[:3])})")

    def replica_checksums(self, model: nn.Module) -> list[str] | None:
        return self.checksums(self.accelerator.unwrap_model(model))


class Sharded(Parallel):
    """FSDP2: the model and the EMA sharded in place, the optimizer built over the shards, DCP
    checkpoints beside the state files (which then hold the LR schedule, RNG states and the rest)."""

    sharded = True

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, units):
        super().__init__(cfg, accelerator, units)
        self.own_group = sharding.ensure_process_group(accelerator.device)
        self.checkpointer = sharding.ShardedCheckpointer(cfg.async_checkpoint)
        self.summed = sharding.summed_gradients(accelerator.device)  # then divided here (README, "Known problems")

    def _compile(self, model: nn.Module) -> None:
        for unit in [unit for _, unit in self.units] or [model]:  # per unit, before sharding (as torchtitan); else the root
            unit.compile()

    def _shard(self, model: nn.Module, ema: nn.Module | None) -> None:
        sharding.shard(model, self.units, self.cfg, self.accelerator.device)
        if ema is not None:  # the same units, by name, in the EMA's copy of the model
            ema_units = [(name, ema.module.get_submodule(name)) for name, _ in self.units]
            sharding.shard(ema.module, ema_units, self.cfg, self.accelerator.device)

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
        return self.checkpointer.save(path, sharding.sharded_state(model, optimizer.optimizer, ema))

    def read_shards(self, path: str, model, optimizer, ema) -> None:
        self.checkpointer.load(path, model, optimizer.optimizer, ema)

    def export(self, model: nn.Module, ema: nn.Module | None) -> None:
        acc, out = self.accelerator, self.cfg.output_dir
        for module, name in ((model, "model.safetensors"), (ema.module if ema is not None else None, "model_ema.safetensors")):
            if module is None:
                continue
            state = sharding.full_state_dict(module)
            if acc.is_main_process:
                with durable.atomic_path(os.path.join(out, name)) as temporary:
                    safetensors.torch.save_file(state, temporary, metadata={"format": "pt"})

    def load_checkpoint_weights(self, model: nn.Module, path: str) -> None:
        raise ConfigError("--final_weights=best needs --data_parallel=ddp")  # refused by TrainConfig.validate

    def close(self) -> None:
        if self.own_group and torch.distributed.is_initialized():  # Accelerate's end_training may have
            torch.distributed.destroy_process_group()


def build_parallel(cfg: TrainConfig, accelerator: Accelerator, units) -> Parallel:
    return (Sharded if cfg.data_parallel == "fsdp" else Replicated)(cfg, accelerator, units)


def optimizer_slots(factory) -> float:
    """Optimizer state per trained parameter element, in elements (AdamW: 2, SGD with momentum: 1),
    measured by one step of the optimizer on a tiny parameter."""
    param = nn.Parameter(torch.zeros(64))
    optimizer = factory([{"params": [param], "lr": 0.0}])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    return sum(t.numel() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.numel() == param.numel()) / param.numel()


def memory_per_rank(model: nn.Module, trained: list[nn.Parameter], slots: float, world: int,
                    sharded: bool) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on each process (FSDP: its shards, each
    parameter split on its first dimension into `world` equal, padded parts)."""
    def size(p: torch.Tensor) -> int:
        if not sharded or p.ndim == 0:
            return p.numel() * p.element_size()
        per_row = p.numel() // max(p.shape[0], 1)
        return -(-p.shape[0] // world) * per_row * p.element_size()

    trained_bytes = sum(size(p) for p in trained)
    return {"params": sum(size(p) for p in model.parameters()), "grads": trained_bytes,
            "optimizer": int(trained_bytes * slots)}


MEMORY_FIELDS = ("params_mb", "optimizer_mb", "peak_rss_mb", "peak_gpu_mb")


class MemoryReport:
    """Each process's MB of parameters (its shards under FSDP) and optimizer state, its peak
    resident memory and, on a GPU, its peak allocated GPU memory, from every rank. The gathered
    tensors are held for the life of this object, as in ReplicaChecksums (a temporary freed by
    gloo's thread as the process group goes away deadlocks the rank)."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.mine = torch.zeros(len(MEMORY_FIELDS), dtype=torch.float64, device=device)
        self.everyone = [torch.zeros_like(self.mine) for _ in range(world_size)]

    def __call__(self, model: nn.Module, optimizer) -> list[dict[str, float]]:
        """A collective: every rank calls it."""
        import resource

        def mb(tensors) -> float:
            return sum(sharding.local(t).numel() * t.element_size() for t in tensors) / 2**20

        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        self.mine.copy_(torch.tensor([mb(model.parameters()), mb(state),
                                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu]))
        if self.world_size > 1:
            torch.distributed.all_gather(self.everyone, self.mine)
        else:
            self.everyone[0].copy_(self.mine)
        return [dict(zip(MEMORY_FIELDS, row.tolist())) for row in self.everyone]
