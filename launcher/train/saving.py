"""Saving a run: each checkpoint written (in the background under --async_checkpoint), put in
place once every rank's files are complete, then best.json and pruning. The trainer decides when
(launcher/train/guards.py's `CheckpointCadence`, preemption, the end); this decides how, and knows
what is written and what is still pending. The files themselves: launcher/runtime/checkpoints.py.
"""

from __future__ import annotations

from typing import Callable

from accelerate import Accelerator

from launcher.runtime import checkpoints
from launcher.train.state import RunState


class Saver:
    def __init__(self, accelerator: Accelerator, output_dir: str, keep: int, in_background: bool, state: RunState,
                 progress: Callable[[], None]):
        self.accelerator, self.output_dir, self.keep = accelerator, output_dir, keep
        self.in_background, self.state = in_background, state
        self.progress = progress  # the hang watchdog's beat: a save under way is progress
        self.saved_step = -1  # the step of the newest checkpoint written or being written
        self.pending: checkpoints.PendingSave | None = None  # written (or being written), not yet in place

    def save(self, trainer_state: dict, rank_state: dict, write_shards: Callable) -> None:
        """Write a checkpoint of this step (every rank calls it), after putting the previous one in place."""
        self.finish()
        self.progress()
        self.pending = checkpoints.save(self.accelerator, self.output_dir, trainer_state, rank_state, write_shards)
        self.saved_step = self.state.step
        if not self.in_background:
            self.finish()

    @property
    def ready_step(self) -> int:
        """The step of the pending checkpoint if this rank has written all of its files, else -1."""
        pending = self.pending
        return pending.step if pending is not None and pending.written else -1

    def finish(self) -> None:
        """Put the pending checkpoint in place (once every rank's files are written), then best.json
        and pruning. A collective."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        acc = self.accelerator
        self.progress()
        pending.finish()
        self.progress()
        if acc.is_main_process:
            best_step = self.state.best.get("step")
            if best_step == pending.step:
                checkpoints.write_best(self.output_dir, self.state.best)
            checkpoints.prune(self.output_dir, self.keep, best_step)
        acc.wait_for_everyone()
