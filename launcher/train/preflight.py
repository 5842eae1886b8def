"""Pre-flight: one real batch of each split through collate, the device move, the model, the loss
and the metrics, before DDP wraps the model and before any DataLoader worker starts, so that a
recipe that would crash at step 1 or at the first evaluation fails in seconds. Nothing is updated:
the model runs in eval mode, no backward, and the random generators are restored.

It also decides what the run is: the step style (launcher/train/step.py), the task and its metrics
(launcher/train/metrics.py), the number of classes, the default best metric, and the model summary's
input -> output line. Mistakes that can be seen here are refused with the fix: cross-entropy on
float targets, MixUp/CutMix without class labels, a best metric the task does not produce, a
classifier with fewer outputs than the data's classes (more: a warning in the plan).

A recipe function that raises is named in a one-line error; the traceback of the recipe's own
code is printed above it (the user's code), the launcher's and torch's frames are not.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sysconfig
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import torch
import torch.utils._pytree as pytree
from PIL import Image

from launcher.config import ConfigError, DataError
from launcher.data.batch import collate, describe
from launcher.data.spec import Shards
from launcher.optim.losses import CrossEntropy
from launcher.track.throughput import FlopCount
from launcher.train.metrics import TaskMetrics, better_direction, default_best, infer_task, loss_name
from launcher.train.step import Step, StepOutput, call_model, choose_style

EXAMPLE_SAMPLES = 2  # samples per split pushed through the model
# default_collate's
COLLATABLE = (torch.Tensor, numpy.ndarray, numpy.generic, numbers.Number, str, bytes, Mapping, Sequence)
# the package: its frames are not shown
_LAUNCHER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP = tuple(
    os.path.realpath(p) + os.sep
    for p in {
        _LAUNCHER,
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
)


class RecipeError(ConfigError):
    """A recipe function raised in the pre-flight check; `frames` is the recipe code's traceback."""

    def __init__(self, message: str, frames: str = ""):
        super().__init__(message)
        self.frames = frames


