"""A checkpoint's training state, written and read without pickle: what Accelerate's
save_state/load_state kept (as pickles, which run code when loaded) in files that hold only data.

Every file of a checkpoint and how it is read (a checkpoint may come from shared storage or from
someone else: nothing in it may run code):

    model.safetensors                 DDP: the unwrapped model's weights (safetensors: tensors only);
                                      a PEFT model's without its frozen base
    optimizer.json + .safetensors     the optimizer's state_dict: its structure and numbers as JSON,
                                      its tensors as safetensors
    registered-N.json (+ .safetensors) the N-th object registered with
                                      accelerator.register_for_checkpointing (the LR scheduler, the
                                      plateau schedule, DDP's EMA): its state_dict, as above
    scaler.json                       fp16's grad scaler (numbers)
    random-states-R.json + .safetensors  rank R's Python and numpy RNG states (JSON), torch's CPU
                                      and device RNG states (safetensors), Accelerate's step counter
    states.json                       what the main process wrote (counts, the registered types)
    sharded/.metadata                 FSDP (DCP): a pickle, read by an unpickler that builds only
                                      DCP's metadata classes, torch.Size, dtypes, layouts and paths
    sharded/*.distcp                  DCP's tensors (torch.load with weights_only=True, DCP's own) and
                                      its other values, the optimizer's hyperparameters (here, also
                                      weights_only=True: DCP's default planner unpickles them freely)

JSON tags what it has no type for: {"__tuple__": [...]}, {"__items__": [[key, value], ...]} (a dict
whose keys are not all strings) and {"__tensor__": name, "__stride__": [...]} (a tensor in the
.safetensors beside it; the stride only for a dense layout other than contiguous: channels_last).
Python's floats are written as the shortest text that reads back to the same bits.

A checkpoint holding Accelerate's pickles (*.pkl, *.bin, scaler.pt) was written by an older
launcher: `refuse_pickled` turns it down in one line, and nothing of it is read.
"""

from __future__ import annotations

import builtins
import collections
import functools
import importlib
import json
import os
import pathlib
import pickle
import random
import re

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

from launcher.config import ConfigError

INDEX_FILE = "states.json"
FORMAT = 1
# Accelerate's optimizer.bin, scaler.pt, random_states_0.pkl, ...
PICKLED_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
TENSOR, STRIDE, TUPLE, ITEMS = "__tensor__", "__stride__", "__tuple__", "__items__"
TAGS = {TENSOR, STRIDE, TUPLE, ITEMS}


# ---- values as JSON plus tensors ------------------------------------------------------------------


def _encode(value, tensors: dict[str, torch.Tensor], where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value
        return {TENSOR: name, STRIDE: list(value.stride())} if _permuted(value) else {TENSOR: name}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not TAGS & value.keys():
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {
            ITEMS: [
                [_encode(key, tensors, f"{where} key"), _encode(item, tensors, f"{where}[{key!r}]")]
                for key, item in value.items()
            ]
        }
    raise ConfigError(
        f"{where} is a {type(value).__name__}; a checkpoint keeps tensors, numbers, strings, "
        "lists, tuples and dicts (it is written without pickle)"
    )


def _permuted(tensor: torch.Tensor) -> bool:
    """Dense in memory but not contiguous (channels_last): the strides are worth keeping. Other
    layouts (views with gaps or overlaps) are stored and read back contiguous."""
    if tensor.is_contiguous():
        return False
    expected = 1
    for dim in sorted(range(tensor.dim()), key=lambda d: (tensor.stride(d), tensor.size(d))):
        if tensor.size(dim) != 1 and tensor.stride(dim) != expected:
            return False
        expected *= tensor.size(dim)
    return True


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        tensor = tensors[value[TENSOR]]
        if STRIDE in value:  # the layout it was saved in (channels_last optimizer state)
            tensor = torch.empty_strided(tensor.shape, value[STRIDE], dtype=tensor.dtype).copy_(tensor)
        return tensor
    if TUPLE in value:
        return tuple(_decode(item, tensors) for item in value[TUPLE])
    if ITEMS in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value[ITEMS]}
    return {key: _decode(item, tensors) for key, item in value.items()}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On the CPU, contiguous, no two sharing memory (safetensors refuses that: tied weights)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[name] = tensor
    return out


def write_tree(stem: str, value, what: str) -> None:
    """`value` (a state_dict) as stem.json, its tensors in stem.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors, what)
    if tensors:
        safetensors.torch.save_file(_storable(tensors), stem + ".safetensors")
    with open(stem + ".json", "w") as f:
        json.dump(encoded, f)


def read_tree(stem: str):
    with open(stem + ".json") as f:
        encoded = json.load(f)
    tensors = (
        safetensors.torch.load_file(stem + ".safetensors") if os.path.isfile(stem + ".safetensors") else {}
    )
    return _decode(encoded, tensors)


# ---- random number generators ---------------------------------------------------------------------


def random_states(device: torch.device) -> dict:
    """This process's RNG states, as Accelerate's save_state takes them."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    module = _device_module(device)
    if module is not None:
        states["device"] = (
            module.get_rng_state_all() if hasattr(module, "get_rng_state_all") else [module.get_rng_state()]
        )
    return states


