"""A torch IterableDataset trained in 2 processes with uneven shares (51 and 50 items), two epochs
without a hang, each rank taking the same batches; the same run logs tokens/s, FLOPs per sample,
MFU (against --peak_tflops) and per-rank step times, and writes a torch.profiler trace of
--profile_steps. One run serves every assertion. The same lines as Hugging Face datasets (a
streaming training split, a map-style validation split) train in 1 and 2 processes; the 1-process
run, with 2 workers, resumes mid-epoch through the stream's state_dict to the same samples and weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launcher, metrics

RECIPE = str(ROOT / "tests" / "recipes" / "stream_lines.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "run"
    result = launcher(
        RECIPE,
        f"--output_dir={out}",
        "--trace_samples",
        "--profile_steps=2:3",
        "--peak_tflops=1",
        processes=2,
    )
    return out, result


def test_an_iterable_dataset_trains_in_two_processes_with_uneven_shares(run):
    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (101 // 16)  # two epochs of 6 whole steps of 8 x 2 samples
    keys = {
        rank: [line.split()[2] for line in (out / "samples" / f"rank{rank}.txt").read_text().splitlines()]
        for rank in range(2)
    }
    assert len(keys[0]) == len(keys[1]) == 2 * 6 * 8
    epoch0 = [set(keys[rank][:48]) for rank in range(2)]
    assert all(int(k) % 2 == rank for rank in range(2) for k in epoch0[rank])  # rank r: items r, r + 2, ...
    assert len(epoch0[0] | epoch0[1]) == 96  # 101 items, 5 dropped, none twice
    [epoch_end] = [m for m in metrics(out) if "data/dropped" in m and m["epoch"] == 0]
    assert epoch_end["data/dropped"] == 5 and epoch_end["data/repeated"] == 0
    assert any("val/loss" in m for m in metrics(out))


def test_throughput_fields_are_logged_with_the_training_record(run):
    out, _ = run
    logged = [m for m in metrics(out) if "train/loss" in m]
    for record in logged:
        assert record["train/tokens_per_s"] > 0 and record["train/flops_per_sample"] > 0
        assert 0 < record["train/mfu"] < 1  # 1 TFLOPS assumed: a small model on a CPU core reaches a fraction
        assert (
            0 < record["train/ready_time_min"] <= record["train/ready_time_max"]
            and record["train/step_time"] > 0
        )
        assert record["train/slowest_rank"] in (0, 1)


def test_the_profile_trace_is_written_for_each_rank(run):
    out, _ = run
    for rank in range(2):
        trace = json.loads((out / "profile" / f"rank{rank}.pt.trace.json").read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any("aten::" in name for name in names)  # the steps' operators


def hf_run_checks(out, processes: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 101 // (8 * processes)  # one epoch of whole steps of 8 x processes samples
    [epoch_end] = [m for m in metrics(out) if "data/dropped" in m]
    assert epoch_end["data/dropped"] == 101 % (8 * processes) and epoch_end["data/repeated"] == 0
    [evaluation] = [m for m in metrics(out) if "val/loss" in m]
    assert evaluation["val/samples"] == 21  # the map-style split: each sample once across the ranks


def test_hugging_face_streaming_and_map_style_datasets_train_in_two_processes(tmp_path):
    out = tmp_path / "run"
    launcher(RECIPE, f"--output_dir={out}", "--source=hf", "--epochs=1", processes=2)
    hf_run_checks(out, processes=2)


def test_a_hugging_face_stream_in_one_process_resumes_mid_epoch_through_its_state(tmp_path):
    """One run with 2 workers and checkpoints; then a resume from its mid-epoch checkpoint of step 8 (of 12)
    continues each worker from its dataset state: the same samples and the same weights."""
    out = tmp_path / "run"
    common = [
        RECIPE,
        f"--output_dir={out}",
        "--source=hf",
        "--epochs=1",
        "--num_workers=2",
        "--trace_samples",
    ]
    launcher(*common, "--checkpoint_every=8")
    hf_run_checks(out, processes=1)
    whole = (out / "samples" / "rank0.txt").read_text().splitlines()
    weights = load_file(str(out / "model.safetensors"))
    checkpoint = out / "checkpoints" / "step-00000008"
    assert json.loads((checkpoint / "rank-0.json").read_text())["states"]  # one per worker, as JSON
    (out / "samples" / "rank0.txt").rename(out / "samples" / "first.txt")
    result = launcher(*common, f"--resume={checkpoint}")
    assert "through its state_dict" in result.stdout
    after = (out / "samples" / "rank0.txt").read_text().splitlines()
    assert [line for line in whole if int(line.split()[1]) < 8] + after == whole
    resumed = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
