"""The run's policies, each deciding for itself when to act, so that the trainer's loop only asks:

- `NonFiniteGuard`: a NaN/Inf loss or gradient (--nonfinite): stop before anything it spoilt is
  saved or logged, or skip the update and count it;
- `DataHealth`: unreadable samples: a JSON line each, the first ten printed, and the
  --max_corrupt_fraction threshold;
- `BestMetric`: the best evaluation so far, and early stopping (--early_stop_patience,
  --early_stop_min_delta);
- `CheckpointCadence`: whether a checkpoint is due (--checkpoint_every, --checkpoint_epoch_end).

Their counters live in the run's `RunState`, which checkpoints keep.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from launcher.config import DataError, RunStopped
from launcher.data.tar_reader import printable
from launcher.train.state import RunState

# nonfinite=stop checks the gradient norms it kept at least this often (one host sync), so a run that
# logs, checkpoints and evaluates rarely does not pile them up.
UNCHECKED_STEPS = 1000
SHOWN_ERRORS = 10  # unreadable samples printed per rank; all are in data_errors/rankN.jsonl


class NonFiniteGuard:
    """`allows` runs at each optimizer step, before the update; `check` wherever the host waits
    anyway (before every checkpoint, log line and evaluation). The gradient norm is the same on every
    rank after the all-reduce, so every rank decides alike. Under fp16 the grad scaler owns overflow.

    nonfinite=stop needs no gradient norm of its own: it keeps each step's loss, and the norm on the
    steps that compute one anyway (clipping, logged steps). A non-finite gradient behind a finite
    loss spoils the weights, which the next loss shows, and which `check` looks at itself (one
    pass over them, `weights_norm`) when a step since the last check had no norm: nothing it
    spoilt is saved, logged or evaluated."""

    def __init__(
        self,
        mode: str,
        fp16: bool,
        state: RunState,
        last_checkpoint: Callable[[], str | None],
        is_main: bool,
        weights_norm: Callable[[], torch.Tensor] | None = None,
    ):
        self.mode, self.fp16, self.state = mode, fp16, state
        self.last_checkpoint, self.is_main = last_checkpoint, is_main
        self.weights_norm = weights_norm  # the parameters' global norm (a collective under FSDP)
        # nonfinite=stop: (step, loss, gradient norm or None) of the steps not checked yet, on the device
        self.unchecked: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    @property
    def needs_norm(self) -> bool:
        """Whether every optimizer step must compute the gradient norm for this guard."""
        return self.mode == "skip" and not self.fp16

    def allows(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """False if optimizer step `step`'s update must be skipped. nonfinite=stop only keeps the loss
        and norm (the host does not wait for the backward here); nonfinite=skip must know before the
        update: one device sync per optimizer step."""
        if self.fp16:
            return True
        if self.mode == "stop":
            self.unchecked.append((step, loss.detach(), grad_norm))
            if len(self.unchecked) >= UNCHECKED_STEPS:
                self.check(step)
            return True
        if grad_norm is None or bool(torch.isfinite(grad_norm)):
            return True
        self.state.skipped_steps += 1
        if self.is_main:
            skipped = self.state.skipped_steps
            tqdm.write(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
        return False

    def check(self, current_step: int) -> None:
        """nonfinite=stop: raise if a step since the last check had a NaN/Inf loss or gradient norm,
        or left NaN/Inf weights."""
        if not self.unchecked:
            return
        unchecked, self.unchecked = self.unchecked, []
        values = [
            value
            for _, loss, norm in unchecked
            for value in (loss.float(), norm if norm is not None else loss.float())
        ]
        normless = self.weights_norm is not None and any(norm is None for _, _, norm in unchecked)
        if normless:
            values.append(self.weights_norm().float())
        bad = (~torch.isfinite(torch.stack([v.to(values[0].device) for v in values]))).nonzero()  # one sync
        if not len(bad):
            return
        first = int(bad[0])
        saved = (
            f"stopped at step {current_step} with nothing saved since; "
            f"last checkpoint: {self.last_checkpoint() or 'none'}"
        )
        if first == 2 * len(unchecked):  # only the weights
            raise RunStopped(
                f"the weights are NaN/Inf after step {current_step}: a gradient was non-finite at step "
                f"{unchecked[0][0]} or after, with finite losses; {saved}. "
                "Lower --lr, set --max_grad_norm, or pass --nonfinite=skip to skip such steps"
            )
        step, loss, norm = unchecked[first // 2]
        shown = f", gradient norm {float(norm):.4g}" if norm is not None else ""
        raise RunStopped(
            f"step {step}: loss {float(loss):.4g}{shown} (non-finite); {saved}. Lower "
            "--lr, set --max_grad_norm, or pass --nonfinite=skip to skip such steps"
        )


class DataHealth:
    """The unreadable accounting, all of it: every unreadable sample or shard of this rank, one JSON
    line in OUTPUT_DIR/data_errors/rankN.jsonl, the first few printed; each pass's count (summed over
    the ranks by the caller, in a collective it makes anyway) added to the run's total; and the run
    stopped, on every rank at once, above --max_corrupt_fraction."""

    def __init__(
        self,
        output_dir: str,
        rank: int,
        max_corrupt_fraction: float,
        gather: Callable[[list], list],
        state: RunState,
    ):
        self.path = os.path.join(output_dir, "data_errors", f"rank{rank}.jsonl")
        self.directory = os.path.dirname(self.path)
        self.rank, self.max_corrupt_fraction, self.gather, self.state = (
            rank,
            max_corrupt_fraction,
            gather,
            state,
        )
        self.shown = 0

    def note(self, errors: list[dict], split: str) -> None:
        if not errors:
            return
        os.makedirs(self.directory, exist_ok=True)
        where = {"split": split, "epoch": self.state.epoch, "step": self.state.step}
        with open(self.path, "a") as f:
            for error in errors:
                f.write(json.dumps({**where, **error}) + "\n")
        for error in errors:
            self.shown += 1
            if self.shown <= SHOWN_ERRORS:
                what = (
                    f"sample {error['key']}"
                    if error["key"]
                    else f"{error['samples']} samples (rest of shard)"
                )
                kind = error.get("kind", "unreadable")
                tqdm.write(
                    printable(
                        f"rank {self.rank}: skipped {kind} {what} in {error['shard']}: {error['reason']}"
                    )
                )  # a key that is not UTF-8 is escaped, not a crash
            elif self.shown == SHOWN_ERRORS + 1:
                tqdm.write(f"rank {self.rank}: more unreadable samples; all are listed in {self.path}")

    def end_of_pass(self, total: int, samples: int, split: str, counts: dict[str, int]) -> None:
        """A whole pass over `split` (a training epoch, an evaluation) ended: its `total` unreadable
        samples join the run's (summary.json's unreadable_skipped), and are checked."""
        self.state.unreadable_total += total
        self.check(total, samples, split, counts)

    def check(self, total: int, samples: int, split: str, counts: dict[str, int]) -> None:
        """`total` unreadable of `samples` (already summed over the ranks; every rank calls this alike);
        `counts` is this rank's per-shard tally, gathered to name the worst shards."""
        if total <= self.max_corrupt_fraction * samples:
            return
        merged: Counter[str] = Counter()
        for per_rank in self.gather([counts]):
            merged.update(per_rank)
        name = "training" if split == "train" else "validation"
        raise DataError(
            f"{total} of {samples} {name} samples in epoch {self.state.epoch} are unreadable, more than "
            f"--max_corrupt_fraction={self.max_corrupt_fraction}; worst shards: "
            + ", ".join(f"{shard} ({n})" for shard, n in merged.most_common(3))
            + f"; details in {self.directory}/. Rewrite or drop those shards"
        )


