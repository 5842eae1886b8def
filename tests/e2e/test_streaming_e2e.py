"""Streaming end to end: uneven shards on 2 processes x 2 workers, exact mid-epoch resume by sample
keys, unreadable samples counted across ranks, and the plan's pre-flight."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from webdataset.tariterators import tarfile_samples

from conftest import MLP_RECIPE, ROOT, launcher, metrics
from launcher.data.index import read_index
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.writer import write_shards


def reshard(digits, out, sizes: list[int], unreadable: frozenset = frozenset()):
    """The digits training split rewritten as shards of the given sizes plus one with the rest,
    with the images of the `unreadable` keys replaced by bytes no decoder accepts."""
    index = read_index(str(digits / "train"))
    samples = [
        {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
        for s in tarfile_samples([{"url": url} for url in index.urls])
    ]
    for sample in samples:
        if sample["__key__"] in unreadable:
            sample["png"] = b"not an image"
    train = out / "train"
    combined = {"shards": {}, "classes": index.classes}
    start = 0
    for n, size in enumerate(sizes + [len(samples) - sum(sizes)]):
        part = write_shards(
            samples[start : start + size],
            str(train),
            max_count=size,
            prefix=f"part{n}",
            classes=index.classes,
        )
        combined["shards"].update(part["shards"])
        start += size
    (train / "index.json").write_text(json.dumps(combined))
    shutil.copytree(digits / "val", out / "val")
    return out


def traced_keys(run_dir, rank: int) -> list[tuple[int, int, str]]:
    lines = (run_dir / "samples" / f"rank{rank}.txt").read_text().split("\n")
    return [(int(e), int(s), key) for e, s, key in (line.split() for line in lines if line)]


def test_plan_preflight_shows_how_uneven_shards_divide(digits, tmp_path):
    data = reshard(digits, tmp_path / "data", [700, 500])  # 700, 500, 238
    text = launcher("plan", MLP_RECIPE, f"--data_dir={data}", "--world_size=2", "--num_workers=2").stdout
    assert "training shards       3 for 2 process(es) x 2 worker(s); 3 local file(s) checked" in text
    assert "min 238, median 500, max 700 samples (largest / mean 1.46)" in text
    assert "WARNING: 1 of 4 workers get no shard each epoch; write at least 4 shards" in text
    split = SplitLoader(
        Shards(str(data / "train"), None),
        rank=0,
        world=2,
        seed=0,
        batch_size=16,
        num_workers=2,
        training=True,
        batches_per_epoch=44,
    )
    layout = split.layout(0)
    assert f"each rank takes 44 batches of 16: {layout.dropped} dropped, {layout.repeated} repeated" in text
    (data / "train" / "part1-000000.tar").write_bytes(b"\0" * 100)
    result = launcher("plan", MLP_RECIPE, f"--data_dir={data}", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "1 of 3 shard files unreadable, first" in result.stderr and "part1-000000.tar" in result.stderr


def test_uneven_shards_on_two_processes_with_workers_finish_and_report_the_evening(digits, tmp_path):
    data = reshard(digits, tmp_path / "data", [700, 500])  # 3 shards for 2 ranks x 2 workers
    out = tmp_path / "run"
    result = launcher(
        MLP_RECIPE,
        f"--data_dir={data}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--trace_samples=true",
        processes=2,
        timeout=240,
    )  # a hang fails here
    per_epoch = {m["epoch"]: m for m in metrics(out) if "data/repeated" in m}
    assert sorted(per_epoch) == [0, 1]
    for epoch, record in per_epoch.items():
        seen = [key for rank in range(2) for e, _, key in traced_keys(out, rank) if e == epoch]
        assert len(seen) == 2 * 44 * 16  # every rank took every batch
        assert len(seen) - len(set(seen)) == record["data/repeated"] > 0
        assert len(set(seen)) == 1438 - record["data/dropped"]
        assert record["data/unreadable"] == 0
    assert "epoch 0 data: 1438 samples, 44 batches of 16 per rank" in result.stdout
    assert [m["val/samples"] for m in metrics(out) if "val/samples" in m] == [359, 359]


@pytest.mark.parametrize(
    "processes, max_steps, resume_step",
    [
        # lowest: torch 2.7's DataLoader worker order
        (1, 100, 98),
        pytest.param(2, 60, 56, marks=pytest.mark.lowest),
    ],
)
def test_a_mid_epoch_resume_sees_exactly_the_samples_of_an_uninterrupted_run(
    digits, tmp_path, processes, max_steps, resume_step
):
    data = reshard(digits, tmp_path / "data", [700, 500, 100])  # uneven: repeats and drops in play
    common = [MLP_RECIPE, f"--data_dir={data}", "--num_workers=2", "--trace_samples=true"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launcher(*common, f"--output_dir={whole}", processes=processes, timeout=240)
    # "Crash" after max_steps, then resume from an earlier mid-epoch checkpoint (steps past it redone).
    launcher(
        *common,
        f"--output_dir={parts}",
        "--checkpoint_every=7",
        f"--max_steps={max_steps}",
        processes=processes,
        timeout=240,
    )
    for rank in range(processes):
        (parts / "samples" / f"rank{rank}.txt").rename(parts / "samples" / f"first{rank}.txt")
    checkpoint = parts / "checkpoints" / f"step-{resume_step:08d}"
    assert json.loads((checkpoint / "rank-0.json").read_text())["batches"] > 0  # mid-epoch
    result = launcher(
        *common, f"--output_dir={parts}", f"--resume={checkpoint}", processes=processes, timeout=240
    )
    assert f"at step {resume_step}, epoch 1" in result.stdout and "batches into it" in result.stdout
    for rank in range(processes):
        first = (parts / "samples" / f"first{rank}.txt").read_text().split("\n")
        before = [tuple(line.split()) for line in first if line and int(line.split()[1]) < resume_step]
        after = [(str(e), str(s), k) for e, s, k in traced_keys(parts, rank)]
        expected = [(str(e), str(s), k) for e, s, k in traced_keys(whole, rank)]
        assert before + after == expected
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_samples_are_skipped_and_counted_across_ranks(digits, tmp_path):
    index = read_index(str(digits / "train"))
    keys = [s["__key__"] for s in tarfile_samples([{"url": url} for url in index.urls])]
    bad = frozenset([keys[3], keys[10], keys[900]])  # two in the first shard, one in the third
    data = reshard(digits, tmp_path / "data", [700, 500], unreadable=bad)
    out = tmp_path / "run"
    result = launcher(
        MLP_RECIPE,
        f"--data_dir={data}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--epochs=1",
        processes=2,
        timeout=240,
    )
    [record] = [m for m in metrics(out) if "data/unreadable" in m]
    assert record["data/unreadable"] == 3  # summed over both ranks, each sample once
    logged = [
        json.loads(line)
        for rank in range(2)
        if (out / "data_errors" / f"rank{rank}.jsonl").exists()
        for line in (out / "data_errors" / f"rank{rank}.jsonl").read_text().splitlines()
    ]
    assert {e["key"] for e in logged} == bad
    assert Counter(e["shard"].rsplit("/", 1)[1] for e in logged) == {
        "part0-000000.tar": 2,
        "part1-000000.tar": 1,
    }
    assert "skipped unreadable sample" in result.stdout + result.stderr

    # Above --max_corrupt_fraction the run stops, naming the worst shards.
    stopped = launcher(
        MLP_RECIPE,
        f"--data_dir={data}",
        f"--output_dir={tmp_path / 'strict'}",
        "--epochs=1",
        "--max_corrupt_fraction=0.002",
        check=False,
    )  # 2 of 1438 allowed
    assert stopped.returncode == 65  # a data error, not bad input
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "launcher: data error: 3 of 1438 training samples in epoch 0 are unreadable, more than "
        "--max_corrupt_fraction=0.002; worst shards: "
    )
    assert "part0-000000.tar (2), " in line and "part1-000000.tar (1)" in line


def test_data_benchmark_runs_and_reports_ratios_per_core():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_data.py"),
            "--images=96",
            "--size=64",
            "--crop=32",
            "--batch_size=8",
            "--rounds=1",
            "--workers=0,2",
            "--imagenet=4",
            "--photos=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tight loop, 1 process, tarfile" in result.stdout
    for way in ("torchvision reference", "launcher default", "PIL draft", "simplejpeg"):  # on both sets
        assert len(re.findall(rf"{way}.* images/s per core +\d+\.\d\dx the reference", result.stdout)) == 2, (
            way
        )
    assert "tight loop, 1 process, launcher's reader" in result.stdout
    for workers in (1, 2):  # 0 workers: one process, so its ratio is to 1 x tight
        found = re.search(
            rf"pipeline / \({workers} x tight\) = (\d+\.\d+) \(tarfile\), (\d+\.\d+) \(launcher's reader\)",
            result.stdout,
        )
        assert found and all(float(value) > 0 for value in found.groups()), result.stdout
