"""FSDP's pieces without a training run: which modules become shard units, what is refused, the
bytes per process the plan shows, and the evaluation in lockstep across two real gloo ranks
(a rank with fewer batches keeps gathering with the others, uncounted)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torchvision
from torch import nn

from conftest import spawn_or_fail
from launcher.config import ConfigError, TrainConfig
from launcher.runtime.parallel import memory_per_rank, optimizer_slots
from launcher.runtime.sharding import check_fsdp, describe_units, find_units
from recipes.char_lm import CharTransformer
from recipes.char_lm_tiny import Config as TinyLM


def names(units) -> list[str]:
    return [name for name, _ in units]


def test_the_default_units_are_the_repeated_blocks_innermost_first_then_by_size():
    lm = CharTransformer(TinyLM())
    # not mlp's Linear, GELU, Linear
    assert names(find_units(lm, None, min_params=0)) == ["blocks.0", "blocks.1"]
    resnet = torchvision.models.resnet18(num_classes=10)
    blocks = names(find_units(resnet, None, min_params=0))
    assert blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert describe_units(find_units(resnet, None, 0)) == "8 + root: layer1.0 ... layer4.1 (8) (BasicBlock)"
    # the size rule looks outside the blocks only: the stem and the head stay with the root
    assert names(find_units(resnet, None, min_params=2_000_000)) == blocks
    mlp = nn.Sequential(
        nn.Linear(100, 100), nn.ReLU(), nn.Sequential(nn.Linear(100, 300), nn.ReLU()), nn.Linear(300, 2)
    )
    assert names(find_units(mlp, None, min_params=10_000)) == ["2.0", "0"]  # 30,300 and 10,100 parameters
    assert find_units(mlp, None, min_params=0) == []  # nothing repeats: the root alone


def test_a_recipe_names_its_units_by_module_or_name_and_a_stranger_is_refused():
    lm = CharTransformer(TinyLM())
    assert names(find_units(lm, ["blocks.1.mlp", lm.blocks[0], lm], 0)) == ["blocks.1.mlp", "blocks.0"]
    with pytest.raises(ConfigError, match="shard_units returned a module that is not part of the model"):
        find_units(lm, [nn.Linear(2, 2)], 0)


@pytest.mark.parametrize(
    "changes, device, message",
    [
        (dict(mixed_precision="fp16"), "cuda", "use --mixed_precision=bf16"),
        (dict(ddp_comm_hook="fp16"), "cpu", "drop --ddp_comm_hook"),
        (dict(channels_last=True), "cpu", "drop --channels_last"),
        ({}, "mps", "runs on CUDA GPUs or CPU processes, not mps"),
    ],
)
def test_fsdp_refuses_what_it_cannot_do_instead_of_falling_back(changes, device, message):
    cfg = dataclasses.replace(TrainConfig(), data_parallel="fsdp", **changes)
    with pytest.raises(ConfigError, match=message):
        check_fsdp(cfg, torch.device(device))
    with pytest.raises(ConfigError, match="needs --data_parallel=fsdp"):
        check_fsdp(dataclasses.replace(TrainConfig(), async_checkpoint=True), torch.device("cpu"))
    check_fsdp(dataclasses.replace(TrainConfig(), data_parallel="fsdp"), torch.device("cpu"))  # accepted


def test_optimizer_state_and_bytes_per_process_under_ddp_and_fsdp():
    assert optimizer_slots(torch.optim.AdamW) == 2
    assert optimizer_slots(lambda groups: torch.optim.SGD(groups, momentum=0.9)) == 1
    assert optimizer_slots(torch.optim.SGD) == 0
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))  # weights (5, 3) and (2, 5), biases 5 and 2
    trained = list(model[1].parameters())
    ddp = memory_per_rank(model, trained, 2, world=4, sharded=False)
    assert ddp == {"params": 4 * 32, "grads": 4 * 12, "optimizer": 4 * 24}
    # four ranks: dim 0 split into ceil(n / 4) rows each, padded: 2 x 3 + 1 x 5 + 2 + 1 + 1 x 1 = 15 elements
    fsdp = memory_per_rank(model, trained, 2, world=4, sharded=True)
    assert fsdp == {"params": 4 * (6 + 2 + 5 + 1), "grads": 4 * 6, "optimizer": 4 * 12}


def _lockstep(rank: int, out: str) -> None:
    import torch.distributed as dist

    from launcher.data.batch import Batch
    from launcher.train.evaluation import in_lockstep

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)

    class Reducer:  # what evaluate_split gets: the accelerator's device and reduce
        device = torch.device("cpu")

        @staticmethod
        def reduce(tensor, op):
            dist.all_reduce(tensor)
            return tensor

    mine = [Batch(data=torch.full((1,), rank * 10 + i), size=1) for i in range(3 if rank == 0 else 1)]
    if rank == 1:
        mine.insert(0, Batch(data=None, errors=[{"reason": "unreadable"}]))
    seen = [
        (None if batch.data is None else int(batch.data), counted)
        for batch, counted in in_lockstep(mine, torch.tensor([-1]), Reducer())
    ]
    # the last collective's tensor outlives the group, as a run's end does (ReplicaChecksums)
    held = torch.zeros(1)
    dist.all_reduce(held)
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_evaluation_in_lockstep_runs_every_rank_as_often_as_the_longest_uncounted(tmp_path):
    spawn_or_fail(_lockstep, (str(tmp_path),))
    zero, one = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2))
    assert zero == [[0, True], [1, True], [2, True]]
    # rank 1: an unreadable batch (counted for its errors, then a filler forward), its batch, then fillers
    assert one == [[None, True], [-1, False], [10, True], [-1, False]]
