"""The trackers (TensorBoard read back with its EventAccumulator), metrics.jsonl and the HTML report's
figures and config differences, without a training run."""

from __future__ import annotations

import json
import re
import subprocess
import types
from pathlib import Path

import pytest

from conftest import ROOT, metrics
from launcher.cli import report
from launcher.config import ConfigError, TrainConfig
from launcher.recipe import Recipe
from launcher.runtime.distributed import build_accelerator
from launcher.track.report import Run, config_differences, figure_specs, load_run, render
from launcher.track.trackers import (
    MetricsLog,
    Tracker,
    check_trackers,
    launcher_commit,
    save_run_files,
    tracker_names,
)
from readers import tensorboard_scalars


def test_an_unknown_tracker_is_refused_in_one_line_naming_the_flag():
    with pytest.raises(ConfigError) as refused:
        check_trackers(TrainConfig(trackers=("wandb", "mlflow")))
    assert str(refused.value) == "--trackers names mlflow; choose from wandb, tensorboard"
    assert tracker_names(TrainConfig(trackers=("wandb", "tensorboard"), wandb_mode="disabled")) == [
        "tensorboard"
    ]
    assert tracker_names(TrainConfig(trackers=("wandb",), wandb_mode="offline")) == ["wandb"]


def test_tensorboard_alone_keeps_the_run_id_and_a_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    # tuples in the config: TensorBoard's hparams take none, the tracker must turn them into text
    cfg = TrainConfig(output_dir=str(tmp_path), trackers=("tensorboard",), wandb_tags=("a", "b"))
    for resume_step, losses in ((0, {1: 1.0, 2: 2.0, 3: 3.0}), (1, {2: 20.0, 3: 30.0})):
        tracker = Tracker(build_accelerator(cfg), cfg)
        assert tracker.start("stored-id", resume_step=resume_step) == "stored-id"
        for step, loss in losses.items():
            tracker.log({"train/loss": loss}, step=step)
        tracker.log_evaluation(3, confusion=None, class_names=[], examples=None)  # nothing for wandb: no-op
        tracker.finish({"steps": 3})
    assert tracker.run_dir is None and tracker.tensorboard_dir == str(tmp_path / "tensorboard" / "launcher")
    assert tensorboard_scalars(Path(tracker.tensorboard_dir)) == {
        "train/loss": [(1, 1.0), (2, 20.0), (3, 30.0)]
    }


def run(name: str, **config) -> Run:
    return Run(name=name, path=name, config=config, metrics=[])


