"""The run's final weights, written for other tools: OUTPUT_DIR/model.safetensors (model_ema.safetensors
for the EMA) and, for a transformers model, OUTPUT_DIR/hf/ in save_pretrained's layout.

    OUTPUT_DIR/model.safetensors                     up to --max_shard_size (default 5GB, as transformers)
    OUTPUT_DIR/model-00001-of-00003.safetensors ...  above it: shards and model.safetensors.index.json
    OUTPUT_DIR/hf/config.json, generation_config.json, model[-0000K-of-0000N].safetensors[.index.json],
                  the tokenizer files of the recipe's tokenizer_dir(cfg)

A model is written tensor by tensor, whether whole (DDP) or sharded (FSDP): every process gathers
one parameter at a time (`full_tensor`, a collective), the main process keeps it until its shard is
complete and writes that shard, so no process holds more than one shard of the model in host
memory. Tied tensors (an LM head sharing the embedding) are written once, under the name
transformers keeps. Everything is written into a staging directory, synced, and moved into place:
a reader sees the previous export or the whole new one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

from launcher import durable
from launcher.config import ConfigError
from launcher.runtime.sharding import full

WEIGHTS_STEM, EMA_STEM = "model", "model_ema"
HF_DIR = "hf"
# OUTPUT_DIR/.export, OUTPUT_DIR/.export-hf: written in full before they are moved in place
STAGING = ".export"
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab*",
    # what transformers' tokenizers save (*.model: sentencepiece)
    "merges.txt",
    "*.model",
    "*.tiktoken",
)


@dataclass(frozen=True)
class HFLayout:
    """What OUTPUT_DIR/hf/ is written from: the transformers model by its name inside the trained
    model ("" for the model itself; a name, not the module: the trainer keeps no extra reference to
    it), and the directory whose tokenizer files go beside it ("" for none)."""

    module_name: str
    tokenizer_dir: str


def is_transformers_model(module: nn.Module) -> bool:
    """A transformers PreTrainedModel, by its duck type (transformers is never imported here); not a
    peft model (`peft_config`), whose state_dict names the adapters' wrapping: it exports its own way."""
    config = getattr(module, "config", None)
    return (
        callable(getattr(module, "save_pretrained", None))
        and callable(getattr(config, "save_pretrained", None))
        and not hasattr(module, "peft_config")
    )


def hf_layout(cfg, recipe, model: nn.Module) -> HFLayout | None:
    """Whether the run writes OUTPUT_DIR/hf/, checked when the model is built: for a transformers
    model, or the one the recipe's hf_model(cfg, model) names inside its own; its tokenizer_dir(cfg)
    must hold tokenizer files."""
    inner = recipe.hf_model(cfg, model)
    if inner is None or (inner is model and not is_transformers_model(model)):
        return None
    names = {module: name for name, module in model.named_modules()}
    if inner not in names or not is_transformers_model(inner):
        raise ConfigError(
            f"recipe {recipe.name}: hf_model(cfg, model) returned a {type(inner).__name__}, not a "
            "transformers model inside the recipe's model; return one of its submodules (or None)"
        )
    tokenizer_dir = recipe.tokenizer_dir(cfg)
    if tokenizer_dir and not tokenizer_files(tokenizer_dir):
        raise ConfigError(
            f"recipe {recipe.name}: tokenizer_dir(cfg) is {tokenizer_dir}, which holds no tokenizer "
            f"files ({', '.join(TOKENIZER_FILES)}); name the model's directory or return ''"
        )
    return HFLayout(names[inner], tokenizer_dir)


def tokenizer_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    return [
        name
        for name in names
        if os.path.isfile(os.path.join(directory, name))
        and any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES)
    ]


# ---- writing ---------------------------------------------------------------------------------


