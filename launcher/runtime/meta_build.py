"""Models larger than one process's memory (--data_parallel=fsdp): built without memory, sharded,
then given values on each rank's device, each rank reading only its own shards' slices.

    with empty_model() as loads:           # parameters on the meta device; load_weights recorded
        model = recipe.build_model(cfg)
    ... fully_shard the units and the root (launcher/runtime/sharding.py) ...
    materialise(model, device, loads, load_weights, init)   # to_empty, buffers put back, the loads, init

Inside `empty_model()` every parameter a module registers is moved to the meta device, where it
takes no memory, while buffers are built on the host as usual: they are small and often computed
in the constructor (a rotary embedding's `inv_freq`, BatchNorm's running statistics), values that
`to_empty` would otherwise leave as garbage. Accelerate's `init_empty_weights(include_buffers=False)`
does the same but wraps an already-meta parameter in a new one, which unties a tied LM head from its
embedding; here a meta parameter is registered as it is, so ties survive.

`load_weights` called inside `empty_model()` (a recipe's build_model loading `--weights`) loads
nothing and is recorded instead; `materialise` runs it again on the sharded model, where
launcher/runtime/weights.py copies into each DTensor only the rows of its local shard
(`local_slices`), read from the safetensors file alone.

Parameters no load gave values (a replaced head, or all of them: a model the recipe builds on the
meta device itself to train from scratch) are initialised on the shards one module at a time:
each module's parameters are drawn whole on the device by the model's `_init_weights(module)`
(transformers' and nanoGPT's convention) or the module's `reset_parameters()`, then
--weight_init, and each rank keeps its slice. The values are the same on
any number of ranks, but not those of a model built on the host (another order of random draws).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import resource
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from launcher.config import ConfigError


class DeferredLoad(NamedTuple):
    """A load_weights call made while the model had no memory, to be made again once it has."""

    module: nn.Module  # the model, or the part of it the recipe loaded into
    args: tuple
    kwargs: dict


_loads: contextvars.ContextVar[list[DeferredLoad] | None] = contextvars.ContextVar(
    "deferred_loads", default=None
)


def defer_load(module: nn.Module, *args, **kwargs) -> bool:
    """Called by load_weights: inside `empty_model()`, record the call and return True (load nothing)."""
    pending = _loads.get()
    if pending is None:
        return False
    pending.append(DeferredLoad(module, args, kwargs))
    return True


@contextlib.contextmanager
def empty_model():
    """Parameters registered inside go to the meta device (buffers stay on the host); yields the list
    of load_weights calls made inside, for `materialise`."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one (a tied weight) is kept as it is
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    pending: list[DeferredLoad] = []
    token = _loads.set(pending)
    nn.Module.register_parameter = register_on_meta
    try:
        yield pending
    finally:
        nn.Module.register_parameter = register
        _loads.reset(token)


def is_empty(model: nn.Module) -> bool:
    """Whether any of the model's parameters is on the meta device (holds no values yet)."""
    return any(p.is_meta or getattr(p, "_local_tensor", p).is_meta for p in model.parameters())


def materialise(
    model: nn.Module,
    device: torch.device,
    loads: list[DeferredLoad],
    load_weights: Callable,
    init: Callable[[nn.Module], None],
) -> None:
    """The sharded, empty `model` given memory on `device` (each rank its shards), its host-built
    buffers put back, then loaded by the recorded `loads` or, without any, initialised by `init`
    (called with each module whose own parameters need values, see `initialise`)."""
    _to_empty(model, device)
    unloaded = {id(p) for p in model.parameters()}
    for load in loads:
        report = load_weights(load.module, *load.args, **load.kwargs)
        state = load.module.state_dict(keep_vars=True)
        left = {id(state[name]) for name in [*report["missing"], *report["replaced"]] if name in state}
        unloaded -= {id(tensor) for tensor in state.values()} - left
    if unloaded:  # a replaced head, parameters the recipe allowed to be missing, or no weights at all
        initialise(model, init, unloaded)


