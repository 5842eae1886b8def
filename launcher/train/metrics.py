"""Validation metrics by task, as sums all-reduced across the ranks when computed.

The task is read from the first batch's outputs and targets (`infer_task`):
- classification, (N, C) outputs and integer (N,) targets: `top1`, `top5` (more than 5 classes),
  per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
- regression, float targets: `mse`, `mae`, `r2` (outputs of shape (N, 1) compare with (N,));
- language_model, (N, T, V) outputs and integer (N, T) targets (-100 ignored): `perplexity`
  (exp of the per-token loss) and `token_accuracy`;
- custom, when the step gives no outputs and targets: the loss alone.
`loss` is the training loss on the validation data, normalised the same way (the trainer's
evaluation pass sums it). A recipe may add its own: `build_metrics(cfg) -> {name: Metric}` (torchmetrics,
or any object with update(outputs, targets), compute(), reset() and to(device)).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

TASKS = ("classification", "regression", "language_model", "custom")
IGNORE_INDEX = -100  # targets the language-model metrics skip (padding)
BEST = {"classification": ("val/top1", "max")}  # the default best metric and mode; others: val/loss, min
SUMS = {  # what each task's metrics sum over the validation samples
    "classification": ("top5_correct",),  # and the confusion matrix
    "regression": ("count", "squared_errors", "absolute_errors", "targets", "target_squares"),
    "language_model": ("correct_tokens", "counted_tokens"),
}
LOSS_NAMES = {
    "CrossEntropy": "cross-entropy",
    "NLL": "negative log-likelihood",
    "BCEWithLogits": "binary cross-entropy",
}


def infer_task(outputs: Any, targets: Any) -> str:
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return "custom"
    if targets.is_floating_point():
        return "regression" if outputs.numel() == targets.numel() else "custom"
    if outputs.ndim == 2 and targets.ndim == 1:
        return "classification"
    if outputs.ndim == 3 and targets.ndim == 2 and outputs.shape[:2] == targets.shape:
        return "language_model"
    return "custom"


def default_best(task: str) -> tuple[str, str]:
    return BEST.get(task, ("val/loss", "min"))


def better_direction(metric: str) -> str:
    """`max` for accuracies and R², `min` for losses, errors and perplexity (best_mode=auto)."""
    return "max" if is_accuracy(metric) or metric.endswith("/r2") else "min"


class TaskMetrics:
    """The task's metrics (and the recipe's) for one evaluation pass, on `device`.

    Each task metric is a sum over the validation samples (a confusion matrix; correct top-5
    predictions; squared and absolute errors; targets and their squares; correct and counted
    tokens), so one all-reduce per evaluation gives every rank the totals. Written here rather
    than with torchmetrics: importing torchmetrics takes as long as importing torch, torchvision
    and Accelerate together (it imports transformers, scipy and matplotlib where they are
    installed), in every process of every run; a recipe's own `build_metrics` may still use it."""

    def __init__(
        self,
        task: str,
        num_classes: int | None,
        device: torch.device,
        extra: dict | None = None,
        sync: bool = True,
    ):
        self.task, self.num_classes, self.device, self.sync = task, num_classes or 0, device, sync
        self.top5 = task == "classification" and self.num_classes > 5
        # float64 sums (MPS has no float64): exact counts, and no float32 drift over many batches
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.extra = {name: metric.to(device) for name, metric in dict(extra or {}).items()}
        # All-reduced on compute, then zeroed in place, never replaced: a tensor whose last reference
        # gloo's worker thread drops can deadlock torch 2.7 as the process group goes away
        # (docs/known-problems.md#the-gil-at-shutdown). The Evaluator keeps its TaskMetrics for the run.
        classes = self.num_classes if self.task == "classification" else 0
        self.confusion = torch.zeros(classes, classes, dtype=torch.long, device=device)
        self.sums = torch.zeros(len(SUMS.get(self.task, ())), dtype=self.dtype, device=device)

    def reset(self) -> None:
        self.confusion.zero_()
        self.sums.zero_()

    def names(self, prefix: str = "val") -> list[str]:
        """The metrics an evaluation reports, besides loss and samples."""
        names = {
            "classification": ["top1"] + (["top5"] if self.top5 else []),
            "regression": ["mse", "mae", "r2"],
            "language_model": ["perplexity", "token_accuracy"],
        }
        return [f"{prefix}/{n}" for n in names.get(self.task, []) + list(self.extra)]

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any) -> torch.Tensor | None:
        """Add one batch; returns its predicted classes (classification), else None."""
        predictions = None
        if self.task == "classification":
            outputs, classes = outputs.float(), self.num_classes
            predictions = outputs.argmax(1)
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
                raise ValueError(
                    f"classification targets must be class indices in [0, {classes}), got values "
                    f"from {int(targets.min())} to {int(targets.max())}"
                )
            self.confusion += torch.bincount(
                targets.long() * classes + predictions, minlength=classes * classes
            ).view(classes, classes)
            if self.top5:
                self.sums[0] += (outputs.topk(5, dim=1).indices == targets[:, None]).any(1).sum()
        elif self.task == "regression":
            outputs, targets = outputs.float().reshape(-1), targets.float().reshape(-1)
            wide = targets.to(self.dtype)
            errors = outputs.to(self.dtype) - wide
            count = torch.tensor(float(wide.numel()), dtype=self.dtype, device=self.device)
            self.sums += torch.stack(
                [count, errors.square().sum(), errors.abs().sum(), wide.sum(), wide.square().sum()]
            )
        elif self.task == "language_model":
            counted = targets != IGNORE_INDEX
            # a product with the mask, not an index by it: no wait for the device
            self.sums[0] += ((outputs.argmax(-1) == targets) & counted).sum()
            self.sums[1] += counted.sum()
        for name in self.extra:
            self.extra[name].update(outputs, targets)
        return predictions

    def compute(self, loss: float, prefix: str = "val") -> tuple[dict, list[list[int]] | None]:
        """({PREFIX/NAME: value}, the confusion matrix), over all ranks (every rank must call it)."""
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for totals in (self.confusion, self.sums):
                if totals.numel():
                    dist.all_reduce(totals)
        values: dict[str, Any] = {}
        confusion = None
        sums = dict(zip(SUMS.get(self.task, ()), self.sums.tolist()))
        if self.task == "classification":
            confusion = self.confusion.tolist()
            samples = max(int(self.confusion.sum()), 1)
            values["top1"] = int(self.confusion.diagonal().sum()) / samples
            if self.top5:
                values["top5"] = sums["top5_correct"] / samples
        elif self.task == "regression":
            count = max(sums["count"], 1.0)
            # the targets' sum of squared deviations
            spread = sums["target_squares"] - sums["targets"] ** 2 / count
            values.update(
                mse=sums["squared_errors"] / count,
                mae=sums["absolute_errors"] / count,
                r2=1 - sums["squared_errors"] / spread if sums["count"] > 1 and spread > 0 else math.nan,
            )
        elif self.task == "language_model":
            values["perplexity"] = math.exp(min(loss, 700.0))
            values["token_accuracy"] = sums["correct_tokens"] / max(sums["counted_tokens"], 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rank without validation batches computes its empty states
            for name, metric in self.extra.items():
                value = metric.compute()
                values[name] = (
                    float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                )
                metric.reset()
        self.reset()
        return {f"{prefix}/{name}": value for name, value in values.items()}, confusion


def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """Recall per true class (None for a class with no sample)."""
    return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]


def is_accuracy(name: str) -> bool:
    """Metrics shown as percentages."""
    return name.rsplit("/", 1)[-1] in ("top1", "top5", "token_accuracy", "accuracy") or name.endswith(
        "_accuracy"
    )


def loss_name(loss_fn: Any, style: str, count: bool, task: str) -> str:
    """A human name for the loss, for the report's axes."""
    if style == "model_loss":
        return "model loss"
    base = LOSS_NAMES.get(type(loss_fn).__name__) if loss_fn is not None else None
    if base is None and type(loss_fn).__name__ == "Regression":
        base = loss_fn.kind.upper() if loss_fn.kind == "mse" else "L1"
    base = base or ("cross-entropy" if task == "language_model" else "loss")
    return (
        f"per-token {base}" if count and task == "language_model" else (f"{base} per item" if count else base)
    )
