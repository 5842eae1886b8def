"""Validation metrics summed over a rank's batches, then over all ranks.

Loss, top-1 and top-5 hits and the sample count are one all-reduce; the confusion matrix
(rows: true class, columns: predicted) is gathered as an object, because a rank that saw no
validation batch does not know the number of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object


class EvalTotals:
    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
        self.confusion: torch.Tensor | None = None  # classes x classes, int64

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add one batch; returns its predictions."""
        logits = logits.float()
        classes = logits.shape[1]
        top = logits.topk(min(5, classes), dim=1).indices
        predictions = top[:, 0]
        hits5 = (top == targets[:, None]).any(1).sum()
        self.sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                  (predictions == targets).sum().double(), hits5.double(),
                                  torch.tensor(float(len(targets)), device=logits.device, dtype=torch.float64)])
        pairs = torch.bincount(targets * classes + predictions, minlength=classes * classes)
        batch_confusion = pairs.view(classes, classes)
        self.confusion = batch_confusion if self.confusion is None else self.confusion + batch_confusion
        return predictions

    def reduce(self, accelerator: Accelerator) -> tuple[dict, list[list[int]] | None]:
        """({val/loss, val/top1, val/top5, val/samples}, the confusion matrix) over all ranks."""
        sums = accelerator.reduce(self.sums, "sum")
        count = int(sums[3].item())
        per = max(count, 1)
        metrics = {"val/loss": (sums[0] / per).item(), "val/top1": (sums[1] / per).item(),
                   "val/top5": (sums[2] / per).item(), "val/samples": count}
        mine = self.confusion.cpu() if self.confusion is not None else None
        parts = [m for m in gather_object([mine]) if m is not None]
        return metrics, (sum(parts[1:], parts[0]).tolist() if parts else None)
