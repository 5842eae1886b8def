"""Parameter groups: which parameters train, when, at what learning rate and weight decay.

A recipe lists `Group`s of patterns over parameter names (`model.named_parameters()`); a
pattern also matches every parameter under a module it names (`layer1` = `layer1.*`). Each
parameter joins the first group that matches it; a parameter that matches no group is an error,
so nothing is trained (or frozen) by accident.

Frozen parameters have `requires_grad=False` while DDP wraps the model, so DDP never waits for
their gradients (no `find_unused_parameters`). A group frozen for good stays out of the
optimizer. A group frozen until an epoch or step (scheduled unfreezing) is in the optimizer from
the start with no gradient, so the optimizer's groups never change and a checkpoint from either
side of the unfreeze resumes; at the unfreeze the loop re-wraps DDP to include it, and its LR
warms up from 0. With `Schedule.no_decay_norm_bias`, each group's biases and norm weights (every
parameter of one dimension or less, as in timm) form a sibling group `NAME/no_decay`. A PEFT
model's frozen base joins no group (launcher/train/adapters.py): the patterns match its adapters
alone, so per-group LR and layer decay apply to them.

Names: a recipe's `Schedule` is the bundle of its groups, its optimizer and its LR curve
(`Schedule.lr_at`, an `LRSchedule` from launcher.optim.schedules or a function of the step); the
trainer applies the curve through torch's `LambdaLR`, its `lr_scheduler`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from launcher.config import ConfigError
from launcher.optim import optimizers, schedules
from launcher.optim.optimizers import OptimizerFactory
from launcher.optim.schedules import LRFunction, LRSchedule, unfreeze_warmup


@dataclass
class Group:
    name: str  # shown in the plan and in logged metrics (lr/NAME)
    patterns: Sequence[str] = ("*",)  # fnmatch patterns over parameter names or module names
    lr_scale: float = 1.0  # this group's LR = config lr x lr_scale
    weight_decay: float | None = None  # None: the config's weight_decay
    frozen: bool = False  # no gradient; out of the optimizer unless an unfreeze is scheduled
    unfreeze_epoch: int | None = None  # a frozen group starts training at the start of this epoch ...
    unfreeze_step: int | None = None  # ... or at this optimizer step (0-based)
    unfreeze_warmup_steps: int = 0  # after the unfreeze its LR rises linearly from 0 over these steps
    keep_norm_stats: bool = True  # while frozen, BatchNorm stays in eval mode (running statistics fixed)

    def __post_init__(self):
        if isinstance(self.patterns, str):
            raise ConfigError(f"group {self.name!r}: patterns must be a list of strings, not one string")
        scheduled = [n for n in ("unfreeze_epoch", "unfreeze_step") if getattr(self, n) is not None]
        if scheduled and not self.frozen:
            raise ConfigError(f"group {self.name!r} sets {scheduled[0]} but is not frozen; add frozen=True")
        if len(scheduled) == 2:
            raise ConfigError(f"group {self.name!r} sets both unfreeze_epoch and unfreeze_step; keep one")
        for name in (*scheduled, "unfreeze_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"group {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Schedule:
    groups: Sequence[Group] = (Group("all"),)
    # called as optimizer(param_groups); None: the config's --optimizer
    optimizer: OptimizerFactory | None = None
    # a schedules.* object or (step, total_steps) -> LR multiplier; None: the config's --lr_schedule
    lr_at: LRSchedule | LRFunction | None = None
    no_decay_norm_bias: bool = False  # biases and norm weights (ndim <= 1) get weight decay 0

    def resolved(self, cfg) -> Schedule:
        """A copy with what the recipe left to the config (optimizer, LR schedule) filled in."""
        return dataclasses.replace(
            self,
            optimizer=self.optimizer or optimizers.from_config(cfg),
            lr_at=self.lr_at if self.lr_at is not None else schedules.from_config(cfg),
        )


def default_schedule(cfg) -> Schedule:
    return Schedule().resolved(cfg)


def layer_decay(stages: Sequence[Group], decay: float, first_depth: int = 1) -> list[Group]:
    """Layer-wise LR decay: `stages` listed from the head down; stage i gets
    lr_scale x decay^(first_depth + i).

    With the head as its own group (depth 0), the stage just below it has depth 1."""
    if not 0 < decay <= 1:
        raise ConfigError(f"layer decay must be in (0, 1], got {decay}")
    return [
        dataclasses.replace(g, lr_scale=g.lr_scale * decay ** (first_depth + i)) for i, g in enumerate(stages)
    ]


@dataclass
class ParamGroup:
    name: str  # the group's name, or NAME/no_decay for its biases and norm weights
    group: Group
    starts_at: int | None  # optimizer step from which it trains; None: frozen for the whole run
    lr: float = 0.0  # peak LR (before the schedule's multiplier)
    weight_decay: float = 0.0
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def in_optimizer(self) -> bool:
        return self.starts_at is not None and bool(self.params)

    def trains_at(self, step: int) -> bool:
        return self.starts_at is not None and step >= self.starts_at


def matches(name: str, pattern: str) -> bool:
    """`pattern` matches the parameter name or one of its module prefixes
    (`layer1` -> `layer1.0.conv1.weight`)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def assign_groups(
    model: nn.Module,
    schedule: Schedule,
    lr: float,
    weight_decay: float,
    steps_per_epoch: int = 1,
    frozen_base: frozenset[str] = frozenset(),
) -> list[ParamGroup]:
    """Split the model's parameters into the schedule's groups (first matching pattern wins).
    `frozen_base`: the names of a PEFT model's frozen base (launcher/train/adapters.py), in no group."""
    pairs: list[tuple[ParamGroup, ParamGroup]] = []  # (weights, biases and norms) per schedule group
    for g in schedule.groups:
        starts_at = _starts_at(g, steps_per_epoch)
        decay = weight_decay if g.weight_decay is None else g.weight_decay
        main = ParamGroup(g.name, g, starts_at, lr=lr * g.lr_scale, weight_decay=decay)
        split = schedule.no_decay_norm_bias and starts_at is not None  # never trained: nothing to split
        pairs.append(
            (main, ParamGroup(f"{g.name}/no_decay", g, starts_at, lr=lr * g.lr_scale) if split else main)
        )
    for name, param in model.named_parameters():
        if name in frozen_base:
            continue  # never trained: apply_freezing never turns its gradient on
        index = next(
            (i for i, g in enumerate(schedule.groups) if any(matches(name, p) for p in g.patterns)), None
        )
        if index is None:
            raise ConfigError(
                f"parameter {name!r} matches no parameter group; add a pattern for it "
                "or a catch-all group Group('rest', ['*'])"
            )
        owner = pairs[index][param.ndim <= 1]
        owner.names.append(name)
        owner.params.append(param)
    groups = [pg for pair in pairs for pg in (pair[:1] if pair[0] is pair[1] else pair)]
    return [pg for pg in groups if pg.params]


