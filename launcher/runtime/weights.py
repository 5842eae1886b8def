"""Initial weights for a model: a launcher run, a Hugging Face model directory, a file, or a
torchvision weights name.

    load_weights(model, "runs/pretrain")              # OUTPUT_DIR's model.safetensors (or its shards + index)
    load_weights(model, "runs/pretrain/best")         # its best checkpoint (checkpoints/best.json)
    load_weights(model, "models/Llama-3.2-1B")        # save_pretrained's (model.safetensors[.index.json],
                                                      # or pytorch_model.bin[.index.json])
    load_weights(model, "resnet18.pth")               # .pth/.pt/.bin/.safetensors, state_dict or checkpoint
    load_weights(model, "IMAGENET1K_V1", arch="resnet18")   # from the local torch hub cache

`open_weights(source)` reads any of these lazily (`WeightFiles`: the file's own names, shapes,
whole tensors or slices; safetensors read only the bytes asked for). `match_keys` pairs the file's
names with the model's: exactly, or with one prefix added to or removed from every file name
(`module.`, `model.`, `_orig_mod.`, `base_model.model.`, ...). Keys under `head` whose shapes differ
are left as initialised (the head is replaced for the new classes); any other shape mismatch is an
error naming the key and both shapes, and so is a trainable parameter the file leaves unloaded,
unless it matches one of the `allow_missing` patterns (the recipe's `allowed_missing(cfg)`).
Tied weights (an LM head sharing the embedding) are loaded through whichever name the file has.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from launcher.config import ConfigError
from launcher.runtime import meta_build

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where checkpoints keep the weights
INDEX_SUFFIX = ".index.json"
DIRECTORY_FILES = (
    "model.safetensors",
    "model.safetensors" + INDEX_SUFFIX,
    "pytorch_model.bin",
    "pytorch_model.bin" + INDEX_SUFFIX,
)  # in order of preference
SHOWN = 3  # names shown in a one-line error


# ---- reading: every source as names, shapes and tensors ------------------------------------------


class _SafetensorsFile:
    """One .safetensors file, memory-mapped: tensors (or slices) are read only when asked for."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self.handle = safe_open(path, framework="pt")
            self.shapes = {key: tuple(self.handle.get_slice(key).get_shape()) for key in self.handle.keys()}
        except Exception as error:  # noqa: BLE001 - safetensors raises its own kinds for a bad header
            raise ConfigError(
                f"weights file {path} cannot be read ({type(error).__name__}: {error}); "
                "is it whole? download or export it again"
            ) from None

    def read(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def read_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        if not slices or not self.shapes[name]:
            return self.read(name)
        from safetensors import safe_open

        # A map of its own, closed at once: the file's pages it touched leave this process's resident
        # memory (through the long-lived map they would stay counted, FSDP's shards of the whole file).
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_slice(name)[tuple(slices)]


class _TensorDict:
    """A torch.save'd state_dict or checkpoint, memory-mapped where its format allows (zip, torch >= 1.6)."""

    def __init__(self, path: str):
        self.path = path
        self.tensors = {
            key: value for key, value in _torch_load(path).items() if isinstance(value, torch.Tensor)
        }
        self.shapes = {key: tuple(value.shape) for key, value in self.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def read_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][tuple(slices)].clone()  # a copy: the file's pages are not kept alive


def _torch_load(path: str) -> dict:
    """The state_dict in a torch.save'd file (weights_only: nothing is unpickled but tensors and
    containers)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means an unusable file
        raise ConfigError(
            f"weights file {path} cannot be read ({type(error).__name__}); "
            "is it a state_dict or checkpoint saved with torch.save or safetensors?"
        ) from None
    for key in CHECKPOINT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _open_file(path: str):
    return _SafetensorsFile(path) if path.endswith(".safetensors") else _TensorDict(path)


class WeightFiles:
    """The tensors of one weights source, by the file's own names, read on demand.

    with open_weights("models/llama") as files:
        files.names                                  # ["model.embed_tokens.weight", ...]
        files.shape("model.norm.weight")             # (2048,)
        files.read("model.norm.weight")              # the whole tensor, on the CPU
        files.read_slice("lm_head.weight", (slice(0, 100),))   # rows 0-99 only
    """

    def __init__(self, source: str, where: dict[str, object]):
        self.source = source  # what the user named, for messages
        self._where = where  # name -> the file (a _SafetensorsFile or _TensorDict) holding it
        self.names = list(where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shapes[name]

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def read_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        """Part of a tensor: one python slice per leading dimension
        (FSDP's shard of rows: `(slice(a, b),)`)."""
        return self._where[name].read_slice(name, slices)

    def close(self) -> None:
        self._where, self.names = {}, []  # the memory maps close with the last reference

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weights(source: str, arch: str = "") -> WeightFiles:
    """`source` (see the module's docstring) ready to read; a damaged or missing file is one line."""
    # here: checkpoints imports DCP, which torch 2.7 makes slow
    from launcher.runtime.checkpoints import resolve_best

    source = resolve_best(source)  # RUN_DIR/best or a best.json: the best checkpoint's directory
    if os.path.isdir(source):
        return _open_path(_directory_file(source), source)
    if os.path.isfile(source):
        return _open_path(source, source)
    if source.endswith((".pth", ".pt", ".safetensors", ".bin", ".json")) or "/" in source:
        raise ConfigError(f"weights file {source} not found; check the path")
    return _open_path(_torchvision_file(source, arch), source)


def _directory_file(directory: str) -> str:
    for name in DIRECTORY_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ConfigError(
        f"weights directory {directory} has no {', '.join(DIRECTORY_FILES[:-1])} or "
        f"{DIRECTORY_FILES[-1]}; pass a finished launcher run's output_dir, a Hugging Face model "
        "directory or a weights file"
    )


def _open_path(path: str, source: str) -> WeightFiles:
    if path.endswith(INDEX_SUFFIX):
        return WeightFiles(source, _open_index(path))
    file = _open_file(path)
    return WeightFiles(source, {name: file for name in file.shapes})


def _open_index(path: str) -> dict[str, object]:
    """Sharded weights: the index's weight_map (tensor name -> shard file beside it), each shard opened."""
    try:
        with open(path, "rb") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a mapping of tensor names to files")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"weights index {path} is damaged ({type(error).__name__}: {error}); "
            "download or export the model again"
        ) from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(os.path.dirname(path), shard)
        if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
            raise ConfigError(
                f"weights index {path} names shard {shard}, which is missing; "
                "download or export the model again"
            )
        files[shard] = _open_file(shard_path)
    lacking = [name for name, shard in weight_map.items() if name not in files[shard].shapes]
    if lacking:
        raise ConfigError(
            f"weights shard {os.path.join(os.path.dirname(path), weight_map[lacking[0]])} lacks "
            f"{lacking[0]}, which its index {path} names; download or export the model again"
        )
    return {name: files[shard] for name, shard in weight_map.items()}


def _torchvision_file(name: str, arch: str) -> str:
    """A torchvision weights name's file in the hub cache (never downloaded here)."""
    import torchvision

    if not arch:
        raise ConfigError(
            f"weights {name!r} is neither a file nor a directory; for torchvision "
            "weights the recipe must name its architecture"
        )
    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[name.split(".")[-1]]
    except (KeyError, ValueError):
        raise ConfigError(
            f"weights {name!r}: not a file, a run directory, or a torchvision weights name for {arch}"
        ) from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ConfigError(
            f"torchvision weights {arch} {weights.name} are not cached: put "
            f"{os.path.basename(weights.url)} (from {weights.url}) at {path}, "
            "or pass a local file with --weights=PATH"
        )
    return path


# ---- matching the file's names with the model's -----------------------------------------------


def match_keys(file_names: Iterable[str], model_names: Iterable[str]) -> dict[str, str]:
    """{model name: file name}: the names equal, or else one prefix removed from (or added to) every
    file name, whichever pairs the most names (ties: no change, then the shortest prefix). The model's
    names are never changed: a prefix both sides share (`model.` in every causal LM) stays."""
    files, models = list(file_names), set(model_names)
    exact = sum(name in models for name in files)
    prefixes: Counter = Counter()  # (removed, added) -> names it pairs
    for names, others, side in ((files, models, 0), (models, set(files), 1)):
        for name in names:
            parts = name.split(".")
            for cut in range(1, len(parts)):
                if ".".join(parts[cut:]) in others:
                    prefix = ".".join(parts[:cut]) + "."
                    prefixes[(prefix, "") if side == 0 else ("", prefix)] += 1
    removed, added = "", ""
    if prefixes:
        (best, count) = max(
            prefixes.items(), key=lambda item: (item[1], -len(item[0][0] + item[0][1]), item[0])
        )
        if count > exact:
            removed, added = best
    matched = {}
    for name in files:
        if name.startswith(removed) and added + name[len(removed) :] in models:
            matched[added + name[len(removed) :]] = name
    return matched


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each state_dict name -> every name of the same tensor (tied weights: the embedding and the LM head)."""
    by_tensor: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def unloaded(
    model: nn.Module, loaded: Iterable[str], *, head: str = "", allow_missing: Iterable[str] = ()
) -> list[str]:
    """The trainable parameters none of whose names is in `loaded`, other than the replaced `head`'s
    and those matching an `allow_missing` fnmatch pattern."""
    loaded, patterns, names = set(loaded), list(allow_missing), aliases(model)
    missing = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or any(alias in loaded for alias in names.get(name, [name])):
            continue
        if _under(name, head) or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        missing.append(name)
    return missing


def refuse_partial(
    model: nn.Module,
    loaded: Iterable[str],
    files: WeightFiles,
    *,
    head: str = "",
    allow_missing: Iterable[str] = (),
) -> None:
    """One line naming the trainable parameters `files` left unloaded, if any."""
    missing = unloaded(model, loaded, head=head, allow_missing=allow_missing)
    if not missing:
        return
    total = sum(1 for p in model.parameters() if p.requires_grad)
    example = _first(files.names, 2) or "nothing"
    raise ConfigError(
        f"weights {files.source} leave {len(missing)} of the model's {total} trainable parameters "
        f"unloaded: {_first(missing)} (the file names tensors like {example}); "
        "pass weights made for this model, or list the parameters that may start untrained in the "
        "recipe's allowed_missing(cfg) (load_weights(..., allow_missing=[...]))"
    )


def _first(names: list[str], shown: int = SHOWN) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ---- loading --------------------------------------------------------------------------------


def load_weights(
    model: nn.Module,
    source: str,
    *,
    arch: str = "",
    head: str = "fc",
    allow_missing: Iterable[str] = (),
    log=print,
) -> dict:
    """Load `source` into `model`, tensor by tensor; return {"missing", "unexpected", "replaced"} key
    lists (missing: the model's names left as initialised; unexpected: the file's names not used).
    While the launcher builds an FSDP model without memory, the load is recorded and made once the
    model is sharded, each rank reading its shards' rows alone (launcher/runtime/meta_build.py)."""
    if meta_build.defer_load(model, source, arch=arch, head=head, allow_missing=allow_missing, log=log):
        return {"missing": [], "unexpected": [], "replaced": [], "deferred": True}
    own = model.state_dict()
    with open_weights(source, arch) as files:
        matched, replaced = match_keys(files.names, own), {}
        for model_name, file_name in list(matched.items()):
            expected, found = tuple(own[model_name].shape), files.shape(file_name)
            if expected != found:
                if not _under(model_name, head):
                    raise ConfigError(
                        f"weights {source}: {model_name} has shape {found}, the model expects "
                        f"{expected}; check --arch or the weights file"
                    )
                replaced[model_name] = matched.pop(model_name)  # the new head keeps its initialisation
        refuse_partial(model, matched, files, head=head, allow_missing=allow_missing)
        copy_matched(model, files, matched)
        used, names = {*matched.values(), *replaced.values()}, aliases(model)
        report = {
            "missing": [
                name
                for name in own
                if name not in replaced and not any(alias in matched for alias in names.get(name, [name]))
            ],
            "unexpected": [name for name in files.names if name not in used],
            "replaced": sorted(replaced),
        }
    log(
        f"loaded {len(matched)} tensors from {source}; "
        f"head replaced: {', '.join(report['replaced']) or 'no'}; "
        f"missing: {_first(report['missing'], 8) or 'none'}; "
        f"unexpected: {_first(report['unexpected'], 8) or 'none'}"
    )
    return report


def _under(name: str, head: str) -> bool:
    return bool(head) and (name == head or name.startswith(head + "."))


@torch.no_grad()
def copy_matched(model: nn.Module, files: WeightFiles, matched: dict[str, str]) -> None:
    """Each matched tensor read and copied into the model's (cast to its dtype), one at a time: the
    host holds the model and one tensor of the file, never the whole file. A sharded (FSDP) tensor
    reads only the rows of this rank's shard."""
    own = model.state_dict()  # views of the parameters and buffers
    for model_name, file_name in matched.items():
        target, slices = own[model_name], meta_build.local_slices(own[model_name])
        if slices is None:
            target.copy_(files.read(file_name))
        else:
            meta_build.copy_slice(
                meta_build.local_tensor(target), slices, functools.partial(files.read_slice, file_name)
            )


# ---- whether a checkpoint fits a model exactly (resume, evaluate, predict) ---------------------


def fit_problem(model: nn.Module, files: WeightFiles, skip: frozenset[str] = frozenset()) -> str:
    """'' if `files` hold exactly the model's tensors (tied ones once is enough) but those in `skip`
    (a PEFT model's frozen base) with its shapes, else the first differences in one line (`misfit`)."""
    own = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in skip}
    matched = match_keys(files.names, own)
    found = {name: files.shape(file_name) for name, file_name in matched.items()}
    used = set(matched.values())
    # by the file's own names
    found.update({name: files.shape(name) for name in files.names if name not in used})
    names = aliases(model)
    expected = {
        name: shape
        for name, shape in own.items()
        if name in matched or not any(alias in matched for alias in names.get(name, []))
    }
    return misfit(expected, found)


