"""How a `Trainer` (launcher/train/trainer.py) is put together from what `build_parts` made:

- `build_training`: the model wrapped or sharded, the EMA, the parameter groups, the optimizer
  and the LR schedule, registered for checkpointing;
- `build_parts_of`: the parts that decide when to act, wired to each other: the guards, the run
  log, the stop signals, the run lock, the hang watchdog, the evaluator, the saver and the
  checkpointing, throughput and profiling, the recipe's callbacks.

They set the trainer's attributes, which `Trainer` declares where the class begins."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from launcher.optim.groups import build_optimizer, frozen_batchnorms, lr_multipliers
from launcher.optim.regularization import EMA, batch_mix
from launcher.optim.schedules import LRSchedule
from launcher.runtime import checkpoints
from launcher.runtime.export import hf_layout
from launcher.runtime.preemption import StopSignals
from launcher.runtime.run_lock import agreed_lock
from launcher.runtime.sharding import global_norm
from launcher.runtime.watchdog import Watchdog
from launcher.track.profiling import StepProfiler
from launcher.track.throughput import Throughput
from launcher.train.adapters import PeftRun
from launcher.train.callbacks import View, build_callbacks
from launcher.train.counting import CountedLoss
from launcher.train.evaluator import Evaluator
from launcher.train.guards import CheckpointCadence, DataHealth, NonFiniteGuard
from launcher.train.run_log import RunLog
from launcher.train.saving import Checkpointing, Saver

if TYPE_CHECKING:
    from launcher.train.build import RunParts
    from launcher.train.trainer import Trainer


def build_training(self: Trainer, parts: RunParts) -> None:
    """The model (wrapped or sharded), the EMA, the optimizer and the LR schedule."""
    cfg, acc, model, schedule = self.cfg, self.accelerator, parts.model, parts.schedule
    self.hf = hf_layout(cfg, self.recipe, model)  # OUTPUT_DIR/hf/ for a transformers model, or None
    self.ema = EMA(parts.ema_source, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
    self.parallel.setup(model, self.ema)  # DDP: compiled; FSDP: the EMA sharded in place
    # a PEFT model: its base's fingerprint, its exports
    self.peft = PeftRun(acc, model, parts.frozen_base)
    self.groups = parts.regroup(model) if self.parallel.sharded else parts.groups
    self.frozen_norms = frozen_batchnorms(model, self.groups)
    self.unfreeze_steps = {pg.starts_at for pg in self.groups if pg.starts_at}
    optimizer = build_optimizer(schedule, self.groups)
    total = self.plan.schedule_steps  # max_steps stops early; it does not shorten the schedule
    self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multipliers(self.groups, schedule.lr_at, total, self.plan.steps_per_epoch)
    )
    self.lr_at = schedule.lr_at
    self.mix = batch_mix(cfg.mixup_alpha, cfg.cutmix_alpha, parts.checked.num_classes)
    self.model, self.optimizer = self.parallel.prepare(model, optimizer)
    self.parameters = list(self.model.parameters())
    self.counted_loss = CountedLoss(acc, self.world, parts.checked.counted, self.parameters)
    acc.register_for_checkpointing(self.lr_scheduler)
    if isinstance(self.lr_at, LRSchedule) and self.lr_at.state_dict():
        acc.register_for_checkpointing(self.lr_at)  # ReduceLROnPlateau's state
    self.parallel.register_ema(self.ema)  # DDP: in Accelerate's state; FSDP: in the sharded one


def build_parts_of(self: Trainer, parts: RunParts, log: Callable[[str], None]) -> None:
    """The guards, the log, the evaluator, the lock, the watchdog and the checkpointing."""
    cfg, acc, state = self.cfg, self.accelerator, self.state
    last_checkpoint = lambda: (checkpoints.checkpoint_dirs(cfg.output_dir) or [None])[-1]  # noqa: E731
    self.guard = NonFiniteGuard(
        cfg.nonfinite,
        acc.mixed_precision == "fp16",
        state,
        last_checkpoint,
        acc.is_main_process,
        lambda: global_norm(self.parameters),
    )
    self.data_health = DataHealth(cfg.output_dir, self.rank, cfg.max_corrupt_fraction, gather_object, state)
    self.run_log = RunLog(cfg, acc, self.plan, state)
    self.signals = StopSignals(
        self.world,
        before_exit=lambda: self.lock is not None and self.lock.release(),
        says=acc.is_main_process,
    )
    self.lock = None  # until it is taken, below: a second Ctrl-C releases it if held
    # Last, before anything is written: one run per output_dir (the main process holds it for all).
    self.lock = agreed_lock(acc, cfg.output_dir, log)  # None on the other ranks; a refusal raised on all
    self.watchdog = Watchdog(
        cfg.hang_timeout_s,
        cfg.output_dir,
        self.rank,
        lambda: state.step,
        before_exit=self.lock.release if self.lock is not None else lambda: None,
    )
    self.evaluator = Evaluator(
        cfg,
        self.val_data,
        parts,
        acc,
        self.parallel,
        state,
        self.data_health,
        self.plan.val_samples,
        beat=self.watchdog.beat,
    )
    self.saver = Saver(
        acc,
        cfg.output_dir,
        cfg.keep_checkpoints,
        cfg.async_checkpoint,
        state,
        progress=self.watchdog.beat,
        frozen_base=parts.frozen_base,
    )
    # tokens/s, MFU, stragglers
    self.throughput = Throughput(acc, parts.checked.flops_per_sample, cfg.peak_tflops)
    # --profile_steps
    self.profiler = StepProfiler(cfg.profile_steps, cfg.output_dir, self.rank, acc.device)

    def before_save() -> None:
        self.guard.check(state.step)
        self.run_log.flush()  # a resume from this checkpoint finds every record up to it

    self.checkpointing = Checkpointing(
        self.saver,
        CheckpointCadence(cfg.checkpoint_every, cfg.checkpoint_epoch_end),
        state,
        before_save,
        contents=lambda: (self._state(), self.position.to_dict()),
        write_shards=lambda path: self.parallel.write_shards(path, self.model, self.optimizer, self.ema),
        after_save=lambda: self.callbacks("on_save"),
    )
    their_cfg = copy.deepcopy(cfg)  # a callback that changes its cfg changes nothing of the run
    self.callbacks = build_callbacks(
        self.recipe,
        their_cfg,
        acc.is_main_process,
        lambda: View(
            state.step,
            state.epoch,
            acc.unwrap_model(self.model),
            their_cfg,
            cfg.output_dir,
            acc.is_main_process,
            self.run_log.log,
        ),
    )
