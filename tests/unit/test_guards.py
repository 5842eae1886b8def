"""The run's policies on their own: the NaN/Inf guard, data health, best metric and early stopping,
checkpoint cadence (the e2e tier checks them inside real runs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.config import DataError, RunStopped
from launcher.train.guards import BestMetric, CheckpointCadence, DataHealth, NonFiniteGuard
from launcher.train.state import RunState


def norm(value: float) -> torch.Tensor:
    return torch.tensor(value)


def test_stop_keeps_the_norms_until_a_check_then_names_the_first_bad_step():
    guard = NonFiniteGuard(
        "stop", fp16=False, state=RunState(), last_checkpoint=lambda: "ckpt/step-2", is_main=False
    )
    assert all(guard.allows(step, norm(1.0), norm(v)) for step, v in [(3, 1.0), (4, math.nan), (5, math.inf)])
    with pytest.raises(
        RunStopped, match=r"step 4: loss 1, gradient norm nan .*stopped at step 5 .*ckpt/step-2"
    ):
        guard.check(5)
    guard.check(6)  # nothing left unchecked


def test_stop_without_norms_checks_the_losses_then_the_weights_once_per_check():
    weights = [norm(2.0)]
    calls = []

    def weights_norm():
        calls.append(1)
        return weights[0]

    guard = NonFiniteGuard(
        "stop",
        fp16=False,
        state=RunState(),
        last_checkpoint=lambda: None,
        is_main=False,
        weights_norm=weights_norm,
    )
    assert not guard.needs_norm and guard.allows(1, norm(1.0), None) and guard.allows(2, norm(1.5), None)
    guard.check(2)
    assert len(calls) == 1
    guard.allows(3, norm(math.inf), None)
    with pytest.raises(
        RunStopped, match=r"^step 3: loss inf \(non-finite\); stopped at step 3 .*last checkpoint: none"
    ):
        guard.check(3)
    weights[0] = norm(math.nan)  # a non-finite gradient behind finite losses spoilt them
    guard.allows(4, norm(1.0), None), guard.allows(5, norm(1.0), None)
    with pytest.raises(
        RunStopped,
        match=r"^the weights are NaN/Inf after step 5: a gradient was non-finite at step 4 or after",
    ):
        guard.check(5)
    guard.allows(6, norm(1.0), norm(1.0))  # a step with its norm needs no look at the weights
    calls.clear()
    guard.check(6)
    assert not calls


def test_skip_counts_skipped_updates_in_the_state_and_fp16_leaves_overflow_to_the_scaler():
    state = RunState()
    guard = NonFiniteGuard("skip", fp16=False, state=state, last_checkpoint=lambda: None, is_main=False)
    assert guard.needs_norm
    assert [guard.allows(s, norm(1.0), norm(v)) for s, v in [(1, 1.0), (2, math.nan), (3, 2.0)]] == [
        True,
        False,
        True,
    ]
    assert state.skipped_steps == 1
    fp16 = NonFiniteGuard("skip", fp16=True, state=state, last_checkpoint=lambda: None, is_main=False)
    assert fp16.allows(4, norm(1.0), norm(math.inf)) and state.skipped_steps == 1


def test_data_health_logs_every_error_and_stops_above_the_fraction_naming_the_worst_shards(tmp_path):
    state = RunState(step=7, epoch=2, unreadable_total=3)
    health = DataHealth(
        str(tmp_path),
        rank=1,
        max_corrupt_fraction=0.1,
        gather=lambda local: local + [{"b.tar": 5}],
        state=state,
    )
    errors = [{"key": f"k{i}", "shard": "a.tar", "samples": 1, "reason": "bad"} for i in range(12)]
    health.note(errors, "train")
    logged = [
        json.loads(line) for line in (tmp_path / "data_errors" / "rank1.jsonl").read_text().splitlines()
    ]
    assert len(logged) == 12 and logged[0] == {"split": "train", "epoch": 2, "step": 7, **errors[0]}
    health.check(10, samples=100, split="train", counts={"a.tar": 12})  # 10 % is allowed
    health.end_of_pass(10, samples=100, split="train", counts={"a.tar": 12})
    assert state.unreadable_total == 13  # each pass's count joins the run's
    with pytest.raises(
        DataError, match=r"17 of 100 training samples in epoch 2 .* worst shards: a.tar \(12\), b.tar \(5\)"
    ):
        health.end_of_pass(17, samples=100, split="train", counts={"a.tar": 12})


@pytest.mark.parametrize("mode, values, best", [("max", [0.5, 0.7, 0.6], 0.7), ("min", [0.5, 0.7, 0.4], 0.4)])
def test_best_metric_follows_its_mode_and_only_epoch_ends_count_for_early_stopping(mode, values, best):
    state = RunState()
    tracker = BestMetric("val/m", mode, patience=2, state=state)
    improved = []
    for step, value in enumerate(values):
        state.step = step
        improved.append(tracker.update({"val/m": value}, epoch_end=True))
    assert state.best == {"metric": "val/m", "value": best, "step": values.index(best)}
    assert improved[0] and improved.count(True) == 2
    assert not tracker.update({"val/m": values[0]}, epoch_end=False)  # mid-epoch: not counted
    assert state.evals_without_improvement == (1 if mode == "max" else 0) and not tracker.stop_early()
    tracker.update({"val/m": values[0]}, epoch_end=True)
    assert tracker.stop_early() == (mode == "max") == state.stopped_early


def test_checkpoint_cadence():
    cadence = CheckpointCadence(every=5, epoch_end=True)
    assert [s for s in range(1, 16) if cadence.after_step(s, at_epoch_end=s == 10)] == [5, 15]
    assert cadence.after_epoch(improved=False)
    only_best = CheckpointCadence(every=0, epoch_end=False)
    assert (
        not only_best.after_step(5, False)
        and not only_best.after_epoch(False)
        and only_best.after_epoch(True)
    )


def test_early_stopping_counts_only_gains_above_min_delta_while_the_best_follows_any_gain():
    state = RunState()
    tracker = BestMetric("val/loss", "min", patience=3, state=state, min_delta=0.01)
    for step, value in enumerate([1.0, 0.995, 0.992, 0.9905], start=1):  # each better, none by more than 0.01
        state.step = step
        assert tracker.update({"val/loss": value}, epoch_end=True)
    assert state.best["step"] == 4 and state.early_stop_value == 1.0 and tracker.stop_early()
    state = RunState()
    maximising = BestMetric("val/top1", "max", patience=2, state=state, min_delta=0.01)
    for step, value in enumerate([0.5, 0.505, 0.52, 0.515], start=1):
        state.step = step
        maximising.update({"val/top1": value}, epoch_end=True)
    assert (
        state.early_stop_value == 0.52
        and state.evals_without_improvement == 1
        and not maximising.stop_early()
    )
    assert state.best == {"metric": "val/top1", "value": 0.52, "step": 3}