class BestMetric:
    """The best evaluation so far (in the run's state) and early stopping. The metrics compared are
    already all-reduced, so every rank decides alike. The best (best.json, --final_weights=best)
    follows any gain; early stopping counts an evaluation as an improvement only if it beats the
    value it last counted by more than `min_delta` (in the metric's units)."""

    def __init__(self, metric: str, mode: str, patience: int, state: RunState, min_delta: float = 0.0):
        self.metric, self.mode, self.patience, self.state = metric, mode, patience, state
        self.min_delta = min_delta

    def _beats(self, value: float, reference: float | None, margin: float) -> bool:
        if not math.isfinite(value):
            return False  # NaN is never the best
        if reference is None or not math.isfinite(reference):
            return True
        return value > reference + margin if self.mode == "max" else value < reference - margin

    def update(self, result: dict, epoch_end: bool) -> bool:
        """True if `result` is the best so far. Only epoch-end evaluations count towards early
        stopping, so a run stopped mid-epoch by max_steps resumes as if it had not stopped."""
        value, best = result.get(self.metric), self.state.best  # the metric is checked by the pre-flight
        better = self._beats(value, best["value"] if best else None, 0.0)
        if better:
            self.state.best = {"metric": self.metric, "value": value, "step": self.state.step}
        if epoch_end:
            reference = self.state.early_stop_value
            if reference is None and best:  # a checkpoint from before early_stop_value
                reference = best["value"]
            if self._beats(value, reference, self.min_delta):
                self.state.early_stop_value, self.state.evals_without_improvement = value, 0
            else:
                self.state.evals_without_improvement += 1
        return better

    def stop_early(self) -> bool:
        if not self.patience or self.state.evals_without_improvement < self.patience:
            return False
        self.state.stopped_early = True
        return True


class CheckpointCadence:
    """When a checkpoint is due: every `every` optimizer steps (mid-epoch too; 0: never), and at
    epoch ends (after the evaluation) if `epoch_end` or the best metric improved."""

    def __init__(self, every: int, epoch_end: bool):
        self.every, self.epoch_end = every, epoch_end

    def after_step(self, step: int, at_epoch_end: bool) -> bool:
        """An epoch's last step leaves it to `after_epoch` when that saves anyway."""
        return bool(self.every) and step % self.every == 0 and not (at_epoch_end and self.epoch_end)

    def after_epoch(self, improved: bool) -> bool:
        return self.epoch_end or improved
