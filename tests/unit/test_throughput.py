"""Throughput (launcher/track/throughput.py): the pre-flight's FLOP count against a hand count for
an MLP (a real build_parts, in process), what counts as a token, the peak table, and
--profile_steps' validation."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from launcher import DataSpec, TrainConfig
from launcher.config import ConfigError
from launcher.recipe import Recipe
from launcher.track.throughput import peak_flops, tokens_in
from launcher.train.build import build_parts


def test_the_flops_per_sample_measured_at_preflight_match_a_hand_count_for_an_mlp(tmp_path):
    module = types.ModuleType("mlp_recipe")
    module.Config = TrainConfig
    module.build_model = lambda cfg: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    module.build_data = lambda cfg: DataSpec(train=[(torch.randn(8), i % 3) for i in range(16)])
    cfg = TrainConfig(batch_size=4, num_workers=0, output_dir=str(tmp_path / "run"), wandb_mode="disabled")
    parts = build_parts(cfg, Recipe("mlp_recipe", module), rank=0, world=1)
    # a matrix multiply of (1 x 8) by (8 x 16) is 8 x 16 multiply-adds: 2 FLOPs each
    # (biases and ReLU not counted)
    assert parts.checked.flops_per_sample == 2 * 8 * 16 + 2 * 16 * 3


def test_tokens_are_the_labelled_positions_else_the_attention_mask_else_every_id():
    ids = torch.ones(2, 5, dtype=torch.long)
    labels = torch.tensor([[1, 2, 3, -100, -100], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    assert tokens_in({"input_ids": ids, "labels": labels, "attention_mask": mask}) == 8
    assert tokens_in({"input_ids": ids, "attention_mask": mask}) == 7
    assert tokens_in({"input_ids": ids}) == 10
    assert tokens_in((ids, labels)) == 8  # an (inputs, targets) pair of token ids
    assert tokens_in((torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))) is None  # images and class labels
    assert tokens_in({"x": torch.rand(2, 5)}) is None


def test_the_peak_is_the_flag_or_unknown_off_gpus():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), peak_tflops=2.5) == 2.5e12


@pytest.mark.parametrize("steps", ["3:2", "0:4", "5", "a:b"])
def test_profile_steps_must_be_a_range_of_steps(steps):
    with pytest.raises(ConfigError, match="--profile_steps must be A:B"):
        TrainConfig(profile_steps=steps).validate()
