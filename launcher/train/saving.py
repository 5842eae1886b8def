"""Saving a run: each checkpoint written (in the background under --async_checkpoint), put in
place once every rank's files are complete and on disk, then best.json and pruning.
`Checkpointing` decides when (launcher/train/guards.py's `CheckpointCadence`, a stop signal, the
end) and which weights the run ends with; `Saver` decides how, and knows what is written, what is
still pending, and which checkpoints are of this run's lineage. The files themselves:
launcher/runtime/checkpoints.py.

Lineage: a run resumed from step S sets the checkpoints after S aside (`start_from`). Pruning
counts only trusted checkpoints (the one resumed from, verified then, and those this process put
in place) towards --keep_checkpoints, and never deletes the newest, the resumed-from or the best;
best.json only ever names a checkpoint that is in place.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from accelerate import Accelerator

from launcher.runtime import checkpoints
from launcher.runtime.preemption import (
    Interrupted,
    Preempted,
    StopSignals,
    requeue_slurm_job,
    slurm_job_to_requeue,
)
from launcher.train.guards import CheckpointCadence
from launcher.train.state import RunState


class Saver:
    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str,
        keep_checkpoints: int,
        async_checkpoint: bool,
        state: RunState,
        progress: Callable[[], None],
        frozen_base: frozenset[str] = frozenset(),
    ):
        self.accelerator, self.output_dir, self.keep_checkpoints = accelerator, output_dir, keep_checkpoints
        self.frozen_base = frozen_base  # a PEFT model's base: not in its checkpoints
        self.async_checkpoint, self.state = async_checkpoint, state
        self.progress = progress  # the hang watchdog's beat: a save under way is progress
        self.saved_step = -1  # the step of the newest checkpoint written or being written
        self.pending: checkpoints.PendingSave | None = None  # written (or being written), not yet in place
        self.resumed_from: str | None = None  # verified when the run resumed from it
        self.in_place: list[str] = []  # checkpoints this process put in place, oldest first

    def start_from(self, path: str, log=print) -> None:
        """The run resumes from checkpoint `path` (at the state's step): main process, set the later
        checkpoints aside (another branch of the history) and make best.json agree."""
        self.resumed_from = os.path.abspath(path)
        self.saved_step = self.state.step
        if self.accelerator.is_main_process:
            checkpoints.set_aside_after(self.output_dir, path, self.state.step, self.state.best, log)

    def save(self, trainer_state: dict, rank_state: dict, write_shards: Callable) -> None:
        """Write a checkpoint of this step (every rank calls it), after putting the previous one in place."""
        self.finish()
        self.progress()
        self.pending = checkpoints.save(
            self.accelerator, self.output_dir, trainer_state, rank_state, write_shards, self.frozen_base
        )
        self.saved_step = self.state.step
        if not self.async_checkpoint:
            self.finish()

    @property
    def ready_step(self) -> int:
        """The step of the pending checkpoint if this rank has written all of its files, else -1."""
        pending = self.pending
        return pending.step if pending is not None and pending.written else -1

    def best_improved(self) -> None:
        """The best metric improved at this step (main process): best.json names its checkpoint once
        that is in place; one still pending is named when `finish` puts it there."""
        step = self.state.best.get("step")
        if step == self.saved_step and (self.pending is None or self.pending.step != step):
            checkpoints.write_best(self.output_dir, self.state.best)

    def finish(self) -> None:
        """Put the pending checkpoint in place (once every rank's files are written), then best.json
        and pruning. A collective."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        acc = self.accelerator
        self.progress()
        final = os.path.abspath(pending.finish())
        self.in_place.append(final)
        self.progress()
        if acc.is_main_process:
            best_step = self.state.best.get("step")
            if best_step == pending.step:
                checkpoints.write_best(self.output_dir, self.state.best)
            root = os.path.join(self.output_dir, "checkpoints")
            best = (
                os.path.abspath(os.path.join(root, f"step-{best_step:08d}"))
                if best_step is not None
                else None
            )
            protected = {final, self.resumed_from, best} - {None}
            trusted = {*self.in_place, *([self.resumed_from] if self.resumed_from else [])}
            checkpoints.prune(self.output_dir, self.keep_checkpoints, protected, trusted, pending.step)
        acc.wait_for_everyone()


class Checkpointing:
    """Decides when the run checkpoints: every --checkpoint_every optimizer steps, at epoch ends
    (--checkpoint_epoch_end, or an evaluation that improved the best metric), where a signal stops
    the run, and at its end; the `Saver` writes. `before_save` runs first (the NaN/Inf guard's
    check, the metrics flushed so a resume finds every record up to the checkpoint); `contents`
    gives (the trainer's state, this rank's data position); `write_shards` the sharded files;
    `after_save` runs once a checkpoint is written (the callbacks' on_save)."""

    def __init__(
        self,
        saver: Saver,
        cadence: CheckpointCadence,
        state: RunState,
        before_save: Callable[[], None],
        contents: Callable[[], tuple[dict, dict]],
        write_shards: Callable,
        after_save: Callable[[], None],
    ):
        self.saver, self.cadence, self.state = saver, cadence, state
        self.before_save, self.contents, self.write_shards = before_save, contents, write_shards
        self.after_save = after_save

    def save(self) -> None:
        """A checkpoint of this step, on every rank."""
        self.before_save()
        self.saver.save(*self.contents(), self.write_shards)
        self.after_save()

    def save_if_new(self) -> None:
        if self.saver.saved_step != self.state.step:
            self.save()

    @property
    def best_is_now(self) -> bool:
        """An evaluation at this step improved the best metric."""
        return self.state.best.get("step") == self.state.step

    def after_step(self, at_epoch_end: bool) -> None:
        """Every --checkpoint_every steps, and where an evaluation (--eval_every) improved the best
        metric; an epoch's last step leaves that to `after_epoch`."""
        if self.cadence.after_step(self.state.step, at_epoch_end) or (self.best_is_now and not at_epoch_end):
            self.save()

    def after_epoch(self) -> None:
        if self.cadence.after_epoch(self.best_is_now):
            self.save()

    def at_end(self) -> None:
        """The run is done: a checkpoint where it stopped (`--resume=auto` continues from there), in place."""
        self.save_if_new()
        self.saver.finish()

    def stop_if_signalled(self, signals: StopSignals, now: bool, close_log: Callable[[], None]) -> None:
        """At a step boundary: if any rank got SIGUSR1/SIGTERM/SIGINT (by the previous boundary, or
        by this one with `now`), checkpoint here, close the log (`close_log`: the trackers' files
        complete before a requeue), requeue under Slurm (SIGUSR1), and stop with exit code 75 (130
        for a SIGINT: Ctrl-C)."""
        saver = self.saver
        signum = signals.agreed(now, ready=saver.ready_step)
        if saver.pending is not None and signals.all_ready == saver.pending.step:
            saver.finish()  # every rank's background write is done
        if not signum:
            return
        self.save_if_new()
        saver.finish()
        close_log()
        if not saver.accelerator.is_main_process:
            raise (Interrupted if signum == signal.SIGINT else Preempted)("")  # the main process says it
        path, step = checkpoints.checkpoint_dirs(saver.output_dir)[-1], self.state.step
        if signum == signal.SIGINT:
            raise Interrupted(f"interrupted at step {step} (checkpoint {path}); continue with --resume=auto")
        stopped = f"{signal.Signals(signum).name} at step {step}: checkpoint {path} saved"
        job = slurm_job_to_requeue(signum)
        if not job:
            raise Preempted(f"{stopped}; rerun with --resume=auto to continue")
        # Said before the requeue: its SIGTERM ends the job step, whose output forwarding can
        # then drop a line written after it.
        sys.stderr.write(
            f"launcher: stopped: {stopped}; requeueing Slurm job {job}: it resumes from this "
            "checkpoint when it starts again\n"
        )
        sys.stderr.flush()
        failed = requeue_slurm_job(job)
        raise Preempted(f"{failed}; rerun with --resume=auto to continue" if failed else "")

    def final_weights(self, final: str, load_weights: Callable[[str], None]) -> dict:
        """What model.safetensors will hold (--final_weights): the last step's weights, or the best
        checkpoint's model weights, which `load_weights(path)` loads on every rank (the replicas
        stay identical; the EMA stays the last step's)."""
        state, output_dir = self.state, self.saver.output_dir
        best_step = state.best.get("step")
        last = {"final_weights": "last", "final_weights_step": state.step}
        if final == "last":
            return last
        path = os.path.join(output_dir, "checkpoints", f"step-{best_step or 0:08d}")
        if best_step is None or not os.path.isfile(os.path.join(path, "model.safetensors")):
            if self.saver.accelerator.is_main_process:
                missing = "no evaluation ran" if best_step is None else f"{path} is gone"
                print(
                    f"WARNING: --final_weights=best: {missing}; "
                    "model.safetensors holds the last step's weights",
                    flush=True,
                )
            return last
        if best_step != state.step:
            load_weights(path)
        return {"final_weights": "best", "final_weights_step": best_step}
