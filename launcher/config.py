"""The fields every recipe shares, and turning CLI overrides into a validated config.

A recipe's `Config` subclasses `TrainConfig`. Each field carries a trailing `# comment` that is
its help text (shown by `python -m launcher RECIPE --help`). Overrides from the command line are
checked against the fields here: unknown names get close matches, wrong types name the field and
the type expected. Every problem is a `ConfigError`, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line on stderr and exits with code 2."""


class RunStopped(RuntimeError):
    """A run that cannot or should not go on (non-finite loss, preemption): one line, `exit_code`."""

    exit_code = 1


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # where metrics, config, checkpoints and final weights go
    seed: int = 0  # one seed for the run; per-rank and per-worker seeds derive from it
    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit); for debugging
    batch_size: int = 32  # samples per device per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype for forward passes
    resume: str = ""  # "" starts fresh, "auto" takes the newest checkpoint in output_dir, or a checkpoint path
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with credentials, else offline
    wandb_project: str = "launcher"  # wandb project name
    wandb_entity: str = ""  # wandb team or user ("" = your default entity)
    wandb_name: str = ""  # wandb run name ("" = the output_dir's name)
    wandb_group: str = ""  # wandb group, to compare related runs together
    wandb_tags: tuple[str, ...] = ()  # wandb tags
    wandb_notes: str = ""  # wandb notes: what this run tries
    trackers: tuple[str, ...] = ("wandb",)  # experiment trackers: wandb, tensorboard (OUTPUT_DIR/tensorboard); metrics.jsonl always
    log_images: int = 16  # validation images (with prediction and label) logged to wandb per evaluation (image classifiers)
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"] = "adamw"  # torch.optim optimizer, unless the recipe's schedule names one
    momentum: float = 0.9  # sgd and rmsprop momentum
    nesterov: bool = False  # sgd: Nesterov momentum
    lr: float = 1e-3  # base learning rate; each parameter group scales it
    weight_decay: float = 0.0  # weight decay (adamw: decoupled; others: L2), unless a parameter group sets its own
    lr_schedule: Literal["cosine", "constant", "step", "multistep", "exponential", "plateau"] = "cosine"  # LR schedule, unless the recipe's schedule sets one; step/multistep/exponential change at epoch ends, plateau after evaluations
    warmup_steps: int = 0  # optimizer steps of linear LR warm-up from 0, in front of any lr_schedule
    min_lr_ratio: float = 0.0  # cosine decay ends at lr x this
    lr_gamma: float = 0.1  # step/multistep/exponential: LR x this per decay; plateau: x this on a plateau
    lr_step_size: int = 30  # step: epochs between decays
    lr_milestones: tuple[int, ...] = ()  # multistep: epochs at which the LR decays
    lr_patience: int = 10  # plateau: evaluations without improvement before the LR decays
    lr_plateau_metric: str = "val/loss"  # plateau: the evaluation metric watched (losses: lower is better)
    loss: Literal["cross_entropy", "nll", "bce_with_logits", "mse", "l1"] = "cross_entropy"  # training loss, unless the recipe defines build_loss
    label_smoothing: float = 0.0  # cross_entropy label smoothing
    class_weights: tuple[float, ...] = ()  # per-class loss weights (cross_entropy, nll; bce_with_logits: pos_weight)
    mixup_alpha: float = 0.0  # MixUp Beta(alpha, alpha) on training batches (0: off)
    cutmix_alpha: float = 0.0  # CutMix Beta(alpha, alpha) on training batches (0: off; with MixUp, one of the two per batch)
    ema_decay: float = 0.0  # keep an EMA of the weights with this decay (e.g. 0.999), evaluated as val_ema/* (0: off)
    ema_warmup: bool = True  # EMA decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates
    early_stop_patience: int = 0  # stop after this many evaluations without a better best_metric (0: never)
    max_grad_norm: float = 0.0  # clip the global gradient norm to this (0: no clipping)
    weight_init: Literal["default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "trunc_normal"] = "default"  # re-initialise conv and linear layers of a model trained from scratch
    deterministic: bool = False  # deterministic algorithms and cuDNN (slower; ops without a deterministic version raise)
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest convolution per input shape (fixed shapes; not with deterministic)
    num_workers: int = 2  # DataLoader worker processes per rank
    eval_batch_size: int = 0  # samples per device per evaluation batch (0: batch_size)
    log_every: int = 10  # optimizer steps between logged training metrics
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps, mid-epoch included (0: epoch ends only)
    checkpoint_epoch_end: bool = True  # checkpoint at each epoch end (after evaluation)
    keep_checkpoints: int = 3  # keep the newest K checkpoints, plus the best one (0: keep all)
    best_metric: str = ""  # evaluation metric that picks the best checkpoint ("": the task's, val/top1 for classifiers, else val/loss)
    best_mode: Literal["auto", "max", "min"] = "auto"  # whether a higher or lower best_metric is better (auto: max for accuracies and r2, min otherwise)
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/Inf loss or gradient: stop with an error, or skip the step and count it
    max_corrupt_fraction: float = 0.01  # stop when more than this fraction of an epoch's samples is unreadable
    channels_last: bool = False  # model weights and input batches in channels-last memory layout (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model (before DDP wraps it); the first steps are slow while it compiles
    pin_memory: bool = True  # page-locked host batches and non-blocking copies to the GPU (no effect without one)
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead
    data_on_gpu: bool = False  # workers only read shards; JPEGs are decoded on the training device (nvJPEG on a GPU) and transformed there
    persistent_workers: bool = False  # keep DataLoader workers alive across epochs and evaluations (the same batches, no start-up each time)
    ddp_comm_hook: Literal["no", "fp16", "bf16"] = "no"  # all-reduce gradients as 16-bit floats across processes (half the bytes; gradients rounded to 16 bits)
    synthetic_data: bool = False  # replace the data with random inputs of its shape (generated once, no I/O): measures the step alone
    trace_samples: bool = False  # write each rank's training sample keys to output_dir/samples/ (debugging, tests)

    def validate(self) -> None:
        """Checks that need no data or model; raise ConfigError naming the flag."""
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "num_workers", "eval_batch_size", "seed", "checkpoint_every",
                     "keep_checkpoints", "log_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio", "max_corrupt_fraction", "momentum",
                     "lr_gamma", "label_smoothing", "mixup_alpha", "cutmix_alpha", "lr_patience",
                     "early_stop_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1) (e.g. 0.999; 0 turns EMA off), got {self.ema_decay}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"--prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.lr_step_size < 1:
            raise ConfigError(f"--lr_step_size must be >= 1 (epochs), got {self.lr_step_size}")
        if self.deterministic and self.cudnn_benchmark:
            raise ConfigError("--deterministic and --cudnn_benchmark contradict each other; keep one")
        if not self.output_dir:
            raise ConfigError("--output_dir must not be empty")
        # Choices are checked by value too, so a recipe that re-declares a field as `str` keeps them.
        for name, tp in typing.get_type_hints(TrainConfig).items():
            if typing.get_origin(tp) is Literal and getattr(self, name) not in typing.get_args(tp):
                raise ConfigError(f"--{name} must be {type_name(tp)}, got {getattr(self, name)!r}")

    def resolved(self) -> "TrainConfig":
        """A copy with the automatic choices made (wandb mode, eval batch size)."""
        changes: dict[str, Any] = {}
        if self.wandb_mode == "auto":
            changes["wandb_mode"] = "online" if has_wandb_credentials() else "offline"
        if self.eval_batch_size == 0:
            changes["eval_batch_size"] = self.batch_size
        return dataclasses.replace(self, **changes)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def field_help(config_cls: type) -> dict[str, str]:
    """Field name -> the `# comment` on its line, from the class and its bases."""
    helps: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", source, re.MULTILINE):
            helps[match.group(1)] = match.group(2).strip()
    return helps


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of `config` with CLI values applied, each checked against its field type."""
    hints = typing.get_type_hints(type(config))
    known = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else (
                "see the fields with --help")
            raise ConfigError(f"unknown field --{name} for {type(config).__module__}; {hint}")
        changes[name] = coerce(name, value, hints[name])
    updated = dataclasses.replace(config, **changes)
    updated.validate()
    return updated


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a value parsed by fire to the field's type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = ConfigError(f"--{name} expects {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, option)
            except ConfigError:
                pass
        raise wrong
    if origin is Literal:
        text = str(value)
        if text in [str(a) for a in args]:
            return next(a for a in args if str(a) == text)
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    if origin in (tuple, list):
        items = value if isinstance(value, (tuple, list)) else (value,)
        item_type = args[0] if args else Any
        converted = [coerce(name, item, item_type) for item in items]
        return origin(converted)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise wrong


def variant(config_cls: type, **defaults) -> type:
    """A subclass of a recipe's Config with other defaults: how tiny and debug variants are made."""
    hints = typing.get_type_hints(config_cls)
    unknown = [name for name in defaults if name not in hints]
    if unknown:
        raise ConfigError(f"variant of {config_cls.__name__}: unknown fields {', '.join(unknown)}")
    fields = [(name, hints[name], dataclasses.field(default=value)) for name, value in defaults.items()]
    cls = dataclasses.make_dataclass(config_cls.__name__, fields, bases=(config_cls,))
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", config_cls.__module__)
    return cls
