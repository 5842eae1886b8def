"""PEFT models (LoRA and peft's other methods): a recipe's `build_model` returns
`peft.get_peft_model(model, LoraConfig(...))`, and the run trains the adapters alone.

A `PeftModel` is found by duck typing (`peft_config` and `get_base_model`); nothing here imports
peft except the merged export, which only runs for one. What this module owns:
- the frozen base: the parameters peft froze when it wrapped the model. They join no parameter
  group (a recipe's `Group("all")` or layer-decay groups cannot unfreeze them), stay out of the
  optimizer and out of checkpoints; a resume rebuilds them from the recipe (and its --weights);
- the base's fingerprint, kept in each checkpoint's trainer_state.json, so that a resume onto
  another base is refused in one line instead of training adapters that no longer fit;
- the exports at the end of a run: OUTPUT_DIR/adapter/ (adapter_model.safetensors and
  adapter_config.json, peft's own `save_pretrained`: `PeftModel.from_pretrained(base, DIR)` loads
  it) and, with --export_merged, OUTPUT_DIR/hf/: the adapters merged into the base by peft's own
  `merge_and_unload`, written by transformers' `save_pretrained`.
"""

from __future__ import annotations

import os

import torch
import xxhash
from torch import nn

from launcher import durable
from launcher.config import ConfigError
from launcher.runtime import sharding

ADAPTER_DIR = "adapter"  # OUTPUT_DIR/adapter: peft's save_pretrained layout
MERGED_DIR = "hf"  # OUTPUT_DIR/hf: the merged model in transformers' save_pretrained layout


class PeftRun:
    """What a run does for a PEFT model (nothing for any other): the base's fingerprint in each
    checkpoint and its check at a resume, and the exports at the end."""

    def __init__(self, accelerator, model: nn.Module, frozen: frozenset[str]):
        """After the model is sharded (FSDP): every rank calls it (the main process's fingerprint is
        everyone's, so a refusal at a resume happens on all of them)."""
        from accelerate.utils import broadcast_object_list

        self.accelerator, self.frozen_base = accelerator, frozen
        fingerprint = [base_fingerprint(model, frozen) if accelerator.is_main_process else ""]
        if frozen and accelerator.num_processes > 1:
            broadcast_object_list(fingerprint, from_process=0)
        self.fingerprint = fingerprint[0]

    def state(self) -> dict:
        """What a checkpoint's trainer_state.json keeps."""
        return {"frozen_base": self.fingerprint} if self.fingerprint else {}

    def check_resume(self, path: str, saved: dict) -> None:
        check_same_base(path, saved, self.fingerprint)

    def export(self, model: nn.Module, output_dir: str, merged: bool) -> None:
        """OUTPUT_DIR/adapter/ and, if `merged`, OUTPUT_DIR/hf/ (every rank calls it: a collective
        under FSDP). `model`: the unwrapped PeftModel."""
        if not self.frozen_base:
            return
        main = self.accelerator.is_main_process
        trained = gathered_state(model, self.frozen_base, with_base=False, is_main=main)
        if main:
            export_adapter(model, trained, output_dir)
        if merged:
            whole = gathered_state(model, self.frozen_base, with_base=True, is_main=main)
            if main:
                export_merged(model, whole, output_dir)
        self.accelerator.wait_for_everyone()


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def frozen_base(model: nn.Module) -> frozenset[str]:
    """The names of the parameters a PEFT model froze (its base), as the recipe built it; empty for
    any other model (its freezing is the recipe's parameter groups')."""
    if not is_peft_model(model):
        return frozenset()
    return frozenset(name for name, param in model.named_parameters() if not param.requires_grad)


def missing_base(model: nn.Module, state: dict) -> frozenset[str]:
    """The frozen base's names if `state` (a checkpoint's tensors) is a PEFT model's checkpoint,
    which holds none of them (the recipe builds the base); else empty."""
    frozen = frozen_base(model)
    return frozen if frozen and frozen.isdisjoint(state) else frozenset()


def plan_note(model: nn.Module, frozen: frozenset[str]) -> str:
    """The plan's line on a PEFT model ('' for any other)."""
    if not frozen:
        return ""
    base = sum(p.numel() for name, p in model.named_parameters() if name in frozen)
    return (
        f"peft: the base's {base:,} parameters ({len(frozen)} tensors) are frozen, in no parameter group and "
        f"in no checkpoint (rebuilt by the recipe at a resume); the adapters are exported to "
        f"OUTPUT_DIR/{ADAPTER_DIR}/"
    )


