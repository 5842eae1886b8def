"""Fully sharded data parallel: torch's FSDP2 (`fully_shard`), chosen by --data_parallel=fsdp.

Each process holds 1/N of every parameter, gradient and optimizer state instead of a whole copy
(DDP). A shard unit's parameters are gathered for its forward and backward and freed after, and
its gradients are reduce-scattered. The units are the recipe's `shard_units(cfg, model)`, or by
default the repeated blocks (the children of an `nn.ModuleList` or `nn.Sequential` that all share
one class: transformer blocks, ResNet blocks) and any other module of at least
`fsdp_unit_params` parameters not already inside a unit; the root takes the rest.

Accelerate's FSDP plugin falls back to DDP on CPU without a word, so the launcher calls
`fully_shard` itself and keeps Accelerate for processes, accumulation and trackers. Checkpoints
of a sharded run are `torch.distributed.checkpoint` (DCP) directories, which load on any number
of processes (launcher/runtime/checkpoints.py); the final weights are written one gathered
parameter at a time (launcher/runtime/export.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from launcher.config import ConfigError, TrainConfig
from launcher.runtime import state_files
from launcher.runtime.checkpoints import SHARDED_DIR

FSDP_TORCH = (2, 7)  # fully_shard hard-codes CUDA streams before 2.7: it cannot run on CPU processes


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_fsdp(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line, what FSDP cannot do here; never fall back to DDP."""
    if cfg.data_parallel != "fsdp":
        if cfg.async_checkpoint:
            raise ConfigError(
                "--async_checkpoint writes sharded (DCP) checkpoints; it needs --data_parallel=fsdp"
            )
        return
    if torch_version() < FSDP_TORCH:
        raise ConfigError(
            f"--data_parallel=fsdp needs torch >= 2.7 (this is {torch.__version__}); "
            "upgrade torch or use --data_parallel=ddp"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"--data_parallel=fsdp runs on CUDA GPUs or CPU processes, not {device.type}; "
            "use --data_parallel=ddp"
        )
    if cfg.mixed_precision == "fp16":
        raise ConfigError(
            "--data_parallel=fsdp keeps bf16 parameters with fp32 reduction; use "
            "--mixed_precision=bf16 (fp16 would need a sharded gradient scaler)"
        )
    if cfg.ddp_comm_hook != "no":
        raise ConfigError(
            "--ddp_comm_hook compresses DDP's all-reduce; FSDP reduces in fp32 "
            "(bf16 parameters with --mixed_precision=bf16): drop --ddp_comm_hook"
        )
    if cfg.channels_last:
        raise ConfigError(
            "--channels_last is not supported with --data_parallel=fsdp (FSDP shards "
            "contiguous parameters); drop --channels_last"
        )


def ensure_process_group(device: torch.device) -> bool:
    """FSDP needs a process group even for one process (`python -m launcher`): a 1-rank one in
    memory, created here. True if this created it (and so destroys it at the end)."""
    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


# ---- which modules become shard units ------------------------------------------------------------


def find_units(
    model: nn.Module, named: Iterable[nn.Module | str] | None, min_params: int
) -> list[tuple[str, nn.Module]]:
    """(name, module) of each shard unit, innermost first (the order fully_shard needs); the root
    is not one of them (it is sharded last, with what is left)."""
    names = {module: name for name, module in model.named_modules()}
    if named is not None:
        units = []
        for item in named:
            module = model.get_submodule(item) if isinstance(item, str) else item
            if module not in names:
                raise ConfigError(
                    f"shard_units returned a module that is not part of the model ({type(module).__name__}); "
                    "return submodules of the model or their names"
                )
            if module is model:
                continue  # the root is always the last unit
            units.append((names[module], module))
        return sorted(units, key=lambda unit: -unit[0].count("."))
    chosen: set[nn.Module] = set()
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            children = list(container.children())
            if (
                len(children) > 1
                and len({type(child) for child in children}) == 1
                and any(True for _ in children[0].parameters())
            ):
                chosen.update(children)  # a stack of blocks, not a layer sequence (Linear, GELU, Linear)
    if min_params:
        _by_size(model, chosen, min_params, is_root=True)
    units = [(names[module], module) for module in model.modules() if module in chosen]
    return sorted(units, key=lambda unit: -unit[0].count("."))


def _by_size(module: nn.Module, chosen: set, min_params: int, is_root: bool = False) -> int:
    """Post-order, outside the units chosen already: a module whose parameters outside the units
    below it reach min_params becomes one. Returns the parameters left to its parent."""
    if module in chosen:
        return 0  # a unit already: what is inside it is sharded with it
    left = sum(_by_size(child, chosen, min_params) for child in module.children())
    left += sum(p.numel() for p in module.parameters(recurse=False))
    if left >= min_params and not is_root:
        chosen.add(module)
        return 0
    return left