def test_metrics_log_holds_unflushed_records_until_the_next_flushed_one_and_drops_steps_after_a_resume(
    tmp_path,
):
    log = MetricsLog(str(tmp_path), enabled=True)
    log.write({"step": 1, "lr/all": 0.1}, flush=False)  # every step's learning rates wait in memory
    log.write({"step": 2, "lr/all": 0.2}, flush=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    log.write({"step": 3, "train/loss": 1.5})  # a logged step writes them all, in order
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    log.write({"step": 4, "lr/all": 0.4}, flush=False)
    log.flush()  # before a checkpoint and at the end of a run
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    log.drop_after(2)  # a resume from step 2 logs steps 3 and 4 again
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    MetricsLog(str(tmp_path / "other"), enabled=False).write({"step": 1})  # not the main process: nothing
    assert not (tmp_path / "other").exists()


def test_config_differences_list_only_the_fields_that_differ():
    runs = [run("a", lr=0.1, epochs=2, tags=["x"]), run("b", lr=0.2, epochs=2, tags=["x"], extra=1)]
    assert config_differences(runs) == [("extra", ["-", 1]), ("lr", [0.1, 0.2])]


def write_run(directory: Path, records: list[dict], config: dict, **files) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl, config.json, and NAME.json per keyword."""
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, value in {"config": config, **files}.items():
        (directory / f"{name}.json").write_text(json.dumps(value))
    return directory


def test_the_report_plots_each_runs_own_metrics_under_its_own_loss_with_only_accuracies_in_percent(tmp_path):
    train = [{"step": 1, "epoch": 0, "train/loss": 2.0, "train/samples_per_s": 100.0, "lr/all": 0.1}]
    counts = {"val/samples": 10, "val/unreadable": 0}
    classifier = write_run(
        tmp_path / "cls",
        train + [{"step": 2, "val/loss": 1.5, "val/top1": 0.5, "val/top5": 0.75, **counts}],
        {"loss": "cross_entropy"},
        task={"task": "classification", "loss": "cross-entropy"},
        summary={"best/metric": "val/top1", "best/value": 0.5, "best/step": 2},
        confusion={"step": 2, "classes": ["a", "b"], "matrix": [[3, 1], [0, 4]]},
    )
    language = write_run(
        tmp_path / "lm",
        train + [{"step": 2, "val/loss": 1.2, "val/perplexity": 3.25, "val/token_accuracy": 0.25, **counts}],
        {"loss": "cross_entropy"},
        task={"task": "language_model", "loss": "per-token cross-entropy"},
        summary={"best/metric": "val/perplexity", "best/value": 3.25, "best/step": 2},
    )
    # from before task.json: config.json's loss names the loss
    regression = write_run(
        tmp_path / "reg",
        train + [{"step": 2, "val/loss": 0.3, "val/mse": 0.25, "val/r2": 0.5}],
        {"loss": "mse"},
    )
    runs = [load_run(str(path)) for path in (classifier, language, regression)]

    lm = {f.title: f for f in figure_specs([runs[1]])}
    assert list(lm) == [
        "Training loss",
        "Validation loss",
        "Validation perplexity",
        "Validation token accuracy",
        "Learning rate per parameter group",
        "Throughput",
    ]
    assert lm["Training loss"].ylabel == lm["Validation loss"].ylabel == "per-token cross-entropy loss"
    assert (lm["Validation perplexity"].ylabel, lm["Validation perplexity"].lines) == (
        "perplexity",
        [("lm: val/perplexity", [2], [3.25])],
    )
    assert (lm["Validation token accuracy"].ylabel, lm["Validation token accuracy"].lines) == (
        "token accuracy (%)",
        [("lm: val/token_accuracy", [2], [25.0])],
    )
    regression_figures = figure_specs([runs[2]])
    assert regression_figures[0].ylabel == "mse loss"
    assert not [
        f
        for f in regression_figures + list(lm.values())
        if "cross-entropy" in f.ylabel and "per-token" not in f.ylabel
    ]
    assert {f.title: f.lines for f in regression_figures}["Validation R² (coefficient of determination)"] == [
        ("reg: val/r2", [2], [0.5])
    ]

    together = {f.title: f for f in figure_specs(runs)}
    assert together["Training loss"].ylabel == "loss"  # the losses differ: the legend names each
    assert [label for label, _, _ in together["Training loss"].lines] == [
        "cls: train/loss (cross-entropy loss)",
        "lm: train/loss (per-token cross-entropy loss)",
        "reg: train/loss (mse loss)",
    ]
    # the others lack it
    assert together["Validation top-1 accuracy"].lines == [("cls: val/top1", [2], [50.0])]
    assert together["Validation perplexity"].lines == [("lm: val/perplexity", [2], [3.25])]

    page = render(runs)
    for title in together:
        assert f"<figcaption>{title}</figcaption>" in page, title
    assert "Confusion matrix: cls" in page and "Confusion matrix: lm" not in page
    assert "val/top1 50.00 % (step 2)" in page and "val/perplexity 3.25 (step 2)" in page
    assert "<td>language_model</td>" in page
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_dollar_signs_in_run_class_and_group_names_are_drawn_as_text(tmp_path):
    """Two `$` in a text matplotlib draws start mathtext, which raises on `$1_$` (a run name) or `$x^$`."""
    import io

    from launcher.track.report import confusion_figure

    names = ["cost $x^$", "run_$1_$2"]
    run = write_run(
        tmp_path / "run_$1_$2",
        [{"step": 1, "train/loss": 2.0, "lr/a$_$b": 0.1, "val/loss": 1.0}],
        {"loss": "cross_entropy", "note": "$_$"},
        task={"task": "classification", "loss": "$_$ loss"},
        confusion={"step": 1, "classes": names, "matrix": [[3, 1], [0, 4]]},
    )
    page = render([load_run(str(run))])
    assert "run_$1_$2" in page and "Confusion matrix: run_$1_$2" in page
    confusion_figure([[1, 0], [0, 1]], names).savefig(io.BytesIO(), format="png")  # what evaluate saves


def two_runs_of_one_and_two_processes(tmp_path) -> list[Run]:
    """Run directories as a run starts them (save_run_files) with batch 8 and 2 accumulation steps,
    in 1 and in 2 processes, and 2 epochs of 4 optimizer steps each logged."""
    records = [{"step": step, "epoch": (step - 1) // 4, "train/loss": 1 / step} for step in range(1, 9)]
    records += [
        {"step": 4, "epoch": 0, "data/dropped": 0, "data/repeated": 0, "data/unreadable": 0},
        {"step": 4, "epoch": 0, "val/loss": 0.5, "val/top1": 0.75},
    ]
    paths = []
    for name, world in (("one", 1), ("two", 2)):
        cfg = TrainConfig(output_dir=str(tmp_path / name), batch_size=8, grad_accum_steps=2)
        save_run_files(cfg, Recipe("mlp", types.ModuleType("mlp")), world)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(tmp_path / name)
    (paths[0] / "task.json").write_text(json.dumps({"task": "classification", "steps_per_epoch": 4}))
    # the second without task.json: its epochs from metrics.jsonl
    return [load_run(str(path)) for path in paths]


def test_config_differences_show_the_processes_and_the_global_batch_first(tmp_path):
    runs = two_runs_of_one_and_two_processes(tmp_path)
    assert config_differences(runs) == [
        ("world_size", [1, 2]),
        ("global_batch", [16, 32]),
        ("output_dir", [str(tmp_path / "one"), str(tmp_path / "two")]),
    ]
    facts = runs[0].facts()
    assert facts["launcher version"] == runs[0].environment["versions"]["launcher"] != "-"
    assert facts["launcher commit"] == launcher_commit()
    if (ROOT / ".git").exists():  # a checkout (a worktree's .git is a file)
        assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", facts["launcher commit"])
    runs[1].environment["launcher_commit"] = "0" * 40
    assert ("launcher commit", [facts["launcher commit"], "0" * 40]) in config_differences(runs)


def test_the_launcher_commit_is_unknown_outside_a_checkout_of_its_own(tmp_path):
    assert launcher_commit(str(tmp_path)) == "unknown"  # not a git repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "site-packages").mkdir()
    assert launcher_commit(str(tmp_path / "site-packages")) == "unknown"  # inside another repository


def test_the_report_draws_curves_against_steps_samples_seen_or_epochs(tmp_path):
    runs = two_runs_of_one_and_two_processes(tmp_path)
    for x, label, one, two in [
        ("step", "optimizer step", [1, 8], [1, 8]),
        ("samples", "samples seen", [16, 128], [32, 256]),  # 16 and 32 per step
        ("epoch", "epoch", [0.25, 2.0], [0.25, 2.0]),
    ]:  # 4 steps per epoch
        loss = {f.title: f for f in figure_specs(runs, x)}["Training loss"]
        assert loss.xlabel == label
        assert [(xs[0], xs[-1]) for _, xs, _ in loss.lines] == [tuple(one), tuple(two)], x
    with pytest.raises(ConfigError, match=r"^--x must be one of step, samples, epoch, got 'time'$"):
        figure_specs(runs, "time")
    (tmp_path / "two" / "environment.json").unlink()
    with pytest.raises(ConfigError, match=r"^--x=samples needs the world size .* use --x=step$"):
        figure_specs([load_run(str(tmp_path / "two"))], "samples")
    assert report([str(tmp_path / "one"), "--x=epoch", f"--out={tmp_path / 'report.html'}"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert (
        "<td>global_batch</td><td>16</td>" in page
        and "<figcaption>Validation top-1 accuracy</figcaption>" in page
    )
