"""The fields every recipe shares.

A recipe's `Config` subclasses `TrainConfig`, whose fields come in sections (run, data,
optimisation, checkpoints, tracking, parallelism, speed: one dataclass each). Each field carries a
trailing `# comment` that is its help text (or, too long for the line, `#:` lines right above it),
and a numeric one its range (`ranged`), declared once: validation, `python -m launcher RECIPE
--help` and the usage text read both from here. Every problem is a `ConfigError`, which the CLI
prints as one line (exit 2). How overrides, --config files and a run's saved config become a
config: launcher/overrides.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line on stderr and exits with code 2."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: at_least <= value (<= at_most, or < below)."""

    at_least: float | None = None
    at_most: float | None = None
    below: float | None = None

    def __contains__(self, value: float) -> bool:
        return (
            (self.at_least is None or value >= self.at_least)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below)
        )

    def __str__(self) -> str:
        high = self.at_most if self.below is None else self.below
        if high is None:
            return f">= {_number(self.at_least)}"
        return f"in [{_number(self.at_least)}, {_number(high)}{']' if self.below is None else ')'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def ranged(default: float, *, at_least: float, at_most: float | None = None, below: float | None = None):
    """A numeric field with its range, declared once: validation and --help read it from here."""
    return dataclasses.field(default=default, metadata={"range": Range(at_least, at_most, below)})


class RunStopped(RuntimeError):
    """A run that cannot or should not go on (non-finite loss, preemption): one line, `exit_code`."""

    exit_code = 1


class DataError(RunStopped):
    """The data cannot be trained on: a share with no readable sample, more unreadable samples than
    --max_corrupt_fraction allows, samples that do not collate. Exit code 65 (sysexits' EX_DATAERR),
    apart from bad input (2), since it is often found epochs into a run."""

    exit_code = 65


@dataclass
class RunFields:
    """What the run is: where it writes, its length, its seed and how it resumes."""

    output_dir: str = "runs/default"  # where metrics, config, checkpoints and final weights go
    seed: int = ranged(0, at_least=0)  # one seed for the run; per-rank and per-worker seeds derive from it
    epochs: int = ranged(1, at_least=1)  # passes over the training split
    #: stop after this many optimizer steps (0: no limit); for debugging
    max_steps: int = ranged(0, at_least=0)
    #: "" starts fresh, "auto" takes the newest checkpoint in output_dir, or a checkpoint path; fields not
    #: given come from the checkpoint's config
    resume: str = ""
    #: --resume with a flag that changes the result (model, data, batch, schedule) set otherwise than the
    #: checkpoint: refuse, or allow it
    resume_changes: Literal["refuse", "allow"] = "refuse"
    #: deterministic algorithms and cuDNN (slower; ops without a deterministic version raise)
    deterministic: bool = False
    #: write each rank's training sample keys to output_dir/samples/ (debugging, tests)
    trace_samples: bool = False
    #: end a rank (exit 124, its stacks in output_dir/hangs/) when no step, evaluation batch or save
    #: progressed for this long (0: off)
    hang_timeout_s: float = ranged(1800.0, at_least=0)


@dataclass
class DataFields:
    """How batches are made and fed: sizes, DataLoader workers, unreadable samples."""

    batch_size: int = ranged(32, at_least=1)  # samples per device per micro-batch
    eval_batch_size: int = ranged(0, at_least=0)  # samples per device per evaluation batch (0: batch_size)
    num_workers: int = ranged(2, at_least=0)  # DataLoader worker processes per rank
    prefetch_factor: int = ranged(2, at_least=1)  # batches each DataLoader worker prepares ahead
    #: keep DataLoader workers alive across epochs and evaluations (the same batches, no start-up each time)
    persistent_workers: bool = False
    #: page-locked host batches and non-blocking copies to the GPU (no effect without one)
    pin_memory: bool = True
    #: workers only read shards; JPEGs are decoded on the training device (nvJPEG on a GPU)
    #: and transformed there
    data_on_gpu: bool = False
    #: replace the data with random inputs of its shape (generated once, no I/O): measures the step alone
    synthetic_data: bool = False
    #: stop when more than this fraction of an epoch's samples is unreadable
    max_corrupt_fraction: float = ranged(0.01, at_least=0, at_most=1)


