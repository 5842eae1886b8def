"""Fine-tuning end to end (recipes/resnet_finetune_tiny): pretrained weights in, frozen parts kept
bit-identical, layer3 unfrozen at step 3 with its LR warming up, every group's LR logged each
step, resume on either side of the unfreeze, and two-process DDP across it."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from conftest import launcher, metrics
from launcher.optim.schedules import warmup_cosine

RECIPE = "recipes/resnet_finetune_tiny"
FROZEN = ("conv1.", "bn1.", "layer1.", "layer2.")  # the recipe's `frozen`, parameters and BN statistics
UNFREEZE_STEP, UNFREEZE_WARMUP = 3, 2  # the tiny variant's unfreeze_step, unfreeze_warmup_steps
SCHEDULE_STEPS = (1438 // 16) * 4  # digits train split // batch 16, x 4 epochs (max_steps stops at 6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    for module in model.modules():  # statistics that differ from a fresh model's, so a change shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / "pretrained.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path, {k: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def whole_run(digits, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "whole"
    result = launcher(
        RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        f"--weights={pretrained[0]}",
        "--checkpoint_every=2",
    )
    return out, result


def test_frozen_parts_stay_bit_identical_and_the_unfrozen_stage_trains(whole_run, pretrained):
    out, result = whole_run
    assert f"step {UNFREEZE_STEP}: training layer3 from now on" in result.stdout
    initial, final = pretrained[1], load_file(str(out / "model.safetensors"))
    for key, value in final.items():
        if key.startswith(FROZEN):
            assert torch.equal(value, initial[key]), key  # weights and BatchNorm running statistics
    for key in (
        "layer3.0.conv1.weight",
        "layer3.1.bn2.weight",
        "layer3.1.bn2.running_mean",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.running_var",
    ):
        assert not torch.equal(final[key], initial[key]), key


def test_every_groups_lr_is_logged_each_step_and_follows_the_schedule(whole_run):
    out, _ = whole_run
    lr_at, lr, decay = warmup_cosine(1), 1e-3, 0.5  # the tiny variant's warm-up; recipe lr, layer_decay
    records = [m for m in metrics(out) if "lr/head" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        used = record["step"] - 1  # the LR logged at step N is the one its update used
        base = lr_at(used, SCHEDULE_STEPS)
        warm = 0.0 if used < UNFREEZE_STEP else min(1.0, (used - UNFREEZE_STEP + 1) / (UNFREEZE_WARMUP + 1))
        expected = {
            "head": 10 * lr * base,
            "layer4": lr * decay * base,
            "layer3": lr * decay**2 * base * warm,
        }
        for name, value in expected.items():
            assert record[f"lr/{name}"] == pytest.approx(value, rel=1e-9, abs=1e-15), (record["step"], name)
            assert record[f"lr/{name}/no_decay"] == pytest.approx(value, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("step", [2, 4], ids=["before-unfreeze", "after-unfreeze"])
def test_resume_on_either_side_of_the_unfreeze_matches_the_uninterrupted_run(
    whole_run, digits, pretrained, tmp_path, step
):
    out, _ = whole_run
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    resumed = tmp_path / "resumed"
    result = launcher(
        RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={resumed}",
        f"--weights={pretrained[0]}",
        f"--resume={checkpoint}",
    )
    assert f"resumed from {checkpoint} at step {step}" in result.stdout
    expected = f"step {max(step, UNFREEZE_STEP)}: training layer3 from now on"
    assert expected in result.stdout
    a, b = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.lowest  # rebuilding DDP reaches into Accelerate 1.1's wrapper
def test_two_process_ddp_with_frozen_parts_keeps_replicas_identical_across_the_unfreeze(
    digits, pretrained, tmp_path
):
    out = tmp_path / "ddp"
    result = launcher(
        RECIPE, f"--data_dir={digits}", f"--output_dir={out}", f"--weights={pretrained[0]}", processes=2
    )
    assert "world size            2 process(es)" in result.stdout and "training layer3" in result.stdout
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas["parameter_checksums"]) == 2 and replicas["identical"] is True
    initial, final = pretrained[1], load_file(str(out / "model.safetensors"))
    assert torch.equal(final["layer1.0.conv1.weight"], initial["layer1.0.conv1.weight"])
    assert not torch.equal(final["layer3.0.conv1.weight"], initial["layer3.0.conv1.weight"])
