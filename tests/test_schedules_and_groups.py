"""LR schedules checked against torch's own schedulers; parameter groups and freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.config import ConfigError
from launcher.params import Group, Schedule, apply_freezing, assign_groups, build_optimizer, frozen_batchnorms
from launcher.schedules import warmup_cosine


@pytest.mark.parametrize("warmup, total, min_ratio", [(0, 20, 0.0), (5, 30, 0.0), (4, 25, 0.1)])
def test_warmup_cosine_matches_torch_linear_then_cosine(warmup, total, min_ratio):
    base = 0.5
    ours = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    fn = warmup_cosine(warmup, min_ratio)
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours, lambda s: fn(s, total))
    ref = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=total - warmup, eta_min=base * min_ratio)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(ref, start_factor=1 / (warmup + 1), total_iters=warmup)
        ref_sched = torch.optim.lr_scheduler.SequentialLR(ref, [linear, cosine], milestones=[warmup])
    else:
        ref_sched = cosine
    for _ in range(total):
        assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ours.step(), ref.step()
        ours_sched.step(), ref_sched.step()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_first_matching_group_wins_and_lrs_scale():
    model = Tiny()
    schedule = Schedule(groups=[Group("head", ["head.*"], lr_scale=10), Group("rest", ["*"], weight_decay=0.0)])
    groups = assign_groups(model, schedule, lr=0.01, weight_decay=0.1)
    assert groups[0].names == ["head.weight", "head.bias"]
    assert len(groups[1].names) == 6
    assert (groups[0].lr, groups[0].weight_decay, groups[1].lr, groups[1].weight_decay) == (0.1, 0.1, 0.01, 0.0)


def test_a_parameter_in_no_group_is_an_error():
    with pytest.raises(ConfigError, match="parameter 'stem.0.weight' matches no parameter group"):
        assign_groups(Tiny(), Schedule(groups=[Group("head", ["head.*"]), Group("body", ["body.*"])]), 0.1, 0.0)


def test_frozen_groups_get_no_grad_and_stay_out_of_the_optimizer():
    model = Tiny()
    groups = assign_groups(model, Schedule(groups=[Group("stem", ["stem.*"], frozen=True), Group("rest")]), 0.1, 0.0)
    apply_freezing(model, groups)
    optimizer = build_optimizer(Schedule(), groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable == {id(p) for n, p in model.named_parameters() if not n.startswith("stem")}
    assert [g["name"] for g in optimizer.param_groups] == ["rest"]
    assert frozen_batchnorms(model) == [model.stem[1]]


def test_everything_frozen_is_an_error():
    model = Tiny()
    groups = assign_groups(model, Schedule(groups=[Group("all", ["*"], frozen=True)]), 0.1, 0.0)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        build_optimizer(Schedule(), groups)
