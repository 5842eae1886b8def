"""Learning-rate schedules: each a multiplier of a parameter group's base LR at every optimizer step.

The loop drives one `torch.optim.lr_scheduler.LambdaLR` with these multipliers and steps it once
per optimizer step (never per micro-batch). A schedule that torch steps per epoch (StepLR,
MultiStepLR, ExponentialLR, LambdaLR by default) has `interval="epoch"`: its multiplier changes
only when an epoch's last optimizer step is done, exactly as if `scheduler.step()` ran at each
epoch end. Closed forms of the step count, so a resumed run needs no scheduler state; the one
exception, `Plateau`, wraps torch's own ReduceLROnPlateau and is saved in the checkpoint.

A schedule is a `Schedule`-like object below, or any function `(step, total_steps) -> multiplier`.
`warmup(schedule, steps)` puts a linear warm-up in front of any of them (multiplied in, as
torch's ChainedScheduler does with LinearLR).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from launcher.config import ConfigError

LRFunction = Callable[[int, int], float]  # (optimizer step, total optimizer steps) -> multiplier
Interval = Literal["step", "epoch"]


class LRSchedule:
    """A multiplier as a function of `t`, counted in optimizer steps or in whole epochs."""

    interval: Interval = "step"

    def multiplier(self, t: int, total: int, base_lr: float) -> float:
        raise NotImplementedError

    def bind(self, *, steps_per_epoch: int, total_steps: int, base_lr: float) -> Callable[[int], float]:
        """The multiplier at each optimizer step for one parameter group."""
        unit = steps_per_epoch if self.interval == "epoch" else 1
        total = max(1, total_steps // unit)
        return lambda step: self.multiplier(step // unit, total, base_lr)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def after_evaluation(self, metrics: dict) -> bool:
        """Called with each evaluation's metrics; True if the multiplier changed."""
        return False


def bind(
    schedule: LRSchedule | LRFunction, *, steps_per_epoch: int, total_steps: int, base_lr: float
) -> Callable[[int], float]:
    if isinstance(schedule, LRSchedule):
        return schedule.bind(steps_per_epoch=steps_per_epoch, total_steps=total_steps, base_lr=base_lr)
    return lambda step: schedule(step, total_steps)


def _check_interval(interval: str) -> None:
    if interval not in ("step", "epoch"):
        raise ConfigError(f"a schedule's interval must be 'step' or 'epoch', got {interval!r}")


@dataclass
class StepLR(LRSchedule):
    """torch.optim.lr_scheduler.StepLR: x gamma every `step_size` epochs (or steps)."""

    step_size: int
    gamma: float = 0.1
    interval: Interval = "epoch"

    def __post_init__(self):
        _check_interval(self.interval)
        if self.step_size < 1:
            raise ConfigError(f"StepLR step_size must be >= 1, got {self.step_size}")

    def multiplier(self, t, total, base_lr):
        return self.gamma ** (t // self.step_size)


@dataclass
class MultiStepLR(LRSchedule):
    """torch.optim.lr_scheduler.MultiStepLR: x gamma at each milestone epoch (or step)."""

    milestones: Sequence[int]
    gamma: float = 0.1
    interval: Interval = "epoch"

    def __post_init__(self):
        _check_interval(self.interval)
        if not self.milestones or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(
                f"MultiStepLR milestones must be increasing and not empty, got {list(self.milestones)}"
            )

    def multiplier(self, t, total, base_lr):
        return self.gamma ** sum(t >= m for m in self.milestones)


@dataclass
class ExponentialLR(LRSchedule):
    """torch.optim.lr_scheduler.ExponentialLR: x gamma every epoch (or step)."""

    gamma: float
    interval: Interval = "epoch"

    def __post_init__(self):
        _check_interval(self.interval)

    def multiplier(self, t, total, base_lr):
        return self.gamma**t


@dataclass
class CosineAnnealingLR(LRSchedule):
    """torch.optim.lr_scheduler.CosineAnnealingLR: from the base LR to `eta_min` (an absolute LR)
    over `t_max` steps (or epochs); t_max 0 spans the whole run."""

    t_max: int = 0
    eta_min: float = 0.0
    interval: Interval = "step"

    def __post_init__(self):
        _check_interval(self.interval)

    def multiplier(self, t, total, base_lr):
        t_max = self.t_max or total
        if base_lr == 0:
            return 0.0
        return (self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2) / base_lr


@dataclass
class LambdaLR(LRSchedule):
    """torch.optim.lr_scheduler.LambdaLR: a recipe's own function of the epoch (or step)."""

    fn: Callable[[int], float]
    interval: Interval = "epoch"

    def __post_init__(self):
        _check_interval(self.interval)

    def multiplier(self, t, total, base_lr):
        return float(self.fn(t))


@dataclass
class Plateau(LRSchedule):
    """torch.optim.lr_scheduler.ReduceLROnPlateau on a validation metric, stepped after each
    evaluation (the next optimizer step uses the new LR). Its state is saved in checkpoints."""

    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    factor: float = 0.1  # the LR is multiplied by this on a plateau
    patience: int = 10
    threshold: float = 1e-4
    cooldown: int = 0
    min_factor: float = 0.0  # the LR never goes below base x this

    def __post_init__(self):
        # its LR is the multiplier
        self._holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self._torch = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._holder,
            mode=self.mode,
            factor=self.factor,
            patience=self.patience,
            threshold=self.threshold,
            cooldown=self.cooldown,
            min_lr=self.min_factor,
        )

    @property
    def current(self) -> float:
        return self._holder.param_groups[0]["lr"]

    def multiplier(self, t, total, base_lr):
        return self.current

    def after_evaluation(self, metrics: dict) -> bool:
        if self.metric not in metrics:
            raise ConfigError(
                f"the plateau schedule watches {self.metric}, which evaluation does not report; "
                f"choose one of {', '.join(k for k in metrics if k != 'val/samples')}"
            )
        before = self.current
        self._torch.step(metrics[self.metric])
        return self.current != before

    def state_dict(self) -> dict:
        return {"torch": self._torch.state_dict(), "factor": self.current}

    def load_state_dict(self, state: dict) -> None:
        self._torch.load_state_dict(state["torch"])
        self._holder.param_groups[0]["lr"] = state["factor"]