def user_frames(error: BaseException) -> str:
    """The traceback lines of `error` in the user's own files (not the launcher's, the standard library's or
    an installed package's)."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not os.path.realpath(f.filename).startswith(_SKIP) and not f.filename.startswith("<")
    ]
    return "".join(traceback.format_list(frames))


@contextlib.contextmanager
def blame(what: str):
    """Turn an exception raised inside into a RecipeError naming `what` raised it."""
    try:
        yield
    except (ConfigError, DataError):
        raise
    except Exception as error:  # noqa: BLE001 - any error of the recipe's code
        text = " ".join(str(error).split()) or "(no message)"
        raise RecipeError(
            f"pre-flight: {what} raised {type(error).__name__}: {text[:400]}", user_frames(error)
        ) from None


@dataclass
class Checked:
    """What the pre-flight found out about the run."""

    step: Step
    task: str
    num_classes: int | None
    counted: bool  # the step returns (loss_sum, count): normalised by the count over a whole optimizer step
    loss_name: str
    metric_names: list[str]  # PREFIX-less names are "val/..."
    best_metric: str
    best_mode: str
    example: Any  # a collated training batch (on the host), what --synthetic_data imitates
    summary: str  # input -> output
    # the model's forward FLOPs per training sample (torch's FlopCounterMode)
    flops_per_sample: float | None = None

    @property
    def label_classes(self) -> int | None:
        """The classes an (input, class label) sample's label must lie in, for the loaders to check
        per sample (launcher/data/stream.py, check_label); None when samples are not such pairs."""
        return self.num_classes if self.task == "classification" and self.step.style == "pair" else None


def preflight(
    cfg,
    recipe,
    train,
    val,
    model: torch.nn.Module,
    device: torch.device,
    loss_fn: Callable,
    extra_metrics: dict | None = None,
    classes: Sequence[str] = (),
    classes_from: str = "",
) -> Checked:
    """Check both splits (`launcher.data.SplitLoader`); raise ConfigError/RecipeError, or return what
    was found. `classes`: the data's class names (from `classes_from`), checked against a classifier's
    outputs."""
    known = (list(classes), classes_from)
    checked = None
    for split, name in ((train, "training"), (val, "validation")):
        if split is None:
            continue
        found = _check_split(cfg, recipe, split, name, model, device, loss_fn, extra_metrics, known)
        if checked is None:
            checked = found
        elif (found.task, found.num_classes, found.step.style) != (
            checked.task,
            checked.num_classes,
            checked.step.style,
        ):
            raise ConfigError(
                f"the validation batches make a {found.task} step ({found.step.style}) but the "
                f"training batches a {checked.task} one ({checked.step.style}); give both splits "
                "samples of one kind"
            )
    _check_best(cfg, checked)
    if cfg.best_metric:
        checked.best_metric = cfg.best_metric
        checked.best_mode = cfg.best_mode if cfg.best_mode != "auto" else better_direction(cfg.best_metric)
    elif cfg.best_mode != "auto":
        checked.best_mode = cfg.best_mode
    return checked


def _check_split(
    cfg, recipe, split, name: str, model, device, loss_fn, extra_metrics, known: tuple
) -> Checked:
    with blame(f"build_data's {name} split (its dataset, decode or transform)"):
        samples = split.example_samples(EXAMPLE_SAMPLES)
    if not samples:
        raise ConfigError(f"the {name} split has no samples")
    if split.collate_fn is None:  # the recipe's own collate may take anything
        _refuse_non_tensors(samples, *_sample_source(split, name), collatable=True)
    with blame(
        "DataSpec.collate"
        if split.collate_fn
        else "default_collate (samples of different sizes need DataSpec(collate=...), e.g. padding)"
    ):
        data = collate(samples, split.collate_fn)
    compute_loss = recipe.compute_loss(cfg)
    try:
        style = choose_style(data, compute_loss is not None, hasattr(recipe.module, "build_loss"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    step = Step(style, loss_fn if style == "pair" else None, compute_loss, split.batch_transform)
    transform_name = (
        f"the {name} split's batch_transform ({_name_of(split.batch_transform)})"
        if split.batch_transform is not None
        else f"moving the {name} batch to {device}"
    )
    with blame(transform_name):
        prepared = step.prepare(data, device, cfg.channels_last)
    if split.batch_transform is not None:
        _refuse_non_tensors(
            prepared[0] if style == "pair" else prepared,
            transform_name,
            split.batch_transform,
            "return a tensor, or tuples/lists/dicts of tensors",
        )
    what = {
        "pair": "build_model's model or the loss",
        "model_loss": "build_model's model (forward(**batch))",
        "compute_loss": "compute_loss(model, batch)",
    }[style]
    training = model.training
    model.eval()
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            blame(what),
            FlopCount() as flops,
        ):
            if style == "pair":  # name the model and the loss apart
                inputs, targets = prepared
                with blame("build_model's model (its forward)"):
                    outputs = call_model(model, inputs)
                # before the loss: a label past the outputs fails there
                check_classes(cfg, outputs, targets, *known)
                with blame(f"the loss ({describe_loss(recipe, cfg)})"):
                    _refuse_float_targets_for_cross_entropy(loss_fn, targets)
                    _refuse_labels_outside_the_outputs(outputs, targets, name)
                    out = StepOutput(loss_fn(outputs, targets), None, outputs, targets)
            else:
                out = step(model, prepared)
    finally:
        model.train(training)
    loss = out.loss
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ConfigError(
            f"the step's loss must be a floating-point scalar tensor, got {_shape_of(loss)}; "
            "reduce it to one number (mean, or a sum with a count)"
        )
    if not loss.requires_grad and any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "the step's loss does not depend on any trainable parameter (was it detached, or "
            "computed under no_grad?); return the loss the model's outputs give"
        )
    check_classes(cfg, out.outputs, out.targets, *known)
    task = infer_task(out.outputs, out.targets)
    num_classes = int(out.outputs.shape[-1]) if task in ("classification", "language_model") else None
    if (cfg.mixup_alpha or cfg.cutmix_alpha) and not (style == "pair" and task == "classification"):
        raise ConfigError(
            f"--mixup_alpha/--cutmix_alpha mix class labels, but this run's step ({style}) gives a "
            f"{task} task without (inputs, class label) pairs; drop them"
        )
    metrics = TaskMetrics(task, num_classes, device, _fresh(extra_metrics), sync=False)
    with blame("the metrics (build_metrics, or the task's)"):
        metrics.update(
            out.outputs.detach() if isinstance(out.outputs, torch.Tensor) else out.outputs, out.targets
        )
        metrics.compute(float(loss.detach()))
    best_metric, best_mode = default_best(task)
    counted = out.count is not None
    return Checked(
        step,
        task,
        num_classes,
        counted,
        loss_name(loss_fn if style == "pair" else None, style, counted, task),
        ["val/loss", *metrics.names()],
        best_metric,
        best_mode,
        data,
        f"input {describe(inputs if style == 'pair' else data)} -> output {describe(_detach(out.outputs))}"
        if out.outputs is not None
        else f"input {describe(data)} -> loss",
        flops.total / len(samples),
    )


def check_classes(cfg, outputs, targets, classes: Sequence[str], source: str) -> None:
    """Refuse a classifier with fewer outputs than the data has classes (`source` names where the
    class list came from): its first label past them would fail the loss ("Target 3 is out of
    bounds"), possibly many steps in (more outputs train: `unused_outputs_note`)."""
    if not classes or infer_task(outputs, targets) != "classification" or outputs.shape[-1] >= len(classes):
        return
    raise ConfigError(
        f"the {_data(source)} have {len(classes)} classes ({source}), the model outputs "
        f"{outputs.shape[-1]}: {_fix(cfg, len(classes))}"
    )


def unused_outputs_note(cfg, checked: Checked, classes: Sequence[str], source: str) -> str:
    """A warning for the plan when a classifier has more outputs than the data has classes, or ""."""
    if checked.task != "classification" or not classes or checked.num_classes <= len(classes):
        return ""
    return (
        f"WARNING: the model outputs {checked.num_classes} classes, the {_data(source)} have {len(classes)} "
        f"({source}): {checked.num_classes - len(classes)} outputs are never a target; "
        f"{_fix(cfg, len(classes))}"
    )


def _data(source: str) -> str:
    return "shards" if source == "index.json" else "data"


def _fix(cfg, classes: int) -> str:
    return (
        f"set --num_classes={classes}"
        if hasattr(cfg, "num_classes")
        else f"make build_model output {classes} classes"
    )


def _sample_source(split, name: str) -> tuple[str, Callable | None, str]:
    """What made the split's samples (named in errors), the function that did, and how to make
    tensors of images."""
    source = split.source
    to_tensor = "end it with a ToTensor/PILToTensor or use launcher.presets (train_transform, eval_transform)"
    transform = getattr(source, "transform", None)
    if isinstance(source, Shards):
        if transform is not None:
            return f"the {name} split's transform ({_name_of(transform)})", transform, to_tensor
        return (
            f"the {name} split's decode ({_name_of(source.decoder)})",
            source.decoder,
            "give Shards a transform that ends with a ToTensor/PILToTensor, or one of launcher.presets",
        )
    if transform is not None:
        return (
            f"the {name} split's dataset ({type(source).__name__}, its transform {_name_of(transform)})",
            transform,
            to_tensor,
        )
    return (
        f"the {name} split's dataset ({type(source).__name__})",
        None,
        "give it a transform that ends with a ToTensor/PILToTensor, or one of launcher.presets",
    )


def _refuse_non_tensors(
    data: Any, what: str, fn: Callable | None, fix: str, collatable: bool = False
) -> None:
    """Refuse samples or batches holding a PIL image, a transform or a function (what returned it
    ends before its ToTensor, or was passed uncalled), naming `what` made them; with `collatable`,
    also anything else torch's default_collate cannot take."""
    if data is None:
        raise ConfigError(f"pre-flight: {what} returned None, not a tensor: {fix}")
    leaves = pytree.tree_leaves(data, is_leaf=lambda node: node is None)  # None is an empty node to pytree
    found = [
        leaf
        for leaf in leaves
        if isinstance(leaf, Image.Image)
        or callable(leaf)
        or (collatable and not isinstance(leaf, COLLATABLE))
    ]
    if not found:
        return
    wrong = found[0]
    if isinstance(wrong, Image.Image) or not callable(wrong) or fn is None:
        if not isinstance(wrong, Image.Image):
            fix = "return tensors, numbers or strings (in tuples, lists or dicts)"
        raise ConfigError(f"pre-flight: {what} returned {_kind(wrong)}, not a tensor: {fix}")
    name = _name_of(fn)
    raise ConfigError(
        f"pre-flight: {what} returned a {type(wrong).__name__}, not a tensor: "
        f"was it passed uncalled? call it ({name}() not {name})"
    )


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    return (
        f"a PIL image ({type(value).__name__})"
        if isinstance(value, Image.Image)
        else f"a {type(value).__name__}"
    )


def _name_of(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def describe_loss(recipe, cfg) -> str:
    return "build_loss" if hasattr(recipe.module, "build_loss") else f"--loss={cfg.loss}"


def _refuse_float_targets_for_cross_entropy(loss_fn, targets) -> None:
    if (
        isinstance(loss_fn, CrossEntropy)
        and isinstance(targets, torch.Tensor)
        and targets.is_floating_point()
    ):
        raise ConfigError(
            f"--loss=cross_entropy takes class indices, but the targets are {targets.dtype} "
            f"{describe(targets)} (a regression?); set --loss=mse or --loss=l1, or give integer labels"
        )


def _refuse_labels_outside_the_outputs(outputs, targets, split: str) -> None:
    """The pre-flight samples' class labels against the model's outputs, before the loss indexes with
    them (on CUDA a label out of range is a device-side assert that ends the process); most often the
    model was built for fewer classes than the data has. During the run each sample is checked in the
    loaders instead, and one out of range is skipped and counted (check_label)."""
    if not (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.ndim == 2
        and targets.ndim == 1
        and not targets.is_floating_point()
        and targets.dtype != torch.bool
    ):
        return
    classes = outputs.shape[-1]
    outside = sorted({int(t) for t in targets.cpu() if not 0 <= int(t) < classes})
    if outside:
        raise DataError(
            f"pre-flight: the first {len(targets)} {split} samples include class labels {outside[:5]} "
            f"outside the model's {classes} outputs (0..{classes - 1}); build the model for the data's "
            "classes, or fix the labels"
        )


def _check_best(cfg, checked: Checked) -> None:
    names = list(checked.metric_names)
    if cfg.ema_decay:
        names += [n.replace("val/", "val_ema/", 1) for n in checked.metric_names]
    if cfg.best_metric and cfg.best_metric not in names:
        raise ConfigError(
            f"--best_metric={cfg.best_metric} is not a metric of this {checked.task} task; "
            f"choose one of {', '.join(names)}"
        )
    if cfg.lr_schedule == "plateau" and cfg.lr_plateau_metric not in names:
        raise ConfigError(
            f"--lr_plateau_metric={cfg.lr_plateau_metric} is not a metric of this {checked.task} task; "
            f"choose one of {', '.join(names)}"
        )


def _fresh(extra: dict | None) -> dict | None:
    """Copies of the recipe's metrics for the check (their states stay clean for the run)."""
    return {name: metric.clone() for name, metric in extra.items()} if extra else None


def _detach(outputs: Any) -> Any:
    return outputs.detach() if isinstance(outputs, torch.Tensor) else outputs


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
