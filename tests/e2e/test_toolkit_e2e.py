"""The toolkit through the real CLI: the two new recipes learn, EMA/MixUp/plateau resume exactly,
early stopping stops every rank, and `evaluate` / `predict` read a trained run."""

from __future__ import annotations

import json
import math
import tarfile

import pytest
from safetensors.torch import load_file

from conftest import MLP_RECIPE, launcher, metrics


def val_losses(run_dir, key="val/loss") -> list[float]:
    return [m[key] for m in metrics(run_dir) if key in m]


def test_convnet_digits_learns_with_adam_and_steplr_stepped_per_epoch(digits, tmp_path):
    out = tmp_path / "convnet"
    result = launcher(
        "recipes/convnet_digits_tiny",
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--grad_accum_steps=2",
        "--batch_size=16",
    )
    assert "optimizer             Adam()" in result.stdout
    assert "StepLR(step_size=1, gamma=0.5, interval='epoch')" in result.stdout
    losses = val_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] < math.log(10) + 0.5
    steps_per_epoch = 1438 // 32  # 16 per device x 2 accumulation
    for record in metrics(out):
        if "lr/all" in record:  # the LR used by this step's update: 2e-3 x 0.5^(its epoch)
            epoch = (record["step"] - 1) // steps_per_epoch
            assert record["lr/all"] == pytest.approx(2e-3 * 0.5**epoch), record


def test_alexnet_learns_on_an_image_folder_with_the_standard_presets(digits, tmp_path):
    out = tmp_path / "alexnet"
    result = launcher(
        "recipes/alexnet_folder_tiny", f"--data_dir={digits / 'folder'}", f"--output_dir={out}", timeout=600
    )
    assert "input (N, 3, 64, 64) -> output (N, 10)" in result.stdout
    assert "1438 samples (map-style dataset, split by DistributedSampler)" in result.stdout
    losses = val_losses(out)
    assert len(losses) == 2 and losses[1] < losses[0] - 0.05


REGULARISED = [
    "--ema_decay=0.9",
    "--mixup_alpha=0.4",
    "--cutmix_alpha=1.0",
    "--label_smoothing=0.1",
    "--optimizer=sgd",
    "--nesterov=True",
    "--lr=0.05",
    "--lr_schedule=plateau",
    "--lr_patience=0",
    "--lr_gamma=0.5",
    "--epochs=3",
    "--num_workers=2",
]


def step_lrs(run_dir) -> dict[int, float]:
    """The LR each optimizer step used, as the run logged it."""
    return {m["step"]: m["lr/all"] for m in metrics(run_dir) if "lr/all" in m}


def plateau_lrs(run_dir) -> dict[int, float]:
    """The LR each step should have used: torch's ReduceLROnPlateau (0.05, x0.5, patience 0) fed
    the run's own val/loss after each evaluation. Whether a plateau comes, and when, depends on
    the losses (and so on torch's version); that the LR follows them does not."""
    import torch

    evaluations = [(m["step"], m["val/loss"]) for m in metrics(run_dir) if "val/loss" in m]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=0)
    expected, lr, done = {}, 0.05, 0
    for step in sorted(step_lrs(run_dir)):
        while done < len(evaluations) and evaluations[done][0] < step:  # evaluated before this step
            reference.step(evaluations[done][1])
            lr, done = optimizer.param_groups[0]["lr"], done + 1
        expected[step] = pytest.approx(lr)
    return expected


@pytest.mark.lowest  # torch 2.7's ReduceLROnPlateau and AveragedModel; torchvision 0.22's MixUp
def test_ema_mixup_and_plateau_resume_exactly_where_they_stopped(digits, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={whole}", *REGULARISED)
    assert (
        "SGD(momentum=0.9, nesterov=True)" in result.stdout and "Plateau(metric='val/loss'" in result.stdout
    )
    assert "EMA decay 0.9 (evaluated as val_ema/*); MixUp alpha 0.4; CutMix alpha 1.0" in result.stdout
    assert len(val_losses(whole, "val_ema/loss")) == 3 and (whole / "model_ema.safetensors").is_file()
    assert step_lrs(whole) == plateau_lrs(whole)
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={split}", *REGULARISED, "--max_steps=130")
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={split}", *REGULARISED, "--resume=auto")
    assert step_lrs(split) == step_lrs(whole)
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert all((a[k] == b[k]).all() for k in a), name
    assert val_losses(split, "val_ema/loss")[-1] == val_losses(whole, "val_ema/loss")[-1]


@pytest.mark.lowest  # collectives on gloo in torch 2.7
def test_early_stopping_stops_every_rank_together(digits, tmp_path):
    out = tmp_path / "early"
    result = launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--epochs=6",
        "--lr=0",
        "--early_stop_patience=2",
        "--best_metric=val/loss",
        "--best_mode=min",
        processes=2,
    )
    summary = json.loads((out / "summary.json").read_text())
    steps_per_epoch = 1438 // 32
    assert summary["stopped_early"] is True and summary["steps"] == 3 * steps_per_epoch  # best at 1, 2 more
    assert (
        f"early stop at step {3 * steps_per_epoch}: val/loss has not improved for 2 evaluations"
        in result.stdout
    )
    assert len(val_losses(out)) == 3