def unique_tensors(module: nn.Module, dropped: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The module's state_dict tensors as they are (DTensors under FSDP: nothing gathered), each tied
    tensor once: under its first name not in `dropped` (transformers' tied keys: lm_head.weight)."""
    kept: dict[int, str] = {}
    tensors = module.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    for name, tensor in tensors.items():
        first = kept.setdefault(id(tensor), name)
        if first in dropped and name not in dropped:
            kept[id(tensor)] = name
    names = set(kept.values())
    return {name: tensor for name, tensor in tensors.items() if name in names}


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int, stem: str) -> dict[str, list[str]]:
    """{file name: tensor names}: one `STEM.safetensors`, or huggingface_hub's split into
    `STEM-0000K-of-0000N.safetensors` above max_shard_bytes, planned from shapes alone (meta tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = {
        name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for name, tensor in tensors.items()
    }
    split = split_torch_state_dict_into_shards(
        shapes, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    return split.filename_to_tensors


def write_safetensors(
    tensors: dict[str, torch.Tensor], directory: str, stem: str, max_shard_bytes: int, is_writer: bool
) -> list[str]:
    """`tensors` as STEM.safetensors, or as shards with STEM.safetensors.index.json, in `directory`;
    returns the file names. A collective under FSDP: every process calls it, `is_writer` writes."""
    plan = plan_shards(tensors, max_shard_bytes, stem)
    for file_name, names in plan.items():
        shard = {}
        for name in names:
            whole = full(tensors[name].detach())  # FSDP: this parameter alone, gathered on every process
            if is_writer:
                shard[name] = whole.to("cpu").contiguous()
            del whole
        if is_writer:
            safetensors.torch.save_file(shard, os.path.join(directory, file_name), metadata={"format": "pt"})
        del shard  # the host holds one shard at a time
    files = list(plan)
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file_name for file_name, names in plan.items() for name in names},
        }
        if is_writer:
            with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        files.append(f"{stem}.safetensors.index.json")
    return files


def write_final_weights(
    out: str,
    model: nn.Module,
    ema_model: nn.Module | None,
    hf: HFLayout | None,
    max_shard_bytes: int,
    is_main: bool,
) -> dict:
    """The final weights into `out` (see the module's docstring); returns {"weights_file": the file to
    read them from, "ema_weights_file" and "hf_dir" where written}. A collective under FSDP."""
    staging = os.path.join(out, STAGING)
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed export's leftovers
        os.makedirs(staging)
    result, written = {}, []
    with durable.no_space_left(out):
        for key, module, stem in (
            ("weights_file", model, WEIGHTS_STEM),
            ("ema_weights_file", ema_model, EMA_STEM),
        ):
            if module is not None:
                files = write_safetensors(unique_tensors(module), staging, stem, max_shard_bytes, is_main)
                result[key] = os.path.join(out, files[-1])  # the index when sharded
                written += files
    if is_main:
        _remove_stale(out, written)
        durable.publish_files(staging, out)
    if hf is not None:
        result["hf_dir"] = write_hf(
            os.path.join(out, HF_DIR),
            model.get_submodule(hf.module_name),
            hf.tokenizer_dir,
            max_shard_bytes,
            is_main,
        )
    return result


def _remove_stale(out: str, written: list[str]) -> None:
    """An earlier export's weight files that this one does not replace (a single file now sharded, or
    the other way round): left in place, a reader could take them for this run's."""
    pattern = re.compile(rf"({WEIGHTS_STEM}|{EMA_STEM})(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in written:
            os.remove(os.path.join(out, name))


def write_hf(target: str, module: nn.Module, tokenizer_dir: str, max_shard_bytes: int, is_main: bool) -> str:
    """`module` (a transformers model, whole or sharded) in save_pretrained's layout at `target`,
    replacing any earlier one at once. A collective under FSDP."""
    staging = os.path.join(os.path.dirname(target), STAGING + "-" + os.path.basename(target))
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        _write_hf_configs(module, staging)
        for name in tokenizer_files(tokenizer_dir) if tokenizer_dir else []:
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(staging, name))
    with durable.no_space_left(target):
        ignored = getattr(module, "_keys_to_ignore_on_save", None) or ()  # what save_pretrained leaves out
        tensors = {
            name: t for name, t in unique_tensors(module, _tied_keys(module)).items() if name not in ignored
        }
        write_safetensors(tensors, staging, WEIGHTS_STEM, max_shard_bytes, is_main)
        if is_main:
            durable.sync_tree(staging)
            _swap_in(staging, target)
    return target


def _write_hf_configs(module: nn.Module, directory: str) -> None:
    """config.json (with the architecture and dtype save_pretrained records) and, for a model that
    generates, generation_config.json; the model's own config is left unchanged."""
    import copy

    config = copy.deepcopy(module.config)
    config.architectures = [type(module).__name__.removeprefix("FSDP")]  # fully_shard renames the class
    floating = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    config.dtype = str(floating).removeprefix("torch.")  # from_pretrained's dtype="auto" reads it
    config.save_pretrained(directory)
    generation = getattr(module, "generation_config", None)
    can_generate = getattr(module, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(directory)


def _tied_keys(module: nn.Module) -> frozenset[str]:
    """The names transformers leaves out of a save when tied (`_tied_weights_keys`: a dict target ->
    source in transformers 5, a list in 4)."""
    return frozenset(getattr(module, "_tied_weights_keys", None) or ())


def _swap_in(staging: str, target: str) -> None:
    old = target + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, old)
    durable.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
