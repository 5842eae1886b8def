"""The training loop: a recipe's model, data and schedule run under accelerate.Accelerator.

DDP over all processes (gloo on CPU), mixed precision, gradient accumulation as a visible loop in
`train_step` (non-final micro-batches skip the all-reduce), clipping, the LR
scheduler stepped once per optimizer step (every group's LR logged each step), scheduled
unfreezing (DDP rebuilt to include the unfrozen parameters), a non-finite gradient stopping the
run or skipping the step, evaluation each epoch with every validation sample counted once,
checkpoints at epoch ends and every `checkpoint_every` steps (with each rank's data position, so
a resume continues mid-epoch exactly), SIGUSR1/SIGTERM/SIGINT acted on at step boundaries, unreadable
samples counted across ranks (stop above `max_corrupt_fraction`), metrics to metrics.jsonl and
wandb, progress as a bar or plain lines (launcher/track/progress.py), final weights and a summary.

The run's progress is one `RunState` (launcher/train/state.py); the policies that decide when to
act (the NaN/Inf guard, data health, best metric and early stopping, checkpoint cadence) are
components of their own (launcher/train/guards.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from launcher.config import ConfigError, DataError, TrainConfig
from launcher.data.layout import Position, derive_seed
from launcher.optim.groups import apply_freezing, build_optimizer, frozen_batchnorms, lr_multipliers
from launcher.optim.regularization import EMA, batch_mix
from launcher.optim.schedules import LRSchedule
from launcher.recipe import Recipe
from launcher.runtime import checkpoints, run_config
from launcher.runtime.distributed import build_accelerator
from launcher.runtime.parallel import build_parallel
from launcher.runtime.sharding import global_norm
from launcher.runtime.preemption import Interrupted, Preempted, StopSignals, requeue_slurm_job
from launcher.runtime.failures import failure_of
from launcher.runtime.run_lock import agreed_lock
from launcher.runtime.watchdog import Watchdog, injected_hang
from launcher.track.progress import Progress, progress_style
from launcher.track.trackers import MetricsLog, Tracker, save_run_files, write_json
from launcher.train.build import build_parts
from launcher.train.counting import CountedLoss
from launcher.train.evaluation import evaluate_split, example_images, format_metrics
from launcher.train.guards import BestMetric, CheckpointCadence, DataHealth, NonFiniteGuard
from launcher.train.metrics import TaskMetrics
from launcher.train.plan import done_lines, format_plan
from launcher.train.saving import Saver
from launcher.train.state import LogWindow, RunState


class Trainer:
    def __init__(self, cfg: TrainConfig, recipe: Recipe, accelerator: Accelerator | None = None):
        self.accelerator = accelerator or build_accelerator(cfg)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        log = print if acc.is_main_process else (lambda _: None)
        self.resume_from = checkpoints.agreed_resume(acc, cfg, log)  # raises before anything is written
        note = ""
        if self.resume_from:
            run_config.check_resumed_config(cfg, self.resume_from, self.world)
            cfg, note = run_config.keep_global_batch(cfg, self.resume_from, self.world)
            acc.gradient_accumulation_steps = cfg.grad_accum_steps
        parts = build_parts(cfg, recipe, self.rank, self.world, acc.device)
        self.cfg, self.recipe = cfg, recipe = parts.cfg, recipe
        parts.plan.notes.append(note)
        self.checked, self.step_fn = parts.checked, parts.checked.step
        self.classes, self.extra_metrics = parts.classes, parts.extra_metrics
        self.train_data, self.val_data, self.plan = parts.train_data, parts.val_data, parts.plan
        model, schedule = parts.model, parts.schedule
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
        self.parallel = build_parallel(cfg, acc, parts.units)  # DDP or FSDP (launcher/runtime/parallel.py)
        self.parallel.setup(model, self.ema)  # FSDP: the model and the EMA sharded in place
        self.groups = parts.regroup(model) if self.parallel.sharded else parts.groups
        self.frozen_norms = frozen_batchnorms(model, self.groups)
        self.unfreeze_steps = {pg.starts_at for pg in self.groups if pg.starts_at}  # steps that change requires_grad
        optimizer = build_optimizer(schedule, self.groups)
        total = self.plan.schedule_steps  # max_steps stops early; it does not shorten the schedule
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multipliers(self.groups, schedule.lr_at, total, self.plan.steps_per_epoch))
        self.lr_at = schedule.lr_at
        self.mix = batch_mix(cfg.mixup_alpha, cfg.cutmix_alpha, parts.checked.num_classes)
        self.model, self.optimizer = self.parallel.prepare(model, optimizer)
        self.parameters = list(self.model.parameters())  # the same tensors under any DDP rewrap
        self.counted_loss = CountedLoss(acc, self.world, parts.checked.counted, self.parameters)
        acc.register_for_checkpointing(self.lr_scheduler)
        if isinstance(self.lr_at, LRSchedule) and self.lr_at.state_dict():
            acc.register_for_checkpointing(self.lr_at)  # ReduceLROnPlateau's state
        self.parallel.register_ema(self.ema)  # DDP: in Accelerate's state; FSDP: in the sharded one
        set_seed(derive_seed(cfg.seed, "rank", self.rank) % 2**32)  # python, numpy, torch: dropout/augmentation differ per rank
        self.state = RunState()  # step, epoch, best, counters: what a checkpoint keeps
        self.position = Position(0)  # this rank's place in the current epoch's data
        last_checkpoint = lambda: (checkpoints.checkpoint_dirs(cfg.output_dir) or [None])[-1]  # noqa: E731
        self.guard = NonFiniteGuard(cfg.nonfinite, acc.mixed_precision == "fp16", self.state, last_checkpoint,
                                    acc.is_main_process, lambda: global_norm(self.parameters))
        self.data_health = DataHealth(cfg.output_dir, self.rank, cfg.max_corrupt_fraction, gather_object)
        self.best_metric = BestMetric(cfg.best_metric, cfg.best_mode, cfg.early_stop_patience, self.state,
                                      cfg.early_stop_min_delta)
        self.cadence = CheckpointCadence(cfg.checkpoint_every, cfg.checkpoint_epoch_end)
        self.metrics = MetricsLog(cfg.output_dir, acc.is_main_process)
        self.tracker = Tracker(acc, cfg)
        self.signals = StopSignals(self.world, before_exit=lambda: self.lock is not None and self.lock.release(),
                                   says=acc.is_main_process)
        self.progress = Progress(progress_style(cfg.progress, cfg.quiet), cfg.quiet, self.plan.total_steps,
                                 acc.is_main_process)
        self.lock = None  # until it is taken, below: a second Ctrl-C releases it if held
        # Last, before anything is written: one run per output_dir (the main process holds it for all).
        self.lock = agreed_lock(acc, cfg.output_dir, log)  # None on the other ranks; a refusal raised on all
        self.watchdog = Watchdog(cfg.hang_timeout_s, cfg.output_dir, self.rank, lambda: self.state.step,
                                 before_exit=self.lock.release if self.lock is not None else lambda: None)
        self.saver = Saver(acc, cfg.output_dir, cfg.keep_checkpoints, cfg.async_checkpoint, self.state,
                           progress=self.watchdog.beat)
        self.hang_at = injected_hang(self.rank)  # tests: the step this rank sleeps in (-1: none)

    # ---- setup ------------------------------------------------------------------------------

    def start(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        resume_from = self.resume_from
        if resume_from and not self.parallel.sharded:  # before anything is written (FSDP's DCP names its own misfits)
            run_config.check_model_fits(resume_from, self.model, cfg)
        if acc.is_main_process:
            self.progress.say(format_plan(cfg, self.plan, self.groups, self.recipe.name))
            save_run_files(cfg, self.recipe, self.world)
            checked = self.checked
            write_json(cfg.output_dir, "task.json", {
                "task": checked.task, "step": checked.step.style, "loss": checked.loss_name,
                "metrics": checked.metric_names, "best_metric": cfg.best_metric, "best_mode": cfg.best_mode,
                "classes": self.classes if checked.task == "classification" else [],
                "steps_per_epoch": self.plan.steps_per_epoch})  # the report's --x=epoch
        if resume_from:
            self.state.load_state_dict(checkpoints.read_state(resume_from))
            self._update_frozen()  # before the optimizer state loads: FSDP's covers what trains then
            state, rank_state = checkpoints.load(acc, resume_from, self.parallel.sharded, self._read_shards)
            self.metrics.drop_after(self.state.step)  # what the lost steps logged is logged again
            self.position = Position.from_dict(rank_state) if rank_state else Position(self.state.epoch)
            self.saver.start_from(resume_from, print)  # later checkpoints set aside: another branch
            self._check_resumable(resume_from, state)
            if acc.is_main_process:
                where = (f", {self.position.batches} of {self.plan.micro_batches_per_epoch} batches into it"
                         if self.position.batches else "")
                print(f"resumed from {resume_from} at step {self.state.step}, epoch {self.state.epoch}{where}", flush=True)
        self._init_tracker()
        acc.wait_for_everyone()

    def _check_resumable(self, path: str, state: dict) -> None:
        """A mid-epoch position is only meaningful for the same ranks x workers and epoch size."""
        if not self.position.batches:
            return
        then = (state.get("world_size"), state.get("num_workers"), state.get("batches_per_epoch"))
        now = (self.world, self.cfg.num_workers, self.plan.micro_batches_per_epoch)
        if then != now:
            raise ConfigError(
                f"checkpoint {path} was taken mid-epoch with {then[0]} processes x {then[1]} workers and "
                f"{then[2]} batches per epoch, this run has {now[0]} x {now[1]} and {now[2]}; resume with "
                "the same --num_processes, --num_workers and --batch_size, or from an epoch-end checkpoint")

    def _init_tracker(self) -> None:
        self.state.wandb_run_id = self.tracker.start(self.state.wandb_run_id, resume_step=self.state.step)

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        self.watchdog.start()  # from here on, a rank that makes no progress for --hang_timeout_s ends
        self.start()
        acc = self.accelerator
        self.progress.start(self.state.step)
        try:
            while self.state.epoch < self.cfg.epochs and self.state.step < self.plan.total_steps:
                self.train_epoch()
                if self.position.batches < self.plan.micro_batches_per_epoch:  # cut short by max_steps
                    self.evaluate(epoch_end=False)
                    break
                self._report_epoch_data()
                improved = self.evaluate()
                self.state.epoch += 1
                self.position = Position(self.state.epoch)
                if self.cadence.after_epoch(improved):
                    self._save()
                if self.best_metric.stop_early():
                    self._say_stopped_early()
                    break
                self._check_signals(now=True)  # a signal that came during evaluation stops here
            self.signals.drain()  # the run is done: a signal that came at its last step changes nothing
            if self.saver.saved_step != self.state.step:
                self._save()  # where max_steps stopped: `--resume=auto` continues from here
            self.saver.finish()
        except (RuntimeError, ConnectionError, EOFError) as error:
            raise failure_of(error, self.rank, self.state.step, (self.train_data, self.val_data),
                             terminated=self.signals.received == signal.SIGTERM) or error
        finally:
            self.watchdog.stop()
            self.metrics.flush()
            self.progress.close()  # an error message then starts on a line of its own
            self.signals.restore()
            for split in (self.train_data, self.val_data):
                if split is not None:
                    split.close()  # persistent workers end here, not at interpreter exit
        return self.finish()

    def _say_stopped_early(self) -> None:
        if self.accelerator.is_main_process:
            best = self.state.best
            by = f" by more than {self.cfg.early_stop_min_delta:g}" if self.cfg.early_stop_min_delta else ""
            self.progress.warn(f"early stop at step {self.state.step}: {self.cfg.best_metric} has not improved{by} for "
                               f"{self.cfg.early_stop_patience} evaluations (best {best['value']:.4g} at step {best['step']})")

    def _save(self) -> None:
        self.guard.check(self.state.step)
        self.metrics.flush()  # a resume from this checkpoint finds every record up to it
        self.saver.save(self._state(), self.position.to_dict(), self._write_shards)

    def _write_shards(self, path: str):
        return self.parallel.write_shards(path, self.model, self.optimizer, self.ema)

    def _read_shards(self, path: str) -> None:
        self.parallel.read_shards(path, self.model, self.optimizer, self.ema)

    def _check_signals(self, now: bool = False) -> None:
        """At a step boundary: if any rank got SIGUSR1/SIGTERM/SIGINT (by the previous boundary, or
        by this one with `now`), checkpoint here, close the tracker, requeue under Slurm (SIGUSR1),
        and stop with exit code 75 (130 for a SIGINT: Ctrl-C)."""
        saver = self.saver
        signum = self.signals.agreed(now, ready=saver.ready_step)
        if saver.pending is not None and self.signals.all_ready == saver.pending.step:
            saver.finish()  # every rank's background write is done
        if not signum:
            return
        if saver.saved_step != self.state.step:
            self._save()
        saver.finish()
        self.progress.close()
        self.tracker.finish(self._summary())  # the tracker's files are complete before a requeue
        requeued = requeue_slurm_job(signum) if self.accelerator.is_main_process else ""
        if not self.accelerator.is_main_process:
            raise (Interrupted if signum == signal.SIGINT else Preempted)("")  # the main process says it
        path = checkpoints.checkpoint_dirs(self.cfg.output_dir)[-1]
        if signum == signal.SIGINT:
            raise Interrupted(f"interrupted at step {self.state.step} (checkpoint {path}); "
                              "continue with --resume=auto")
        raise Preempted(f"{signal.Signals(signum).name} at step {self.state.step}: checkpoint {path} saved; "
                        + (requeued or "rerun with --resume=auto to continue"))

    def train_epoch(self) -> None:
        """The current epoch's remaining optimizer steps (fewer where max_steps ends the run)."""
        plan = self.plan
        self._train_mode()
        if self.position.epoch != self.state.epoch:
            self.position = Position(self.state.epoch)
        done = self.position.batches // self.cfg.grad_accum_steps  # steps of this epoch before a resume
        steps = min(plan.steps_per_epoch - done, plan.total_steps - self.state.step)
        batches = iter(self.train_data.loader(self.state.epoch, self.position))
        window = LogWindow(self.accelerator.device)
        for _ in range(steps):
            self.train_step(batches, window)
            if self._after_step(window):
                window = LogWindow(self.accelerator.device)  # the next logged step reports the steps from here

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
            with self.parallel.gradient_sync(self.model, sync=last):
                out = self.step_fn(self.model, data)
                counted = self.counted_loss.check(out)
                self._backward(self.counted_loss.loss(out) if counted else out.loss)
            window.add(out.loss.detach(), out.count if counted else 1, batch.size)
        if counted:
            self.counted_loss.normalise()
        window.grad_norm = self._clip_gradients(self._logs_at(self.state.step + 1))
        if self.guard.allows(self.state.step + 1, out.loss, window.grad_norm) and self._update():
            if self.ema is not None:
                self.ema.update_parameters(acc.unwrap_model(self.model))
        # the wrapped optimizer's own: Accelerate's inspects its signature at every call
        self.optimizer.optimizer.zero_grad(set_to_none=True)

    def _micro_batch_data(self, batch):
        """A training batch on the device, mixed (--mixup_alpha, --cutmix_alpha), its position and
        unreadable samples noted."""
        self.position.advance(batch)
        self.data_health.note(batch.errors, "train", self.state.epoch, self.state.step)
        if batch.data is None:  # every sample of it was unreadable
            raise DataError(f"rank {self.rank}: a training batch with no readable sample ({len(batch.errors)} "
                            "unreadable); check the shards and the split's decode")
        data = self.step_fn.prepare(batch.data, self.accelerator.device, self.cfg.channels_last)
        if self.mix is not None:
            data = type(data)(self.mix(*data))
        self._trace(batch.keys)
        return data

    def _backward(self, loss: torch.Tensor) -> None:
        """Accelerate's backward (the grad scaler, the division by the accumulation steps), or with
        neither to do the loss's own: Accelerate's divides by 1 too, a node in every step's graph."""
        if self.accelerator.scaler is None and self.accelerator.gradient_accumulation_steps == 1:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def _update(self) -> bool:
        """The optimizer step; False if fp16's grad scaler skipped it (overflow). Without a scaler,
        the wrapped optimizer's own step: Accelerate's wrapper looks two optional packages up on
        disk at every call (about 0.1 ms)."""
        if self.accelerator.scaler is None:
            self.optimizer.optimizer.step()
            return True
        self.optimizer.step()
        return not self.optimizer.step_was_skipped

    def _after_step(self, window: LogWindow) -> bool:
        """An optimizer step is done: schedule, unfreezing, logging, checkpoint, signals. True if it
        logged the window's training metrics."""
        cfg, plan = self.cfg, self.plan
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}  # this step's
        self.lr_scheduler.step()
        self.state.step += 1
        self.watchdog.beat()
        if self.state.step == self.hang_at:  # tests: a rank frozen in a step, its connections open
            os.kill(os.getpid(), signal.SIGSTOP)
        self.progress.advance()
        if self.state.step in self.unfreeze_steps:
            self._update_frozen()
        logged = self._logs_at(self.state.step)
        if logged:
            self._log_train(window, lrs)
        else:
            self._record({"step": self.state.step, "epoch": self.state.epoch, **lrs}, flush=False)
        if self.cadence.after_step(self.state.step, self.position.batches == plan.micro_batches_per_epoch):
            self._save()
        self._check_signals()
        return logged

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
        if self.accelerator.is_main_process:
            self.progress.say(f"step {self.state.step}: training {', '.join(unfrozen)} from now on")

    def _logs_at(self, step: int) -> bool:
        """Whether optimizer step `step` logs the training metrics."""
        return step % self.cfg.log_every == 0 or step == self.plan.total_steps

    def _clip_gradients(self, logged: bool):
        """The gradient norm (before clipping to max_grad_norm, if set): logged, and checked for NaN/Inf.
        None where nothing needs it: no clipping, a step that does not log, and a guard that does not ask."""
        if self.cfg.max_grad_norm > 0 or logged or self.guard.needs_norm:
            return self.parallel.grad_norm(self.parameters, self.cfg.max_grad_norm)
        return None

    def _log_train(self, window: LogWindow, lrs: dict[str, float]) -> None:
        self.guard.check(self.state.step)
        acc = self.accelerator
        corrupt = float(sum(self.position.corrupt.values()))
        mine = torch.stack([*window.totals(), torch.tensor(corrupt, dtype=torch.float64, device=acc.device)])
        loss_sum, weight, corrupt_total = acc.reduce(mine, "sum").tolist()  # one collective for all
        loss = loss_sum / max(weight, 1e-12)
        self._check_corrupt(int(corrupt_total), "train", self.position.corrupt)
        elapsed = time.perf_counter() - window.start
        record = {"step": self.state.step, "epoch": self.state.epoch, "train/loss": loss,
                  "train/samples_per_s": window.samples * self.world / elapsed,
                  "train/data_wait": window.data_time / elapsed}
        if window.grad_norm is not None:
            record["train/grad_norm"] = float(window.grad_norm)
        if self.state.skipped_steps:
            record["train/skipped_steps"] = self.state.skipped_steps
        if torch.cuda.is_available():
            record["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30  # peak since last log
            torch.cuda.reset_peak_memory_stats(acc.device)
        self._record({**record, **lrs})
        self.progress.logged(loss, self.optimizer.param_groups[0]["lr"], record["train/samples_per_s"])

    def _record(self, record: dict, flush: bool = True) -> None:
        self.metrics.write(record, flush)
        self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=self.state.step)

    # ---- data problems ------------------------------------------------------------------------

    def _check_corrupt(self, total: int, split: str, counts: dict[str, int]) -> None:
        samples = self.plan.train_samples if split == "train" else self.plan.val_samples
        self.data_health.check(total, samples, split, self.state.epoch, counts)

    def _report_epoch_data(self) -> None:
        """Samples dropped or repeated to give every rank the same batches, and unreadable ones."""
        acc = self.accelerator
        mine = torch.tensor([self.position.repeated, sum(self.position.corrupt.values())],
                            dtype=torch.float64, device=acc.device)
        repeated, corrupt = (int(x) for x in acc.reduce(mine, "sum").tolist())
        self.state.unreadable_total += corrupt
        self._check_corrupt(corrupt, "train", self.position.corrupt)
        dropped = self.train_data.planned_dropped(self.state.epoch)
        self._record({"step": self.state.step, "epoch": self.state.epoch, "data/dropped": dropped,
                      "data/repeated": repeated, "data/unreadable": corrupt})
        if acc.is_main_process and (dropped or repeated or corrupt):
            self.progress.warn(f"epoch {self.state.epoch} data: {self.plan.train_samples} samples, "
                               f"{self.plan.micro_batches_per_epoch} batches of {self.cfg.batch_size} per rank: "
                               f"{dropped} dropped, {repeated} repeated, {corrupt} unreadable")

    def _trace(self, keys) -> None:
        if not self.cfg.trace_samples:
            return
        path = os.path.join(self.cfg.output_dir, "samples", f"rank{self.rank}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.writelines(f"{self.state.epoch} {self.state.step} {key}\n" for key in keys)

    @torch.no_grad()
    def evaluate(self, epoch_end: bool = True) -> bool:
        """Evaluate on the validation split (and the EMA weights, if kept); True if `best_metric` improved.
        Only epoch-end evaluations step a plateau schedule and count towards early stopping, so a
        run stopped mid-epoch by max_steps resumes as if it had not stopped."""
        self.guard.check(self.state.step)  # a spoilt model would step the plateau schedule and early stopping
        if self.val_data is None:
            return False
        acc = self.accelerator
        self.parallel.before_evaluation(self.model, self.ema)
        result, confusion, examples = self._evaluate(acc.unwrap_model(self.model), "val")
        if self.ema is not None:
            result.update(self._evaluate(self.ema.module, "val_ema")[0])
        improved = self.best_metric.update(result, epoch_end)
        if improved and acc.is_main_process:
            self.saver.best_improved()  # best.json, if this step's checkpoint is in place already
        self._record({"step": self.state.step, "epoch": self.state.epoch, **result})
        if epoch_end:
            if isinstance(self.lr_at, LRSchedule) and self.lr_at.after_evaluation(result):
                self._refresh_lr()
        if acc.is_main_process:
            names = self.classes
            if confusion is not None:
                write_json(self.cfg.output_dir, "confusion.json", {"step": self.state.step, "classes": names, "matrix": confusion})
            self.tracker.log_evaluation(self.state.step, confusion, names, examples)
            self.progress.say(f"epoch {self.state.epoch} step {self.state.step}: {format_metrics(result, 'val')}"
                              + (f"; EMA {format_metrics(result, 'val_ema')}" if self.ema is not None else ""))
        return improved

    def _evaluate(self, model: torch.nn.Module, prefix: str) -> tuple[dict, list | None, list | None]:
        """One pass over the validation split: (metrics, confusion matrix, example predictions)."""
        acc, raw = self.accelerator, prefix == "val"  # the raw weights' pass also counts unreadable samples
        metrics = TaskMetrics(self.checked.task, self.checked.num_classes, acc.device, self.extra_metrics)
        passed = evaluate_split(model, self._beating(self.val_data.loader(self.state.epoch)), self.step_fn, metrics, acc, prefix,
                                self.cfg.channels_last, (lambda errors: self.data_health.note(errors, "val", self.state.epoch, self.state.step)) if raw else None,
                                lockstep=self.checked.example if self.parallel.sharded else None)
        result = passed.metrics
        examples = None  # (image, prediction, label) from the main process's first batch
        if raw and passed.first is not None and acc.is_main_process and self.cfg.log_images:
            examples = example_images(*passed.first, self.cfg.log_images)
        if raw:
            unreadable = passed.unreadable
            skipped = int(acc.reduce(torch.tensor(float(sum(unreadable.values())), device=acc.device), "sum").item())
            self._check_corrupt(skipped, "val", unreadable)
            self.state.unreadable_total += skipped
            result["val/unreadable"] = skipped
        return result, passed.confusion, examples

    def _beating(self, batches):
        """Evaluation batches, each one progress for the hang watchdog."""
        for batch in batches:
            self.watchdog.beat()
            yield batch

    def _refresh_lr(self) -> None:
        """The schedule changed between steps (a plateau): apply it to the next step's LR now. The LR
        is read from the optimizer's groups everywhere (never from the scheduler's get_last_lr())."""
        sched = self.lr_scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        if self.accelerator.is_main_process:
            self.progress.say(f"step {self.state.step}: {self.cfg.lr_plateau_metric} plateaued, LR now "
                              f"{self.optimizer.param_groups[0]['lr']:.3g}")

    def _state(self) -> dict:
        return {**self.state.state_dict(), "config": dataclasses.asdict(self.cfg), "world_size": self.world,
                "num_workers": self.cfg.num_workers, "batches_per_epoch": self.plan.micro_batches_per_epoch}

    # ---- the end ----------------------------------------------------------------------------

    def _summary(self) -> dict:
        return self.state.summary(self.plan.global_batch)

    def _final_weights(self) -> dict:
        """What model.safetensors will hold: the last step's weights, or with --final_weights=best the
        best checkpoint's model weights, loaded on every rank (the replicas stay identical; the EMA
        stays the last step's)."""
        best_step = self.state.best.get("step")
        last = {"final_weights": "last", "final_weights_step": self.state.step}
        if self.cfg.final_weights == "last":
            return last
        path = os.path.join(self.cfg.output_dir, "checkpoints", f"step-{best_step or 0:08d}")
        if best_step is None or not os.path.isfile(os.path.join(path, "model.safetensors")):
            if self.accelerator.is_main_process:
                print(f"WARNING: --final_weights=best: {'no evaluation ran' if best_step is None else f'{path} is gone'}; "
                      "model.safetensors holds the last step's weights", flush=True)
            return last
        if best_step != self.state.step:
            self.parallel.load_checkpoint_weights(self.model, path)
        return {"final_weights": "best", "final_weights_step": best_step}

    def finish(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        final = self._final_weights()
        self.parallel.export(self.model, self.ema)  # model.safetensors (and the EMA's), main process only
        summary = {**self._summary(), **final, "memory_per_process": self.parallel.memory(self.model, self.optimizer)}
        checksums = self.parallel.replica_checksums(self.model)  # FSDP: none, each rank holds other shards
        if checksums is not None:
            summary["replicas_identical"] = len(set(checksums)) == 1
        if acc.is_main_process:
            if checksums is not None:
                write_json(cfg.output_dir, "replicas.json",
                           {"parameter_checksums": checksums, "identical": summary["replicas_identical"]})
                if not summary["replicas_identical"]:
                    print("WARNING: model parameters differ across ranks (see replicas.json)", flush=True)
            write_json(cfg.output_dir, "summary.json", summary)
            print(done_lines(cfg, summary, self.state.best, self.ema is not None, self.tracker.run_dir,
                             self.tracker.tensorboard_dir), flush=True)
        # The wrapped model (DDP's reducer, FSDP's mesh) holds the process group: let go of it while
        # the group lives. Freed after end_training destroyed it, ~ProcessGroupGloo can hang (torch 2.7).
        self.model = self.optimizer = self.ema = None
        self.parallel.release()
        self.tracker.finish(summary)  # Accelerate's end_training destroys the process group
        self.parallel.close()
        return summary


def train(cfg: TrainConfig, recipe: Recipe) -> dict:
    trainer = Trainer(cfg, recipe)
    try:
        return trainer.fit()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
