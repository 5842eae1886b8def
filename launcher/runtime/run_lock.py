"""One run per output_dir: OUTPUT_DIR/run.lock, taken by the main process before anything is written.

The lock file is created exclusively (O_EXCL, atomic on local and NFS v3+ filesystems) and holds
the host, the pid, the start time and the Slurm job id. A second run into the same directory is
refused in one line naming the holder. A lock whose holder is gone is taken over with a note: a
process on this host that no longer exists, or a Slurm job's own earlier allocation (a requeued
job keeps its id). The other ranks of a run, on any node, share the main process's lock.
"""

from __future__ import annotations

import json
import os
import socket
import time

from launcher.config import ConfigError


LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    def __init__(self, output_dir: str, log=print):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
        os.makedirs(output_dir, exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and the read
            stale = self._stale(holder)
            if not stale:
                raise ConfigError(
                    f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}); wait for it, choose another --output_dir, or remove "
                    f"{self.path} if that run is gone")
            log(f"note: taking over {self.path} from {stale}")
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = True

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.mine, f)
        return True

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn by a crash while it was written: nobody holds it

    def _stale(self, holder: dict) -> str:
        """Why the holder is gone ('' if it may still run)."""
        if not holder:
            return "an unreadable lock"
        if holder.get("slurm_job") and holder["slurm_job"] == self.mine["slurm_job"]:
            return f"this Slurm job's earlier allocation (pid {holder.get('pid')} on {holder.get('host')})"
        pid = holder.get("pid")
        if holder.get("host") == self.mine["host"] and not (isinstance(pid, int) and pid > 0 and _alive(pid)):
            return f"pid {holder.get('pid')} on {holder.get('host')}, which has ended"
        return ""

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