@dataclass
class Warmup(LRSchedule):
    """A linear warm-up over `steps` optimizer steps (the first update at 1/(steps + 1)), times `inner`."""

    inner: LRSchedule | LRFunction
    steps: int

    def bind(self, *, steps_per_epoch, total_steps, base_lr):
        inner = bind(self.inner, steps_per_epoch=steps_per_epoch, total_steps=total_steps, base_lr=base_lr)
        return lambda step: min(1.0, (step + 1) / (self.steps + 1)) * inner(step)

    def state_dict(self):
        return self.inner.state_dict() if isinstance(self.inner, LRSchedule) else {}

    def load_state_dict(self, state):
        if isinstance(self.inner, LRSchedule):
            self.inner.load_state_dict(state)

    def after_evaluation(self, metrics):
        return isinstance(self.inner, LRSchedule) and self.inner.after_evaluation(metrics)


def warmup(schedule: LRSchedule | LRFunction, steps: int) -> LRSchedule | LRFunction:
    """`schedule` with a linear warm-up over its first `steps` optimizer steps (none if 0)."""
    if steps < 0:
        raise ConfigError(f"warm-up steps must be >= 0, got {steps}")
    return Warmup(schedule, steps) if steps else schedule


@dataclass
class WarmupCosine(LRSchedule):
    """1. Linear warm-up from 0 over `warmup_steps`; 2. cosine decay to `min_ratio` at the run's end.
    Also callable as a function (step, total_steps) -> multiplier."""

    warmup_steps: int = 0
    min_ratio: float = 0.0

    def multiplier(self, t, total, base_lr):
        return self(t, total)

    def __call__(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:  # phase 1
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)  # phase 2
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(warmup_steps: int, min_ratio: float = 0.0) -> WarmupCosine:
    return WarmupCosine(warmup_steps, min_ratio)


def constant() -> LRFunction:
    return lambda step, total_steps: 1.0


def from_config(cfg) -> LRSchedule | LRFunction:
    """The schedule a config names (`--lr_schedule` and its fields), warm-up included."""
    name = cfg.lr_schedule
    if name == "cosine":
        return warmup_cosine(cfg.warmup_steps, cfg.min_lr_ratio)
    if name == "step":
        inner = StepLR(cfg.lr_step_size, cfg.lr_gamma)
    elif name == "multistep":
        if not cfg.lr_milestones:
            raise ConfigError(
                "--lr_schedule=multistep needs --lr_milestones (epochs), e.g. --lr_milestones=[30,60]"
            )
        inner = MultiStepLR(cfg.lr_milestones, cfg.lr_gamma)
    elif name == "exponential":
        inner = ExponentialLR(cfg.lr_gamma)
    elif name == "plateau":
        inner = Plateau(
            cfg.lr_plateau_metric,
            metric_mode(cfg.lr_plateau_metric),
            factor=cfg.lr_gamma,
            patience=cfg.lr_patience,
        )
    else:  # constant
        inner = constant()
    return warmup(inner, cfg.warmup_steps)


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Lower is better for losses, higher for accuracies."""
    return "min" if "loss" in metric else "max"


def unfreeze_warmup(start_step: int, warmup_steps: int) -> Callable[[int], float]:
    """A group unfrozen at `start_step`: 1. LR 0 before it; 2. linear warm-up over `warmup_steps`
    (the first update after the unfreeze at 1/(warmup_steps + 1)); 3. 1 after."""

    def multiplier(step: int) -> float:
        if step < start_step:  # phase 1
            return 0.0
        return min(1.0, (step - start_step + 1) / (warmup_steps + 1))  # phases 2 and 3

    return multiplier
