"""A checkpoint's training state without pickle (launcher/runtime/state_files.py): what it writes
restores bitwise what Accelerate's save_state/load_state restored, and a pickle planted in any file
of a DDP or an FSDP checkpoint runs nothing: the load is a one-line error."""

from __future__ import annotations

import copy
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from conftest import Planted, planted_pickle
from launcher.config import ConfigError
from launcher.optim.regularization import EMA
from launcher.optim.schedules import Plateau
from launcher.runtime import checkpoints, sharding, state_files


def same(a, b) -> bool:
    """Equal to the bit, types included (a tensor's dtype, shape and strides too)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and torch.equal(
                a.detach().contiguous().flatten().view(torch.uint8),
                b.detach().contiguous().flatten().view(torch.uint8),
            )
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    return a == b


class Multiplier:
    """A multiplier object: LambdaLR keeps its __dict__ (functions give None)."""

    def __init__(self):
        self.scale, self.pair, self.nothing = 0.5, (1, 2.5), None

    def __call__(self, step):
        return self.scale


def test_values_round_trip_through_json_and_safetensors_bitwise(tmp_path):
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    shared = torch.arange(6.0)
    value = {
        "floats": [0.1, -0.0, float("inf"), float("-inf"), 1e-310, 2**53 + 1],
        "pair": (0.9, 0.999),
        "keys": {0: {"step": torch.tensor(3.0), "exp_avg": channels_last}, (1, "a"): None},
        "tagged": {"__tuple__": "a dict whose key is a tag"},
        "bool": True,
        "none": None,
        "text": "é",
        "tied": [shared, shared[:3]],
        "gaps": shared[::2],
        "permuted": torch.randn(3, 4).t(),
        "big": 2**70,
        "bf16": torch.randn(4, dtype=torch.bfloat16),
    }
    state_files.write_tree(str(tmp_path / "tree"), value, "a test value")
    back = state_files.read_tree(str(tmp_path / "tree"))
    gaps = back.pop("gaps")  # a view with gaps comes back contiguous, its values the same
    assert gaps.is_contiguous() and torch.equal(gaps, value.pop("gaps"))
    assert same(back, value)
    assert back["keys"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert same(float("nan"), float("nan")) and not same(0.0, -0.0)
    with pytest.raises(ConfigError, match=r"the state of X\.f is a function; a checkpoint keeps tensors"):
        state_files.write_tree(str(tmp_path / "bad"), {"f": same}, "the state of X")


def test_scheduler_optimizer_scaler_and_plateau_states_round_trip_bitwise(tmp_path):
    model = nn.Linear(3, 2)
    adamw, sgd = (
        torch.optim.AdamW(model.parameters(), lr=0.01),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    )
    for optimizer in (adamw, sgd):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [Multiplier()])
        for _ in range(3):
            model(torch.randn(4, 3)).square().sum().backward()
            optimizer.step()
            scheduler.step()
        for name, state in (("optimizer", optimizer.state_dict()), ("scheduler", scheduler.state_dict())):
            state_files.write_tree(str(tmp_path / name), state, name)
            assert same(state_files.read_tree(str(tmp_path / name)), state), name
        assert scheduler.state_dict()["lr_lambdas"] == [{"scale": 0.5, "pair": (1, 2.5), "nothing": None}]
    plateau = Plateau(patience=0)
    plateau.after_evaluation({"val/loss": 1.0})
    plateau.after_evaluation({"val/loss": 2.0})  # the factor drops: best, counters and the multiplier change
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for name, state in (("plateau", plateau.state_dict()), ("scaler", scaler.state_dict())):
        state_files.write_tree(str(tmp_path / name), state, name)
        assert same(state_files.read_tree(str(tmp_path / name)), state), name


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3)


def test_random_states_round_trip_bitwise(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    states = state_files.random_states(torch.device("cpu"))
    state_files.write_tree(str(tmp_path / "rng"), states, "random states")
    expected = draws()
    state_files.restore_random_states(state_files.read_tree(str(tmp_path / "rng")), torch.device("cpu"))
    assert same(draws(), expected)


# ---- against Accelerate: the same objects restored, file formats apart ------------------------------------


def build_ddp(seed: int = 0):
    """As the trainer registers them under DDP: the model and optimizer prepared, the LR scheduler,
    the plateau schedule and the EMA registered for checkpointing."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    plateau = Plateau(patience=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1 / (step + 1)])
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler, plateau, ema)
    parts = dict(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        plateau=plateau,
        ema=ema,
    )
    return parts


