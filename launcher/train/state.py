"""A run's progress: what a checkpoint keeps and a resume restores, and what the run's end reports;
and the training statistics of the steps since the last logged one (`LogWindow`).

One object, so that a new counter is declared once: `state_dict` saves every field (a checkpoint
from an older version, lacking one, loads it at its default) and `summary` reports them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from launcher.global_batch import GlobalBatch


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way
    best: dict = field(default_factory=dict)  # {"metric", "value", "step"} of the best evaluation so far
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (nonfinite=skip)
    # epoch-end evaluations since the best metric improved (by more than early_stop_min_delta)
    evals_without_improvement: int = 0
    # the best metric's value early stopping last counted as an improvement
    early_stop_value: float | None = None
    unreadable_total: int = 0  # training and validation samples skipped as unreadable, all ranks
    elapsed_s: float = 0.0  # seconds of training before this process (earlier runs, when resumed)
    wandb_run_id: str | None = None
    stopped_early: bool = False  # by early stopping
    # this process's start (not saved)
    started: float = field(default_factory=time.perf_counter, compare=False)

    def elapsed(self) -> float:
        """Seconds of training so far, this process and the ones it resumed from."""
        return self.elapsed_s + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        saved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "started"}
        return {**saved, "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        defaults = RunState()
        for f in dataclasses.fields(self):
            if f.name != "started":
                setattr(self, f.name, state.get(f.name, getattr(defaults, f.name)))
        self.started = time.perf_counter()

    def summary(self, batch: GlobalBatch) -> dict:
        """What the run's end (or a preemption) reports: to the trackers' summary and summary.json."""
        summary = {
            "steps": self.step,
            "samples_seen": batch.samples_in_steps(self.step),
            "total_time_s": round(self.elapsed(), 1),
            "unreadable_skipped": self.unreadable_total,
            "skipped_steps": self.skipped_steps,
        }
        if self.stopped_early:
            summary["stopped_early"] = True
        if self.best:
            summary.update(
                {
                    "best/metric": self.best["metric"],
                    "best/value": self.best["value"],
                    "best/step": self.best["step"],
                }
            )
        return summary


class LogWindow:
    """Training statistics accumulated between two logged steps (kept on device: no syncs)."""

    def __init__(self, device):
        self.device = device
        self.losses: list[torch.Tensor] = []  # each micro-batch's mean loss, or summed one
        self.weights: list = []  # 1 each, or their counts (ints or device tensors)
        self.samples = 0
        self.data_time = 0.0
        self.grad_norm = None
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, weight, samples: int) -> None:
        """A micro-batch: its mean loss (weight 1), or its loss sum over `weight` items. Kept as they
        are until the window is logged: no device work per micro-batch."""
        self.losses.append(loss)
        self.weights.append(weight)
        self.samples += samples

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed losses, summed weights) as float64 tensors on the device."""

        def total(values: list) -> torch.Tensor:
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            numbers = sum(v for v in values if not isinstance(v, torch.Tensor))
            result = torch.tensor(float(numbers), dtype=torch.float64, device=self.device)
            return result + torch.stack(tensors).double().sum() if tensors else result

        return total(self.losses), total(self.weights)
