"""Validation metrics summed over a rank's batches, then over all ranks.

Classification (class-index targets for (N, classes) outputs): cross-entropy, top-1 and top-5
hits and the sample count are one all-reduce, so the metrics equal a single process's; the
confusion matrix (rows: true class, columns: predicted) is gathered as an object, because a rank
that saw no validation batch does not know the number of classes. Other targets (multi-label,
regression): the run's own loss, averaged over samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object

from launcher.losses import is_classification


class EvalTotals:
    def __init__(self, device: torch.device, loss_fn: Callable | None = None):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
        self.loss_fn = loss_fn
        self.classification = True
        self.confusion: torch.Tensor | None = None  # classes x classes, int64

    def add(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add one batch; returns its predictions (classification) or the outputs."""
        outputs = outputs.float()
        count = torch.tensor(float(len(targets)), device=outputs.device, dtype=torch.float64)
        if not is_classification(outputs, targets):
            self.classification = False
            loss = (self.loss_fn or F.mse_loss)(outputs, targets).double() * count
            self.sums += torch.stack([loss, torch.zeros_like(loss), torch.zeros_like(loss), count])
            return outputs
        classes = outputs.shape[1]
        top = outputs.topk(min(5, classes), dim=1).indices
        predictions = top[:, 0]
        hits5 = (top == targets[:, None]).any(1).sum()
        self.sums += torch.stack([F.cross_entropy(outputs, targets, reduction="sum").double(),
                                  (predictions == targets).sum().double(), hits5.double(), count])
        pairs = torch.bincount(targets * classes + predictions, minlength=classes * classes)
        batch_confusion = pairs.view(classes, classes)
        self.confusion = batch_confusion if self.confusion is None else self.confusion + batch_confusion
        return predictions

    def reduce(self, accelerator: Accelerator, prefix: str = "val") -> tuple[dict, list[list[int]] | None]:
        """({PREFIX/loss, PREFIX/top1, PREFIX/top5, PREFIX/samples}, the confusion matrix) over all ranks."""
        sums = accelerator.reduce(self.sums, "sum")
        count = int(sums[3].item())
        per = max(count, 1)
        metrics = {f"{prefix}/loss": (sums[0] / per).item()}
        mine = self.confusion.cpu() if self.confusion is not None else None
        parts = [m for m in gather_object([mine]) if m is not None]
        if parts or count == 0:  # some rank classified (a rank without batches knows nothing)
            metrics.update({f"{prefix}/top1": (sums[1] / per).item(), f"{prefix}/top5": (sums[2] / per).item()})
        metrics[f"{prefix}/samples"] = count
        return metrics, (sum(parts[1:], parts[0]).tolist() if parts else None)

    @staticmethod
    def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
        """Recall per true class (None for a class with no sample)."""
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
