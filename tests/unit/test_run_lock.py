"""One run per output_dir: the lock refuses a live holder in one line, takes over a gone one's
(this host's ended or reused pid, this process's own pid from a restarted container, an unreadable
lock past its grace period, the same Slurm job requeued), releases only its own, and holds under
races: of many runs starting at once, exactly one gets it. `agreed_lock` raises the main process's
refusal on every rank of a real two-process gloo group."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from conftest import free_port, spawn_or_fail
from launcher.config import ConfigError
from launcher.runtime.run_lock import LOCK_FILE, RunLock, agreed_lock, process_start

needs_proc = pytest.mark.skipif(
    not process_start(os.getpid()), reason="no /proc: process start times unknown"
)


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir, age_s: float = 0, **holder) -> None:
    """A lock file as another run left it, last written `age_s` seconds ago."""
    path = run_dir / LOCK_FILE
    text = holder.pop("text", None)
    path.write_text(
        text
        if text is not None
        else json.dumps(
            {"host": socket.gethostname(), "started": "then", "slurm_job": "", "nonce": "theirs", **holder}
        )
    )
    os.utime(path, (time.time() - age_s,) * 2)


def holder_of(run_dir) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


def test_a_live_holder_is_refused_naming_it_and_a_released_lock_is_free(tmp_path):
    first = RunLock(str(tmp_path))
    with pytest.raises(
        ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on {socket.gethostname()}"
    ):
        RunLock(str(tmp_path))  # this process's own pid, in a lock it holds: not a restarted container
    first.release()
    assert os.listdir(tmp_path) == []  # no lock, draft or claim left
    RunLock(str(tmp_path)).release()


@pytest.fixture
def slurm(monkeypatch):
    """This process as allocation `restart` of Slurm job 4242."""

    def as_job(restart: str = "0") -> None:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)

    return as_job


@needs_proc
@pytest.mark.parametrize(
    "holder, why",
    [
        (dict(pid="ENDED"), "which has ended"),
        (dict(pid="OWN"), "which is this process's own pid (a restarted container)"),
        (
            dict(pid="PARENT", pid_start="an-earlier-boot:123"),
            "which has ended (the pid is now another process's)",
        ),
        (
            dict(pid=1, host="another-node", slurm_job="4242", slurm_restart="0"),
            "this Slurm job's earlier allocation",
        ),
        (dict(text='{"host": "x", "pi', age_s=31), "an unreadable lock, 31 s old"),
        (dict(text="", age_s=31), "an unreadable lock, 31 s old"),
    ],
)
def test_a_gone_holders_lock_is_taken_over_with_a_note(tmp_path, slurm, holder, why):
    slurm(restart="1")
    pid = {"ENDED": ended_pid(), "OWN": os.getpid(), "PARENT": os.getppid()}.get(
        holder.get("pid"), holder.get("pid")
    )
    write_lock(
        tmp_path, **{**holder, "pid": pid, "pid_start": holder.get("pid_start", process_start(pid or 0))}
    )
    notes = []
    lock = RunLock(str(tmp_path), log=notes.append)
    assert (
        len(notes) == 1
        and notes[0].startswith(f"note: taking over {tmp_path / LOCK_FILE}")
        and why in notes[0]
    )
    assert holder_of(tmp_path)["nonce"] == lock.mine["nonce"] and holder_of(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path) == []


@needs_proc
@pytest.mark.parametrize(
    "holder, restart",
    [
        (dict(pid=1, host="another-node", slurm_job="6"), "0"),  # another job's
        # another node of this allocation
        (dict(pid=1, host="another-node", slurm_job="4242", slurm_restart="0"), "0"),
        (dict(pid="PARENT", slurm_job="4242", slurm_restart="0"), "1"),  # this job, live on this host
    ],
)
def test_a_live_holder_is_refused_also_within_its_slurm_job(tmp_path, slurm, holder, restart):
    slurm(restart)
    pid = os.getppid() if holder["pid"] == "PARENT" else holder["pid"]
    write_lock(tmp_path, **{**holder, "pid": pid, "pid_start": process_start(pid)})
    before = (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(
        ConfigError,
        match=rf"in use by another run \(pid {pid} on {holder.get('host', '.*')}, started "
        rf"then\); wait for it, .* or remove {tmp_path / LOCK_FILE} if that run",
    ):
        RunLock(str(tmp_path))
    assert (tmp_path / LOCK_FILE).read_text() == before and os.listdir(tmp_path) == [LOCK_FILE]


def test_an_unreadable_lock_is_taken_over_only_after_its_grace_period(tmp_path):
    write_lock(tmp_path, text="", age_s=0.5)  # a run of an older launcher, between creating it and writing it
    with pytest.raises(
        ConfigError, match=rf"{tmp_path / LOCK_FILE} is unreadable and only \d s old .* retry after 2 s"
    ):
        RunLock(str(tmp_path), grace_s=2)
    assert (tmp_path / LOCK_FILE).read_text() == ""
    RunLock(str(tmp_path), grace_s=0.25).release()  # 0.5 s old: past this grace period


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    ours = RunLock(str(tmp_path))
    write_lock(tmp_path, pid=1, host="another-node")  # put in its place (by hand, or a wrong takeover)
    ours.release()
    assert holder_of(tmp_path)["nonce"] == "theirs" and os.listdir(tmp_path) == [LOCK_FILE]


# ---- races: real processes started together ---------------------------------------------------

CONTENDERS, ROUNDS = 8, 5


def _contend(gate, go, results, run_dirs) -> None:
    """Each round: wait for the go, try the lock, report, hold it until every contender has tried."""
    for round_number, run_dir in enumerate(run_dirs, 1):
        gate.wait()  # the round's directory is laid out
        while go.value < round_number:
            pass  # spinning, not waking one by one from the gate: the contenders that run now start together
        try:
            lock, outcome = RunLock(run_dir, log=lambda _: None), "held"
        except ConfigError:
            lock, outcome = None, "refused"
        except Exception as error:  # reported, not raised: the gate must not break
            lock, outcome = None, repr(error)
        results.put((os.getpid(), outcome))
        gate.wait()  # every contender has tried
        if lock is not None:
            lock.release()
        gate.wait()  # released


@pytest.mark.parametrize("start", ["no lock", "an empty lock past its grace", "a dead holder's lock"])
def test_of_many_runs_starting_at_once_exactly_one_holds_the_lock(tmp_path, start):
    run_dirs = [tmp_path / f"round-{i}" for i in range(ROUNDS)]
    stale = (
        None if start == "no lock" else dict(text="", age_s=60) if "empty" in start else dict(pid=ended_pid())
    )
    # already imported: the contenders start within milliseconds
    context = multiprocessing.get_context("fork")
    gate, go, results = context.Barrier(CONTENDERS + 1, timeout=30), context.RawValue("i", 0), context.Queue()
    contenders = [
        context.Process(target=_contend, args=(gate, go, results, list(map(str, run_dirs))))
        for _ in range(CONTENDERS)
    ]
    for process in contenders:
        process.start()
    try:
        for round_number, run_dir in enumerate(run_dirs, 1):
            if stale is not None:
                run_dir.mkdir()
                write_lock(run_dir, **stale)
            gate.wait()
            go.value = round_number
            outcomes = dict(results.get(timeout=30) for _ in contenders)
            held = [pid for pid, outcome in outcomes.items() if outcome == "held"]
            assert len(held) == 1 and set(outcomes.values()) == {"held", "refused"}, outcomes
            assert holder_of(run_dir)["pid"] == held[0]  # still held: its holder waits at the gate
            gate.wait()
            gate.wait()
            assert os.listdir(run_dir) == []  # released; no draft or claim left behind
    except BaseException:
        gate.abort()  # the contenders stop now, not after the gate's timeout
        raise
    finally:
        for process in contenders:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in contenders] == [0] * CONTENDERS


# ---- agreement across ranks ---------------------------------------------------------------------


def _agree(rank: int, run_dir: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    # Forked: Accelerate's state, shared within a process, may be an earlier test's single process
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, seen = Accelerator(cpu=True), {}
    try:
        agreed_lock(accelerator, run_dir)
    except ConfigError as error:
        seen["refused"] = str(error)
    if rank == 0:
        os.remove(os.path.join(run_dir, LOCK_FILE))  # the holder's run is gone, its lock removed by hand
    accelerator.wait_for_everyone()
    lock = agreed_lock(accelerator, run_dir)
    seen["held"] = (
        lock is not None and json.loads(open(os.path.join(run_dir, LOCK_FILE)).read())["pid"] == os.getpid()
    )
    accelerator.wait_for_everyone()
    if lock is not None:
        lock.release()
    accelerator.end_training()
    with open(os.path.join(run_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_every_rank_raises_the_main_processs_refusal(tmp_path):
    holder = RunLock(str(tmp_path))  # this test's process: alive, on this host
    spawn_or_fail(_agree, (str(tmp_path), free_port()), timeout=60, start_method="fork")
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert seen[0]["refused"] == seen[1]["refused"] and f"(pid {os.getpid()} on " in seen[0]["refused"]
    assert [s["held"] for s in seen] == [True, False]  # once free: the main process holds it for both
    holder.release()  # its file is gone: nothing to remove
