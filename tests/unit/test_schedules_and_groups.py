"""LR schedules checked against torch's own schedulers; parameter groups, freezing, layer decay,
unfreezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.config import ConfigError
from launcher.optim.groups import (
    Group,
    Schedule,
    apply_freezing,
    assign_groups,
    build_optimizer,
    frozen_batchnorms,
    layer_decay,
    lr_multipliers,
)
from launcher.optim.schedules import constant, unfreeze_warmup, warmup_cosine


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
    schedule = Schedule(
        groups=[Group("head", ["head.*"], lr_scale=10), Group("rest", ["*"], weight_decay=0.0)]
    )
    groups = assign_groups(model, schedule, lr=0.01, weight_decay=0.1)
    assert groups[0].names == ["head.weight", "head.bias"]
    assert len(groups[1].names) == 6
    assert (groups[0].lr, groups[0].weight_decay, groups[1].lr, groups[1].weight_decay) == (
        0.1,
        0.1,
        0.01,
        0.0,
    )


def test_a_parameter_in_no_group_is_an_error():
    with pytest.raises(ConfigError, match="parameter 'stem.0.weight' matches no parameter group"):
        assign_groups(
            Tiny(), Schedule(groups=[Group("head", ["head.*"]), Group("body", ["body.*"])]), 0.1, 0.0
        )


def test_frozen_groups_get_no_grad_and_stay_out_of_the_optimizer():
    model = Tiny()
    groups = assign_groups(
        model, Schedule(groups=[Group("stem", ["stem"], frozen=True), Group("rest")]), 0.1, 0.0
    )
    apply_freezing(groups, step=0)
    optimizer = build_optimizer(Schedule(), groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert (
        in_optimizer == trainable == {id(p) for n, p in model.named_parameters() if not n.startswith("stem")}
    )
    assert [g["name"] for g in optimizer.param_groups] == ["rest"]
    assert frozen_batchnorms(model, groups) == [model.stem[1]]


def test_a_module_name_pattern_covers_its_parameters_and_only_them():
    model = nn.Sequential()
    model.add_module("layer1", nn.Linear(2, 2))
    model.add_module("layer10", nn.Linear(2, 2))
    groups = assign_groups(model, Schedule(groups=[Group("one", ["layer1"]), Group("rest")]), 0.1, 0.0)
    assert groups[0].names == ["layer1.weight", "layer1.bias"]
    assert groups[1].names == ["layer10.weight", "layer10.bias"]


def test_norm_and_bias_parameters_get_no_weight_decay_in_a_sibling_group():
    model = Tiny()
    schedule = Schedule(
        groups=[Group("stem", ["stem"], frozen=True), Group("head", ["head"], lr_scale=10), Group("rest")],
        no_decay_norm_bias=True,
    )
    groups = {pg.name: pg for pg in assign_groups(model, schedule, lr=0.01, weight_decay=0.1)}
    assert list(groups) == ["stem", "head", "head/no_decay", "rest", "rest/no_decay"]  # frozen: not split
    assert groups["head/no_decay"].names == ["head.bias"] and groups["head"].names == ["head.weight"]
    assert groups["rest/no_decay"].names == ["body.bias"]
    assert (groups["head"].weight_decay, groups["head/no_decay"].weight_decay) == (0.1, 0.0)
    assert groups["head/no_decay"].lr == groups["head"].lr == pytest.approx(0.1)
    assert groups["stem"].names == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]


def test_layer_decay_scales_each_stage_below_the_head():
    stages = layer_decay([Group("c", ["c"]), Group("b", ["b"], lr_scale=2.0), Group("a", ["a"])], 0.5)
    assert [(g.name, g.lr_scale) for g in stages] == [("c", 0.5), ("b", 0.5), ("a", 0.125)]
    with pytest.raises(ConfigError, match="layer decay must be in"):
        layer_decay(stages, 1.5)


def unfreezing_model():
    torch.manual_seed(0)
    model = Tiny()
    schedule = Schedule(
        groups=[
            Group("stem", ["stem"], frozen=True, unfreeze_epoch=1, unfreeze_warmup_steps=2),
            Group("rest"),
        ]
    )
    groups = assign_groups(model, schedule, lr=0.1, weight_decay=0.5, steps_per_epoch=3)
    return model, groups


def train_step(model, optimizer):
    x = torch.randn(4, 1, 3, 3)
    loss = model.head(model.body(model.stem(x).mean((2, 3)))).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_scheduled_group_is_in_the_optimizer_from_the_start_but_unchanged_until_it_unfreezes():
    model, groups = unfreezing_model()
    apply_freezing(groups, step=0)
    optimizer = build_optimizer(Schedule(), groups)
    assert [g["name"] for g in optimizer.param_groups] == ["stem", "rest"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        assert apply_freezing(groups, step) == []
        train_step(model, optimizer)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == name.startswith("stem"), name  # weight decay included
        assert (param in optimizer.state) == (not name.startswith("stem"))
    assert frozen_batchnorms(model, groups) == [model.stem[1]]
    assert apply_freezing(groups, step=3) == ["stem"]  # epoch 1 = step 3
    assert frozen_batchnorms(model, groups) == []
    train_step(model, optimizer)
    assert not torch.equal(model.stem[0].weight, before["stem.0.weight"])


def test_batchnorm_of_a_frozen_group_can_keep_updating_its_statistics():
    model = Tiny()
    groups = assign_groups(
        model,
        Schedule(groups=[Group("stem", ["stem"], frozen=True, keep_norm_stats=False), Group("rest")]),
        0.1,
        0.0,
    )
    apply_freezing(groups, step=0)
    assert frozen_batchnorms(model, groups) == []


def test_an_unfrozen_groups_lr_matches_torchs_constant_then_linear_warmup():
    start, warmup, base = 6, 3, 0.2
    ours = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    multiplier = unfreeze_warmup(start, warmup)
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours, multiplier)
    ref = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    frozen = torch.optim.lr_scheduler.ConstantLR(ref, factor=0.0, total_iters=start)
    rise = torch.optim.lr_scheduler.LinearLR(ref, start_factor=1 / (warmup + 1), total_iters=warmup)
    ref_sched = torch.optim.lr_scheduler.SequentialLR(ref, [frozen, rise], milestones=[start])
    for _ in range(start + warmup + 4):
        assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ours.step(), ref.step()
        ours_sched.step(), ref_sched.step()


def test_each_groups_lr_is_the_schedule_times_its_unfreeze_warmup():
    model, groups = unfreezing_model()
    apply_freezing(groups, step=0)
    optimizer = build_optimizer(Schedule(), groups)
    lr_at = warmup_cosine(2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multipliers(groups, lr_at, total_steps=12))
    for step in range(12):
        stem, rest = (g["lr"] for g in optimizer.param_groups)
        assert rest == pytest.approx(0.1 * lr_at(step, 12))
        assert stem == pytest.approx(0.0 if step < 3 else 0.1 * lr_at(step, 12) * min(1, (step - 2) / 3))
        optimizer.step()
        scheduler.step()
    assert lr_multipliers(groups, constant(), 12)[1](0) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unfreeze_epoch=1), "sets unfreeze_epoch but is not frozen"),
        (dict(frozen=True, unfreeze_epoch=1, unfreeze_step=4), "sets both unfreeze_epoch and unfreeze_step"),
        (dict(frozen=True, unfreeze_step=-1), "unfreeze_step must be >= 0"),
        (dict(patterns="layer1"), "patterns must be a list of strings"),
    ],
)
def test_bad_groups_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Group("g", **kwargs)


def test_everything_frozen_at_the_start_is_an_error():
    model = Tiny()
    groups = assign_groups(
        model, Schedule(groups=[Group("all", ["*"], frozen=True, unfreeze_step=5)]), 0.1, 0.0
    )
    with pytest.raises(ConfigError, match="every parameter is frozen at the start"):
        build_optimizer(Schedule(), groups)


def test_everything_but_the_head_frozen():
    model = Tiny()
    groups = assign_groups(
        model, Schedule(groups=[Group("head", ["head"]), Group("body", ["*"], frozen=True)]), 0.1, 0.0
    )
    apply_freezing(groups, step=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert [g["name"] for g in build_optimizer(Schedule(), groups).param_groups] == ["head"]