@dataclass
class OptimisationFields:
    """What an optimizer step does: accumulation, optimizer, LR schedule, loss, regularisation, guards."""

    grad_accum_steps: int = ranged(1, at_least=1)  # micro-batches per optimizer step
    #: torch.optim optimizer, unless the recipe's schedule names one
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"] = "adamw"
    momentum: float = ranged(0.9, at_least=0)  # sgd and rmsprop momentum
    nesterov: bool = False  # sgd: Nesterov momentum
    lr: float = ranged(1e-3, at_least=0)  # base learning rate; each parameter group scales it
    #: weight decay (adamw: decoupled; others: L2), unless a parameter group sets its own
    weight_decay: float = ranged(0.0, at_least=0)
    #: LR schedule, unless the recipe's schedule sets one; step/multistep/exponential change at epoch ends,
    #: plateau after evaluations
    lr_schedule: Literal["cosine", "constant", "step", "multistep", "exponential", "plateau"] = "cosine"
    #: optimizer steps of linear LR warm-up from 0, in front of any lr_schedule
    warmup_steps: int = ranged(0, at_least=0)
    min_lr_ratio: float = ranged(0.0, at_least=0, at_most=1)  # cosine decay ends at lr x this
    #: step/multistep/exponential: LR x this per decay; plateau: x this on a plateau
    lr_gamma: float = ranged(0.1, at_least=0)
    lr_step_size: int = ranged(30, at_least=1)  # step: epochs between decays
    lr_milestones: tuple[int, ...] = ()  # multistep: epochs at which the LR decays
    lr_patience: int = ranged(10, at_least=0)  # plateau: evaluations without improvement before the LR decays
    lr_plateau_metric: str = "val/loss"  # plateau: the evaluation metric watched (losses: lower is better)
    #: training loss, unless the recipe defines build_loss
    loss: Literal["cross_entropy", "nll", "bce_with_logits", "mse", "l1"] = "cross_entropy"
    label_smoothing: float = ranged(0.0, at_least=0, below=1)  # cross_entropy label smoothing
    #: per-class loss weights (cross_entropy, nll; bce_with_logits: pos_weight)
    class_weights: tuple[float, ...] = ()
    mixup_alpha: float = ranged(0.0, at_least=0)  # MixUp Beta(alpha, alpha) on training batches (0: off)
    #: CutMix Beta(alpha, alpha) on training batches (0: off; with MixUp, one of the two per batch)
    cutmix_alpha: float = ranged(0.0, at_least=0)
    #: keep an EMA of the weights with this decay (e.g. 0.999), evaluated as val_ema/* (0: off)
    ema_decay: float = ranged(0.0, at_least=0, below=1)
    ema_warmup: bool = True  # EMA decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates
    max_grad_norm: float = ranged(0.0, at_least=0)  # clip the global gradient norm to this (0: no clipping)
    #: on a NaN/Inf loss or gradient: stop with an error, or skip the step and count it
    nonfinite: Literal["stop", "skip"] = "stop"
    #: re-initialise conv and linear layers of a model trained from scratch
    weight_init: Literal[
        "default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "trunc_normal"
    ] = "default"