def restore_random_states(states: dict, device: torch.device) -> None:
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    module = _device_module(device)
    if module is not None and "device" in states:
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(states["device"])
        else:
            module.set_rng_state(states["device"][0])


def _device_module(device: torch.device):
    return None if device.type == "cpu" else getattr(torch, device.type, None)


# ---- a checkpoint's states ------------------------------------------------------------------------


def _numbered(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def _registered(accelerator: Accelerator) -> tuple[list, list, list]:
    """(models, optimizers, objects) as Accelerate holds them: what prepare() returned, and what
    register_for_checkpointing registered (the LR scheduler, the plateau schedule, DDP's EMA). No
    public API lists them; save_state read the same lists."""
    return accelerator._models, accelerator._optimizers, accelerator._custom_objects


def write(accelerator: Accelerator, path: str, frozen_base: frozenset[str] = frozenset()) -> None:
    """What accelerator.save_state wrote: the main process the models, optimizers, registered
    objects and grad scaler; every process its RNG states and Accelerate's step counter. The
    tensors named in `frozen_base` (a PEFT model's base) are left out: the recipe rebuilds them."""
    acc = accelerator
    models, optimizers, objects = _registered(acc)
    if acc.is_main_process:
        for i, model in enumerate(models):
            file = os.path.join(path, _numbered("model", i) + ".safetensors")
            if frozen_base:
                trained = {
                    k: v for k, v in acc.unwrap_model(model).state_dict().items() if k not in frozen_base
                }
                safetensors.torch.save_file(_storable(trained), file, metadata={"format": "pt"})
            else:  # tied weights once, channels_last made contiguous, as Accelerate did
                safetensors.torch.save_model(
                    acc.unwrap_model(model), file, metadata={"format": "pt"}, force_contiguous=True
                )
        for i, optimizer in enumerate(optimizers):
            write_tree(
                os.path.join(path, _numbered("optimizer", i)), optimizer.state_dict(), "the optimizer's state"
            )
        for i, obj in enumerate(objects):
            write_tree(
                os.path.join(path, f"registered-{i}"), obj.state_dict(), f"the state of {type(obj).__name__}"
            )
        if acc.scaler is not None:
            write_tree(os.path.join(path, "scaler"), acc.scaler.state_dict(), "the grad scaler's state")
        index = {
            "format": FORMAT,
            "models": len(models),
            "optimizers": len(optimizers),
            "registered": [type(obj).__name__ for obj in objects],
        }
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=1)
    write_tree(
        os.path.join(path, f"random-states-{acc.process_index}"),
        {"step": acc.step, **random_states(acc.device)},
        "the random states",
    )


def read(accelerator: Accelerator, path: str, frozen_base: frozenset[str] = frozenset()) -> None:
    """Load what `write` wrote into the accelerator's models, optimizers, registered objects and
    grad scaler, and this process's RNG states and step counter. A process the checkpoint has no
    RNG states for (it was written by fewer) keeps its own, as with Accelerate. `frozen_base`: the
    tensors the checkpoint leaves out (a PEFT model's base, as the recipe built it)."""
    acc = accelerator
    refuse_pickled(path)
    models, optimizers, objects = _registered(acc)
    with open(os.path.join(path, INDEX_FILE)) as f:
        index = json.load(f)
    if index["format"] > FORMAT:
        raise ConfigError(
            f"checkpoint {path} was written by a newer launcher (state format {index['format']}); "
            "resume it with that launcher"
        )
    written = (index["models"], index["optimizers"], index["registered"])
    here = (len(models), len(optimizers), [type(obj).__name__ for obj in objects])
    if written != here:
        raise ConfigError(
            f"checkpoint {path} holds {written[0]} model(s), {written[1]} optimizer(s) and the states "
            f"of [{', '.join(written[2])}], this run has {here[0]}, {here[1]} and [{', '.join(here[2])}]; "
            "resume with the settings it was written with (--ema_decay, --lr_schedule)"
        )
    for i, model in enumerate(models):
        file = os.path.join(path, _numbered("model", i) + ".safetensors")
        missing, unexpected = safetensors.torch.load_model(
            acc.unwrap_model(model), file, strict=not frozen_base
        )
        misfits = sorted(set(missing) - frozen_base) + sorted(unexpected)
        if misfits:
            raise ConfigError(
                f"checkpoint {path} does not fit the model ({len(misfits)} tensors differ: "
                f"{', '.join(misfits[:3])}); resume with the recipe and flags it was trained with"
            )
    for i, optimizer in enumerate(optimizers):
        optimizer.load_state_dict(read_tree(os.path.join(path, _numbered("optimizer", i))))
    for i, obj in enumerate(objects):
        obj.load_state_dict(read_tree(os.path.join(path, f"registered-{i}")))
    # none in the checkpoint (it trained without fp16): not loadable, as with Accelerate
    if acc.scaler is not None:
        acc.scaler.load_state_dict(read_tree(os.path.join(path, "scaler")))
    rank = os.path.join(path, f"random-states-{acc.process_index}")
    if os.path.isfile(rank + ".json"):
        states = read_tree(rank)
        acc.step = states["step"]
        restore_random_states(states, acc.device)


