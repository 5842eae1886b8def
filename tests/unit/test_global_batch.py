"""The global-batch arithmetic (launcher/global_batch.py), against the sums the plan, the loader, a
resume on another number of processes and the report each used to write out themselves."""

from __future__ import annotations

import itertools

import pytest
import torch

from launcher.config import TrainConfig
from launcher.data.loader import SplitLoader
from launcher.data.spec import Synthetic
from launcher.global_batch import GlobalBatch

SIZES = list(itertools.product([1, 3, 8], [1, 2, 3], [1, 4]))  # batch_size, world_size, grad_accum_steps


@pytest.mark.parametrize("batch_size, world_size, grad_accum_steps", SIZES)
def test_each_count_is_the_product_the_callers_computed(batch_size, world_size, grad_accum_steps):
    batch = GlobalBatch(batch_size, world_size, grad_accum_steps)
    assert batch.samples == batch_size * world_size * grad_accum_steps
    assert batch.micro_batch_samples == batch_size * world_size
    for total in (0, 1, 47, 100, 1000):
        steps = total // (batch_size * world_size * grad_accum_steps)  # the loader's whole optimizer steps
        assert batch.steps_in_samples(total) == steps
        assert batch.micro_batches_in_steps(steps) == steps * grad_accum_steps  # its batches_per_epoch
        # the plan's
        assert batch.steps_in_micro_batches(steps * grad_accum_steps + grad_accum_steps - 1) == steps
        assert (
            batch.samples_in_micro_batches(steps * grad_accum_steps)
            == steps * grad_accum_steps * batch_size * world_size
        )
        assert batch.samples_in_steps(steps) == steps * batch.samples  # the summary's samples_seen


def test_it_reads_a_config_or_a_saved_one_and_says_itself_as_the_plan_did():
    assert GlobalBatch.of(TrainConfig(batch_size=4, grad_accum_steps=3), 2) == GlobalBatch(4, 2, 3)
    assert GlobalBatch.of({"batch_size": 4}, 5) == GlobalBatch(4, 5, 1)  # a config saved before accumulation
    assert str(GlobalBatch(4, 2, 3)) == "4 per device x 2 processes x 3 accumulation = 24"


@pytest.mark.parametrize(
    "then, world_size, batch_size, accumulation",
    [
        ((32, 1, 4), 2, 32, 2),  # 32 x 1 x 4 = 32 x 2 x 2
        ((8, 4, 1), 2, 8, 2),
        ((8, 2, 3), 3, 8, 2),
        ((8, 2, 3), 4, 8, None),  # 48 is no multiple of 32
        ((8, 2, 3), 6, 4, 2),
        ((5, 2, 1), 4, 5, None),
    ],
)
def test_the_same_global_batch_on_another_world_size(then, world_size, batch_size, accumulation):
    old = GlobalBatch(*then)
    now = old.on(world_size, batch_size)
    per_step = batch_size * world_size  # what run_config.keep_global_batch computed
    expected = None if old.samples % per_step else old.samples // per_step
    assert expected == accumulation
    assert (now.grad_accum_steps if now else None) == accumulation
    if now:
        assert (now.samples, now.world_size, now.batch_size) == (old.samples, world_size, batch_size)


@pytest.mark.parametrize("world, accumulation", [(1, 1), (2, 3), (3, 2)])
def test_the_loaders_epoch_is_whole_optimizer_steps_and_the_rest_is_dropped(world, accumulation):
    source = Synthetic(torch.zeros(2), 100, None)
    splits = [
        SplitLoader(
            source,
            rank=rank,
            world=world,
            seed=0,
            batch_size=4,
            num_workers=0,
            training=True,
            grad_accum_steps=accumulation,
        )
        for rank in range(world)
    ]
    steps = 100 // (4 * world * accumulation)
    for split in splits:
        assert split.batches_per_epoch == steps * accumulation
        assert split.planned_dropped(0) == 100 - steps * accumulation * 4 * world
