"""Saving a run: each checkpoint written (in the background under --async_checkpoint), put in
place once every rank's files are complete and on disk, then best.json and pruning. The trainer
decides when (launcher/train/guards.py's `CheckpointCadence`, preemption, the end); this decides
how, and knows what is written, what is still pending, and which checkpoints are of this run's
lineage. The files themselves: launcher/runtime/checkpoints.py.

Lineage: a run resumed from step S sets the checkpoints after S aside (`start_from`). Pruning
counts only trusted checkpoints (the one resumed from, verified then, and those this process put
in place) towards --keep_checkpoints, and never deletes the newest, the resumed-from or the best;
best.json only ever names a checkpoint that is in place.
"""

from __future__ import annotations

import os
from typing import Callable

from accelerate import Accelerator

from launcher.runtime import checkpoints
from launcher.train.state import RunState


class Saver:
    def __init__(self, accelerator: Accelerator, output_dir: str, keep: int, in_background: bool, state: RunState,
                 progress: Callable[[], None], frozen_base: frozenset[str] = frozenset()):
        self.accelerator, self.output_dir, self.keep = accelerator, output_dir, keep
        self.frozen_base = frozen_base  # a PEFT model's base: not in its checkpoints
        self.in_background, self.state = in_background, state
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
        self.pending = checkpoints.save(self.accelerator, self.output_dir, trainer_state, rank_state, write_shards,
                                        self.frozen_base)
        self.saved_step = self.state.step
        if not self.in_background:
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
            best = os.path.abspath(os.path.join(root, f"step-{best_step:08d}")) if best_step is not None else None
            protected = {final, self.resumed_from, best} - {None}
            trusted = {*self.in_place, *([self.resumed_from] if self.resumed_from else [])}
            checkpoints.prune(self.output_dir, self.keep, protected, trusted, pending.step)
        acc.wait_for_everyone()
