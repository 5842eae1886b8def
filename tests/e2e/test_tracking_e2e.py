"""What a run logs to wandb (read back with `wandb leet inspect --json`) and to TensorBoard (read
back with TensorBoard's EventAccumulator), one run across restarts, and the HTML report checked in a
real headless Chromium."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest

from conftest import MLP_RECIPE, ROOT, child_env, launcher, metrics
from readers import history, logged_series, summary, tensorboard_scalars, wandb_records

ARTIFACTS = ROOT / "test-artifacts"


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
        return dict(
            env, **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
        )


@pytest.mark.lowest  # wandb 0.19.5 and tensorboard 2.18 through Accelerate 1.1's trackers
def test_wandb_and_tensorboard_get_per_step_and_per_evaluation_metrics_from_the_main_process_only(
    digits, tmp_path
):
    out = tmp_path / "tracked"
    network = ProxyWatch()
    launcher(
        "recipes/resnet_finetune_tiny",
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--wandb_mode=offline",
        "--trackers=[wandb,tensorboard]",
        "--wandb_name=tiny-ft",
        "--wandb_group=tests",
        "--wandb_tags=[a,b]",
        "--wandb_notes=checking logs",
        "--log_every=1",
        "--log_images=8",
        processes=2,
        env=network.env(),
    )
    # Offline means no connection at all (wandb's own usage telemetry included).
    assert network.requests == []
    # TensorBoard: one event file (rank 1 wrote none) with every scalar of metrics.jsonl, at its
    # steps, with its values (stored as float32).
    tensorboard = out / "tensorboard" / "launcher"
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 1
    scalars, logged = tensorboard_scalars(tensorboard), logged_series(metrics(out))
    assert (
        scalars.keys() == logged.keys() and {"val/loss", "val/top1", "lr/head", "lr/layer3"} <= scalars.keys()
    )
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for key, points in logged.items():
        assert [step for step, _ in scalars[key]] == [step for step, _ in points], key
        assert [value for _, value in scalars[key]] == pytest.approx(
            [value for _, value in points], rel=1e-6
        ), key
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # rank 1 created none
    records = wandb_records(run_dirs[0])
    run = next(r["run"] for r in records if r.get("type") == "run")
    assert (
        run["display_name"] == "tiny-ft" and run.get("run_group") == "tests" and run.get("tags") == ["a", "b"]
    )
    assert run.get("notes") == "checking logs"
    config = {}
    for r in records:
        if r.get("type") == "config":
            config.update(r["config"]["update"])
    assert config["lr"] == 0.001 and config["unfreeze_step"] == 3 and config["log_images"] == 8
    steps = history(records)
    per_step = (
        "train/loss",
        "train/grad_norm",
        "train/samples_per_s",
        "train/data_wait",
        "lr/head",
        "lr/layer3",
    )
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
def test_a_resumed_run_continues_the_same_wandb_run_with_steps_going_forward(digits, tmp_path):
    out = tmp_path / "resumed"
    args = [MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--wandb_mode=offline"]
    launcher(*args, "--max_steps=50")
    launcher(*args, "--resume=auto")
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1
    first, second = ([h["_step"] for h in history(wandb_records(d)) if "lr/all" in h] for d in run_dirs)
    assert first == list(range(1, 51)) and second == list(range(51, 179))


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
    rows = dict(
        re.findall(r"<tr><td>([^<]+)</td>((?:<td>[^<]*</td>)+)</tr>", text.split("Config differences")[1])
    )
    assert set(rows) == {"lr", "output_dir"} and "0.01" in rows["lr"] and "0.003" in rows["lr"]
    driver = chromium()
    try:
        driver.get(page.as_uri())
        figures = driver.find_elements("tag name", "figcaption")
        captions = [f.text for f in figures]
        for title in (
            "Training loss",
            "Validation loss",
            "Validation top-1 accuracy",
            "Validation top-5 accuracy",
            "Learning rate per parameter group",
            "Throughput",
            f"Confusion matrix: {runs[0].name}",
            f"Confusion matrix: {runs[1].name}",
        ):
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
