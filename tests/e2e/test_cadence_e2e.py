"""Evaluation on a cadence (--eval_every, --eval_batches) and a recipe's callbacks, trained in
this process through the real command line (one process; the two-process runs of the char LM
with a cadence and its generated text are in test_tasks_e2e.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, metrics
from launcher.cli import main

RECIPE = str(ROOT / "tests" / "recipes" / "callback_digits.py")
CADENCE = [
    "--epochs=2",
    "--batch_size=64",
    "--eval_every=10",
    "--eval_batches=2",
    "--checkpoint_epoch_end=false",
    "--checkpoint_every=0",
    "--keep_checkpoints=0",
]


def train(*args: str) -> None:
    assert main([RECIPE, *args]) == 0


def evaluations(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run_dir) if "val/loss" in m}


@pytest.fixture(scope="module")
def cadence(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("cadence") / "run"
    train(f"--data_dir={digits}", f"--output_dir={out}", *CADENCE)
    return out


def test_eval_every_evaluates_every_n_steps_on_the_same_k_batches_and_where_the_run_ends(cadence):
    total = 2 * json.loads((cadence / "task.json").read_text())["steps_per_epoch"]
    evaluated = evaluations(cadence)
    assert list(evaluated) == [*range(10, total + 1, 10), *([total] if total % 10 else [])]
    assert {m["val/samples"] for m in evaluated.values()} == {2 * 64}  # 2 batches of 64, one process
    # The best checkpoint follows the cadence: written at an evaluation that improved, and named.
    best = json.loads((cadence / "checkpoints" / "best.json").read_text())
    sign = 1 if json.loads((cadence / "task.json").read_text())["best_mode"] == "max" else -1
    values = {step: sign * m[best["metric"]] for step, m in evaluated.items()}
    improved = [s for s in values if all(values[s] > values[t] for t in values if t < s)]
    assert best["step"] == improved[-1] and sign * best["value"] == values[best["step"]]
    saved = sorted(int(p.name.split("-")[1]) for p in (cadence / "checkpoints").glob("step-*"))
    assert saved == sorted({*improved, total})


def test_callbacks_see_each_event_with_a_read_only_view_and_log_to_metrics(cadence):
    events = json.loads((cadence / "events.json").read_text())
    total = 2 * json.loads((cadence / "task.json").read_text())["steps_per_epoch"]
    assert events[:2] == [["on_train_start", 0, 0], ["read-only", 0, 0]]
    assert [e[1] for e in events if e[0] == "on_step_end"] == list(range(1, total + 1))
    assert [e[1] for e in events if e[0] == "on_evaluate"] == list(evaluations(cadence))
    assert {e[3] for e in events if e[0] == "on_evaluate"} == {128}
    saved = sorted(int(p.name.split("-")[1]) for p in (cadence / "checkpoints").glob("step-*"))
    assert [e[1] for e in events if e[0] == "on_save"] == saved
    assert events[-1] == ["on_train_end", total, 2]
    # the callback's copy changed, not the run's
    assert json.loads((cadence / "config.json").read_text())["lr"] == 3e-3
    logged = [m for m in metrics(cadence) if "callback/note" in m]
    assert [(m["step"], m["callback/steps_seen"], m["callback/note"]) for m in logged] == [
        (s, s, f"evaluated at {s}") for s in evaluations(cadence)
    ]


def test_a_resume_between_two_evaluations_is_bitwise_the_uninterrupted_run(cadence, digits, tmp_path):
    out = tmp_path / "resumed"
    args = [f"--data_dir={digits}", f"--output_dir={out}", *CADENCE]
    train(*args, "--max_steps=15")  # stops between the evaluations at 10 and 20, checkpoint at 15
    assert 15 in evaluations(out)  # where it stopped: evaluated, not counted
    train(*args, "--resume=auto")
    reference, mine = load_file(str(cadence / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert reference.keys() == mine.keys() and all(torch.equal(reference[k], mine[k]) for k in reference)
    assert {s: m for s, m in evaluations(out).items() if s != 15} == evaluations(cadence)


def test_a_failing_callback_stops_the_run_in_one_line_naming_it(digits, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(
            [RECIPE, f"--data_dir={digits}", f"--output_dir={tmp_path / 'failing'}", "--fail_at=3", "--quiet"]
        )
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert errors == [
        "launcher: callback failed: Exploding.on_step_end raised ValueError: no luck at step 3 (at "
        "step 3); fix the recipe's callback or remove it from callbacks(cfg)"
    ]


def test_eval_batches_are_the_same_samples_at_every_evaluation_whatever_the_epoch(digits, tmp_path):
    from launcher.recipe import load_recipe
    from launcher.train.trainer import Trainer

    recipe = load_recipe(RECIPE)
    cfg = recipe.config_cls(
        data_dir=str(digits), output_dir=str(tmp_path / "run"), batch_size=64, eval_batches=2
    ).resolved()
    trainer = Trainer(cfg, recipe)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        first = trainer.evaluator.evaluate(model, None, counted=True).metrics
        trainer.state.epoch = 1
        second = trainer.evaluator.evaluate(model, None, counted=True).metrics
    finally:
        trainer.lock.release()
    assert first == second and first["val/samples"] == 2 * 64


def test_early_stopping_counts_the_evaluations_of_the_cadence(digits, tmp_path, capsys):
    out = tmp_path / "early"
    train(
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--batch_size=64",
        "--lr=0",
        "--eval_every=5",
        "--eval_batches=2",
        "--early_stop_patience=2",
        "--best_metric=val/loss",
        "--best_mode=min",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps"] == 15  # best at 5, 2 more
    assert list(evaluations(out)) == [5, 10, 15]
    assert (
        capsys.readouterr().out.count("early stop at step 15: val/loss has not improved for 2 evaluations")
        == 1
    )
