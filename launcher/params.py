"""Parameter groups: which parameters train, at what learning rate and weight decay.

A recipe lists `Group`s of fnmatch patterns over parameter names (`model.named_parameters()`).
Each parameter joins the first group whose pattern matches it; a parameter that matches no
group is an error, so nothing is trained (or frozen) by accident. Frozen groups get
`requires_grad=False` before DDP wraps the model, so DDP never waits for their gradients
(no `find_unused_parameters`), and they are left out of the optimizer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from launcher.config import ConfigError
from launcher.schedules import LRFunction, warmup_cosine


@dataclass
class Group:
    name: str  # shown in the plan and in logged metrics (lr/NAME)
    patterns: Sequence[str] = ("*",)  # fnmatch patterns over parameter names
    lr_scale: float = 1.0  # this group's LR = config lr x lr_scale
    weight_decay: float | None = None  # None: the config's weight_decay
    frozen: bool = False  # no gradient, not in the optimizer, BatchNorm statistics fixed


@dataclass
class Schedule:
    groups: Sequence[Group] = (Group("all"),)
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW  # called as optimizer(param_groups)
    lr_at: LRFunction | None = None  # (step, total_steps) -> LR multiplier; None: warm-up + cosine


def default_schedule(cfg) -> Schedule:
    return Schedule(lr_at=warmup_cosine(cfg.warmup_steps, cfg.min_lr_ratio))


@dataclass
class ParamGroup:
    group: Group
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    lr: float = 0.0
    weight_decay: float = 0.0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def assign_groups(model: nn.Module, schedule: Schedule, lr: float, weight_decay: float) -> list[ParamGroup]:
    """Split the model's parameters into the schedule's groups (first matching pattern wins)."""
    groups = [ParamGroup(g, lr=lr * g.lr_scale,
                         weight_decay=weight_decay if g.weight_decay is None else g.weight_decay)
              for g in schedule.groups]
    for name, param in model.named_parameters():
        owner = next((pg for pg in groups
                      if any(fnmatch.fnmatchcase(name, pat) for pat in pg.group.patterns)), None)
        if owner is None:
            raise ConfigError(f"parameter {name!r} matches no parameter group; add a pattern for it "
                              "or a catch-all group Group('rest', ['*'])")
        owner.names.append(name)
        owner.params.append(param)
    return groups


def apply_freezing(model: nn.Module, groups: list[ParamGroup]) -> None:
    for pg in groups:
        for param in pg.params:
            param.requires_grad_(not pg.group.frozen)


def build_optimizer(schedule: Schedule, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    param_groups = [dict(params=pg.params, lr=pg.lr, weight_decay=pg.weight_decay, name=pg.group.name)
                    for pg in groups if not pg.group.frozen and pg.params]
    if not param_groups:
        raise ConfigError("every parameter is frozen: nothing to train; unfreeze a group in the recipe")
    return schedule.optimizer(param_groups)


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen: kept in eval mode (statistics fixed)."""
    norms = (nn.modules.batchnorm._BatchNorm,)
    return [m for m in model.modules()
            if isinstance(m, norms) and all(not p.requires_grad for p in m.parameters(recurse=False))
            and any(True for _ in m.parameters(recurse=False))]


def sgd(momentum: float = 0.9, nesterov: bool = False) -> Callable[..., torch.optim.Optimizer]:
    """An SGD factory for Schedule.optimizer (the group dicts carry lr and weight decay)."""
    return partial(torch.optim.SGD, momentum=momentum, nesterov=nesterov)
