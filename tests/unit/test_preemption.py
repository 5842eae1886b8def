"""StopSignals across two real gloo processes: a signal one rank receives reaches every rank at the
same call; the per-step check lags one call (its all-reduce overlaps the next step), the
epoch-end check (`now`) does not. A second Ctrl-C ends a real process at once, in one line; a
forked DataLoader worker ignores the Ctrl-C its rank acts on."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawn_or_fail
from launcher.runtime.preemption import StopSignals


def _rank(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    seen = {}
    signals = StopSignals(world_size=2)
    seen["before"] = signals.agreed()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 hears it, between two step boundaries
    seen["first boundary after"] = signals.agreed()
    seen["second boundary after"] = signals.agreed()
    seen["drained"] = signals.drain()
    signals.restore()

    signals = StopSignals(world_size=2)
    signals.agreed()  # a step boundary: its all-reduce is in flight during the evaluation
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # heard during the evaluation
    seen["epoch end (now)"] = signals.agreed(now=True)
    seen["drained after now"] = signals.drain()
    signals.restore()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_every_rank_sees_one_ranks_signal_at_the_same_boundary(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2)
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert (
        seen[0]
        == seen[1]
        == {
            "before": 0,
            "first boundary after": 0,  # its all-reduce started before the signal came
            "second boundary after": signal.SIGTERM,
            "drained": 0,  # a boundary that reports a signal starts no new all-reduce
            "epoch end (now)": signal.SIGUSR1,
            "drained after now": 0,
        }
    )


def _check_then_leave(rank: int, out: str, rounds: int) -> None:
    for i in range(rounds):
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{i}", rank=rank, world_size=2)
        signals = StopSignals(world_size=2)
        signals.agreed(now=True)  # its all-reduce has just finished...
        signals.restore()
        dist.destroy_process_group()  # ...when the process group goes away


def test_the_process_group_can_go_away_right_after_a_check(tmp_path):
    # With a new flag tensor per check, torch 2.4 froze here within a few rounds:
    # gloo's worker thread freed the last tensor, waiting for the GIL that destroy_process_group held
    # while it joined that thread.
    spawn_or_fail(_check_then_leave, (str(tmp_path), 40))


SECOND_INTERRUPT = """
import os, signal, sys
from launcher.runtime.preemption import StopSignals
signals = StopSignals(world_size=1, before_exit=lambda: print("lock released", flush=True))
worker = os.fork()
if worker == 0:  # as a DataLoader worker forked from the rank: the terminal's Ctrl-C reaches it too
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(0)
print("worker", os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]), flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("first", signals.received, flush=True)
os.kill(os.getpid(), signal.SECOND)
print("still running", flush=True)
"""


# SIGTERM: torchrun's, after a second Ctrl-C reached it
@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_interrupt_exits_at_once_in_one_line_and_a_worker_ignores_both(second):
    import subprocess
    import sys

    from conftest import ROOT, child_env
    from launcher.runtime.preemption import SECOND_INTERRUPT as LINE

    done = subprocess.run(
        [sys.executable, "-c", SECOND_INTERRUPT.replace("SECOND", second)],
        cwd=ROOT,
        env=dict(child_env(), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130
    assert done.stdout.splitlines() == ["worker 0", f"first {int(signal.SIGINT)}", "lock released"]
    assert done.stderr == LINE  # one line, no traceback
