"""A recipe's own code at the run's events: `callbacks(cfg) -> [object]` in the recipe.

Each object defines any of these methods, each called with a read-only `View` of the run:

    on_train_start(view)            once, before the first step (after a resume: at its step)
    on_step_end(view)               after each optimizer step
    on_evaluate(view, metrics)      after each evaluation (metrics: {"val/loss": ..., ...})
    on_save(view)                   after each checkpoint is written
    on_train_end(view)              once, after the last step and its checkpoint

They run on the main process only, unless the object has `all_ranks = True` (then on every rank,
alike: it may use collectives). `view.log(dict)` sends numbers, text, `launcher.Table` and
`launcher.Images` to metrics.jsonl and every tracker (launcher/track/media.py). An exception in a
callback stops the run in one line naming it (`CallbackFailed`, exit code 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch

from launcher.config import ConfigError, RunStopped

EVENTS = ("on_train_start", "on_step_end", "on_evaluate", "on_save", "on_train_end")


class CallbackFailed(RunStopped):
    """A recipe's callback raised: the run stops in one line naming it."""

    heading = "callback failed"


@dataclasses.dataclass(frozen=True)
class View:
    """What a callback sees, read-only: a frozen dataclass, `cfg` a copy of the run's config (a
    change to it changes nothing)."""

    step: int  # optimizer steps done
    epoch: int  # the epoch under way
    # the unwrapped model (under FSDP: its shards; gather before reading whole tensors)
    model: torch.nn.Module
    cfg: Any  # the run's resolved config (the recipe's Config)
    output_dir: str
    is_main_process: bool
    log: Callable[[dict], None]  # to metrics.jsonl and every tracker, at this step


class Callbacks:
    """The recipe's callbacks, called at the run's events. `view` makes the View of now."""

    def __init__(self, objects: list, is_main: bool, view: Callable[[], View]):
        for obj in objects:
            if not any(callable(getattr(obj, event, None)) for event in EVENTS):
                raise ConfigError(
                    f"callback {name_of(obj)} has none of {', '.join(EVENTS)}; define at least one"
                )
        self.objects = [obj for obj in objects if is_main or getattr(obj, "all_ranks", False)]
        self.view = view

    def __call__(self, event: str, *args) -> None:
        if not self.objects:
            return
        view = self.view()
        for obj in self.objects:
            method = getattr(obj, event, None)
            if method is None:
                continue
            try:
                method(view, *(MappingProxyType(dict(a)) if isinstance(a, dict) else a for a in args))
            except RunStopped:
                raise
            except Exception as error:  # noqa: BLE001 - any error in the recipe's code stops the run in one line
                raise CallbackFailed(
                    f"{name_of(obj)}.{event} raised {type(error).__name__}: {error} (at step "
                    f"{view.step}); fix the recipe's callback or remove it from callbacks(cfg)"
                ) from error


def build_callbacks(recipe, cfg, is_main: bool, view: Callable[[], View]) -> Callbacks:
    """The recipe's `callbacks(cfg)`, if it defines one; an error there is a ConfigError (exit 2)."""
    make = getattr(recipe.module, "callbacks", None)
    if make is None:
        return Callbacks([], is_main, view)
    try:
        objects = list(make(cfg))
    except Exception as error:  # noqa: BLE001 - the recipe's own code, named in one line
        raise ConfigError(f"the recipe's callbacks(cfg) raised {type(error).__name__}: {error}") from error
    return Callbacks(objects, is_main, view)


def name_of(obj) -> str:
    return type(obj).__name__
