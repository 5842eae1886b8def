"""Initial weights for a model: a launcher run, a local file, or a torchvision weights name.

    load_weights(model, "runs/pretrain")              # OUTPUT_DIR/model.safetensors of a run
    load_weights(model, "runs/pretrain/best")         # its best checkpoint (checkpoints/best.json)
    load_weights(model, "resnet18.pth")               # .pth/.pt/.safetensors, state_dict or checkpoint
    load_weights(model, "IMAGENET1K_V1", arch="resnet18")   # from the local torch hub cache

Keys are matched after stripping `module.`, `model.` and `_orig_mod.` prefixes. Keys under
`head` whose shapes differ are left as initialised (the head is replaced for the new classes);
any other shape mismatch is an error naming the key and both shapes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from launcher.config import ConfigError


PREFIXES = ("module.", "model.", "_orig_mod.")
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_weights(model: nn.Module, source: str, *, arch: str = "", head: str = "fc",
                 log=print) -> dict:
    """Load `source` into `model`; return {"missing", "unexpected", "replaced"} key lists."""
    state = read_state_dict(source, arch)
    own = model.state_dict()
    loadable, replaced = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if key == head or key.startswith(head + "."):
                replaced.append(key)
                continue
            raise ConfigError(f"weights {source}: {key} has shape {tuple(value.shape)}, the model "
                              f"expects {tuple(own[key].shape)}; check --arch or the weights file")
        loadable[key] = value
    result = model.load_state_dict(loadable, strict=False)
    report = {"missing": [k for k in result.missing_keys if k not in replaced],
              "unexpected": sorted(set(state) - set(own)), "replaced": sorted(replaced)}
    log(f"loaded {len(loadable)} tensors from {source}; head replaced: {', '.join(report['replaced']) or 'no'}; "
        f"missing: {', '.join(report['missing']) or 'none'}; unexpected: {', '.join(report['unexpected']) or 'none'}")
    return report


def read_state_dict(source: str, arch: str = "") -> dict[str, torch.Tensor]:
    from launcher.runtime.checkpoints import resolve_best  # here: checkpoints imports DCP, which torch 2.7 makes slow

    source = resolve_best(source)  # RUN_DIR/best or a best.json: the best checkpoint's directory
    if os.path.isdir(source):
        path = os.path.join(source, "model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"weights directory {source} has no model.safetensors; pass a finished "
                              "launcher run's output_dir or a weights file")
        return read_state_dict(path)
    if os.path.isfile(source):
        return _strip_prefixes(_read_file(source))
    if source.endswith((".pth", ".pt", ".safetensors", ".bin")) or "/" in source:
        raise ConfigError(f"weights file {source} not found; check the path")
    return _read_torchvision(source, arch)


def _read_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means an unusable file
        raise ConfigError(f"weights file {path} cannot be read ({type(error).__name__}); "
                          "is it a state_dict or checkpoint saved with torch.save or safetensors?") from error
    for key in CHECKPOINT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    return state


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """A state dict's {name: shape}, names without wrapper prefixes (DDP's module., compile's _orig_mod.)."""
    return {key: tuple(value.shape) for key, value in _strip_prefixes(state).items() if hasattr(value, "shape")}


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in a .safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own kinds for a bad header
        raise ConfigError(f"weights file {path} cannot be read ({type(error).__name__}: {error})") from None
    return _strip_prefixes(found)


def misfit(expected: dict[str, tuple], found: dict[str, tuple], shown: int = 3) -> str:
    """'' if `found` (a checkpoint's tensor shapes) fits `expected` (the model's) exactly, else its
    first differences in one line: shapes, then names missing or unexpected."""
    different = [key for key in expected if key in found and tuple(found[key]) != tuple(expected[key])]
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    parts = []
    if different:
        first = different[0]
        parts.append(f"{first} is {tuple(found[first])} in the checkpoint, {tuple(expected[first])} in the model"
                     + "".join(f"; {key} {tuple(found[key])} vs {tuple(expected[key])}" for key in different[1:shown])
                     + (f" ({len(different)} of {len(expected)} tensors differ)" if len(different) > shown else ""))
    for what, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected)):
        if keys:
            parts.append(f"{what}: {', '.join(keys[:shown])}" + (f" and {len(keys) - shown} more" if len(keys) > shown else ""))
    return "; ".join(parts)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        stripped[key] = value
    return stripped


def _read_torchvision(name: str, arch: str) -> dict[str, torch.Tensor]:
    """A torchvision weights name, read from the hub cache only (never downloads)."""
    import torchvision

    if not arch:
        raise ConfigError(f"weights {name!r} is neither a file nor a directory; for torchvision "
                          "weights the recipe must name its architecture")
    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[name.split(".")[-1]]
    except (KeyError, ValueError):
        raise ConfigError(f"weights {name!r}: not a file, a run directory, or a torchvision weights "
                          f"name for {arch}") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ConfigError(f"torchvision weights {arch} {weights.name} are not cached: put "
                          f"{os.path.basename(weights.url)} (from {weights.url}) at {path}, "
                          "or pass a local file with --weights=PATH")
    return _strip_prefixes(_read_file(path))