def train(parts, steps: int) -> None:
    acc, model = parts["accelerator"], parts["model"]
    for _ in range(steps):
        with acc.accumulate(model):
            acc.backward(model(torch.randn(5, 4)).square().mean())
            parts["optimizer"].step()
            parts["optimizer"].zero_grad()
        parts["scheduler"].step()
        parts["ema"].update_parameters(model)
        parts["plateau"].after_evaluation({"val/loss": float(torch.rand(()))})


def restored(parts) -> dict:
    """Everything a load restores (copied), then the next draws of every generator."""
    return copy.deepcopy(
        {
            "model": parts["model"].state_dict(),
            "optimizer": parts["optimizer"].state_dict(),
            "scheduler": parts["scheduler"].state_dict(),
            "plateau": parts["plateau"].state_dict(),
            "ema": parts["ema"].state_dict(),
            "step": parts["accelerator"].step,
            "draws": draws(),
        }
    )


def test_the_state_files_restore_bitwise_what_accelerates_save_state_restored(tmp_path):
    parts = build_ddp()
    train(parts, 3)
    acc = parts["accelerator"]
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    acc.save_state(str(tmp_path / "accelerate"))
    (tmp_path / "ours").mkdir()
    state_files.write(acc, str(tmp_path / "ours"))
    assert not [name for name in os.listdir(tmp_path / "ours") if name.endswith(state_files.PICKLED_SUFFIXES)]
    train(parts, 2)
    acc.load_state(str(tmp_path / "accelerate"))
    theirs = restored(parts)
    train(parts, 2)
    state_files.read(acc, str(tmp_path / "ours"))
    ours = restored(parts)
    assert ours["step"] == 3 and ours["plateau"]["factor"] < 1
    for key in theirs:
        assert same(ours[key], theirs[key]), key


# ---- planted pickles ------------------------------------------------------------------------------


def planted_copies(checkpoint: str, tmp_path, names: list[str]):
    """For each file name: a copy of the checkpoint with that file replaced by a planted pickle
    (manifest rewritten, so the checkpoint looks intact), and the marker the pickle would create."""
    for name in names:
        copy = tmp_path / f"planted-{name.replace('/', '-')}" / os.path.basename(checkpoint)
        shutil.copytree(checkpoint, copy)
        marker = tmp_path / f"ran-{name.replace('/', '-')}"
        (copy / name).write_bytes(planted_pickle(marker))
        checkpoints.write_manifest(str(copy))
        if name != checkpoints.STATE_FILE:  # a trainer_state.json that is no JSON fails the check itself
            assert checkpoints.verify(str(copy)) is None
        yield name, str(copy), marker


def assert_refused(load, path: str, marker, match: str = "") -> str:
    with pytest.raises(ConfigError, match=match) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message and path in message, message
    assert not marker.exists(), f"the planted pickle ran ({message})"
    return message


def test_the_planted_pickle_runs_when_unpickled(tmp_path):
    """The control: what the tests below plant does run code under pickle.load."""
    pickle.loads(planted_pickle(tmp_path / "ran"))
    assert (tmp_path / "ran").exists()


