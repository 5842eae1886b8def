"""ReplicaChecksums across two real gloo processes: each rank's entry is the hash of that rank's
parameters, equal on every rank exactly when the parameters are; and the process group can be
destroyed right after the gather (the end of every run), and destroying it after DDP ends gloo's
threads. The backends' configuration imports torch's compiler only where determinism is switched
on."""

from __future__ import annotations

import glob
import json
import os

import torch
import torch.distributed as dist

from conftest import spawn_or_fail
from launcher.runtime.distributed import ReplicaChecksums


def _model(rank: int, differ: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    if differ and rank == 1:
        with torch.no_grad():
            model[0].bias[2] += 1e-6
    model[1].running_mean += rank  # a buffer: rank-local by DDP's design, not compared
    return model


def _gather(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    checksums = ReplicaChecksums(torch.device("cpu"), world_size=2)
    seen = {
        "same": checksums(_model(rank, differ=False)),
        "differ": checksums(_model(rank, differ=True)),
        "alone": ReplicaChecksums(torch.device("cpu"), world_size=1)(_model(rank, differ=True)),
    }
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_each_rank_reports_its_own_parameters_hash_to_every_rank(tmp_path):
    spawn_or_fail(_gather, (str(tmp_path),))
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert seen[0]["same"] == seen[1]["same"] and len(set(seen[0]["same"])) == 1
    assert seen[0]["differ"] == seen[1]["differ"]
    zero, one = seen[0]["differ"]
    assert zero == seen[0]["same"][0] and one != zero  # one changed bias value changes rank 1's hash
    assert [seen[0]["alone"], seen[1]["alone"]] == [[zero], [one]]  # one process: its own hash


def _gather_then_leave(rank: int, out: str, rounds: int) -> None:
    model = _model(rank, differ=False)
    for i in range(rounds):
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{i}", rank=rank, world_size=2)
        checksums = ReplicaChecksums(torch.device("cpu"), world_size=2)  # the loop holds it for the run
        checksums(model)  # the last collective of a run...
        dist.destroy_process_group()  # ...then the tracker's end_training leaves the process group
        del checksums


def test_the_process_group_can_go_away_right_after_the_checksums(tmp_path):
    # Gathered into temporaries (as accelerator.gather does on gloo), or with the ReplicaChecksums
    # freed before the destroy, torch 2.4 froze here within a few rounds; see
    # StopSignals.
    spawn_or_fail(_gather_then_leave, (str(tmp_path), 40))


def _ddp_then_leave(rank: int, out: str) -> None:
    torch.set_num_threads(1)  # no intra-op pool threads to count
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))  # imports torch._dynamo
    model(torch.ones(2, 4)).sum().backward()
    del model
    before = _thread_names()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump({"before": before, "after": _thread_names()}, f)


def _thread_names() -> list[str]:
    return sorted(open(path).read().strip() for path in glob.glob("/proc/self/task/*/comm"))


def test_destroying_the_group_after_ddp_ends_gloos_threads(tmp_path):
    # With the default group held elsewhere (torch.distributed.nn.functional's default arguments,
    # imported by DDP after the group was made), gloo's worker threads outlived the group and ran on
    # into interpreter shutdown, where one that takes the GIL aborts the process.
    spawn_or_fail(_ddp_then_leave, (str(tmp_path),))
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert len(seen["after"]) < len(seen["before"]), seen
        assert not [name for name in seen["after"] if "gloo" in name], seen


def test_backends_are_configured_without_importing_the_compiler_unless_determinism_changes():
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import sys, torch\n"
        "from launcher.config import TrainConfig\n"
        "from launcher.runtime.distributed import configure_backends\n"
        "configure_backends(TrainConfig())\n"
        "before = 'torch._inductor' in sys.modules\n"
        "configure_backends(TrainConfig(deterministic=True))\n"
        "print(before, torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "True", "True"]