def describe_units(units: list[tuple[str, nn.Module]]) -> str:
    """'4 units: blocks.0-3 (Block)', grouped by class."""
    by_class: dict[str, list[str]] = {}
    for name, module in sorted(units, key=lambda unit: unit[0]):
        by_class.setdefault(type(module).__name__, []).append(name)
    parts = [
        f"{', '.join(names) if len(names) <= 4 else f'{names[0]} ... {names[-1]} ({len(names)})'} ({kind})"
        for kind, names in by_class.items()
    ]
    return f"{len(units)} + root: " + "; ".join(parts) if units else "the root only"


# ---- sharding ----------------------------------------------------------------------------


def prepare(
    model: nn.Module, units: list[tuple[str, nn.Module]], cfg: TrainConfig, device: torch.device
) -> None:
    """Activation checkpointing and compilation of the units (as torchtitan: each block compiled before
    sharding; without units the root), then fully_shard, in place. The model may be on the meta device."""
    if cfg.activation_checkpointing:
        checkpoint_activations(units)
    if cfg.compile:
        for unit in [unit for _, unit in units] or [model]:
            unit.compile()
    shard(model, units, cfg, device)


def shard(
    model: nn.Module, units: list[tuple[str, nn.Module]], cfg: TrainConfig, device: torch.device
) -> None:
    """fully_shard each unit, then the root, in place: bf16 parameters with fp32 reduction under
    --mixed_precision=bf16 (the root's outputs in fp32, so the loss is computed in fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = cfg.mixed_precision == "bf16"
    for _, unit in units:
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    root_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        output_dtype=torch.float32 if bf16 else None,
    )
    # The root's parameters are needed again right after the forward (the head's backward): keep them.
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)


def reshard(model: nn.Module) -> None:
    """Every unit back to its shards, the root too (it keeps its gathered parameters after a forward,
    for the backward): after a forward without one, e.g. the pre-flight check. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def summed_gradients(device: torch.device) -> bool:
    """Whether fully_shard sums the ranks' gradients instead of averaging them: torch 2.7 asks for
    ReduceOp.AVG in fp32, which gloo's reduce-scatter sums. Found by sharding a probe whose every
    rank has the gradient 1 (the average 1, the sum the world size). A collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if world == 1:
        return False
    probe = nn.Linear(1, world, bias=False, device=device)
    nn.init.ones_(probe.weight)
    fully_shard(probe, mesh=init_device_mesh(device.type, (world,)))
    probe(torch.ones(1, 1, device=device)).sum().backward()
    return bool(local(probe.weight.grad).flatten()[0].item() > 1.5)


def checkpoint_activations(units: list[tuple[str, nn.Module]]) -> None:
    """--activation_checkpointing: each unit keeps only its input and recomputes its activations in
    the backward. torch's composable `checkpoint` keeps parameter names (no wrapper module), so
    checkpoints and `model.safetensors` are unchanged."""
    from torch.distributed._composable import checkpoint

    for _, unit in units:
        checkpoint(unit)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The norm of all these tensors together, sharded (a collective under FSDP) or not."""
    return full(torch.nn.utils.get_total_norm(tensors))


def grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global norm of the (sharded) gradients, clipped to max_norm when it is > 0."""
    norm = global_norm([p.grad for p in parameters if p.grad is not None])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's broadcast_buffers
    keeps them: FSDP shards parameters only, so each rank's buffers would follow its own data."""
    if dist.get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


# ---- checkpoints and the final weights ----------------------------------------------------------


def sharded_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    frozen_base: frozenset[str] = frozenset(),
) -> dict:
    """What DCP saves and loads: DTensors keyed by parameter name, so they reshard on any world size.
    A PEFT model's `frozen_base` is left out (the recipe rebuilds it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trained = {name: tensor for name, tensor in model.state_dict().items() if name not in frozen_base}
    state = {"model": trained, "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


class ShardedCheckpointer:
    """Saves (optionally asynchronously) and loads the sharded model, optimizer and EMA state."""

    def __init__(self, async_checkpoint: bool):
        self.async_checkpoint = async_checkpoint
        # async_save writes from a thread: its collectives need a group of their own (gloo, on CPU),
        # or they would interleave with the training step's on the default group.
        self.group = (
            dist.new_group(backend="gloo") if async_checkpoint and dist.get_world_size() > 1 else None
        )

    def save(self, path: str, state: dict):
        """Writes state under path/sharded; returns a future when asynchronous (the tensors are
        copied to host memory before it returns, so training may go on changing them), else None."""
        import torch.distributed.checkpoint as dcp

        target = os.path.join(path, SHARDED_DIR)
        if self.async_checkpoint:
            return dcp.async_save(state, checkpoint_id=target, process_group=self.group)
        dcp.save(state, checkpoint_id=target)
        return None

    @staticmethod
    def load(
        path: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: nn.Module | None,
        frozen_base: frozenset[str] = frozenset(),
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = sharded_state(model, optimizer, ema, frozen_base)
        # nothing unpickled but DCP's metadata
        state_files.load_sharded(state, os.path.join(path, SHARDED_DIR))
        model.load_state_dict(state["model"], strict=not frozen_base)  # DCP named any tensor it lacks
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
