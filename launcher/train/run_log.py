"""The run's log: what a run tells while it trains, to metrics.jsonl, the trackers (wandb,
TensorBoard: launcher/track/trackers.py) and the progress bar or lines (launcher/track/progress.py).
Every rank calls its methods alike (the training record is all-reduced); only the main process writes,
but for --trace_samples' file of each rank.
"""

from __future__ import annotations

import os
import time

import torch
from accelerate import Accelerator

from launcher.config import TrainConfig
from launcher.track import media
from launcher.track.progress import Progress, progress_style
from launcher.track.throughput import Throughput
from launcher.track.trackers import MetricsLog, Tracker, save_run_files, write_json
from launcher.train.evaluation import format_metrics
from launcher.train.plan import Plan, done_lines, format_plan
from launcher.train.state import LogWindow, RunState


class RunLog:
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, plan: Plan, state: RunState):
        self.cfg, self.accelerator, self.plan, self.state = cfg, accelerator, plan, state
        self.is_main = accelerator.is_main_process
        self.metrics = MetricsLog(cfg.output_dir, self.is_main)
        self.tracker = Tracker(accelerator, cfg)
        self.progress = Progress(
            progress_style(cfg.progress, cfg.quiet), cfg.quiet, plan.total_steps, self.is_main
        )

    def start(self, recipe, groups, checked, classes: list[str]) -> None:
        """Main process: the plan printed; the run's files (config, recipe, environment) and task.json
        written."""
        cfg = self.cfg
        if not self.is_main:
            return
        self.progress.say(format_plan(cfg, self.plan, groups, recipe.name))
        save_run_files(cfg, recipe, self.accelerator.num_processes)
        write_json(
            cfg.output_dir,
            "task.json",
            {
                "task": checked.task,
                "step": checked.step.style,
                "loss": checked.loss_name,
                "metrics": checked.metric_names,
                "best_metric": cfg.best_metric,
                "best_mode": cfg.best_mode,
                "classes": classes if checked.task == "classification" else [],
                "steps_per_epoch": self.plan.steps_per_epoch,
            },
        )  # the report's --x=epoch

    def logs_at(self, step: int) -> bool:
        """Whether optimizer step `step` logs the training metrics (every --log_every, and the last)."""
        return step % self.cfg.log_every == 0 or step == self.plan.total_steps

    def record(self, values: dict, flush: bool = True) -> None:
        """One record at the current step (and epoch): to metrics.jsonl and every tracker."""
        record = {"step": self.state.step, "epoch": self.state.epoch, **values}
        self.metrics.write(record, flush)
        self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=self.state.step)

    def log(self, values: dict) -> None:
        """A callback's values at this step: numbers and text as any record, tables and images as
        each tracker shows them (launcher/track/media.py)."""
        values = media.normalized(values)
        if not self.is_main:
            return
        plain, rich = media.split_values(values)
        step = self.state.step
        as_json = {key: media.to_json(self.cfg.output_dir, key, value, step) for key, value in rich.items()}
        self.metrics.write({"step": step, "epoch": self.state.epoch, **plain, **as_json})
        self.tracker.log(plain, step=step)
        self.tracker.log_media(rich, step=step)

    def say(self, text: str) -> None:
        if self.is_main:
            self.progress.say(text)

    def warn(self, text: str) -> None:
        if self.is_main:
            self.progress.warn(text)

    def training(
        self, window: LogWindow, lrs: dict[str, float], next_lr: float, corrupt: float, throughput: Throughput
    ) -> int:
        """The training record of the steps in `window` with this step's `lrs` (the progress shows
        the first group's `next_lr`). A collective: one all-reduce for the loss, its weight and this
        rank's `corrupt` samples, whose sum over the ranks it returns."""
        acc, world = self.accelerator, self.accelerator.num_processes
        mine = torch.stack([*window.totals(), torch.tensor(corrupt, dtype=torch.float64, device=acc.device)])
        loss_sum, weight, corrupt_total = acc.reduce(mine, "sum").tolist()
        loss = loss_sum / max(weight, 1e-12)
        elapsed = time.perf_counter() - window.start
        record = {
            "train/loss": loss,
            "train/samples_per_s": window.samples * world / elapsed,
            "train/data_wait": window.data_time / elapsed,
        }
        if window.grad_norm is not None:
            record["train/grad_norm"] = float(window.grad_norm)
        if self.state.skipped_steps:
            record["train/skipped_steps"] = self.state.skipped_steps
        record.update(throughput.record(record["train/samples_per_s"], elapsed))  # tokens/s, MFU, stragglers
        if torch.cuda.is_available():
            # peak since last log
            record["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
            torch.cuda.reset_peak_memory_stats(acc.device)
        self.record({**record, **lrs})
        self.progress.logged(loss, next_lr, record["train/samples_per_s"])
        return int(corrupt_total)

    def summed(self, *counts: float) -> list[int]:
        """Each of this rank's `counts` summed over the ranks (one all-reduce)."""
        mine = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
        return [int(x) for x in self.accelerator.reduce(mine, "sum").tolist()]

    def epoch_data(self, dropped: int, repeated: int, corrupt: int, unreachable: int) -> None:
        """Samples dropped or repeated to give every rank the same batches, unreadable ones, and
        unreachable ones (remote shards whose reads failed after their retries)."""
        self.record(
            {
                "data/dropped": dropped,
                "data/repeated": repeated,
                "data/unreadable": corrupt,
                "data/unreachable": unreachable,
            }
        )
        if dropped or repeated or corrupt or unreachable:
            plan = self.plan
            self.warn(
                f"epoch {self.state.epoch} data: {plan.train_samples} samples, "
                f"{plan.micro_batches_per_epoch} batches of {self.cfg.batch_size} per rank: "
                f"{dropped} dropped, {repeated} repeated, {corrupt} unreadable, {unreachable} unreachable"
            )

    def trace(self, keys: list) -> None:
        """--trace_samples: this rank's training sample keys, `epoch step key` lines, in
        OUTPUT_DIR/samples/."""
        if not self.cfg.trace_samples:
            return
        path = os.path.join(self.cfg.output_dir, "samples", f"rank{self.accelerator.process_index}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.writelines(f"{self.state.epoch} {self.state.step} {key}\n" for key in keys)

    def evaluation(self, evaluation, class_names: list[str], ema: bool) -> None:
        """An evaluation's metrics, and on the main process its confusion matrix (confusion.json,
        wandb), example images (wandb) and one line."""
        state, result = self.state, evaluation.metrics
        self.record(result)
        if not self.is_main:
            return
        if evaluation.confusion is not None:
            write_json(
                self.cfg.output_dir,
                "confusion.json",
                {"step": state.step, "classes": class_names, "matrix": evaluation.confusion},
            )
        self.tracker.log_evaluation(state.step, evaluation.confusion, class_names, evaluation.examples)
        self.progress.say(
            f"epoch {state.epoch} step {state.step}: {format_metrics(result, 'val')}"
            + (f"; EMA {format_metrics(result, 'val_ema')}" if ema else "")
        )

    def final(self, summary: dict, checksums: list[str] | None, ema: bool) -> None:
        """Main process: replicas.json (DDP: each rank's parameter checksum), summary.json and the final
        lines."""
        if not self.is_main:
            return
        out = self.cfg.output_dir
        if checksums is not None:
            write_json(
                out,
                "replicas.json",
                {"parameter_checksums": checksums, "identical": summary["replicas_identical"]},
            )
            if not summary["replicas_identical"]:
                print("WARNING: model parameters differ across ranks (see replicas.json)", flush=True)
        write_json(out, "summary.json", summary)
        print(
            done_lines(
                self.cfg, summary, self.state.best, ema, self.tracker.run_dir, self.tracker.tensorboard_dir
            ),
            flush=True,
        )

    def flush(self) -> None:
        self.metrics.flush()

    def close(self) -> None:
        """Before the run stops for a signal: the bar closed, the trackers' files complete."""
        self.progress.close()
        self.tracker.finish(self.state.summary(self.plan.batch))
