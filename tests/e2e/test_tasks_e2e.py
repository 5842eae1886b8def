"""Any task end to end: the regression, GRU and language-model recipes trained in 1 and 2
processes, a model that returns its own loss, exact resume of the LM on shards after SIGKILL,
token-weighted losses equal across batch sizes, accumulation and processes, the pre-flight
errors, and evaluate, predict, plan and the report for these tasks."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launcher, metrics, start_launcher, wait_for_step
from launcher.runtime.weights import open_weights
from readers import history, tensorboard_texts, wandb_records

TOKEN_COUNTS = str(ROOT / "tests" / "recipes" / "token_counts.py")
HF_STYLE = str(ROOT / "tests" / "recipes" / "hf_style_digits.py")
CRASHING = str(ROOT / "tests" / "recipes" / "crashing.py")


def weights(run_dir) -> dict:
    """A run's final weights: model.safetensors, or its shards through their index."""
    with open_weights(str(run_dir)) as files:
        return {name: files.read(name) for name in files.names}


def evaluations(run_dir) -> list[dict]:
    return [m for m in metrics(run_dir) if "val/loss" in m]


def train_losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]


def identical_replicas(run_dir) -> bool:
    return json.loads((run_dir / "replicas.json").read_text())["identical"]


# ---- the recipes, each trained once in 1 and once in 2 processes -----------------------------

# every validation sample (--eval_batches: test_fsdp_e2e.py, test_cadence_e2e.py)
LM_CADENCE = ["--eval_every=10"]
RECIPES = {  # recipe -> (extra args, the metric that must beat an untrained model's, that model's value)
    "regression_tiny": ([], "val/r2", 0.0),  # predicting the mean: R2 0
    "gru_classifier_tiny": ([], "val/top1", 1 / 6),  # 6 balanced classes
    "char_lm_tiny": (
        [
            "--max_steps=30",
            "--checkpoint_every=5",
            *LM_CADENCE,
            "--trackers=[wandb,tensorboard]",
            "--wandb_mode=offline",
        ],
        "val/loss",
        math.log(256),
    ),  # uniform bytes
    HF_STYLE: ([], "val/top1", 1 / 10),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_shards) -> dict:
    """(recipe, processes) -> run dir, each trained once."""
    done = {}
    for recipe, (extra, _, _) in RECIPES.items():
        for processes in (1, 2):
            out = tmp_path_factory.mktemp("task") / f"{os.path.basename(recipe)}-p{processes}"
            path = recipe if recipe.endswith(".py") else f"recipes/{recipe}"
            data = [f"--data_dir={text_shards}"] if recipe == "char_lm_tiny" else []
            result = launcher(path, *data, *extra, f"--output_dir={out}", processes=processes, timeout=400)
            (out / "stdout.txt").write_text(result.stdout)
            done[recipe, processes] = out
    return done


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_task_trains_its_loss_falls_and_its_metric_improves(runs, recipe, processes):
    out = runs[recipe, processes]
    _, metric, untrained = RECIPES[recipe]
    losses = train_losses(out)
    assert losses[-1] < 0.9 * losses[0]
    higher = json.loads((out / "task.json").read_text())["best_mode"] == "max" or metric.endswith("r2")
    values = [m[metric] for m in evaluations(out)]
    assert values[-1] > untrained + 0.05 if higher else values[-1] < 0.8 * untrained, values
    assert evaluations(out)[-1]["val/loss"] <= evaluations(out)[0]["val/loss"]
    assert identical_replicas(out)


