"""Losses by name: cross-entropy (class weights, label smoothing), NLL on log-probabilities,
BCE-with-logits for multi-label targets, MSE and L1 for regression.

Each is `loss(outputs, targets) -> scalar mean`. Cross-entropy and BCE also take soft targets
(class probabilities, as MixUp/CutMix make); BCE takes class indices too (one-hot). A recipe
picks one by name with `loss(name, ...)` in its `build_loss`, or returns any callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from launcher.config import ConfigError

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _weight(values: Sequence[float] | None, like: torch.Tensor) -> torch.Tensor | None:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device) if values else None


@dataclass
class CrossEntropy:
    class_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    soft_targets = True

    def __call__(self, logits, targets):
        if self.class_weights and len(self.class_weights) != logits.shape[1]:
            raise ConfigError(
                f"{len(self.class_weights)} class weights for a model with {logits.shape[1]} "
                "outputs; give one weight per class"
            )
        return F.cross_entropy(
            logits, targets, weight=_weight(self.class_weights, logits), label_smoothing=self.label_smoothing
        )


@dataclass
class NLL:
    """For models that end in log_softmax."""

    class_weights: Sequence[float] | None = None
    soft_targets = False

    def __call__(self, log_probs, targets):
        return F.nll_loss(log_probs, targets, weight=_weight(self.class_weights, log_probs))


@dataclass
class BCEWithLogits:
    """Multi-label: targets are 0/1 (or soft) per class; class indices are one-hot encoded."""

    pos_weight: Sequence[float] | None = None
    soft_targets = True

    def __call__(self, logits, targets):
        if targets.dtype in (torch.int64, torch.int32) and targets.ndim == logits.ndim - 1:
            targets = F.one_hot(targets, logits.shape[-1])
        return F.binary_cross_entropy_with_logits(
            logits, targets.to(logits.dtype), pos_weight=_weight(self.pos_weight, logits)
        )


@dataclass
class Regression:
    """MSE or L1; a model output of shape (N, 1) is compared with targets of shape (N,)."""

    kind: str = "mse"
    soft_targets = False

    def __call__(self, outputs, targets):
        if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        fn = F.mse_loss if self.kind == "mse" else F.l1_loss
        return fn(outputs.float(), targets.to(torch.float32))


LOSSES = ("cross_entropy", "nll", "bce_with_logits", "mse", "l1")


def loss(
    name: str,
    *,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    pos_weight: Sequence[float] | None = None,
) -> LossFunction:
    if name == "cross_entropy":
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {label_smoothing}")
        return CrossEntropy(list(class_weights or ()), label_smoothing)
    unused = [n for n, v in (("label_smoothing", label_smoothing),) if v]
    if unused:
        raise ConfigError(f"--{unused[0]} applies to cross_entropy only, not to --loss={name}")
    if name == "nll":
        return NLL(list(class_weights or ()))
    if name == "bce_with_logits":
        return BCEWithLogits(list(pos_weight or class_weights or ()))
    if name in ("mse", "l1"):
        if class_weights:
            raise ConfigError(f"--class_weights do not apply to --loss={name}")
        return Regression(name)
    raise ConfigError(
        f"unknown loss {name!r}; choose one of {', '.join(LOSSES)} or return your own "
        "callable from the recipe's build_loss"
    )


def from_config(cfg) -> LossFunction:
    return loss(cfg.loss, class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing)