def test_evaluate_and_predict_read_a_trained_run(digits, tmp_path):
    out = tmp_path / "run"
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--epochs=2")
    trained = metrics(out)[-1]
    result = launcher("evaluate", MLP_RECIPE, f"--data_dir={digits}", f"--checkpoint={out}")
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["val/top1"] == pytest.approx(trained["val/top1"]) and report["val/samples"] == 359
    assert f"top-1  {100 * trained['val/top1']:.2f} %" in result.stdout
    confusion = report["confusion"]
    assert sum(map(sum, confusion)) == 359
    assert report["per_class_accuracy"][3] == pytest.approx(confusion[3][3] / sum(confusion[3]))
    assert (out / "evaluation" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = launcher(
        "evaluate",
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--checkpoint={out}",
        f"--out={tmp_path / 'eval2'}",
        processes=2,
    )
    assert json.loads((tmp_path / "eval2" / "evaluation.json").read_text())["val/top1"] == pytest.approx(
        report["val/top1"]
    ), two.stdout

    images = tmp_path / "images"
    images.mkdir()
    labels = {}
    with tarfile.open(next((digits / "val").glob("*.tar"))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(members)[:80]:
            if name.endswith(".png"):
                key = name[:-4]
                (images / name).write_bytes(tar.extractfile(members[name]).read())
                labels[name] = tar.extractfile(members[key + ".cls"]).read().decode()
    (images / "broken.png").write_bytes(b"not a png")
    predictions = tmp_path / "predictions.jsonl"
    result = launcher(
        "predict",
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--checkpoint={out}",
        str(images),
        "--top_k=3",
        f"--out={predictions}",
    )
    assert f"skipped unreadable image {images / 'broken.png'}" in result.stderr
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == len(labels) and result.stdout == ""  # the predictions are in --out
    correct = 0
    for row in rows:
        probabilities = [t["probability"] for t in row["top"]]
        assert (
            len(row["top"]) == 3
            and probabilities == sorted(probabilities, reverse=True)
            and sum(probabilities) <= 1
        )
        correct += row["top"][0]["class"] == labels[row["input"].rsplit("/", 1)[-1]]
    assert correct / len(rows) >= trained["val/top1"] - 0.15  # the trained model's accuracy, on these images


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["evaluate", MLP_RECIPE, "--checkpoint=/nonexistent/model.safetensors"],
            "weights file /nonexistent/model.safetensors not found",
        ),
        (["predict", MLP_RECIPE, "--checkpoint={out}"], "predict needs inputs"),
        (
            ["predict", MLP_RECIPE, "--checkpoint={out}", "/nonexistent.png"],
            "/nonexistent.png does not exist",
        ),
        (
            [MLP_RECIPE, "--mixup_alpha=0.2", "--loss=nll"],
            "MixUp/CutMix make soft targets, which --loss=nll cannot take",
        ),
        (
            ["recipes/resnet_finetune_tiny", "--weights={out}", "--weight_init=xavier_uniform"],
            "would overwrite the loaded --weights",
        ),
        (
            [MLP_RECIPE, "--optimizer=lamb"],
            "--optimizer expects one of adamw, adam, sgd, rmsprop, adagrad, got 'lamb'",
        ),
        ([MLP_RECIPE, "--ema_decay=1.5"], "--ema_decay must be in [0, 1)"),
    ],
)
def test_toolkit_mistakes_are_one_line_and_exit_2(args, message, digits, tmp_path):
    out = tmp_path / "trained"
    args = [a.format(out=out) for a in args] + [f"--data_dir={digits}"]
    result = launcher(*args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