@dataclass
class CheckpointFields:
    """When the run evaluates and checkpoints, which checkpoints are kept, and which one is best."""

    #: evaluate every N optimizer steps (0: at epoch ends); the best checkpoint, early stopping and a plateau
    #: schedule follow
    eval_every: int = ranged(0, at_least=0)
    #: evaluate on the same first K validation batches of each process every time (0: every sample)
    eval_batches: int = ranged(0, at_least=0)
    #: also checkpoint every N optimizer steps, mid-epoch included (0: epoch ends only)
    checkpoint_every: int = ranged(0, at_least=0)
    checkpoint_epoch_end: bool = True  # checkpoint at each epoch end (after evaluation)
    #: keep the newest K checkpoints, plus the best one (0: keep all)
    keep_checkpoints: int = ranged(3, at_least=0)
    #: evaluation metric that picks the best checkpoint
    #: ("": the task's, val/top1 for classifiers, else val/loss)
    best_metric: str = ""
    #: whether a higher or lower best_metric is better (auto: max for accuracies and r2, min otherwise)
    best_mode: Literal["auto", "max", "min"] = "auto"
    #: stop after this many evaluations without a better best_metric (0: never)
    early_stop_patience: int = ranged(0, at_least=0)
    #: early stopping counts an evaluation as better only if it beats the best by more than this, in
    #: best_metric's units (the best checkpoint still follows any gain)
    early_stop_min_delta: float = ranged(0.0, at_least=0)
    #: what the run's model.safetensors holds: the last step's weights, or the best checkpoint's (ddp)
    final_weights: Literal["last", "best"] = "last"
    #: a peft model: also write its adapters merged into the base,
    #: in the Hugging Face layout, to OUTPUT_DIR/hf/
    export_merged: bool = False
    #: the final weights (model.safetensors, hf/) above this size are split into files of at most this size,
    #: with an index (KB, MB, GB: powers of 1000, as transformers)
    max_shard_size: str = "5GB"
    #: fsdp: write checkpoints in the background (DCP async_save);
    #: a step waits only for the copy to host memory
    async_checkpoint: bool = False


@dataclass
class TrackingFields:
    """What is logged, and where (metrics.jsonl always; wandb, TensorBoard)."""

    log_every: int = ranged(10, at_least=1)  # optimizer steps between logged training metrics
    #: training progress: a tqdm bar, a plain line every log_every steps (step, loss, LR, samples/s, time
    #: left) or none; auto: the bar when stderr is a terminal, lines otherwise (Slurm, a redirected log)
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    #: print only warnings, errors, where a resume continues and the final lines: no plan, progress or
    #: evaluation lines
    quiet: bool = False
    #: experiment trackers: wandb, tensorboard (OUTPUT_DIR/tensorboard); metrics.jsonl always
    trackers: tuple[str, ...] = ("wandb",)
    #: validation images (with prediction and label) logged to wandb per evaluation (image classifiers)
    log_images: int = ranged(16, at_least=0)
    #: auto: online with credentials, else offline
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "launcher"  # wandb project name
    wandb_entity: str = ""  # wandb team or user ("" = your default entity)
    wandb_name: str = ""  # wandb run name ("" = the output_dir's name)
    wandb_group: str = ""  # wandb group, to compare related runs together
    wandb_tags: tuple[str, ...] = ()  # wandb tags
    wandb_notes: str = ""  # wandb notes: what this run tries
    #: the device's peak dense TFLOPS for train/mfu (0: from the table of GPUs in
    #: launcher/track/throughput.py; no MFU where unknown)
    peak_tflops: float = ranged(0.0, at_least=0)
    #: A:B: a torch.profiler trace of optimizer steps A to B (and on CUDA a memory snapshot) in
    #: OUTPUT_DIR/profile/ ("": none)
    profile_steps: str = ""


@dataclass
class ParallelFields:
    """How the model is spread over the processes."""

    #: ddp: a whole copy of the model per process; fsdp: parameters, gradients and optimizer state sharded
    #: over the processes (FSDP2, torch >= 2.7)
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    #: fsdp default policy: besides the repeated blocks, a module with this many parameters outside smaller
    #: units becomes a shard unit (0: blocks only)
    fsdp_unit_params: int = ranged(10_000_000, at_least=0)
    #: fsdp: free each unit's gathered parameters after its forward and gather them again for the backward
    #: (False: more memory, less communication)
    fsdp_reshard_after_forward: bool = True
    #: recompute each shard unit's activations in the backward instead of keeping them (less memory, about a
    #: third more compute)
    activation_checkpointing: bool = False


