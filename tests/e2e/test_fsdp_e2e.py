"""--data_parallel=fsdp end to end on CPU processes (gloo): the same losses as DDP, frozen
parameters untouched, one model.safetensors, async DCP checkpoints that survive a SIGKILL
mid-write and resume bitwise, and resharding onto 1 and 3 processes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, child_env, launcher, metrics, planted_pickle
from launcher.runtime import checkpoints

LM = "recipes/char_lm_tiny"
RESNET = "recipes/resnet_finetune_tiny"
# char LM: clipping on (max_grad_norm=1 in the recipe), EMA, checkpoints every 5 steps written in the
# background, evaluations every 10 steps on each process's first 2 batches of 8
LM_ARGS = [
    "--max_steps=20",
    "--log_every=1",
    "--ema_decay=0.9",
    "--checkpoint_every=5",
    "--eval_every=10",
    "--eval_batches=2",
]
# ResNet fine-tune: conv1, bn1, layer1-2 frozen, layer3 unfrozen at step 3; one epoch of 29 steps, its
# end checkpointed. No clipping: the sharded norm sums in another order (1e-6 relative), which this
# ReLU network amplifies past 1e-5 within 20 steps; the char LM covers clipping.
RESNET_ARGS = [
    "--epochs=1",
    "--max_steps=0",
    "--batch_size=24",
    "--log_every=1",
    "--max_grad_norm=0",
    "--unfreeze_step=3",
]
FROZEN = ("conv1.", "bn1.", "layer1.", "layer2.")


def losses(run_dir, key="train/loss") -> list[float]:
    return [m[key] for m in metrics(run_dir) if key in m]


@pytest.fixture(scope="module")
def lm(text_shards, tmp_path_factory):
    """The char LM under DDP and FSDP, 2 processes, 20 steps."""
    root = tmp_path_factory.mktemp("fsdp_lm")
    runs = {}
    for mode, extra in (("ddp", []), ("fsdp", ["--data_parallel=fsdp", "--async_checkpoint"])):
        runs[mode] = root / mode
        launcher(LM, f"--data_dir={text_shards}", f"--output_dir={runs[mode]}", *LM_ARGS, *extra, processes=2)
    return runs


@pytest.fixture(scope="module")
def resnet(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_resnet")
    runs = {}
    for mode in ("ddp", "fsdp"):
        runs[mode] = root / mode
        launcher(
            RESNET,
            f"--data_dir={digits}",
            f"--output_dir={runs[mode]}",
            *RESNET_ARGS,
            f"--data_parallel={mode}",
            processes=2,
        )
    return runs


@pytest.mark.lowest  # fully_shard on CPU processes needs torch >= 2.7, the floor
def test_fsdp_trains_the_char_lm_to_the_losses_of_ddp(lm):
    for key in ("train/loss", "val/loss", "val_ema/loss"):
        ddp, fsdp = losses(lm["ddp"], key), losses(lm["fsdp"], key)
        assert len(ddp) == len(fsdp) > 0 and max(abs(a - b) for a, b in zip(ddp, fsdp)) < 1e-5, key
    assert len(losses(lm["fsdp"])) == 20
    # the same 2 batches per process at each evaluation, each sample counted once
    for mode in ("ddp", "fsdp"):
        assert [(m["step"], m["val/samples"]) for m in metrics(lm[mode]) if "val/loss" in m] == [
            (10, 32),
            (20, 32),
        ]
    # The char LM's callback generates on every rank (each forward is a collective under FSDP).
    assert [m["step"] for m in metrics(lm["fsdp"]) if "val/generated" in m] == [10, 20]
    summary = json.loads((lm["fsdp"] / "summary.json").read_text())
    # each rank holds half of every parameter and of the AdamW state (first dimensions split in two)
    ddp_memory = json.loads((lm["ddp"] / "summary.json").read_text())["memory_per_process"]
    for sharded, whole in zip(summary["memory_per_process"], ddp_memory):
        assert 0.45 < sharded["params_mb"] / whole["params_mb"] < 0.55
        assert 0.45 < sharded["optimizer_mb"] / whole["optimizer_mb"] < 0.55
    assert "replicas_identical" not in summary and not (lm["fsdp"] / "replicas.json").exists()


def test_an_async_checkpoint_killed_mid_write_leaves_the_previous_one_and_resume_is_bitwise(
    lm, text_shards, tmp_path
):
    out = tmp_path / "killed"
    args = [
        LM,
        f"--data_dir={text_shards}",
        f"--output_dir={out}",
        *LM_ARGS,
        "--data_parallel=fsdp",
        "--async_checkpoint",
    ]
    env = dict(child_env(), LAUNCHER_TEST_KILL_DURING_SAVE="15")  # SIGKILL while step 15's shards are written
    killed = launcher(*args, processes=2, env=env, check=False)
    assert killed.returncode != 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # evaluated at 10
    assert names == [".tmp-step-00000015", "best.json", "step-00000005", "step-00000010"], names
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == 10
    assert (out / "checkpoints" / "step-00000010" / "sharded" / ".metadata").exists()
    resumed = launcher(*args, "--resume=auto", processes=2)
    assert "resumed from" in resumed.stdout and "step-00000010 at step 10" in resumed.stdout
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(lm["fsdp"] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["step"] for m in metrics(out) if "train/loss" in m] == list(range(1, 21))


def test_a_pickle_planted_in_an_fsdp_checkpoints_dcp_metadata_runs_nothing(lm, text_shards, tmp_path):
    """DCP's .metadata is a pickle: replaced by one that runs code (the manifest rewritten to match),
    the resume stops in one line and nothing runs."""
    import shutil

    out, marker = tmp_path / "planted", tmp_path / "ran"
    shutil.copytree(lm["fsdp"], out)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    (newest / "sharded" / ".metadata").write_bytes(planted_pickle(marker))
    checkpoints.write_manifest(str(newest))
    result = launcher(
        LM,
        f"--data_dir={text_shards}",
        f"--output_dir={out}",
        *LM_ARGS,
        "--max_steps=25",
        "--data_parallel=fsdp",
        "--resume=auto",
        check=False,
    )
    assert result.returncode == 2 and not marker.exists() and "Traceback" not in result.stderr
    assert (
        f"checkpoint {newest}/sharded: .metadata holds a disallowed type posix.system; it was not written by "
        "the launcher"
    ) in result.stderr.strip().splitlines()[-1]


def test_fsdp_fine_tunes_the_resnet_like_ddp_and_leaves_frozen_parameters_bit_identical(resnet, digits):
    ddp, fsdp = losses(resnet["ddp"]), losses(resnet["fsdp"])
    assert len(ddp) == len(fsdp) == 29 and max(abs(a - b) for a, b in zip(ddp, fsdp)) < 1e-5
    # DDP's rank 1 evaluates with rank 0's BatchNorm statistics of the step before plus its own last
    # update; FSDP gives every rank rank 0's (the exported ones): a sample or two may differ.
    assert abs(losses(resnet["ddp"], "val/top1")[-1] - losses(resnet["fsdp"], "val/top1")[-1]) < 0.01

    import torchvision
    from accelerate.utils import set_seed

    set_seed(0)  # the launcher seeds before build_model: these are the run's initial weights
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    exported = load_file(str(resnet["fsdp"] / "model.safetensors"))
    replicated = load_file(str(resnet["ddp"] / "model.safetensors"))
    assert exported.keys() == replicated.keys()
    assert all(torch.allclose(exported[k].double(), replicated[k].double(), atol=1e-4) for k in exported)
    model.load_state_dict(exported)  # strict: the unwrapped model's names and shapes, gathered whole
    frozen = [k for k in exported if k.startswith(FROZEN) and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(exported[k], initial[k]) for k in frozen)
    trained = [k for k in exported if k.startswith(("layer3.", "fc.")) and k.endswith("weight")]
    assert all(not torch.equal(exported[k], initial[k]) for k in trained)

    evaluated = launcher("evaluate", RESNET, f"--checkpoint={resnet['fsdp']}", f"--data_dir={digits}")
    assert f"{100 * losses(resnet['fsdp'], 'val/top1')[-1]:.2f}" in evaluated.stdout


@pytest.mark.parametrize("processes, batch_size, accumulation", [(1, 24, 2), (3, 16, 1)])
def test_a_two_process_fsdp_checkpoint_resumes_resharded_and_trains_on(
    resnet, digits, tmp_path, processes, batch_size, accumulation
):
    import shutil

    out = tmp_path / f"on{processes}"
    shutil.copytree(resnet["fsdp"], out)
    resumed = launcher(
        RESNET,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        *RESNET_ARGS,
        "--epochs=2",
        "--max_steps=33",
        f"--batch_size={batch_size}",
        "--data_parallel=fsdp",
        "--resume=auto",
        "--resume_changes=allow",
        processes=processes,
    )
    assert "step-00000029 at step 29, epoch 1" in resumed.stdout
    assert (
        f"grad_accum_steps 1 -> {accumulation} keeps the global batch of 48" in resumed.stdout
        or accumulation == 1
    )
    trained_on = [m for m in metrics(out) if "train/loss" in m and m["step"] > 29]
    assert [m["step"] for m in trained_on] == list(range(30, 34))
    assert all(0 < m["train/loss"] < 5 for m in trained_on)
    assert losses(out, "val/top1")[-1] > 0.2  # ten classes: it still predicts, after resharding


def test_fsdp_refuses_what_it_cannot_do_in_one_line(digits, tmp_path):
    refused = launcher(
        RESNET,
        f"--data_dir={digits}",
        f"--output_dir={tmp_path / 'x'}",
        "--data_parallel=fsdp",
        "--ddp_comm_hook=bf16",
        check=False,
    )
    assert (
        refused.returncode == 2
        and "--ddp_comm_hook compresses DDP's all-reduce" in refused.stderr.strip().splitlines()[-1]
    )
    refused = launcher(
        RESNET, f"--data_dir={digits}", f"--output_dir={tmp_path / 'y'}", "--async_checkpoint", check=False
    )
    assert refused.returncode == 2 and "it needs --data_parallel=fsdp" in refused.stderr


def test_a_ddp_checkpoint_is_refused_by_an_fsdp_run_naming_the_mode(resnet, digits, tmp_path):
    import shutil

    out = tmp_path / "ddp"
    shutil.copytree(resnet["ddp"], out)
    refused = launcher(
        RESNET,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        *RESNET_ARGS,
        "--epochs=2",
        "--data_parallel=fsdp",
        "--resume=auto",
        "--resume_changes=allow",
        check=False,
    )
    assert refused.returncode == 2
    assert "was written with --data_parallel=ddp, this run has --data_parallel=fsdp" in refused.stderr


def test_one_process_fsdp_with_activation_checkpointing_bf16_and_compile(text_shards, tmp_path):
    """A single process (its own 1-rank group): activation checkpointing recomputes the same
    losses; bf16 parameters train close to fp32 and export fp32 weights; compiled units match eager."""

    def run(name, *args, steps=4):
        out = tmp_path / name
        launcher(
            LM,
            f"--data_dir={text_shards}",
            f"--output_dir={out}",
            f"--max_steps={steps}",
            "--log_every=1",
            "--data_parallel=fsdp",
            *args,
        )
        return out

    eager = run("eager")
    recomputed = run("recomputed", "--activation_checkpointing")
    assert max(abs(a - b) for a, b in zip(losses(eager), losses(recomputed))) < 1e-6
    bf16 = run("bf16", "--mixed_precision=bf16")
    assert max(abs(a - b) for a, b in zip(losses(eager), losses(bf16))) < 0.05
    assert {t.dtype for t in load_file(str(bf16 / "model.safetensors")).values()} == {torch.float32}
    compiled = run("compiled", "--compile", steps=2)  # each block compiled (the evaluation compiles again)
    assert (
        len(losses(compiled)) == 2 and max(abs(a - b) for a, b in zip(losses(eager), losses(compiled))) < 1e-4
    )


def test_the_plan_shows_the_shard_units_and_the_bytes_per_process(text_shards):
    plan = launcher("plan", LM, f"--data_dir={text_shards}", "--data_parallel=fsdp").stdout
    assert "data parallel         fsdp, shard units 2 + root: blocks.0, blocks.1 (Block)" in plan
    line = next(line for line in plan.splitlines() if line.startswith("  memory per process"))
    assert line.index("fsdp over 1 process(es): params") < line.index("ddp: params")


def test_the_nonfinite_guard_skips_a_step_of_an_fsdp_run(digits, tmp_path):
    out = tmp_path / "nan"
    launcher(
        str(ROOT / "tests" / "recipes" / "nan_digits.py"),
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--nan_step=7",
        "--nonfinite=skip",
        "--max_steps=12",
        "--data_parallel=fsdp",
    )
    assert [m["train/skipped_steps"] for m in metrics(out) if "train/skipped_steps" in m][-1] == 1
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "model.safetensors")).values())


def test_the_fsdp_benchmark_measures_both_modes_through_bench_gpu(text_shards, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "fsdp.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_gpu.py",
            "--fsdp",
            "--fsdp_processes=2",
            "--fsdp_layers=2",
            "--fsdp_width=64",
            "--fsdp_block=16",
            "--fsdp_batch=2",
            "--fsdp_precision=no",
            "--steps=2",
            "--warmup=1",
            f"--data_dir={text_shards}",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    ddp, fsdp = report["rows"]
    assert (
        (ddp["mode"], fsdp["mode"]) == ("ddp", "fsdp") and ddp["steps_per_s"] > 0 and fsdp["steps_per_s"] > 0
    )
    assert report["ratios"]["state"] == pytest.approx(fsdp["state_mb"] / ddp["state_mb"])
    assert 0.45 < report["ratios"]["state"] < 0.6  # half of each tensor's rows, padded
    assert (
        f"params + grads + optimizer state {report['ratios']['state']:.3f} (target <= 0.55)" in result.stdout
    )
