"""Optimizers by name: SGD, Adam, AdamW, RMSprop, Adagrad from torch.optim.

`optimizer(name, **kwargs)` returns a factory for `Schedule.optimizer`; the loop calls it with
the parameter groups, each carrying its own lr and weight_decay (so weight decay is per group).
A recipe may also pass any callable `param_groups -> torch.optim.Optimizer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch

from launcher.config import ConfigError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


def optimizer(name: str, **kwargs) -> OptimizerFactory:
    """A factory for torch.optim's `name` with `kwargs` (lr and weight_decay come from the groups)."""
    cls = OPTIMIZERS.get(name.lower())
    if cls is None:
        raise ConfigError(
            f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)} "
            "or pass your own callable as Schedule.optimizer"
        )
    accepted = inspect.signature(cls).parameters
    for key in kwargs:
        if key not in accepted or key == "params":
            raise ConfigError(
                f"optimizer {name} takes no argument {key!r}; it takes "
                f"{', '.join(k for k in accepted if k != 'params')}"
            )
    if kwargs.get("nesterov") and not kwargs.get("momentum"):
        raise ConfigError("nesterov SGD needs momentum > 0; set --momentum (e.g. 0.9) or --nesterov=False")
    return partial(cls, **kwargs)


def from_config(cfg) -> OptimizerFactory:
    """The optimizer a config names (`--optimizer`, with --momentum/--nesterov where they apply)."""
    name = cfg.optimizer
    if name == "sgd":
        return optimizer(name, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "rmsprop":
        return optimizer(name, momentum=cfg.momentum)
    return optimizer(name)


def sgd(momentum: float = 0.9, nesterov: bool = False) -> OptimizerFactory:
    """SGD with momentum, for Schedule.optimizer."""
    return optimizer("sgd", momentum=momentum, nesterov=nesterov)
