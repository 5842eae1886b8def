"""Validation metrics by task, with torchmetrics (its states are synced across ranks on compute).

The task is read from the first batch's outputs and targets (`infer_task`):
- classification, (N, C) outputs and integer (N,) targets: `top1`, `top5` (more than 5 classes),
  per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
- regression, float targets: `mse`, `mae`, `r2` (outputs of shape (N, 1) compare with (N,));
- language_model, (N, T, V) outputs and integer (N, T) targets (-100 ignored): `perplexity`
  (exp of the per-token loss) and `token_accuracy`;
- custom, when the step gives no outputs and targets: the loss alone.
`loss` is the training loss on the validation data, normalised the same way (the trainer's
evaluation pass sums it). A recipe may add its own: `build_metrics(cfg) -> {name: Metric}`, each
updated with (outputs, targets).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import torchmetrics

TASKS = ("classification", "regression", "language_model", "custom")
IGNORE_INDEX = -100  # targets the language-model metrics skip (padding)
BEST = {"classification": ("val/top1", "max")}  # the default best metric and mode; others: val/loss, min
LOSS_NAMES = {"CrossEntropy": "cross-entropy", "NLL": "negative log-likelihood", "BCEWithLogits": "binary cross-entropy"}


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
    """The task's metrics (and the recipe's) for one evaluation pass, on `device`."""

    def __init__(self, task: str, num_classes: int | None, device: torch.device, extra: dict | None = None,
                 sync: bool = True):
        # torchmetrics is imported here, where metrics are built: it imports torchvision, scipy and
        # matplotlib (about 5 s), which a run refused at its start never needs.
        from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

        self.task, self.num_classes = task, num_classes
        kwargs = {"sync_on_compute": sync}
        built: dict[str, torchmetrics.Metric] = {}
        if task == "classification":
            built["confusion"] = MulticlassConfusionMatrix(num_classes, **kwargs)
            if num_classes > 5:
                built["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **kwargs)
        elif task == "regression":
            built.update(mse=MeanSquaredError(**kwargs), mae=MeanAbsoluteError(**kwargs), r2=R2Score(**kwargs))
        elif task == "language_model":
            built["token_accuracy"] = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX,
                                                         **kwargs)
        self.extra = dict(extra or {})
        self.metrics = {name: metric.to(device) for name, metric in {**built, **self.extra}.items()}

    def names(self, prefix: str = "val") -> list[str]:
        """The metrics an evaluation reports, besides loss and samples."""
        names = {"classification": ["top1"] + (["top5"] if "top5" in self.metrics else []),
                 "regression": ["mse", "mae", "r2"], "language_model": ["perplexity", "token_accuracy"]}
        return [f"{prefix}/{n}" for n in names.get(self.task, []) + list(self.extra)]

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any) -> torch.Tensor | None:
        """Add one batch; returns its predicted classes (classification), else None."""
        predictions = None
        if self.task == "classification":
            outputs = outputs.float()
            predictions = outputs.argmax(1)
            self.metrics["confusion"].update(predictions, targets)
            if "top5" in self.metrics:
                self.metrics["top5"].update(outputs, targets)
        elif self.task == "regression":
            outputs, targets = outputs.float().reshape(-1), targets.float().reshape(-1)
            for name in ("mse", "mae", "r2"):
                self.metrics[name].update(outputs, targets)
        elif self.task == "language_model":
            self.metrics["token_accuracy"].update(outputs.float().flatten(0, 1), targets.flatten())
        for name in self.extra:
            self.metrics[name].update(outputs, targets)
        return predictions

    def compute(self, loss: float, prefix: str = "val") -> tuple[dict, list[list[int]] | None]:
        """({PREFIX/NAME: value}, the confusion matrix), over all ranks (every rank must call it)."""
        values: dict[str, float] = {}
        confusion = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rank without validation batches computes its empty states
            computed = {name: metric.compute() for name, metric in self.metrics.items()}
        if self.task == "classification":
            matrix = computed.pop("confusion").long()
            confusion = matrix.tolist()
            values["top1"] = float(matrix.diagonal().sum() / matrix.sum().clamp(min=1))
        elif self.task == "language_model":
            values["perplexity"] = math.exp(min(loss, 700.0))
        for name, value in computed.items():
            values[name] = float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        for metric in self.metrics.values():
            metric.reset()
        return {f"{prefix}/{name}": value for name, value in values.items()}, confusion


def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """Recall per true class (None for a class with no sample)."""
    return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]


def is_accuracy(name: str) -> bool:
    """Metrics shown as percentages."""
    return name.rsplit("/", 1)[-1] in ("top1", "top5", "token_accuracy", "accuracy") or name.endswith("_accuracy")


def loss_name(loss_fn: Any, style: str, count: bool, task: str) -> str:
    """A human name for the loss, for the report's axes."""
    if style == "model_loss":
        return "model loss"
    base = LOSS_NAMES.get(type(loss_fn).__name__) if loss_fn is not None else None
    if base is None and type(loss_fn).__name__ == "Regression":
        base = loss_fn.kind.upper() if loss_fn.kind == "mse" else "L1"
    base = base or ("cross-entropy" if task == "language_model" else "loss")
    return f"per-token {base}" if count and task == "language_model" else (
        f"{base} per item" if count else base)