def refuse_pickled(path: str) -> None:
    """A checkpoint of Accelerate's save_state (an older launcher's) is refused, in one line."""
    pickled = sorted(name for name in os.listdir(path) if name.endswith(PICKLED_SUFFIXES))
    if not pickled:
        return
    weights = os.path.join(path, "model.safetensors")
    fix = (
        f"start a new --output_dir with --weights={weights}, or resume it with an older launcher"
        if os.path.isfile(weights)
        else "resume it with an older launcher"
    )
    raise ConfigError(
        f"checkpoint {path} was written by an older launcher: its states are pickled "
        f"({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}), which this launcher does "
        f"not load; {fix}"
    )


# ---- DCP (FSDP's sharded checkpoints) -------------------------------------------------------------

# What a DCP .metadata may name: DCP's own dataclasses (and one Enum), torch.Size, dtypes, layouts
# and memory formats, containers, and the path StorageMeta keeps. Nothing here runs code when built.
BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "set",
        "frozenset",
        "tuple",
        "list",
        "dict",
        "int",
        "float",
        "str",
        "bytes",
        "bool",
        "complex",
    )
}
PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


def _allowed(module: str, name: str):
    """The object a DCP .metadata may name, or None."""
    if module == "builtins":
        return BUILTINS.get(name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module in ("pathlib", "pathlib._local") and name in PATHS:  # pathlib._local: Python 3.13
        return getattr(pathlib, name)
    if module == "torch":
        value = getattr(torch, name, None)
        return (
            value
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
            else None
        )
    # how a torch.layout pickles: a lookup by name
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # noqa: SLF001
    if module in DCP_MODULES and (module == DCP_MODULES[0] or name == "_StorageInfo"):
        value = getattr(importlib.import_module(module), name, None)
        return value if isinstance(value, type) and value.__module__ == module else None
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed(module, name)
        if found is None:
            raise _Disallowed(f"{module}.{name}")
        return found


class _Disallowed(pickle.UnpicklingError):
    pass


@functools.cache
def _dcp_classes():
    """(reader, planner): DCP's FileSystemReader and DefaultLoadPlanner, without pickle's freedom."""
    from torch.distributed.checkpoint import FileSystemReader, default_planner
    from torch.distributed.checkpoint._traverse import set_element

    class MetadataCheckedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            if hasattr(self, "_get_metadata_path"):  # torch >= 2.8 (a rank's own metadata)
                file = self._get_metadata_path(rank)
            else:  # torch 2.7
                file = self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(file, "rb") as stream:
                try:
                    metadata = _MetadataUnpickler(stream).load()
                except _Disallowed as error:
                    raise ConfigError(
                        f"checkpoint {self.path}: {os.path.basename(str(file))} holds a disallowed type "
                        f"{error}; it was not written by the launcher"
                    ) from None
            from torch.distributed.checkpoint.metadata import Metadata

            if not isinstance(metadata, Metadata):
                raise ConfigError(
                    f"checkpoint {self.path}: {os.path.basename(str(file))} holds a "
                    f"{type(metadata).__name__}, not DCP's Metadata; it was not written by the launcher"
                )
            if hasattr(metadata, "storage_meta"):  # as FileSystemReader.read_metadata does
                from torch.distributed.checkpoint.metadata import StorageMeta

                if metadata.storage_meta is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyLoadPlanner(default_planner.DefaultLoadPlanner):
        """Values that are not tensors (the optimizer's hyperparameters) with weights_only=True."""

        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                named = re.search(r"GLOBAL (\S+)", str(error))
                raise ConfigError(
                    f"{fqn} holds a disallowed type {named[1] if named else '(not plain data)'}; "
                    "it was not written by the launcher"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return MetadataCheckedReader, WeightsOnlyLoadPlanner


def read_metadata(directory: str):
    """A DCP directory's .metadata, through the checked unpickler."""
    reader, _ = _dcp_classes()
    return reader(directory).read_metadata()


def load_sharded(state: dict, directory: str) -> None:
    """dcp.load(state) from `directory`, unpickling nothing but DCP's metadata (checked first, on
    every process, so a planted one is a one-line error before any collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader_class, planner_class = _dcp_classes()
    reader = reader_class(directory)
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=planner_class())
    except (CheckpointException, ConfigError) as error:
        # CheckpointException (a BaseException): each rank's failure
        failures = (
            [error]
            if isinstance(error, ConfigError)
            else [
                failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()
            ]
        )
        planted = next((failure for failure in failures if isinstance(failure, ConfigError)), None)
        if planted is not None:
            raise ConfigError(f"checkpoint {directory}: {planted}") from None
        reasons = [f"{type(failure).__name__}: {_first_line(failure)}" for failure in failures[:2]]
        raise RuntimeError("; ".join(reasons)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