def misfit(expected: dict[str, tuple], found: dict[str, tuple], shown: int = SHOWN) -> str:
    """'' if `found` (a checkpoint's tensor shapes) fits `expected` (the model's) exactly, else its
    first differences in one line: shapes, then names missing or unexpected."""
    different = [key for key in expected if key in found and tuple(found[key]) != tuple(expected[key])]
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    parts = []
    if different:
        first = different[0]
        parts.append(
            f"{first} is {tuple(found[first])} in the checkpoint, {tuple(expected[first])} in the model"
            + "".join(f"; {key} {tuple(found[key])} vs {tuple(expected[key])}" for key in different[1:shown])
            + (f" ({len(different)} of {len(expected)} tensors differ)" if len(different) > shown else "")
        )
    for what, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected)):
        if keys:
            parts.append(f"{what}: {_first(keys, shown)}")
    return "; ".join(parts)


def load_exactly(model: nn.Module, source: str, skip: frozenset[str] = frozenset()) -> str:
    """Load checkpoint `source` into `model` if it fits exactly (`fit_problem`) but for the tensors in
    `skip` (a PEFT model's frozen base, left as built); return the problem, or ''."""
    with open_weights(source) as files:
        problem = fit_problem(model, files, skip=skip)
        if not problem:
            own = {name: tensor for name, tensor in model.state_dict().items() if name not in skip}
            copy_matched(model, files, match_keys(files.names, own))
    return problem


def tensor_names(source: str) -> set[str]:
    """The names of the tensors `source` holds, as its files name them (nothing is read but headers)."""
    with open_weights(source) as files:
        return set(files.names)
