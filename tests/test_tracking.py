"""What a run logs to wandb (read back with `wandb leet inspect --json`) and to TensorBoard (read
back with TensorBoard's EventAccumulator), one run across restarts, and the HTML report checked in a
real headless Chromium."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import MLP_RECIPE, ROOT, WANDB, child_env, launcher, metrics
from launcher.config import ConfigError, TrainConfig
from launcher.distributed import build_accelerator
from launcher.report import Run, config_differences, figure_specs, load_run, render
from launcher.tracking import Tracker, check_trackers, tracker_names

ARTIFACTS = ROOT / "test-artifacts"


def wandb_records(run_dir: Path) -> list[dict]:
    result = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_dir)],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def summary(records: list[dict]) -> dict:
    merged: dict = {}
    for r in records:
        if r.get("type") == "summary":
            merged.update(r["summary"]["update"])
    return merged


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard run directory's event files: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) per key."""
    series: dict = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], value))
    return series


class ProxyWatch:
    """A local socket named as every process's HTTP(S) proxy (Python's requests and wandb's Go
    service both honour these variables), recording the first bytes of each connection made to it:
    what a process tried to reach over the network."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            connection, _ = self.server.accept()
            with connection:
                connection.settimeout(5)
                try:
                    self.requests.append(connection.recv(300))
                except OSError as error:
                    self.requests.append(repr(error).encode())

    def env(self) -> dict:
        proxy = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        env = {k: v for k, v in child_env().items() if k.lower() != "no_proxy"}
        return dict(env, **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})


@pytest.mark.lowest  # wandb 0.19.5 and tensorboard 2.18 through Accelerate 1.0's trackers
@pytest.mark.e2e
def test_wandb_and_tensorboard_get_per_step_and_per_evaluation_metrics_from_the_main_process_only(digits, tmp_path):
    out = tmp_path / "tracked"
    network = ProxyWatch()
    launcher("recipes/resnet_finetune_tiny", f"--data_dir={digits}", f"--output_dir={out}", "--wandb_mode=offline",
             "--trackers=[wandb,tensorboard]", "--wandb_name=tiny-ft", "--wandb_group=tests", "--wandb_tags=[a,b]",
             "--wandb_notes=checking logs", "--log_every=1", "--log_images=8", processes=2, env=network.env())
    # Offline means no connection at all (wandb's own usage telemetry included).
    assert network.requests == []
    # TensorBoard: one event file (rank 1 wrote none) with every scalar of metrics.jsonl, at its
    # steps, with its values (stored as float32).
    tensorboard = out / "tensorboard" / "launcher"
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 1
    scalars, logged = tensorboard_scalars(tensorboard), logged_series(metrics(out))
    assert scalars.keys() == logged.keys() and {"val/loss", "val/top1", "lr/head", "lr/layer3"} <= scalars.keys()
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for key, points in logged.items():
        assert [step for step, _ in scalars[key]] == [step for step, _ in points], key
        assert [value for _, value in scalars[key]] == pytest.approx([value for _, value in points], rel=1e-6), key
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # rank 1 created none
    records = wandb_records(run_dirs[0])
    run = next(r["run"] for r in records if r.get("type") == "run")
    assert run["display_name"] == "tiny-ft" and run.get("run_group") == "tests" and run.get("tags") == ["a", "b"]
    assert run.get("notes") == "checking logs"
    config = {}
    for r in records:
        if r.get("type") == "config":
            config.update(r["config"]["update"])
    assert config["lr"] == 0.001 and config["unfreeze_step"] == 3 and config["log_images"] == 8
    steps = history(records)
    per_step = ("train/loss", "train/grad_norm", "train/samples_per_s", "train/data_wait", "lr/head", "lr/layer3")
    for key in per_step:
        assert [h["_step"] for h in steps if key in h] == [1, 2, 3, 4, 5, 6], key
    last = steps[-1]
    assert last["val/samples"] == 359 and 0 <= last["val/top1"] <= last["val/top5"] <= 1
    assert last["val/examples.nrows"] == 8 and last["val/confusion_matrix_table.nrows"] >= 1
    end = summary(records)
    assert end["best/metric"] == "val/top1" and end["best/step"] == 6 and end["samples_seen"] == 6 * 32
    assert end["unreadable_skipped"] == 0 and end["total_time_s"] > 0 and end["replicas_identical"] is True
    confusion = json.loads((out / "confusion.json").read_text())
    assert sum(map(sum, confusion["matrix"])) == 359 and len(confusion["classes"]) == 10


@pytest.mark.lowest  # wandb 0.19.5's resume
@pytest.mark.e2e
def test_a_resumed_run_continues_the_same_wandb_run_with_steps_going_forward(digits, tmp_path):
    out = tmp_path / "resumed"
    args = [MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--wandb_mode=offline"]
    launcher(*args, "--max_steps=50")
    launcher(*args, "--resume=auto")
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1
    first, second = ([h["_step"] for h in history(wandb_records(d)) if "lr/all" in h] for d in run_dirs)
    assert first == list(range(1, 51)) and second == list(range(51, 179))


def test_an_unknown_tracker_is_refused_in_one_line_naming_the_flag():
    with pytest.raises(ConfigError) as refused:
        check_trackers(TrainConfig(trackers=("wandb", "mlflow")))
    assert str(refused.value) == "--trackers names mlflow; choose from wandb, tensorboard"
    assert tracker_names(TrainConfig(trackers=("wandb", "tensorboard"), wandb_mode="disabled")) == ["tensorboard"]
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
    assert tensorboard_scalars(Path(tracker.tensorboard_dir)) == {"train/loss": [(1, 1.0), (2, 20.0), (3, 30.0)]}


def run(name: str, **config) -> Run:
    return Run(name=name, path=name, config=config, metrics=[])


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
        tmp_path / "cls", train + [{"step": 2, "val/loss": 1.5, "val/top1": 0.5, "val/top5": 0.75, **counts}],
        {"loss": "cross_entropy"}, task={"task": "classification", "loss": "cross-entropy"},
        summary={"best/metric": "val/top1", "best/value": 0.5, "best/step": 2},
        confusion={"step": 2, "classes": ["a", "b"], "matrix": [[3, 1], [0, 4]]})
    language = write_run(
        tmp_path / "lm", train + [{"step": 2, "val/loss": 1.2, "val/perplexity": 3.25, "val/token_accuracy": 0.25,
                                   **counts}],
        {"loss": "cross_entropy"}, task={"task": "language_model", "loss": "per-token cross-entropy"},
        summary={"best/metric": "val/perplexity", "best/value": 3.25, "best/step": 2})
    # from before task.json: config.json's loss names the loss
    regression = write_run(tmp_path / "reg", train + [{"step": 2, "val/loss": 0.3, "val/mse": 0.25, "val/r2": 0.5}],
                           {"loss": "mse"})
    runs = [load_run(str(path)) for path in (classifier, language, regression)]

    lm = {f.title: f for f in figure_specs([runs[1]])}
    assert list(lm) == ["Training loss", "Validation loss", "Validation perplexity", "Validation token accuracy",
                        "Learning rate per parameter group", "Throughput"]
    assert lm["Training loss"].ylabel == lm["Validation loss"].ylabel == "per-token cross-entropy loss"
    assert (lm["Validation perplexity"].ylabel, lm["Validation perplexity"].lines) == (
        "perplexity", [("lm: val/perplexity", [2], [3.25])])
    assert (lm["Validation token accuracy"].ylabel, lm["Validation token accuracy"].lines) == (
        "token accuracy (%)", [("lm: val/token_accuracy", [2], [25.0])])
    regression_figures = figure_specs([runs[2]])
    assert regression_figures[0].ylabel == "mse loss"
    assert not [f for f in regression_figures + list(lm.values())
                if "cross-entropy" in f.ylabel and "per-token" not in f.ylabel]
    assert {f.title: f.lines for f in regression_figures}["Validation R² (coefficient of determination)"] == [
        ("reg: val/r2", [2], [0.5])]

    together = {f.title: f for f in figure_specs(runs)}
    assert together["Training loss"].ylabel == "loss"  # the losses differ: the legend names each
    assert [label for label, _, _ in together["Training loss"].lines] == [
        "cls: train/loss (cross-entropy loss)", "lm: train/loss (per-token cross-entropy loss)",
        "reg: train/loss (mse loss)"]
    assert together["Validation top-1 accuracy"].lines == [("cls: val/top1", [2], [50.0])]  # the others lack it
    assert together["Validation perplexity"].lines == [("lm: val/perplexity", [2], [3.25])]

    page = render(runs)
    for title in together:
        assert f"<figcaption>{title}</figcaption>" in page, title
    assert "Confusion matrix: cls" in page and "Confusion matrix: lm" not in page
    assert "val/top1 50.00 % (step 2)" in page and "val/perplexity 3.25 (step 2)" in page
    assert "<td>language_model</td>" in page
    assert not re.search(r'(src|href)="(?!data:)', page)


@pytest.mark.e2e
def test_the_report_for_two_runs_shows_their_plots_and_config_differences_in_a_browser(digits, tmp_path):
    from browser import chromium

    runs = []
    for lr in (0.01, 0.003):
        out = tmp_path / f"lr{lr}"
        launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", f"--lr={lr}")
        runs.append(out)
    page = tmp_path / "report.html"
    result = launcher("report", *runs, f"--out={page}")
    assert f"report: {page}" in result.stdout
    text = page.read_text()
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing to fetch: it opens from disk, offline
    rows = dict(re.findall(r"<tr><td>([^<]+)</td>((?:<td>[^<]*</td>)+)</tr>", text.split("Config differences")[1]))
    assert set(rows) == {"lr", "output_dir"} and "0.01" in rows["lr"] and "0.003" in rows["lr"]
    driver = chromium()
    try:
        driver.get(page.as_uri())
        figures = driver.find_elements("tag name", "figcaption")
        captions = [f.text for f in figures]
        for title in ("Training loss", "Validation loss", "Validation top-1 accuracy", "Validation top-5 accuracy",
                      "Learning rate per parameter group",
                      "Throughput", f"Confusion matrix: {runs[0].name}", f"Confusion matrix: {runs[1].name}"):
            assert any(c.startswith(title) for c in captions), title
        widths = driver.execute_script("return [...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(widths) == len(captions) and all(w > 100 for w in widths)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        ARTIFACTS.mkdir(exist_ok=True)
        driver.set_window_size(1200, driver.execute_script("return document.body.scrollHeight"))
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        driver.quit()