def base_fingerprint(model: nn.Module, frozen: frozenset[str]) -> str:
    """One line that tells two bases apart: xxh3-64 of each frozen tensor's name, shape and dtype and
    of its first row (the main process holds that row under FSDP on any number of processes, so the
    line is the same for DDP and FSDP); '' for a model without a frozen base."""
    if not frozen:
        return ""
    digest = xxhash.xxh3_64()
    for name, param in model.named_parameters():
        if name not in frozen:
            continue
        mine = sharding.local(param.detach())
        first_row = (mine.reshape(1) if mine.ndim == 0 else mine[:1]).cpu().contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(first_row.view(torch.uint8).numpy().tobytes() if first_row.numel() else b"")
    return f"xxh3_64:{digest.hexdigest()} over {len(frozen)} frozen tensors"


def check_same_base(path: str, saved: dict, fingerprint: str) -> None:
    """A resume from checkpoint `path` (its trainer state `saved`) onto this run's frozen base."""
    then = saved.get("frozen_base", "")
    if then == fingerprint:
        return
    if not then or not fingerprint:
        which = "a PEFT model's adapters" if then else "a whole model"
        now = "a PEFT model" if fingerprint else "not a PEFT model"
        raise ConfigError(
            f"checkpoint {path} holds {which}, this run's model is {now}; "
            "resume with the recipe it was trained with"
        )
    raise ConfigError(
        f"checkpoint {path} trained adapters on another base model ({then}; this run's base: "
        f"{fingerprint}); resume with the base weights it was trained on (--weights, the recipe's model)"
    )


def gathered_state(
    model: nn.Module, frozen: frozenset[str], with_base: bool, is_main: bool
) -> dict[str, torch.Tensor]:
    """The unwrapped model's state (without the frozen base unless `with_base`), whole, on the main
    process's host memory (empty elsewhere). A collective under FSDP: one all-gather per tensor."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name in frozen and not with_base:
            continue
        whole = sharding.full(tensor.detach())
        if is_main:
            state[name] = whole.cpu().clone()
    return state


def export_adapter(model: nn.Module, trained: dict[str, torch.Tensor], output_dir: str) -> str:
    """Main process: OUTPUT_DIR/adapter/ by peft's own save_pretrained, from the gathered adapter
    tensors (`trained`: what `gathered_state` gave without the base). Returns the directory."""
    target = os.path.join(output_dir, ADAPTER_DIR)
    with durable.no_space_left(output_dir):
        model.save_pretrained(target, state_dict=trained, safe_serialization=True)
    return target


def check_mergeable(model: nn.Module) -> None:
    """--export_merged needs a PEFT model over a transformers model (one that writes the HF layout)."""
    if not is_peft_model(model):
        raise ConfigError(
            "--export_merged merges a PEFT model's adapters into its base, and this recipe's model "
            f"({type(model).__name__}) is not a peft PeftModel; drop --export_merged"
        )
    method = model.peft_config[model.active_adapter]
    if getattr(method, "is_prompt_learning", False):
        raise ConfigError(
            f"--export_merged merges adapter weights into the base, and {type(method).__name__} learns "
            f"prompts, which do not merge; drop --export_merged and use OUTPUT_DIR/{ADAPTER_DIR}/"
        )
    base = model.get_base_model()
    if not (hasattr(base, "save_pretrained") and hasattr(base, "config")):
        raise ConfigError(
            f"--export_merged writes the Hugging Face layout, and the base model "
            f"({type(base).__name__}) is not a transformers model; drop --export_merged and use "
            f"OUTPUT_DIR/{ADAPTER_DIR}/"
        )


def export_merged(model: nn.Module, whole: dict[str, torch.Tensor], output_dir: str) -> str:
    """Main process: OUTPUT_DIR/hf/, the adapters merged into the base. A copy of the model is built
    without memory (meta device), takes the gathered tensors (`whole`, every one of the model's), and
    peft merges it (`merge_and_unload`: each LoRA layer's W + scaling x B @ A); transformers writes it.
    The run's own model, sharded or not, is left as it is."""
    from peft import get_peft_model

    base = model.get_base_model()
    adapter = model.active_adapter
    with torch.device("meta"):
        copy = get_peft_model(type(base)(base.config), model.peft_config[adapter], adapter_name=adapter)
    # strict=False: non-persistent buffers (rotary frequencies) stay on meta, and are never written
    copy.load_state_dict(whole, assign=True, strict=False)
    missing = [name for name, tensor in copy.state_dict().items() if tensor.is_meta]
    if missing:
        raise RuntimeError(f"the merged export lacks {len(missing)} tensors ({', '.join(missing[:3])})")
    merged = copy.merge_and_unload()
    target = os.path.join(output_dir, MERGED_DIR)
    with durable.no_space_left(output_dir):
        merged.save_pretrained(target)
    return target