def test_each_task_logs_its_own_metrics_and_picks_its_own_best(runs):
    tasks = {
        "regression_tiny": ("regression", {"val/mse", "val/mae", "val/r2"}, "val/loss", "min"),
        "gru_classifier_tiny": ("classification", {"val/top1", "val/top5"}, "val/top1", "max"),
        "char_lm_tiny": ("language_model", {"val/perplexity", "val/token_accuracy"}, "val/loss", "min"),
        HF_STYLE: ("classification", {"val/top1", "val/top5"}, "val/top1", "max"),
    }
    for recipe, (task, names, best, mode) in tasks.items():
        out = runs[recipe, 1]
        described = json.loads((out / "task.json").read_text())
        assert (described["task"], described["best_metric"], described["best_mode"]) == (task, best, mode), (
            recipe
        )
        last = evaluations(out)[-1]
        assert names <= set(last), recipe
        assert ("val/top1" in last) == (task == "classification"), recipe
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best/metric"] == best
    lm = evaluations(runs["char_lm_tiny", 1])[-1]
    assert lm["val/perplexity"] == pytest.approx(2.718281828 ** lm["val/loss"], rel=1e-9)
    assert 0 < lm["val/token_accuracy"] < 1
    regression = evaluations(runs["regression_tiny", 1])[-1]
    assert regression["val/r2"] < 1 and regression["val/mse"] > 0 and regression["val/mae"] > 0
    stdout = (runs["char_lm_tiny", 1] / "stdout.txt").read_text()
    assert (
        "step                  the recipe's compute_loss(model, batch), a sum normalised by the count"
        in stdout
    )
    assert "input {input_ids: (N, " in stdout and "-> output (N, " in stdout
    assert (
        "step                  model(**batch) returns its own loss"
        in (runs[HF_STYLE, 1] / "stdout.txt").read_text()
    )
    gru = (runs["gru_classifier_tiny", 1] / "stdout.txt").read_text()
    assert "input ((N, " in gru and "(N,)) -> output (N, 6)" in gru


def test_validation_counts_every_sample_once_in_two_processes(runs):
    for recipe in RECIPES:
        one, two = (evaluations(runs[recipe, p])[-1]["val/samples"] for p in (1, 2))
        assert one == two > 0, recipe


@pytest.mark.parametrize("processes", [1, 2])
def test_the_char_lm_evaluates_every_10_steps_and_logs_its_generated_text_to_every_tracker(runs, processes):
    out = runs["char_lm_tiny", processes]
    assert [m["step"] for m in evaluations(out)] == [10, 20, 30]
    prompts = ["def ", "import ", "class ", "    return "]
    # metrics.jsonl: the table at each evaluation, 16 bytes after each prompt.
    tables = {m["step"]: m["val/generated"] for m in metrics(out) if "val/generated" in m}
    assert list(tables) == [10, 20, 30]
    assert all(
        t["columns"] == ["prompt", "continuation"] and [r[0] for r in t["rows"]] == prompts
        for t in tables.values()
    )
    # "\ufffd" for a stray byte
    assert all(0 < len(row[1].encode()) <= 3 * 16 for t in tables.values() for row in t["rows"])
    # wandb (offline, read back): a Table per evaluation with the same rows.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    # a table file, by reference
    logged = [h for h in history(wandb_records(run_dir)) if "val/generated.path" in h]
    assert [(h["_step"], h["val/generated._type"]) for h in logged] == [
        (10, "table-file"),
        (20, "table-file"),
        (30, "table-file"),
    ]
    for step, path in ((h["_step"], h["val/generated.path"]) for h in logged):
        table = json.loads((run_dir / "files" / path).read_text())
        assert table["columns"] == tables[step]["columns"] and table["data"] == tables[step]["rows"]
    # TensorBoard: the same table as Markdown text.
    texts = tensorboard_texts(out / "tensorboard" / "launcher")
    assert [step for step, _ in texts["val/generated/text_summary"]] == [10, 20, 30]
    cell = lambda value: value.replace("|", "\\|").replace("\n", " ")  # noqa: E731 - as media.Table.markdown writes it
    for step, text in texts["val/generated/text_summary"]:
        assert all(
            f"| {cell(prompt)} | {cell(generated)} |" in text for prompt, generated in tables[step]["rows"]
        )


