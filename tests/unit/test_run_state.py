"""The run's state: one object saved in checkpoints, restored on resume, reported at the end."""

from __future__ import annotations

import json

from launcher.global_batch import GlobalBatch
from launcher.train.state import RunState


def test_every_field_survives_a_checkpoint_and_an_older_checkpoint_loads_with_defaults():
    state = RunState(
        step=12,
        epoch=3,
        best={"metric": "val/loss", "value": 0.5, "step": 10},
        skipped_steps=2,
        evals_without_improvement=1,
        unreadable_total=4,
        elapsed_s=100.0,
        wandb_run_id="abc",
    )
    saved = json.loads(json.dumps(state.state_dict()))  # as a checkpoint's JSON holds it
    assert saved["elapsed_s"] >= 100.0 and "started" not in saved
    restored = RunState()
    restored.load_state_dict(saved)
    assert restored.state_dict() | {"elapsed_s": 0} == saved | {"elapsed_s": 0}
    assert restored.elapsed() >= saved["elapsed_s"]  # time before this process counts
    older = RunState(unreadable_total=7)
    older.load_state_dict({"step": 5, "epoch": 1})  # a checkpoint written before the later counters
    assert (older.step, older.epoch, older.unreadable_total, older.best, older.wandb_run_id) == (
        5,
        1,
        0,
        {},
        None,
    )


def test_the_summary_reports_steps_samples_counters_and_the_best():
    state = RunState(step=6, skipped_steps=1, unreadable_total=3)
    assert state.summary(GlobalBatch(batch_size=8, world_size=2, grad_accum_steps=2)) | {
        "total_time_s": 0
    } == {"steps": 6, "samples_seen": 192, "total_time_s": 0, "unreadable_skipped": 3, "skipped_steps": 1}
    state.best, state.stopped_early = {"metric": "val/top1", "value": 0.9, "step": 4}, True
    summary = state.summary(GlobalBatch(batch_size=32, world_size=1))
    assert (
        summary["best/metric"],
        summary["best/value"],
        summary["best/step"],
        summary["stopped_early"],
    ) == ("val/top1", 0.9, 4, True)
