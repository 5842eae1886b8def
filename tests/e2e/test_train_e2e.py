"""End to end: the real CLI in subprocesses, one process and two (accelerate launch, gloo on CPU)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MLP_RECIPE, ROOT, WANDB, launcher, metrics
from launcher.optim.schedules import warmup_cosine
from launcher.train.plan import fork_hang_warning


def val_losses(run_dir) -> list[float]:
    return [m["val/loss"] for m in metrics(run_dir) if "val/loss" in m]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["recipes/resnet_finetune_tiny", "--bach_size=4"],
            "unknown field --bach_size for recipes.resnet_finetune_tiny; did you mean --batch_size",
        ),
        (["recipes/resnet_finetune_tiny", "--epochs=three"], "--epochs expects int, got 'three'"),
        (["recipes/nope"], "unknown recipe 'recipes/nope': tried recipes/nope.py"),
        (["recipes/resnet_finetune_tiny", "stray"], "unexpected argument 'stray'"),
        (
            ["plan", "recipes/resnet_finetune_tiny", "--data_dir=/nonexistent"],
            "1 of 1 shard files missing, first /nonexistent/train",
        ),
        (["report", "/nonexistent"], "/nonexistent is not a run directory (no metrics.jsonl)"),
        (
            ["recipes/resnet_finetune_tiny", "--data_dir={digits}", "--unfreeze=[layer9]"],
            "--unfreeze names layer9; stages are layer4",
        ),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message, digits):
    result = launcher(*[arg.format(digits=digits) for arg in args], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_plan_prints_batch_arithmetic_groups_and_outputs(digits):
    text = launcher(
        "plan",
        "recipes/resnet_finetune",
        f"--data_dir={digits}",
        "--batch_size=8",
        "--grad_accum_steps=2",
        "--world_size=4",
    ).stdout
    assert "world size            4 process(es)" in text
    assert "8 per device x 4 processes x 2 accumulation = 64 global" in text
    assert "1438 in 8 shards" in text and "22 per epoch x 4 epochs -> 88 total" in text
    rows = {
        line.split()[0]: line.split()[1:] for line in text.split("parameter groups:")[1].splitlines()[2:-1]
    }
    assert rows["frozen"] == ["683,072", "-", "-", "never", "(frozen)"]  # conv1, bn1, layer1, layer2
    assert rows["head"] == ["5,120", "0.01", "0.05", "always"] and rows["head/no_decay"][:3] == [
        "10",
        "0.01",
        "0",
    ]
    assert rows["layer4"] == ["8,388,608", "0.0005", "0.05", "always"]  # lr x layer_decay
    assert rows["layer3"][:4] == ["2,097,152", "0.00025", "0.05", "from"]
    assert "from step 44 (epoch 2), LR warm-up 10 steps" in text  # 22 steps per epoch
    assert "8,398,858 of 11,181,642 parameters trainable, 2,099,712 more after unfreezing" in text
    assert "outputs               runs/resnet_finetune" in text
    workers = int(re.search(r"num_workers\s+(\d+)", text).group(1))
    assert ("gh-112275" in text) == bool(fork_hang_warning(sys.version_info, 4, workers))  # this Python's


def test_one_process_trains_and_validation_loss_falls(digits, tmp_path):
    out = tmp_path / "run"
    result = launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--epochs=3", "--lr=0.002")
    losses = val_losses(out)
    chance = math.log(10)  # the loss of an untrained 10-class model
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.2 * chance
    assert [m["val/samples"] for m in metrics(out) if "val/samples" in m] == [359] * 3
    train = [m for m in metrics(out) if "train/loss" in m]
    assert train[-1]["train/loss"] < train[0]["train/loss"] and "lr/all" in train[0]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 3 and config["lr"] == 0.002 and config["recipe"] == "mlp_digits"
    assert (out / "recipe.py").read_text() == (ROOT / "tests/recipes/mlp_digits.py").read_text()
    assert set(load_file(str(out / "model.safetensors"))) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert "done: " in result.stdout and str(out / "model.safetensors") in result.stdout


def test_an_existing_run_is_not_overwritten_and_resume_auto_continues_it(digits, tmp_path):
    out = tmp_path / "run"
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--epochs=1")
    weights = (out / "model.safetensors").read_bytes()
    again = launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--epochs=1", check=False)
    assert again.returncode == 2 and "already holds a run; pass --resume=auto" in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights
    resumed = launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--epochs=2",
        "--resume=auto",
        "--resume_changes=allow",
    )
    assert "resumed from" in resumed.stdout and "step 89, epoch 1" in resumed.stdout
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [89, 178]


def test_resume_across_an_epoch_boundary_matches_an_uninterrupted_run(digits, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={whole}", "--epochs=2")
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={parts}", "--epochs=2", "--max_steps=89")
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={parts}", "--epochs=2", "--resume=auto")
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.lowest  # Accelerate 1.1's accumulate and loss scaling
def test_gradient_accumulation_matches_a_larger_batch(digits, tmp_path):
    runs = {}
    for batch, accum in [(8, 2), (16, 1)]:
        out = tmp_path / f"b{batch}"
        launcher(
            MLP_RECIPE,
            f"--data_dir={digits}",
            f"--output_dir={out}",
            "--epochs=1",
            f"--batch_size={batch}",
            f"--grad_accum_steps={accum}",
            "--max_grad_norm=1.0",
            "--warmup_steps=5",
        )
        runs[batch] = load_file(str(out / "model.safetensors"))
    for key in runs[8]:
        torch.testing.assert_close(runs[8][key], runs[16][key], rtol=1e-5, atol=1e-6)
    # The scheduler steps once per optimizer step, not per micro-batch: 89 steps in the epoch,
    # each logging the LR its update used.
    logged = [m for m in metrics(tmp_path / "b8") if "lr/all" in m]
    lr_at = warmup_cosine(5)
    assert [m["step"] for m in logged] == list(range(1, 90))
    for record in logged:
        assert record["lr/all"] == pytest.approx(3e-3 * lr_at(record["step"] - 1, 89))


@pytest.mark.lowest  # CPU autocast in torch 2.7
def test_bf16_trains_on_cpu_and_fp16_without_a_gpu_is_refused(digits, tmp_path):
    launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={tmp_path / 'bf16'}",
        "--epochs=1",
        "--mixed_precision=bf16",
    )
    assert val_losses(tmp_path / "bf16")[0] < 0.5 * math.log(10)
    if not torch.cuda.is_available():
        result = launcher(
            MLP_RECIPE, f"--output_dir={tmp_path / 'fp16'}", "--mixed_precision=fp16", check=False
        )
        assert result.returncode == 2 and "fp16 needs a GPU; use --mixed_precision=bf16" in result.stderr


@pytest.mark.lowest  # DDP over gloo in torch 2.7
def test_two_processes_see_disjoint_shards_and_keep_identical_weights(digits, tmp_path):
    out = tmp_path / "ddp"
    result = launcher(
        "recipes/resnet_finetune_tiny",
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--trace_samples=true",
        "--max_steps=4",
        processes=2,
    )
    assert "world size            2 process(es)" in result.stdout
    keys = {}
    for rank in range(2):
        lines = (out / "samples" / f"rank{rank}.txt").read_text().split("\n")
        keys[rank] = [line.split()[2] for line in lines if line]
    assert len(keys[0]) == len(keys[1]) == 4 * 16  # steps x per-device batch
    assert not set(keys[0]) & set(keys[1])
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas["parameter_checksums"]) == 2 and replicas["identical"] is True
    assert [m["val/samples"] for m in metrics(out) if "val/samples" in m] == [359]


@pytest.mark.lowest  # wandb 0.19.5 offline (older ones hang on an image table)
def test_finetune_loads_a_pretraining_run_and_logs_to_offline_wandb(digits, tmp_path):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    launcher("recipes/resnet_pretrain_tiny", f"--data_dir={digits}", f"--output_dir={pre}")
    result = launcher(
        "recipes/resnet_finetune_tiny",
        f"--data_dir={digits}",
        f"--output_dir={fine}",
        f"--weights={pre}",
        "--wandb_mode=offline",
    )
    assert f"from {pre}; head replaced: fc.bias, fc.weight" in result.stdout
    pretrained, tuned = load_file(str(pre / "model.safetensors")), load_file(str(fine / "model.safetensors"))
    assert torch.equal(pretrained["conv1.weight"], tuned["conv1.weight"])  # frozen stem kept
    assert not torch.equal(pretrained["layer4.1.conv2.weight"], tuned["layer4.1.conv2.weight"])
    run_dirs = list((fine / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    inspect = subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(run_dirs[0])],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    history = [json.loads(line) for line in inspect.stdout.splitlines() if '"history"' in line]
    logged = json.dumps(history)
    for key in ("train/loss", "val/top1", "val/loss"):
        assert key in logged, key
    lr_steps = [h["history"]["item"]["_step"] for h in history if "lr/layer3" in h["history"]["item"]]
    assert lr_steps == [1, 2, 3, 4, 5, 6]  # every group's LR at every optimizer step


def _overhead_rates(stdout: str, model: str, unit: str) -> tuple[float, float, float]:
    """(plain rate, launcher rate, ratio) from the three lines under the setting's `model: ...` line."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"model: {model}")), None)
    assert start is not None, stdout[-2000:]
    plain = re.fullmatch(rf"plain loop +([\d.]+) {unit}   \(rounds: [\d., ]+\)", lines[start + 1])
    ours = re.fullmatch(rf"launcher +([\d.]+) {unit}   \(rounds: [\d., ]+\)", lines[start + 2])
    ratio = re.fullmatch(r"launcher / plain +([\d.]+)   \(target >= 0\.97\)", lines[start + 3])
    assert plain and ours and ratio, lines[start : start + 4]
    return float(plain[1]), float(ours[1]), float(ratio[1])


def test_overhead_benchmark_runs_and_reports_a_ratio(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_overhead.py"),
            "--steps=10",
            "--warmup=0",
            "--repeats=1",
            "--hidden=64",
            "--n_layer=1",
            "--n_embd=16",
            "--block_size=16",
            "--lm_batch_size=8",
            "--noise_floor",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "launcher / plain" in result.stdout
    for model, unit in (
        ("MLP 256-64-64-10", "steps/s"),
        ("char LM n_layer 1, n_embd 16, block 16, batch 8", "tokens/s"),
    ):
        plain, ours, ratio = _overhead_rates(result.stdout, model, unit)
        assert plain > 0 and ours > 0
        # the rates are printed to 0.05 and the ratio to 0.0005 of what was divided
        assert ratio == pytest.approx(ours / plain, abs=5e-4 + 0.05 * (1 + ours / plain) / plain + 1e-9)
    floors = re.findall(
        r"noise floor: plain / plain ([\d.]+) \(per-round ratios within ([\d.]+)% of 1\)", result.stdout
    )
    assert len(floors) == 2 and all(float(ratio) > 0 for ratio, _ in floors), result.stdout[-2000:]