def test_a_pickle_planted_in_any_file_of_a_ddp_checkpoint_runs_nothing(tmp_path):
    parts = build_ddp()
    train(parts, 2)
    path = checkpoints.save(
        parts["accelerator"], str(tmp_path / "run"), {"step": 2, "epoch": 0}, {"epoch": 0}
    ).finish()
    files = sorted(os.listdir(path))
    assert {
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "registered-0.json",
        "registered-1.json",
        "registered-2.json",
        "registered-2.safetensors",
        "random-states-0.json",
        "random-states-0.safetensors",
        state_files.INDEX_FILE,
        "rank-0.json",
        checkpoints.STATE_FILE,
    } <= set(files)
    load = lambda p: checkpoints.load(build_ddp(seed=1)["accelerator"], p)  # noqa: E731
    assert load(path)[0]["step"] == 2  # as written, it loads
    for _, planted, marker in planted_copies(
        path, tmp_path, [f for f in files if f != checkpoints.MANIFEST_FILE]
    ):
        assert_refused(load, planted, marker, "cannot be loaded")
    # Accelerate's files, as an older launcher wrote them: refused before anything is read
    for _, planted, marker in planted_copies(path, tmp_path, ["custom_checkpoint_0.pkl", "optimizer.bin"]):
        message = assert_refused(
            load, planted, marker, r"was written by an older launcher: its states are pickled"
        )
        assert f"start a new --output_dir with --weights={planted}/model.safetensors" in message
        assert_refused(checkpoints.read_state, planted, marker, "older launcher")


# ---- FSDP: DCP's .metadata and .distcp files -------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_group():
    created = sharding.ensure_process_group(torch.device("cpu"))
    yield
    if created:
        dist.destroy_process_group()


def build_fsdp(seed: int = 0):
    """As the trainer has it under FSDP: model and EMA sharded (one rank here), the optimizer over
    the shards, the LR scheduler registered (the EMA is in the DCP files)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    # int64 and float32 in .metadata
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ema = EMA(model, 0.9)
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model, mesh=mesh)
    fully_shard(ema.module, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0])
    accelerator.register_for_checkpointing(scheduler)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    ema.update_parameters(model)
    return accelerator, model, AcceleratedOptimizer(optimizer, device_placement=False), ema


def fsdp_load(path: str) -> dict:
    acc, model, optimizer, ema = build_fsdp(seed=1)
    checkpoints.load(
        acc,
        path,
        sharded=True,
        read_shards=lambda p: sharding.ShardedCheckpointer.load(p, model, optimizer.optimizer, ema),
    )
    return {k: sharding.full(v) for k, v in model.state_dict().items()}


def test_a_pickle_planted_in_any_file_of_an_fsdp_checkpoint_runs_nothing(tmp_path, one_rank_group):
    acc, model, optimizer, ema = build_fsdp()
    saver = sharding.ShardedCheckpointer(False)
    write_shards = lambda p: saver.save(p, sharding.sharded_state(model, optimizer.optimizer, ema))  # noqa: E731
    path = checkpoints.save(
        acc, str(tmp_path / "run"), {"step": 1, "epoch": 0}, write_shards=write_shards
    ).finish()
    written = {k: sharding.full(v) for k, v in model.state_dict().items()}
    assert same(fsdp_load(path), written)  # a real .metadata passes the checked unpickler
    files = sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)
    assert "sharded/.metadata" in files and any(f.endswith(".distcp") for f in files)
    for name, planted, marker in planted_copies(
        path, tmp_path, [f for f in files if f != checkpoints.MANIFEST_FILE]
    ):
        if name == "sharded/.metadata":
            assert_refused(
                fsdp_load,
                planted,
                marker,
                r"sharded: \.metadata holds a disallowed type posix\.system; "
                "it was not written by the launcher",
            )
        else:
            assert_refused(fsdp_load, planted, marker, "cannot be loaded")


def test_dcp_values_that_are_not_tensors_are_read_weights_only(tmp_path, one_rank_group):
    """DCP's default planner torch.loads an optimizer hyperparameter with weights_only=False: one
    planted there runs under dcp.load, and is refused here."""
    import torch.distributed.checkpoint as dcp

    target = str(tmp_path / "sharded")
    dcp.save({"weight": torch.ones(2), "lr": Planted(tmp_path / "ran-dcp")}, checkpoint_id=target)
    state = {"weight": torch.zeros(2), "lr": 0.1}
    refused = (
        r"checkpoint .*sharded: lr holds a disallowed type posix\.system; it was not written by the launcher"
    )
    with pytest.raises(ConfigError, match=refused):
        state_files.load_sharded(state, target)
    assert not (tmp_path / "ran-dcp").exists()
    dcp.load(state, checkpoint_id=target)  # torch's own planner: the control
    assert (tmp_path / "ran-dcp").exists()
    assert state_files.read_metadata(target).state_dict_metadata.keys() == {"weight", "lr"}
