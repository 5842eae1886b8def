"""Evaluation on a cadence: when the run evaluates (every --eval_every optimizer steps, or at epoch
ends when that is 0), on what (every validation sample, or with --eval_batches the same first K
batches of each process every time, each sample counted once across ranks), and the best metric
and early stopping that follow it (counted in evaluations). One pass over the data:
launcher/train/evaluation.py, shared with `launcher evaluate`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from launcher.config import TrainConfig
from launcher.data.loader import SplitLoader
from launcher.runtime.parallel import Parallel
from launcher.train.evaluation import evaluate_split, example_images
from launcher.train.guards import BestMetric, DataHealth
from launcher.train.metrics import TaskMetrics
from launcher.train.state import RunState


@dataclass
class Evaluation:
    metrics: dict  # val/* (and val_ema/*), all-reduced: the same on every rank
    improved: bool  # the best metric improved
    counted: bool  # on the cadence: counts towards early stopping and a plateau schedule
    confusion: list[list[int]] | None = None  # classifiers: the raw weights' confusion matrix
    examples: list[tuple] | None = None  # main process: (image, prediction, label) of its first batch


class Evaluator:
    """Decides when to evaluate (`due_after_step`, `at_epoch_ends`) and evaluates: every rank calls
    `evaluate` alike."""

    def __init__(
        self,
        cfg: TrainConfig,
        val_data: SplitLoader | None,
        parts,
        accelerator: Accelerator,
        parallel: Parallel,
        state: RunState,
        data_health: DataHealth,
        val_samples: int,
        beat: Callable[[], None],
    ):
        self.eval_every = cfg.eval_every  # optimizer steps (0: at epoch ends)
        self.eval_batches = cfg.eval_batches  # per process (0: all)
        self.channels_last, self.log_images = cfg.channels_last, cfg.log_images
        self.val_data, self.accelerator, self.parallel, self.state = val_data, accelerator, parallel, state
        self.checked, self.extra_metrics = parts.checked, parts.extra_metrics
        self.data_health, self.beat = data_health, beat  # beat: the hang watchdog's, once per batch
        self.val_samples = val_samples  # the whole split's
        self.best = BestMetric(
            cfg.best_metric, cfg.best_mode, cfg.early_stop_patience, state, cfg.early_stop_min_delta
        )
        self.evaluated_step = -1  # the step of this process's last evaluation
        # prefix (val, val_ema) -> its metrics, kept for the run (launcher/train/metrics.py says why)
        self.task_metrics: dict[str, TaskMetrics] = {}

    @property
    def at_epoch_ends(self) -> bool:
        return not self.eval_every

    def due_after_step(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ema, counted: bool) -> Evaluation | None:
        """The validation metrics of `model` (unwrapped) and the EMA's weights; None without
        validation data. `counted`: an evaluation on the cadence, not the one where a run ends."""
        if self.val_data is None:
            return None
        self.evaluated_step = self.state.step
        self.parallel.before_evaluation(model, ema)
        metrics, confusion, examples = self._pass(model, "val")
        if ema is not None:
            metrics.update(self._pass(ema.module, "val_ema")[0])
        improved = self.best.update(metrics, counted)
        return Evaluation(metrics, improved, counted, confusion, examples)

    def _batches(self):
        """This rank's validation batches: all of them in the epoch's order, or its first
        --eval_batches in epoch 0's order (the same samples at every evaluation)."""
        if not self.eval_batches:
            return self.val_data.loader(self.state.epoch)
        return itertools.islice(self.val_data.loader(0), self.eval_batches)

    def _beating(self, batches):
        for batch in batches:
            self.beat()
            yield batch

    def _pass(self, model: torch.nn.Module, prefix: str) -> tuple[dict, list | None, list | None]:
        """One pass: (metrics, confusion matrix, example predictions). The raw weights' pass also
        counts unreadable samples."""
        acc, raw = self.accelerator, prefix == "val"
        if prefix not in self.task_metrics:
            self.task_metrics[prefix] = TaskMetrics(
                self.checked.task, self.checked.num_classes, acc.device, self.extra_metrics
            )
        metrics = self.task_metrics[prefix]
        on_errors = (lambda errors: self.data_health.note(errors, "val")) if raw else None
        passed = evaluate_split(
            model,
            self._beating(self._batches()),
            self.checked.step,
            metrics,
            acc,
            prefix,
            self.channels_last,
            on_errors,
            lockstep=self.checked.example if self.parallel.sharded else None,
        )
        result, examples = passed.metrics, None
        if raw and passed.first is not None and acc.is_main_process and self.log_images:
            examples = example_images(*passed.first, self.log_images)
        if raw:
            unreadable = passed.unreadable
            skipped = int(
                acc.reduce(torch.tensor(float(sum(unreadable.values())), device=acc.device), "sum").item()
            )
            read = self.val_samples if not self.eval_batches else result[f"{prefix}/samples"] + skipped
            self.data_health.end_of_pass(skipped, read, "val", unreadable)
            result["val/unreadable"] = skipped
        return result, passed.confusion, examples