def test_a_killed_language_model_resumes_to_bitwise_the_same_weights(runs, text_shards, tmp_path):
    out = tmp_path / "killed"
    args = [
        "recipes/char_lm_tiny",
        f"--data_dir={text_shards}",
        "--max_steps=30",
        "--checkpoint_every=5",
        # killed after step 13: resumed from 10, on the way to the evaluation at 20
        *LM_CADENCE,
        f"--output_dir={out}",
    ]
    run = start_launcher(*args, log=tmp_path / "killed.log")
    wait_for_step(out, 13, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    resumed = launcher(*args, "--resume=auto")
    assert "resumed from" in resumed.stdout
    reference, mine = weights(runs["char_lm_tiny", 1]), weights(out)
    assert reference.keys() == mine.keys() and all(torch.equal(reference[k], mine[k]) for k in reference)


@pytest.mark.lowest  # torch 2.7's pytree
def test_synthetic_data_imitates_a_dict_batch_of_tokens(text_shards, tmp_path):
    out = tmp_path / "synthetic"
    result = launcher(
        "recipes/char_lm_tiny",
        f"--data_dir={text_shards}",
        "--synthetic_data=True",
        "--max_steps=10",
        "--log_every=2",
        f"--output_dir={out}",
    )
    assert re.search(
        r"training data +synthetic: \d+ random samples like \{input_ids: \(N, \d+\), labels: \(N, \d+\)\}",
        result.stdout,
    )
    losses = train_losses(out)
    assert len(losses) == 5 and losses[-1] < losses[0]  # one fixed batch, learnt step after step


def test_evaluate_and_predict_report_each_task(runs, text_shards):
    lm = launcher(
        "evaluate",
        "recipes/char_lm_tiny",
        f"--checkpoint={runs['char_lm_tiny', 1]}",
        f"--data_dir={text_shards}",
    ).stdout
    last = evaluations(runs["char_lm_tiny", 1])[-1]
    assert "(language_model)" in lm and re.search(
        rf"^  perplexity +{last['val/perplexity']:.4f}$", lm, re.MULTILINE
    )
    assert re.search(r"^  token accuracy +\d+\.\d\d %$", lm, re.MULTILINE)
    regression = launcher(
        "predict",
        "recipes/regression_tiny",
        f"--checkpoint={runs['regression_tiny', 1]}",
        "59,2,32.1,101,157,93.2,38,4,4.8598,87",
        "48,1,21.6,87,183,103.2,70,3,3.8918,69",
    )
    values = re.findall(r"^59,2,.*: (-?[\d.e+-]+)$", regression.stdout, re.MULTILINE)
    assert len(values) == 1 and "predicted 2 inputs" in regression.stderr
    gru = launcher(
        "predict",
        "recipes/gru_classifier_tiny",
        f"--checkpoint={runs['gru_classifier_tiny', 1]}",
        "--top_k=2",
        "parser.add_argument('--verbose', action='store_true')",
    )
    assert re.search(r"parser\.add_argument.*: \w[\w.]* \d+\.\d %, \w[\w.]* \d+\.\d %$", gru.stdout.strip())
    refused = launcher(
        "predict",
        "recipes/char_lm_tiny",
        f"--checkpoint={runs['char_lm_tiny', 1]}",
        f"--data_dir={text_shards}",
        "some text",
        check=False,
    )
    assert refused.returncode == 2 and "define predict_sample(cfg, text)" in refused.stderr


def test_the_report_of_a_language_model_run_opens_in_a_browser(runs, tmp_path):
    from browser import chromium

    page = tmp_path / "lm.html"
    launcher("report", runs["char_lm_tiny", 1], runs["regression_tiny", 1], f"--out={page}")
    text = page.read_text()
    assert "cross-entropy loss" not in text.split("Training loss")[0]  # no classifier's axis for these runs
    driver = chromium()
    try:
        driver.get(page.as_uri())
        captions = [f.text for f in driver.find_elements("tag name", "figcaption")]
        for title in (
            "Training loss",
            "Validation loss",
            "Validation perplexity",
            "Validation token accuracy",
            "Validation mean squared error",
            "Validation R²",
        ):
            assert any(c.startswith(title) for c in captions), (title, captions)
        assert not any(c.startswith("Confusion matrix") for c in captions)
        widths = driver.execute_script("return [...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(widths) == len(captions) and all(w > 100 for w in widths)
    finally:
        driver.quit()


# ---- the loss normalised by tokens over micro-batches and ranks ------------------------------


@pytest.mark.lowest  # torch 2.7's foreach ops and Accelerate 1.1's backward
def test_a_token_weighted_loss_is_the_same_for_any_batch_split_across_accumulation_and_processes(tmp_path):
    def run(name, *args, processes=1):  # plain SGD: the update is the gradient, rounding is not amplified
        out = tmp_path / name
        launcher(
            TOKEN_COUNTS,
            f"--output_dir={out}",
            "--optimizer=sgd",
            "--momentum=0",
            "--lr=1.0",
            *args,
            processes=processes,
        )
        return weights(out)

    whole = run("b16")
    accumulated = run("b8x2", "--batch_size=8", "--grad_accum_steps=2")
    processes = run("p2b4x2", "--batch_size=4", "--grad_accum_steps=2", processes=2)
    # one micro-batch per step: the count, summed over the ranks, divides the loss before the backward
    unaccumulated = run("p2b8", "--batch_size=8", processes=2)
    # FSDP: no reduce-scatter on the first micro-batch, the count summed over both and both ranks
    sharded = run(
        "p2b4x2-fsdp", "--batch_size=4", "--grad_accum_steps=2", "--data_parallel=fsdp", processes=2
    )
    wrong = run("b8x2-mean", "--batch_size=8", "--grad_accum_steps=2", "--per_batch_mean=True")

    def gap(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    gaps = (
        gap(whole, accumulated),
        gap(whole, processes),
        gap(whole, unaccumulated),
        gap(whole, sharded),
        gap(whole, wrong),
    )
    assert max(gaps[:4]) < 1e-6 and gaps[4] > 100 * max(*gaps[:4], 1e-8), gaps


# ---- what the pre-flight check refuses ---------------------------------------------------------


@pytest.mark.lowest  # torch 2.7's fork_rng and tracebacks
@pytest.mark.parametrize(
    "args, message, frame",
    [
        (
            [CRASHING, "--fail=forward"],
            "pre-flight: build_model's model (its forward) raised RuntimeError: shape",
            'crashing.py", line',
        ),
        (
            [CRASHING, "--fail=collate"],
            "pre-flight: default_collate (samples of different sizes need "
            "DataSpec(collate=...), e.g. padding) raised RuntimeError: "
            "stack expects each tensor to be equal size",
            None,
        ),
        ([CRASHING, "--fail=loss"], "pre-flight: the loss (build_loss) raised IndexError", 'outputs["loss"]'),
        (
            ["recipes/regression_tiny", "--loss=cross_entropy"],
            "--loss=cross_entropy takes class indices, but the "
            "targets are torch.float32 (N,) (a regression?); set --loss=mse or --loss=l1",
            None,
        ),
        (
            ["recipes/regression_tiny", "--mixup_alpha=0.2"],
            "--mixup_alpha/--cutmix_alpha mix class labels, but this "
            "run's step (pair) gives a regression task",
            None,
        ),
        (
            ["recipes/regression_tiny", "--best_metric=val/top1"],
            "--best_metric=val/top1 is not a metric of this "
            "regression task; choose one of val/loss, val/mse, val/mae, val/r2",
            None,
        ),
    ],
)
def test_a_recipe_that_would_fail_is_refused_before_training_in_one_line(args, message, frame, tmp_path):
    result = launcher(*args, f"--output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("launcher: error: ") and message in lines[-1], lines[-1]
    assert not (tmp_path / "run").exists()  # found before anything was written
    # only the recipe's frames
    assert "/launcher/" not in result.stderr and "site-packages" not in result.stderr
    if frame:
        assert frame in result.stderr
    else:
        assert len(lines) == 1


# ---- the best weights by name, and predict's inputs ---------------------------------------------

FEATURES = "-0.04,0.05,0.06,0.02,-0.04,-0.03,-0.04,0.0,0.02,-0.01"  # standardised already: starts with -
RAW = "59,2,32.1,101,157,93.2,38,4,4.8598,87"


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """regression_tiny whose best is its first epoch (the highest val/loss counts as best), its
    final weights the best checkpoint's, exported in several shards with an index."""
    out = tmp_path_factory.mktemp("best") / "run"
    launcher(
        "recipes/regression_tiny",
        "--epochs=3",
        "--best_metric=val/loss",
        "--best_mode=max",
        "--final_weights=best",
        "--max_shard_size=2KB",
        f"--output_dir={out}",
    )
    return out


def test_final_weights_best_are_the_best_checkpoints_and_evaluate_names_their_step(best_run):
    best = json.loads((best_run / "checkpoints" / "best.json").read_text())
    summary = json.loads((best_run / "summary.json").read_text())
    assert (
        best["step"] == summary["final_weights_step"] < summary["steps"]
        and summary["final_weights"] == "best"
    )
    final = weights(best_run)
    assert (
        len(list(best_run.glob("model-0000*-of-0000*.safetensors"))) > 1
        and not (best_run / "model.safetensors").exists()
    )
    checkpoint = {
        k.removeprefix("module."): v
        for k, v in load_file(
            str(best_run / "checkpoints" / f"step-{best['step']:08d}" / "model.safetensors")
        ).items()
    }
    last = load_file(str(best_run / "checkpoints" / f"step-{summary['steps']:08d}" / "model.safetensors"))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    by_name = launcher(
        "evaluate", "recipes/regression_tiny", "--checkpoint=best", f"--output_dir={best_run}"
    ).stdout
    checkpoint_dir = best_run / "checkpoints" / f"step-{best['step']:08d}"
    assert f"evaluated checkpoint {checkpoint_dir} (step {best['step']}) on 88 validation samples" in by_name
    assert re.search(rf"^  loss +{best['value']:.4f}$", by_name, re.MULTILINE)
    final_run = launcher(
        "evaluate", "recipes/regression_tiny", f"--checkpoint={best_run}", "--out=" + str(best_run / "e")
    ).stdout
    assert f"evaluated final weights of {best_run} (step {best['step']}, the best)" in final_run
    assert re.search(rf"^  loss +{best['value']:.4f}$", final_run, re.MULTILINE)


def test_predict_reads_inputs_after_double_dash_from_files_and_stdin(best_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, child_env

    printed = launcher(
        "predict", "recipes/regression_tiny", f"--checkpoint={best_run}/best", RAW, "--", FEATURES
    ).stdout
    values = dict(line.rsplit(": ", 1) for line in printed.splitlines())
    assert list(values) == [RAW, FEATURES]
    final = launcher(
        "predict", "recipes/regression_tiny", f"--checkpoint={best_run}", RAW, "--", FEATURES
    ).stdout
    assert final == printed  # the final weights, read from their shards, are the best checkpoint's
    listed = tmp_path / "inputs.txt"
    listed.write_text(f"{FEATURES}\n\n{RAW}\n")
    out = tmp_path / "predictions.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "predict",
            "recipes/regression_tiny",
            f"--checkpoint={best_run}/checkpoints/best.json",
            f"--inputs={listed}",
            f"--out={out}",
            str(listed),
            "-",
            "--",
            FEATURES,
        ],
        input=f"{RAW}\n",
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout == "", result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # INPUTs in order, then --inputs
    assert [r["input"] for r in rows] == [FEATURES, RAW, RAW, FEATURES, FEATURES, RAW]
    # the printed values have 6 significant digits; within a batch of another size the same input's
    # float32 prediction can differ in its last bit, so it is compared, not its 6-digit rounding
    assert all(r["prediction"] == pytest.approx(float(values[r["input"]]), rel=1e-5) for r in rows), rows
    assert "predicted 6 inputs; written to" in result.stderr