def _starts_at(group: Group, steps_per_epoch: int) -> int | None:
    if not group.frozen:
        return 0
    if group.unfreeze_step is not None:
        return group.unfreeze_step
    if group.unfreeze_epoch is not None:
        return group.unfreeze_epoch * steps_per_epoch
    return None


def apply_freezing(groups: list[ParamGroup], step: int) -> list[str]:
    """Set requires_grad for `step`; the names of groups that changed (DDP must then be rebuilt)."""
    changed = []
    for pg in groups:
        trains = pg.trains_at(step)
        if any(param.requires_grad != trains for param in pg.params) and pg.group.name not in changed:
            changed.append(pg.group.name)
        for param in pg.params:
            param.requires_grad_(trains)
    return changed


def build_optimizer(schedule: Schedule, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """Every group that trains at some point, in a fixed order; ones still frozen have no gradient,
    which torch's optimizers skip (no update, no weight decay, no state)."""
    if not any(pg.trains_at(0) for pg in groups):
        raise ConfigError(
            "every parameter is frozen at the start: nothing to train; "
            "leave at least one group (e.g. the head) unfrozen in the recipe"
        )
    make = schedule.optimizer or torch.optim.AdamW
    try:
        return make(
            [
                dict(params=pg.params, lr=pg.lr, weight_decay=pg.weight_decay, name=pg.name)
                for pg in groups
                if pg.in_optimizer
            ]
        )
    except ValueError as error:  # torch's own argument checks (a negative momentum, ...)
        raise ConfigError(f"the optimizer rejects its settings: {error}") from None


def lr_multipliers(
    groups: list[ParamGroup], lr_at: LRSchedule | LRFunction, total_steps: int, steps_per_epoch: int = 1
) -> list[Callable[[int], float]]:
    """One LambdaLR function per optimizer group: the schedule, times the warm-up after an unfreeze."""

    def for_group(pg: ParamGroup) -> Callable[[int], float]:
        at = schedules.bind(lr_at, steps_per_epoch=steps_per_epoch, total_steps=total_steps, base_lr=pg.lr)
        if not pg.starts_at:  # trains from step 0
            return at
        after = unfreeze_warmup(pg.starts_at, pg.group.unfreeze_warmup_steps)
        return lambda step: at(step) * after(step)

    return [for_group(pg) for pg in groups if pg.in_optimizer]


def frozen_batchnorms(model: nn.Module, groups: list[ParamGroup]) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen now in groups that keep norm statistics:
    kept in eval mode, so their running statistics stay as loaded."""
    fixed = {id(p) for pg in groups if pg.group.keep_norm_stats for p in pg.params if not p.requires_grad}
    norms = (nn.modules.batchnorm._BatchNorm,)
    return [
        m
        for m in model.modules()
        if isinstance(m, norms)
        and any(True for _ in m.parameters(recurse=False))
        and all(id(p) in fixed for p in m.parameters(recurse=False))
    ]