def _to_empty(model: nn.Module, device: torch.device) -> None:
    """Parameters given (uninitialised) memory on `device`; the buffers, built on the host with
    their values, moved there (to_empty alone would leave them uninitialised too)."""
    buffers = {
        (module, name): buffer
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    }
    model.to_empty(device=device)
    for (module, name), buffer in buffers.items():
        module._buffers[name] = buffer.to(device)


@torch.no_grad()
def initialise(model: nn.Module, init: Callable[[nn.Module], None], only: set[int]) -> None:
    """The parameters whose ids are in `only` drawn whole on the device by `init(module)` of their
    module, this rank keeping its slice of each: the host holds one module's parameters at a time."""
    for module in model.modules():
        own = {name: p for name, p in module._parameters.items() if p is not None}
        if not any(id(p) in only for p in own.values()):
            continue
        whole = {
            name: nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device=sharded_device(p)), requires_grad=p.requires_grad
            )
            for name, p in own.items()
        }
        module._parameters.update(whole)
        try:
            init(module)
        finally:
            module._parameters.update(own)
        for name, p in own.items():
            if id(p) not in only:
                continue  # loaded
            slices = local_slices(p)
            local_tensor(p).copy_(whole[name][slices] if slices else whole[name])


def module_init(model: nn.Module, scheme_init: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """The initialisation of one module of `model`: the model's `_init_weights(module)` where it has one,
    else the module's `reset_parameters()`, then `scheme_init` (--weight_init)."""
    own_init = getattr(model, "_init_weights", None)

    def init(module: nn.Module) -> None:
        if own_init is not None:
            own_init(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif any(True for _ in module.parameters(recurse=False)):
            raise ConfigError(
                f"the model was built on the meta device, and its {type(module).__name__} has no "
                "reset_parameters() to give its parameters values; give it one, or load --weights"
            )
        scheme_init(module)

    return init


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (ties kept; buffers copied): what
    the EMA starts from under FSDP, given values by `copy_values` once sharded."""
    memo = {id(p): nn.Parameter(p.to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def copy_values(target: nn.Module, source: nn.Module, device: torch.device) -> None:
    """`target`, sharded like `source` but empty, given memory on `device` and `source`'s values,
    each rank copying its own shards (and every buffer)."""
    _to_empty(target, device)
    pairs = [*zip(target.parameters(), source.parameters()), *zip(target.buffers(), source.buffers())]
    for mine, theirs in pairs:
        local_tensor(mine).copy_(local_tensor(theirs))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sharded_device(tensor: torch.Tensor) -> torch.device:
    return local_tensor(tensor).device


def local_slices(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The part of the whole tensor that a DTensor's local shard holds (one slice per dimension), or
    None for a plain tensor: FSDP's rows [offset, offset + local rows) on this rank."""
    if not hasattr(tensor, "device_mesh"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(start, start + length) for start, length in zip(offset, shape))


READ_BYTES = 8 * 2**20  # a shard is read in blocks of rows of at most this size: the host's only extra memory


def copy_slice(
    local: torch.Tensor, slices: tuple[slice, ...], read: Callable[[tuple[slice, ...]], torch.Tensor]
) -> None:
    """Fill `local`, the part `slices` of a whole tensor, with `read(part)` of blocks of its rows, so
    that reading a shard of an embedding never holds a second copy of the shard."""
    if not local.numel():
        return  # a rank past a short tensor's rows holds none
    if local.ndim == 0:
        local.copy_(read(slices))
        return
    rows = max(1, READ_BYTES // (local[0].numel() * local.element_size()))
    first = slices[0].start
    for start in range(0, local.shape[0], rows):
        stop = min(start + rows, local.shape[0])
        local[start:stop].copy_(read((slice(first + start, first + stop), *slices[1:])))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
