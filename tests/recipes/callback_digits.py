"""A test recipe: mlp_digits with callbacks: one that records each event it sees (written to
OUTPUT_DIR/events.json at the end) and one that raises at step `fail_at`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from mlp_digits import Config as Base
from mlp_digits import build_data, build_model  # noqa: F401


@dataclass
class Config(Base):
    fail_at: int = 0  # the optimizer step whose on_step_end raises (0: never)
    output_dir: str = "runs/callback_digits"


class Recorder:
    def __init__(self):
        self.events: list[list] = []

    def on_train_start(self, view) -> None:
        self.events.append(["on_train_start", view.step, view.epoch])
        try:
            view.step = 10**6
        except dataclasses.FrozenInstanceError:
            self.events.append(["read-only", view.step, view.epoch])
        view.cfg.lr = 123.0  # the run's own config keeps its value

    def on_step_end(self, view) -> None:
        self.events.append(["on_step_end", view.step, view.epoch])

    def on_evaluate(self, view, metrics) -> None:
        self.events.append(["on_evaluate", view.step, view.epoch, metrics["val/samples"]])
        view.log({"callback/steps_seen": view.step, "callback/note": f"evaluated at {view.step}"})

    def on_save(self, view) -> None:
        self.events.append(["on_save", view.step, view.epoch])

    def on_train_end(self, view) -> None:
        self.events.append(["on_train_end", view.step, view.epoch])
        with open(os.path.join(view.output_dir, "events.json"), "w") as f:
            json.dump(self.events, f)


class Exploding:
    def __init__(self, fail_at: int):
        self.fail_at = fail_at

    def on_step_end(self, view) -> None:
        if view.step == self.fail_at:
            raise ValueError(f"no luck at step {view.step}")


def callbacks(cfg: Config) -> list:
    return [Recorder(), Exploding(cfg.fail_at)]
