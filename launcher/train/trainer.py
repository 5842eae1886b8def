"""The training loop: a recipe's model, data and schedule run under accelerate.Accelerator.

`fit` reads as the run goes: epochs of optimizer steps, each epoch's end, the run's end. One
optimizer step is `train_step`: a visible loop over its micro-batches, the gradients' reduction
held until the last (DDP and FSDP alike: launcher/runtime/parallel.py), then clipping, the NaN/Inf
guard, the update and the EMA. After each step the parts decide for themselves when to act:

- the `Evaluator` (launcher/train/evaluator.py): when to evaluate (epoch ends, or every
  --eval_every steps), on what (--eval_batches), the best metric, early stopping;
- `Checkpointing` (launcher/train/saving.py): when to checkpoint (with each rank's data position,
  so a resume continues mid-epoch exactly);
- the `RunLog` (launcher/train/run_log.py): metrics.jsonl, the trackers and the progress;
- the guards (launcher/train/guards.py): NaN/Inf, unreadable samples;
- `StopSignals`: SIGUSR1/SIGTERM/SIGINT acted on at step boundaries;
- the recipe's `Callbacks` (launcher/train/callbacks.py), at the run's events.

The run's progress is one `RunState` (launcher/train/state.py), which checkpoints keep. The
trainer is put together by launcher/train/assembly.py."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher.config import DataError, TrainConfig
from launcher.data.layout import Position, derive_seed
from launcher.data.loader import SplitLoader
from launcher.optim.groups import (
    ParamGroup,
    apply_freezing,
    frozen_batchnorms,
)
from launcher.optim.regularization import EMA
from launcher.optim.schedules import LRSchedule
from launcher.recipe import Recipe
from launcher.runtime import checkpoints, run_config
from launcher.runtime.distributed import build_accelerator
from launcher.runtime.export import HFLayout
from launcher.runtime.failures import failure_of
from launcher.runtime.parallel import Parallel, build_parallel
from launcher.runtime.preemption import StopSignals
from launcher.runtime.run_lock import RunLock
from launcher.runtime.watchdog import Watchdog, injected_hang
from launcher.track.profiling import StepProfiler
from launcher.track.throughput import Throughput
from launcher.train.adapters import PeftRun
from launcher.train.assembly import build_parts_of, build_training
from launcher.train.build import build_parts
from launcher.train.callbacks import Callbacks
from launcher.train.counting import CountedLoss
from launcher.train.evaluator import Evaluator
from launcher.train.guards import DataHealth, NonFiniteGuard
from launcher.train.plan import Plan
from launcher.train.preflight import Checked
from launcher.train.run_log import RunLog
from launcher.train.saving import Checkpointing, Saver
from launcher.train.state import LogWindow, RunState
from launcher.train.step import Step


class Trainer:
    # ---- what the run is ------------------------------------------------------------------------
    cfg: TrainConfig
    recipe: Recipe
    accelerator: Accelerator
    rank: int
    world: int
    plan: Plan  # batch arithmetic: steps per epoch, total steps
    checked: Checked  # the pre-flight's findings: task, step style, classes
    classes: list[str]
    step_fn: Step  # what one micro-batch computes
    train_data: SplitLoader
    val_data: SplitLoader | None
    resume_from: str | None  # the checkpoint this run continues

    # ---- the model and its training -------------------------------------------------------------
    parallel: Parallel  # DDP or FSDP
    model: torch.nn.Module  # as trained: wrapped (DDP) or sharded (FSDP)
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    lr_at: object  # the schedule's own: a plateau schedule is told of each evaluation on the cadence
    groups: list[ParamGroup]
    parameters: list[torch.Tensor]  # the same tensors under any DDP rewrap
    ema: EMA | None
    counted_loss: CountedLoss
    unfreeze_steps: set[int]  # steps that change requires_grad
    frozen_norms: list[torch.nn.Module]  # BatchNorms kept in eval mode
    mix: object | None  # MixUp/CutMix
    hf: HFLayout | None  # OUTPUT_DIR/hf/ is written for a transformers model (launcher/runtime/export.py)
    peft: PeftRun  # a PEFT model's frozen base and its exports (launcher/train/adapters.py)

    # ---- where the run stands -------------------------------------------------------------------
    state: RunState  # step, epoch, best, counters: what a checkpoint keeps
    position: Position  # this rank's place in the current epoch's data

    # ---- the parts that decide when to act ------------------------------------------------------
    evaluator: Evaluator
    checkpointing: Checkpointing
    saver: Saver
    run_log: RunLog
    throughput: Throughput  # tokens/s, FLOPs, MFU, stragglers, with each training record
    profiler: StepProfiler  # --profile_steps
    guard: NonFiniteGuard
    data_health: DataHealth
    signals: StopSignals
    watchdog: Watchdog
    lock: RunLock | None  # one run per output_dir, held by the main process
    callbacks: Callbacks  # the recipe's callbacks(cfg)
    hang_at: int  # tests: the step this rank sleeps in (-1: none)

    def __init__(self, cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator | None = None):
        self.accelerator = acc = accelerator or build_accelerator(cfg)
        self.rank, self.world = acc.process_index, acc.num_processes
        log = print if acc.is_main_process else (lambda _: None)
        self.resume_from = checkpoints.agreed_resume(acc, cfg, log)  # raises before anything is written
        note = ""
        if self.resume_from:
            run_config.check_resumed_config(cfg, self.resume_from, self.world)
            cfg, note = run_config.keep_global_batch(cfg, self.resume_from, self.world)
            acc.gradient_accumulation_steps = cfg.grad_accum_steps
        self.parallel = build_parallel(cfg, acc)  # DDP or FSDP (launcher/runtime/parallel.py)
        parts = build_parts(cfg, recipe, self.rank, self.world, acc.device, self.parallel)  # FSDP: sharded
        parts.plan.notes.append(note)
        self.cfg, self.recipe, self.plan, self.checked = parts.cfg, recipe, parts.plan, parts.checked
        self.step_fn, self.classes = parts.checked.step, parts.classes
        self.train_data, self.val_data = parts.train_data, parts.val_data
        build_training(self, parts)
        # python, numpy, torch: dropout/augmentation differ per rank
        set_seed(derive_seed(cfg.seed, "rank", self.rank) % 2**32)
        self.state, self.position = RunState(), Position(0)
        build_parts_of(self, parts, log)
        self.hang_at = injected_hang(self.rank)

    # ---- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        resume_from = self.resume_from
        # before anything is written (FSDP's DCP names its own misfits)
        if resume_from and not self.parallel.sharded:
            run_config.check_model_fits(resume_from, self.model, self.cfg, self.peft.frozen_base)
        self.run_log.start(self.recipe, self.groups, self.checked, self.classes)
        if resume_from:
            self._resume(resume_from)
        self.state.wandb_run_id = self.run_log.tracker.start(
            self.state.wandb_run_id, resume_step=self.state.step
        )
        self.accelerator.wait_for_everyone()

    def _resume(self, path: str) -> None:
        saved = checkpoints.read_state(path)
        self.peft.check_resume(path, saved)  # a PEFT run: the same frozen base
        self.state.load_state_dict(saved)
        self._update_frozen()  # before the optimizer state loads: FSDP's covers what trains then
        read_shards = lambda path: self.parallel.read_shards(path, self.model, self.optimizer, self.ema)  # noqa: E731
        state, rank_state = checkpoints.load(
            self.accelerator, path, self.parallel.sharded, read_shards, self.peft.frozen_base
        )
        self.run_log.metrics.drop_after(self.state.step)  # what the lost steps logged is logged again
        self.position = Position.from_dict(rank_state) if rank_state else Position(self.state.epoch)
        self.saver.start_from(path, print)  # later checkpoints set aside: another branch
        if self.position.batches:
            run_config.check_resumable_position(
                path, state, self.world, self.cfg.num_workers, self.plan.micro_batches_per_epoch
            )
        if self.accelerator.is_main_process:
            where = (
                f", {self.position.batches} of {self.plan.micro_batches_per_epoch} batches into it"
                if self.position.batches
                else ""
            )
            print(
                f"resumed from {path} at step {self.state.step}, epoch {self.state.epoch}{where}", flush=True
            )

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        self.watchdog.start()  # from here on, a rank that makes no progress for --hang_timeout_s ends
        self.start()
        self.run_log.progress.start(self.state.step)
        self.profiler.at_step(self.state.step)
        try:
            self.callbacks("on_train_start")
            first_step = self.state.step
            while self.state.epoch < self.cfg.epochs and self.state.step < self.plan.total_steps:
                if self.state.stopped_early:
                    break  # by an evaluation on the cadence (a resumed run too: it has ended)
                self.train_epoch()
                # cut short: max_steps or an early stop
                if self.position.batches < self.plan.micro_batches_per_epoch:
                    break
                self.end_epoch()
            if self.state.step > first_step and self.evaluator.evaluated_step != self.state.step:
                # where max_steps (or an --eval_every off the last step) ended it
                self.evaluate(counted=False)
            self.signals.drain()  # the run is done: a signal that came at its last step changes nothing
            self.checkpointing.at_end()
            self.callbacks("on_train_end")
        except (RuntimeError, ConnectionError, EOFError) as error:
            lost = failure_of(
                error,
                self.rank,
                self.state.step,
                (self.train_data, self.val_data),
                terminated=self.signals.received == signal.SIGTERM,
            )
            if lost is None:
                raise
            raise lost from error
        finally:
            self._close()
        return self.finish()

    def train_epoch(self) -> None:
        """The current epoch's remaining optimizer steps (fewer where max_steps ends the run)."""
        plan = self.plan
        self._train_mode()
        if self.position.epoch != self.state.epoch:
            self.position = Position(self.state.epoch)
        done = plan.batch.steps_in_micro_batches(self.position.batches)  # steps of this epoch before a resume
        steps = min(plan.steps_per_epoch - done, plan.total_steps - self.state.step)
        batches = iter(self.train_data.loader(self.state.epoch, self.position))
        window = LogWindow(self.accelerator.device)
        self.throughput.clock.start(fresh=True)
        for _ in range(steps):
            self.train_step(batches, window)
            if self.after_step(window):
                # the next logged step reports the steps from here
                window = LogWindow(self.accelerator.device)
            if self.state.stopped_early:
                return

    def train_step(self, batches, window: LogWindow) -> None:
        """One optimizer step: forward and backward of each of its micro-batches (the gradients'
        reduction held until the last), then the count normalisation, clipping, the NaN/Inf guard,
        the update and the EMA."""
        acc, accumulation = self.accelerator, self.cfg.grad_accum_steps
        for index in range(accumulation):
            last = index == accumulation - 1
            fetch_start = time.perf_counter()
            batch = next(batches)
            window.data_time += time.perf_counter() - fetch_start
            data = self._micro_batch_data(batch)
            self.throughput.batch(batch.data)
            with self.parallel.gradient_sync(self.model, sync=last):
                out = self.step_fn(self.model, data)
                counted = self.counted_loss.check(out)
                if last:
                    # the step's all-reduce comes next: ranks wait for each other from here
                    self.throughput.clock.ready()
                self._backward(self.counted_loss.loss(out) if counted else out.loss)
            window.add(out.loss.detach(), out.count if counted else 1, batch.size)
        if counted:
            self.counted_loss.normalise()
        window.grad_norm = self._clip_gradients(self.run_log.logs_at(self.state.step + 1))
        if self.guard.allows(self.state.step + 1, out.loss, window.grad_norm) and self._update():
            if self.ema is not None:
                self.ema.update_parameters(acc.unwrap_model(self.model))
        # the wrapped optimizer's own: Accelerate's inspects its signature at every call
        self.optimizer.optimizer.zero_grad(set_to_none=True)
        self.throughput.clock.start()

    def after_step(self, window: LogWindow) -> bool:
        """An optimizer step is done: schedule, unfreezing, logging, evaluation (--eval_every),
        checkpoint, callbacks, signals. True if it logged the window's training metrics."""
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}  # this step's
        self.lr_scheduler.step()
        self.state.step += 1
        self.watchdog.beat()
        if self.state.step == self.hang_at:  # tests: a rank frozen in a step, its connections open
            os.kill(os.getpid(), signal.SIGSTOP)
        self.run_log.progress.advance()
        self.profiler.at_step(self.state.step)
        if self.state.step in self.unfreeze_steps:
            self._update_frozen()
        logged = self.run_log.logs_at(self.state.step)
        if logged:
            self.guard.check(self.state.step)
            corrupt = self.run_log.training(
                window,
                lrs,
                self.optimizer.param_groups[0]["lr"],
                float(sum(self.position.corrupt.values())),
                self.throughput,
            )
            self.data_health.check(corrupt, self.plan.train_samples, "train", self.position.corrupt)  # so far
        else:
            self.run_log.record(lrs, flush=False)
        at_epoch_end = self.position.batches == self.plan.micro_batches_per_epoch
        if self.evaluator.due_after_step(self.state.step):
            self.evaluate()
            self._train_mode()
            self._stop_early_if_due()
        self.checkpointing.after_step(at_epoch_end)
        self.callbacks("on_step_end")
        self._check_signals()
        return logged

    def end_epoch(self) -> None:
        """The epoch's data report, its evaluation (without --eval_every) and checkpoint."""
        self._report_epoch_data()
        if self.evaluator.at_epoch_ends:
            self.evaluate()
        self.state.epoch += 1
        self.position = Position(self.state.epoch)
        self.checkpointing.after_epoch()
        if not self._stop_early_if_due():
            self._check_signals(now=True)  # a signal that came during evaluation stops here

    # ---- the step's pieces ----------------------------------------------------------------------

    def _micro_batch_data(self, batch):
        """A training batch on the device, mixed (--mixup_alpha, --cutmix_alpha), its position and
        unreadable samples noted."""
        self.position.advance(batch)
        self.data_health.note(batch.errors, "train")
        if batch.data is None:  # every sample of it was unreadable
            raise DataError(
                f"rank {self.rank}: a training batch with no readable sample ({len(batch.errors)} "
                "unreadable); check the shards and the split's decode"
            )
        data = self.step_fn.prepare(batch.data, self.accelerator.device, self.cfg.channels_last)
        if self.mix is not None:
            data = type(data)(self.mix(*data))
        self.run_log.trace(batch.keys)
        return data

    def _backward(self, loss: torch.Tensor) -> None:
        """Accelerate's backward (the grad scaler, the division by the accumulation steps), or with
        neither to do the loss's own: Accelerate's divides by 1 too, a node in every step's graph."""
        if self.accelerator.scaler is None and self.accelerator.gradient_accumulation_steps == 1:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def _clip_gradients(self, logged: bool):
        """The gradient norm (before clipping to max_grad_norm, if set): logged, and checked for NaN/Inf.
        None where nothing needs it: no clipping, a step that does not log, and a guard that does not ask."""
        if self.cfg.max_grad_norm > 0 or logged or self.guard.needs_norm:
            return self.parallel.grad_norm(self.parameters, self.cfg.max_grad_norm)
        return None

    def _update(self) -> bool:
        """The optimizer step; False if fp16's grad scaler skipped it (overflow). Without a scaler,
        the wrapped optimizer's own step: Accelerate's wrapper looks two optional packages up on
        disk at every call (about 0.1 ms)."""
        if self.accelerator.scaler is None:
            self.optimizer.optimizer.step()
            return True
        self.optimizer.step()
        return not self.optimizer.step_was_skipped

    def _train_mode(self) -> None:
        self.model.train()
        for module in self.frozen_norms:
            module.eval()  # frozen BatchNorm keeps its running statistics

    def _update_frozen(self) -> None:
        """Unfreeze the groups whose step has come (after a resume too): gradients on, BatchNorm
        statistics updating again, DDP rebuilt so it all-reduces their gradients."""
        unfrozen = apply_freezing(self.groups, self.state.step)
        if not unfrozen:
            return
        self.frozen_norms = frozen_batchnorms(self.model, self.groups)
        self.model = self.parallel.after_unfreeze(self.model)  # DDP rebuilt
        self._train_mode()
        self.run_log.say(f"step {self.state.step}: training {', '.join(unfrozen)} from now on")

    # ---- evaluation, data, signals --------------------------------------------------------------

    def evaluate(self, counted: bool = True) -> bool:
        """Evaluate (every rank); True if `best_metric` improved. Only evaluations on the cadence
        (`counted`) step a plateau schedule and count towards early stopping, so a run stopped
        between two by max_steps resumes as if it had not stopped."""
        self.guard.check(self.state.step)  # a spoilt model would step the plateau schedule and early stopping
        evaluation = self.evaluator.evaluate(self.accelerator.unwrap_model(self.model), self.ema, counted)
        if evaluation is None:
            return False
        if evaluation.improved and self.accelerator.is_main_process:
            self.saver.best_improved()  # best.json, if this step's checkpoint is in place already
        self.run_log.evaluation(evaluation, self.classes, self.ema is not None)
        if counted and isinstance(self.lr_at, LRSchedule) and self.lr_at.after_evaluation(evaluation.metrics):
            self._refresh_lr()
        self.callbacks("on_evaluate", evaluation.metrics)  # the model still in eval mode
        return evaluation.improved

    def _refresh_lr(self) -> None:
        """The schedule changed between steps (a plateau): apply it to the next step's LR now. The LR
        is read from the optimizer's groups everywhere (never from the scheduler's get_last_lr())."""
        sched = self.lr_scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        self.run_log.say(
            f"step {self.state.step}: {self.cfg.lr_plateau_metric} plateaued, LR now "
            f"{self.optimizer.param_groups[0]['lr']:.3g}"
        )

    def _stop_early_if_due(self) -> bool:
        """Early stopping (--early_stop_patience evaluations without improvement): True if it stops the
        run."""
        if self.state.stopped_early or not self.evaluator.best.stop_early():
            return self.state.stopped_early
        best, cfg = self.state.best, self.cfg
        by = f" by more than {cfg.early_stop_min_delta:g}" if cfg.early_stop_min_delta else ""
        self.run_log.warn(
            f"early stop at step {self.state.step}: {cfg.best_metric} has not improved{by} for "
            f"{cfg.early_stop_patience} evaluations (best {best['value']:.4g} at step {best['step']})"
        )
        return True

    def _report_epoch_data(self) -> None:
        """Samples dropped or repeated to give every rank the same batches, and unreadable ones."""
        repeated, corrupt, unreachable = self.run_log.summed(
            self.position.repeated,
            sum(self.position.corrupt.values()),
            sum(self.position.unreachable.values()),
        )
        self.data_health.end_of_pass(corrupt, self.plan.train_samples, "train", self.position.corrupt)
        self.run_log.epoch_data(
            self.train_data.planned_dropped(self.state.epoch), repeated, corrupt, unreachable
        )

    def _check_signals(self, now: bool = False) -> None:
        self.checkpointing.stop_if_signalled(self.signals, now, close_log=self.run_log.close)

    def _state(self) -> dict:
        return {
            **self.state.state_dict(),
            **self.peft.state(),
            "config": dataclasses.asdict(self.cfg),
            "world_size": self.world,
            "num_workers": self.cfg.num_workers,
            "batches_per_epoch": self.plan.micro_batches_per_epoch,
        }

    # ---- the end --------------------------------------------------------------------------------

    def _close(self) -> None:
        self.profiler.close()
        self.watchdog.stop()
        self.run_log.flush()
        self.run_log.progress.close()  # an error message then starts on a line of its own
        self.signals.restore()
        for split in (self.train_data, self.val_data):
            if split is not None:
                split.close()  # persistent workers end here, not at interpreter exit

    def finish(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        final = self.checkpointing.final_weights(
            cfg.final_weights, lambda path: self.parallel.load_checkpoint_weights(self.model, path)
        )
        # model.safetensors or shards, the EMA's, hf/
        exported = self.parallel.export(self.model, self.ema, self.hf)
        # OUTPUT_DIR/adapter/, hf/
        self.peft.export(acc.unwrap_model(self.model), cfg.output_dir, cfg.export_merged)
        summary = {
            **self.state.summary(self.plan.batch),
            **final,
            **exported,
            "memory_per_process": self.parallel.memory(self.model, self.optimizer),
        }
        checksums = self.parallel.replica_checksums(self.model)  # FSDP: none, each rank holds other shards
        if checksums is not None:
            summary["replicas_identical"] = len(set(checksums)) == 1
        self.run_log.final(summary, checksums, self.ema is not None)
        # The wrapped model (DDP's reducer, FSDP's mesh) holds the process group: let go of it while
        # the group lives. Freed after end_training destroyed it, ~ProcessGroupGloo can hang (torch 2.7).
        self.model = self.optimizer = self.ema = None
        self.parallel.release()
        self.run_log.tracker.finish(summary)  # Accelerate's end_training destroys the process group
        self.parallel.close()
        return summary


def train(cfg: TrainConfig, recipe: Recipe) -> dict:
    trainer = Trainer(cfg, recipe)
    try:
        return trainer.fit()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