@dataclass
class SpeedFields:
    """Speed settings that leave the result unchanged (up to rounding)."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype for forward passes
    #: model weights and input batches in channels-last memory layout (faster convolutions on GPUs)
    channels_last: bool = False
    #: torch.compile the model before DDP wraps it (fsdp: each shard unit before sharding); the first steps
    #: are slow while it compiles
    compile: bool = False
    #: let cuDNN pick the fastest convolution per input shape (fixed shapes; not with deterministic)
    cudnn_benchmark: bool = False
    #: all-reduce gradients as 16-bit floats across processes (half the bytes; gradients rounded to 16 bits)
    ddp_comm_hook: Literal["no", "fp16", "bf16"] = "no"


@dataclass
class TrainConfig(
    SpeedFields, ParallelFields, TrackingFields, CheckpointFields, OptimisationFields, DataFields, RunFields
):
    """The fields every recipe shares, in sections (run first); a recipe's Config adds its own."""

    def validate(self) -> None:
        """Checks that need no data or model; raise ConfigError naming the flag. Ranges and choices are
        TrainConfig's (so a recipe that re-declares a field keeps them) plus the recipe's own."""
        hints = typing.get_type_hints(TrainConfig)
        for name, accepted in field_ranges(type(self)).items():
            if getattr(self, name) not in accepted:
                raise ConfigError(f"--{name} must be {accepted}, got {getattr(self, name)}")
        if self.deterministic and self.cudnn_benchmark:
            raise ConfigError("--deterministic and --cudnn_benchmark contradict each other; keep one")
        if not self.output_dir:
            raise ConfigError("--output_dir must not be empty")
        profile_window(self.profile_steps)
        if self.final_weights == "best" and self.data_parallel == "fsdp":
            raise ConfigError(
                "--final_weights=best needs --data_parallel=ddp (FSDP checkpoints are sharded); under "
                "fsdp keep --final_weights=last and evaluate or predict with --checkpoint=RUN_DIR/best"
            )
        size_in_bytes(self.max_shard_size)
        for name, tp in hints.items():
            if typing.get_origin(tp) is Literal and getattr(self, name) not in typing.get_args(tp):
                raise ConfigError(f"--{name} must be {type_name(tp)}, got {getattr(self, name)!r}")

    def resolved(self) -> TrainConfig:
        """A copy with the automatic choices made (wandb mode, eval batch size)."""
        changes: dict[str, Any] = {}
        if self.wandb_mode == "auto":
            changes["wandb_mode"] = "online" if has_wandb_credentials() else "offline"
        if self.eval_batch_size == 0:
            changes["eval_batch_size"] = self.batch_size
        return dataclasses.replace(self, **changes)


def profile_window(steps: str) -> tuple[int, int] | None:
    """--profile_steps "A:B" as (A, B), 1 <= A <= B; None for "" (no profile)."""
    if not steps:
        return None
    first, _, last = steps.partition(":")
    if not (first.isdigit() and last.isdigit()) or not 1 <= int(first) <= int(last):
        raise ConfigError(
            f"--profile_steps must be A:B, optimizer steps with 1 <= A <= B (e.g. 5:8), got {steps!r}"
        )
    return int(first), int(last)


SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def size_in_bytes(size: str) -> int:
    """'5GB' -> 5 * 10**9 (transformers' max_shard_size notation); anything else is refused naming
    --max_shard_size."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(size))
    if not found or found.group(2).upper() not in SIZE_UNITS or float(found.group(1)) <= 0:
        raise ConfigError(f"--max_shard_size must be a size like 5GB, 500MB or 20KB, got {size!r}")
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2).upper()])


SECTIONS = {
    RunFields: "run",
    DataFields: "data",
    OptimisationFields: "optimisation",
    CheckpointFields: "checkpoints",
    TrackingFields: "tracking",
    ParallelFields: "parallelism",
    SpeedFields: "speed",
}


def field_ranges(config_cls: type) -> dict[str, Range]:
    """Field name -> its declared range: TrainConfig's, and those of the recipe's own fields."""
    ranges = {f.name: f.metadata["range"] for f in dataclasses.fields(TrainConfig) if "range" in f.metadata}
    ranges.update(
        {f.name: f.metadata["range"] for f in dataclasses.fields(config_cls) if "range" in f.metadata}
    )
    return ranges


def sections(config_cls: type) -> dict[str, list[str]]:
    """Section -> its field names, in declaration order: the recipe's own fields first, then TrainConfig's."""
    shared = {name: title for klass, title in SECTIONS.items() for name in klass.__dataclass_fields__}
    grouped: dict[str, list[str]] = {"recipe": []}
    grouped.update((title, []) for title in SECTIONS.values())
    for f in dataclasses.fields(config_cls):
        grouped[shared.get(f.name, "recipe")].append(f.name)
    return {title: names for title, names in grouped.items() if names}


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
