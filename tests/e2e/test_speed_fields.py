"""The GPU-speed fields, checked for correctness on CPU: each on or off trains to the same loss;
synthetic data feeds the step with no I/O; the GPU benchmark runs end to end at a CPU size."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT, launcher, metrics
from launcher.data.index import read_index
from launcher.data.loader import SplitLoader
from launcher.data.spec import Synthetic

TINY = [
    "recipes/convnet_digits_tiny",
    "--max_steps=8",
    "--log_every=8",
    "--epochs=1",
    "--dropout=0",
]  # compiled dropout draws from another RNG (inductor's), so masks would differ


def last_loss(run_dir) -> float:
    return [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m][-1]


@pytest.fixture(scope="module")
def baseline(digits, tmp_path_factory):
    """The TINY run with the given extra flags and processes, trained once for all the tests that
    compare against it."""
    done: dict = {}

    def run(*flags: str, processes: int = 1):
        if (flags, processes) not in done:
            out = tmp_path_factory.mktemp("baseline")
            launcher(*TINY, f"--data_dir={digits}", f"--output_dir={out}", *flags, processes=processes)
            done[flags, processes] = out
        return done[flags, processes]

    return run


# lowest: torch.compile and channels-last in torch 2.7 (the other fields are the launcher's own logic)
@pytest.mark.parametrize(
    "flags, without",
    [
        pytest.param(["--channels_last=True"], [], marks=pytest.mark.lowest),
        pytest.param(["--compile=True"], [], marks=pytest.mark.lowest),
        (["--pin_memory=False"], []),
        (["--num_workers=2", "--prefetch_factor=4"], ["--num_workers=2"]),  # the default prefetch_factor: 2
        (["--data_on_gpu=True"], []),  # PNGs: decoded in the main process instead of by PIL, losslessly
        (["--data_on_gpu=True", "--num_workers=2"], ["--num_workers=2"]),
    ],
)
def test_each_speed_field_trains_to_the_same_loss(flags, without, baseline, digits, tmp_path):
    fast = tmp_path / "fast"
    launcher(*TINY, f"--data_dir={digits}", f"--output_dir={fast}", *flags, timeout=900)
    assert last_loss(fast) == pytest.approx(last_loss(baseline(*without)), rel=1e-3, abs=1e-4)


def test_persistent_workers_train_and_evaluate_exactly_as_fresh_ones(digits, tmp_path):
    args = [
        "recipes/convnet_digits_tiny",
        "--epochs=2",
        "--log_every=11",
        "--num_workers=2",
        f"--data_dir={digits}",
    ]
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    launcher(*args, f"--output_dir={plain}")
    launcher(*args, f"--output_dir={kept}", "--persistent_workers=True")
    logged = [
        [(m["step"], m.get("train/loss"), m.get("val/top1")) for m in metrics(run)] for run in (plain, kept)
    ]
    assert logged[0] == logged[1] and len([v for *_, v in logged[1] if v is not None]) == 2


def test_synthetic_data_trains_on_random_inputs_of_the_data_shape(digits, tmp_path):
    out = tmp_path / "synthetic"
    result = launcher(
        *TINY,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--synthetic_data=True",
        "--max_steps=30",
        "--log_every=10",
    )
    assert (
        "training data         synthetic: 1438 random samples like ((N, 3, 8, 8), (N,)), no I/O"
        in result.stdout
    )
    losses = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
    assert losses[-1] < losses[0] - 0.3  # one fixed batch, learnt step after step


@pytest.mark.parametrize("world", [1, 3])
def test_synthetic_validation_serves_every_sample_once_across_ranks(world):
    example = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 4]))
    source = Synthetic(example, length=23)
    sizes = [
        len(b.data[1])
        for rank in range(world)
        for b in SplitLoader(
            source, rank=rank, world=world, seed=0, batch_size=4, num_workers=0, training=False
        ).loader(0)
    ]
    assert sum(sizes) == 23 and max(sizes) <= 4
    train = SplitLoader(
        source, rank=0, world=world, seed=0, batch_size=4, num_workers=0, training=True, batches_per_epoch=5
    )
    batches = list(train.loader(0))
    inputs, labels = batches[0].data
    assert len(batches) == 5 and inputs.dtype == torch.uint8 and inputs.shape == (4, 3, 4, 4)
    assert labels.dtype == torch.int64 and labels.shape == (4,) and 0 <= labels.min() and labels.max() <= 4


def test_gpu_benchmark_runs_at_a_cpu_size(tmp_path):
    import subprocess
    import time

    out = tmp_path / "bench.json"
    # ImageNet-sized JPEGs, channels-last, at --smoke's CPU size (bf16 there stopped on an infinite
    # gradient norm)
    bench = subprocess.Popen(
        [
            sys.executable,
            "scripts/bench_gpu.py",
            "--smoke",
            "--image_set=imagenet",
            "--precision=no",
            "--channels_last=True",
            "--data=[synthetic,gpu_decode]",
            f"--data_dir={tmp_path / 'shards'}",
            f"--out={out}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not out.exists() and bench.poll() is None:  # the first row is written before the second is run
        time.sleep(0.05)
    first = json.loads(out.read_text())["rows"] if out.exists() else []
    stdout, stderr = bench.communicate(timeout=900)
    result = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert first == rows[:1] and not list(tmp_path.glob("*.tmp"))
    # the shards row, channels_last=False: the demo recipe's run below
    assert [(r["data"], r["channels_last"]) for r in rows] == [("synthetic", True), ("gpu_decode", True)]
    for row in rows:
        assert (
            row["launcher"] > 0
            and row["plain"] > 0
            and row["ratio"] == pytest.approx(row["launcher"] / row["plain"])
        )
    assert "gpu_decode / synthetic (compile=False, no, channels_last=True): launcher" in result.stdout
    assert max(read_index(str(tmp_path / "shards")).image_sides[0].values()) == 500  # ImageNet-sized JPEGs


def test_gpu_benchmark_times_the_demo_recipe_on_its_own_shards(digits, tmp_path):
    import subprocess

    out = tmp_path / "demo.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_gpu.py",
            "--recipe=recipes/resnet_pretrain",
            f"--data_dir={digits}",
            "--image_size=16",
            "--batch_size=16",
            "--steps=4",
            "--warmup=2",
            "--compile=False",
            "--precision=no",
            "--channels_last=False",
            "--workers=1",
            "--data=shards",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    # the recipe's model and transforms on the demo's digits: ResNet-18, greyscale PNGs made RGB at 16 px
    assert (report["recipe"], report["arch"], report["input_shape"], report["batch_size"]) == (
        "resnet_pretrain",
        "resnet18",
        [3, 16, 16],
        16,
    )
    # one row, shards: the other data sources' code paths are test_gpu_benchmark_runs_at_a_cpu_size's
    [row] = report["rows"]
    assert row["data"] == "shards" and row["launcher"] > 0 and row["plain"] > 0
    assert row["ratio"] == pytest.approx(row["launcher"] / row["plain"])
    assert "resnet_pretrain (resnet18, inputs (3, 16, 16)), batch 16, 4 timed steps after 2" in result.stdout


def test_gpu_benchmark_refuses_a_recipe_that_does_not_train_on_shards(digits):
    import subprocess

    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_gpu.py",
            "--recipe=recipes/alexnet_folder_tiny",
            f"--data_dir={digits / 'folder'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "bench_gpu.py: recipe alexnet_folder_tiny's training split is a ImageFolder dataset, not Shards; "
        "the plain loop reads WebDataset shards, so pick a recipe whose build_data gives Shards"
    )


def test_cpu_scaling_benchmark_runs_both_sides(tmp_path):
    import subprocess

    out = tmp_path / "ddp.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_ddp_cpu.py",
            "--arch=resnet18",
            "--image_size=16",
            "--batch_size=4",
            "--steps=2",
            "--warmup=1",
            "--rounds=1",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    row = report["rounds"][0]
    assert row["ratio"] == pytest.approx(row["two"] / (2 * row["one"])) and row["one"] > 0
    assert (
        row["plain_ratio"] == pytest.approx(row["plain_two"] / (2 * row["plain_one"]))
        and row["plain_one"] > 0
    )
    assert (
        row["apart_ratio"] == pytest.approx(row["apart_two"] / (2 * row["plain_one"]))
        and row["apart_two"] > 0
    )
    assert (
        f"= {report['median']:.3f} through the launcher, {report['plain_median']:.3f} in a plain DDP loop, "
        f"{report['apart_median']:.3f} for two independent plain loops side by side, no communication "
        "(this machine's ceiling; medians of 1; target >= 0.85)"
    ) in result.stdout


# lowest: Accelerate 1.1's comm hooks
@pytest.mark.parametrize("hook", [pytest.param("fp16", marks=pytest.mark.lowest), "bf16"])
def test_ddp_comm_hook_all_reduces_16_bit_gradients_and_keeps_replicas_identical(
    hook, baseline, digits, tmp_path
):
    plain, compressed = baseline(processes=2), tmp_path / hook
    launcher(
        *TINY, f"--data_dir={digits}", f"--output_dir={compressed}", f"--ddp_comm_hook={hook}", processes=2
    )
    assert json.loads((compressed / "replicas.json").read_text())["identical"] is True
    # Rounded gradients: a slightly different run (so the hook was in use), but the same training.
    assert last_loss(compressed) != last_loss(plain)
    assert last_loss(compressed) == pytest.approx(last_loss(plain), rel=0.02)


def test_lm_benchmark_runs_at_a_cpu_size(tmp_path):
    import subprocess

    out = tmp_path / "lm.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_gpu.py",
            "--lm",
            "--lm_size=tiny",
            "--lm_seq=32",
            "--lm_batch=2",
            "--lm_compile=False",
            "--lm_precision=no",
            "--steps=2",
            "--warmup=1",
            "--peak_tflops=0.001",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())
    assert (row["size"], row["seq_len"], row["batch_size"], row["compile"], row["precision"]) == (
        "tiny",
        32,
        2,
        False,
        "no",
    )
    for side in ("launcher", "plain"):  # MFU: tokens/s x FLOPs per token over the 1 TFLOP/s given as the peak
        assert row[f"{side}_tokens_per_s"] > 0
        assert row[f"{side}_mfu"] == pytest.approx(row[f"{side}_tokens_per_s"] * row["flops_per_token"] / 1e9)
    assert "FSDP on 1 process, compile=False, no, 2 timed steps after 1" in result.stdout
