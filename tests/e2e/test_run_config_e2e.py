"""A run's own config, everywhere: one tiny run (--hidden=32, 4 steps) resumed, evaluated and
predicted with no model or data flags, refused when a resume changes its model, and re-run from
its config.json to bitwise the same weights."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from conftest import MLP_RECIPE, launcher, metrics


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_config") / "run"
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--hidden=32", "--max_steps=4")
    return out


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_evaluate_and_predict_build_the_model_and_data_from_the_runs_config(run, digits, tmp_path):
    evaluated = launcher("evaluate", MLP_RECIPE, f"--checkpoint={run}", f"--out={tmp_path / 'eval'}")
    top1 = [m["val/top1"] for m in metrics(run) if "val/top1" in m][-1]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["val/samples"] == 359 and report["val/top1"] == pytest.approx(top1), evaluated.stdout
    image = tmp_path / "digit.png"
    with tarfile.open(next((digits / "val").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        image.write_bytes(tar.extractfile(member).read())
    predicted = launcher("predict", run / "checkpoints" / "step-00000004", image, "--top_k=1")  # no RECIPE
    assert predicted.stdout.startswith(f"{image}: ") and predicted.stdout.count("%") == 1
    refused = one_line_error(launcher("evaluate", f"--checkpoint={run}", "--hidden=64", check=False))
    assert refused == (
        f"launcher: error: checkpoint {run} does not fit mlp_digits's model (1.weight is (32, 192) in "
        "the checkpoint, (64, 192) in the model; 1.bias (32,) vs (64,); 3.weight (10, 32) vs (10, 64)); "
        "it was trained with --hidden=32 (here 64): drop the flags that change the model"
    )


def test_a_resume_takes_the_checkpoints_config_and_refuses_a_changed_model(run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    checkpoint = out / "checkpoints" / "step-00000004"
    refused = launcher(
        MLP_RECIPE, f"--output_dir={out}", "--resume=auto", "--hidden=64", "--log_every=1", check=False
    )
    assert one_line_error(refused) == (
        f"launcher: error: checkpoint {checkpoint} was trained otherwise: "
        "--hidden=64 differs from the checkpoint's 32; drop it to resume as trained, "
        "or pass --resume_changes=allow to resume with it anyway"
    )
    config = (out / "config.json").read_text()
    unfit = launcher(
        MLP_RECIPE,
        f"--output_dir={out}",
        "--resume=auto",
        "--hidden=64",
        "--resume_changes=allow",
        check=False,
    )
    assert one_line_error(unfit).startswith(
        f"launcher: error: checkpoint {checkpoint} does not fit the model "
        "(1.weight is (32, 192) in the checkpoint, (64, 192) in the model"
    )
    assert (out / "config.json").read_text() == config  # refused before anything is written
    # The run in place of RECIPE, no model or data flag: the checkpoint's; a neutral flag applies;
    # an allowed change too.
    resumed = launcher(
        out, "--resume=auto", "--max_steps=6", "--log_every=1", "--lr=0.006", "--resume_changes=allow"
    )
    assert f"resumed from {checkpoint} at step 4" in resumed.stdout
    assert "note: --resume_changes=allow: --lr=0.006 differs from the checkpoint's 0.003" in resumed.stdout
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden"], saved["lr"], saved["log_every"], saved["data_dir"]) == (
        32,
        0.006,
        1,
        json.loads(config)["data_dir"],
    )
    assert [m["step"] for m in metrics(out) if "train/loss" in m][-2:] == [5, 6]


def test_a_runs_config_json_reruns_it_to_bitwise_the_same_weights(run, tmp_path):
    again = tmp_path / "again"
    launcher(f"--config={run / 'config.json'}", f"--output_dir={again}")
    assert (again / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["hidden"] == 32
