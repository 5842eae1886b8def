"""One run per output_dir: the lock refuses a live holder in one line, takes over a dead one's
(this host's ended pid, a torn file, the same Slurm job's earlier allocation) and is released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from launcher.config import ConfigError
from launcher.runtime.run_lock import LOCK_FILE, RunLock


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(tmp_path, **holder):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": "then", "slurm_job": "",
                                                  **holder}))


def test_a_live_holder_is_refused_naming_it_and_a_released_lock_is_free(tmp_path):
    first = RunLock(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(str(tmp_path))
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(str(tmp_path)).release()


@pytest.mark.parametrize("holder, why", [
    (dict(pid="ENDED"), "which has ended"),
    (dict(pid=1, host="another-node", slurm_job="4242"), "this Slurm job's earlier allocation"),
    (None, "an unreadable lock"),
])
def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path, monkeypatch, holder, why):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if holder is None:
        (tmp_path / LOCK_FILE).write_text('{"host": "x", "pi')  # torn
    else:
        write_lock(tmp_path, **{**holder, "pid": ended_pid() if holder["pid"] == "ENDED" else holder["pid"]})
    notes = []
    lock = RunLock(str(tmp_path), log=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"note: taking over {tmp_path / LOCK_FILE}") and why in notes[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_holder_is_refused_outside_its_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    write_lock(tmp_path, pid=1, host="another-node", slurm_job="6")
    with pytest.raises(ConfigError, match=f"on another-node, started then\\); wait for it, .* or remove {tmp_path / LOCK_FILE}"):
        RunLock(str(tmp_path))
