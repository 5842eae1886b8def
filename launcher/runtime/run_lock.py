"""One run per output_dir: OUTPUT_DIR/run.lock, taken by the main process before anything is written.

The lock names its holder: host, pid, the pid's start (this boot's id and the clock tick after boot
at which it started, /proc/PID/stat field 22), a random nonce, the Slurm job id and restart count,
and the wall-clock start. It is written whole to a draft beside it, fsynced, and hard-linked into
place: the link is atomic (also on NFS), so a lock in place is never half written, and an
existing one (EEXIST) means another run holds it. A second run into the same directory is refused
in one line naming the holder; `agreed_lock` raises that refusal on every rank.

A lock is stale, and taken over with a note, when its holder is gone:
- on this host: its pid has ended; its pid is now a process that started at another time (pid
  reuse, a reboot); or its pid is this process's own and this process does not hold it (a
  restarted container, whose processes get the same pids again). A Slurm job's earlier
  allocation on this host is judged the same way: its live processes keep the lock.
- on another host: only a requeue of the same Slurm job (same SLURM_JOB_ID, another
  SLURM_RESTART_COUNT) shows the holder is gone; other nodes of the same allocation are refused.
- unreadable (not written by this code, or damaged): only once older than a grace period, since
  another writer may still be filling it.
To take a stale lock over, a run first creates, exclusively, a claim named after that lock's
inode and content, and then renames its own draft over the lock. Of the runs that judged one lock
stale only the claimant replaces it, and at no moment is there no lock in place, so two runs
never both hold it. A claim older than the grace period is a crashed claimant's: the next claim
takes the next number.

`release` removes the lock only while it is still this run's (checked before and after moving it
aside); a lock another run put in its place stays. The other ranks of a run, on any node, run
under the main process's lock.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import secrets
import socket
import time
from typing import NamedTuple

from accelerate.utils import broadcast_object_list

from launcher.config import ConfigError

LOCK_FILE = "run.lock"
STALE_GRACE_S = 30.0  # an unreadable lock younger than this may still be being written; covers NFS clock skew
CLAIM_WAIT_S = 0.01  # another run is taking a stale lock over: read again after this

_NONCES_HELD_HERE: set[str] = set()  # this process's own locks: its pid in these is no restarted container


class Seen(NamedTuple):
    """The lock file as one read found it."""

    holder: dict  # {} when unreadable
    identity: str  # inode and content hash: the same file, unchanged
    age_s: float  # since it was last written


def process_start(pid: int) -> str:
    """When `pid` started: this boot's id and the clock tick after boot ('' where /proc cannot say).
    Two processes that had one pid one after the other differ in it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            tick = f.read().rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces
    except (OSError, IndexError):
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}:{tick}"


def holder_details() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "nonce": secrets.token_hex(8),
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _link(source: str, target: str) -> bool:
    """Hard-link `source` as `target`; False if `target` exists. `source` has no other link."""
    try:
        os.link(source, target)
    except FileExistsError:
        return os.stat(source).st_nlink > 1  # NFS: a resent link whose first try succeeded says EEXIST
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _older(path: str, seconds: float) -> bool:
    """Whether `path` was last written more than `seconds` ago (False if it is gone)."""
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except FileNotFoundError:
        return False


def _read(path: str) -> Seen | None:
    """The lock at `path`, or None if there is none."""
    try:
        with open(path, "rb") as f:
            status = os.fstat(f.fileno())
            content = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(content)
    except ValueError:
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder or "host" not in holder:
        holder = {}
    identity = f"{status.st_ino}-{hashlib.sha1(content).hexdigest()[:16]}"
    return Seen(holder, identity, time.time() - status.st_mtime)


class RunLock:
    """OUTPUT_DIR/run.lock, held by this process until `release`; ConfigError if a live run holds it.
    `grace_s`: how old an unreadable lock must be to count as stale (tests pass less)."""

    def __init__(self, output_dir: str, log=print, grace_s: float = STALE_GRACE_S):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.grace_s = grace_s
        self.mine = holder_details()
        self.held = False
        self.claim = ""  # the claim by which we took a stale lock over, removed at release
        os.makedirs(output_dir, exist_ok=True)
        draft = self._write_draft()
        try:
            self._acquire(draft, log)
        finally:
            _remove(draft)  # linked into place (or renamed over the lock) by now, or not wanted
        self.held = True
        _NONCES_HELD_HERE.add(self.mine["nonce"])

    def _write_draft(self) -> str:
        draft = f"{self.path}.tmp-{self.mine['nonce']}"
        fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self.mine, f)
            f.flush()
            os.fsync(f.fileno())  # whole on disk before it is the lock: a crash leaves no empty lock
        return draft

    def _acquire(self, draft: str, log) -> None:
        while not _link(draft, self.path):
            seen = _read(self.path)
            if seen is None:
                continue  # released between our link and the read
            why = self._stale(seen)
            if not why:
                raise ConfigError(self._refusal(seen))
            if self._take_over(draft, seen):
                log(f"note: taking over {self.path} from {why}")
                return

    def _stale(self, seen: Seen) -> str:
        """Why the holder is gone ('' if it may still run); the rules are in the module docstring."""
        holder = seen.holder
        if not holder:
            return f"an unreadable lock, {seen.age_s:.0f} s old" if seen.age_s > self.grace_s else ""
        pid, named = holder["pid"], f"pid {holder['pid']} on {holder['host']}"
        if holder["host"] != self.mine["host"]:
            requeued = (
                holder.get("slurm_job") == self.mine["slurm_job"] != ""
                and str(holder.get("slurm_restart", "0")) != self.mine["slurm_restart"]
            )
            return f"this Slurm job's earlier allocation ({named}, a requeue)" if requeued else ""
        if not (isinstance(pid, int) and pid > 0 and _alive(pid)):
            return f"{named}, which has ended"
        if pid == os.getpid() and holder.get("nonce") not in _NONCES_HELD_HERE:
            return f"{named}, which is this process's own pid (a restarted container)"
        recorded, now = holder.get("pid_start", ""), process_start(pid)
        if recorded and now and recorded != now:
            return f"{named}, which has ended (the pid is now another process's)"
        return ""

    def _refusal(self, seen: Seen) -> str:
        output_dir = os.path.dirname(self.path)
        if not seen.holder:
            return (
                f"{self.path} is unreadable and only {max(seen.age_s, 0):.0f} s old "
                f"(another run may be starting in {output_dir}); retry after {self.grace_s:.0f} s, "
                "choose another --output_dir, or remove it"
            )
        holder = seen.holder
        return (
            f"{output_dir} is in use by another run (pid {holder['pid']} on {holder['host']}, started "
            f"{holder.get('started')}); wait for it, choose another --output_dir, or remove {self.path} if "
            "that run is gone"
        )

    def _take_over(self, draft: str, stale: Seen) -> bool:
        """Rename our draft over the stale lock if we are first to claim it; False: read it again."""
        for number in itertools.count():  # a claim older than the grace period is a crashed run's
            claim = f"{self.path}.taken-{stale.identity}-{number}"
            if _link(draft, claim):
                break
            if not _older(claim, self.grace_s):
                time.sleep(CLAIM_WAIT_S)  # another run is taking it over, within milliseconds
                return False
        again = _read(self.path)
        if again is None or again.identity != stale.identity:
            _remove(claim)  # it changed since we judged it (a slow claim): judge it again
            return False
        os.rename(draft, self.path)  # no claimant but us replaces it, and never leaves it missing
        self.claim = claim
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours, and the claims and drafts of runs before."""
        if not self.held:
            return
        self.held = False
        nonce = self.mine["nonce"]
        _NONCES_HELD_HERE.discard(nonce)
        seen = _read(self.path)
        if seen is not None and seen.holder.get("nonce") == nonce:
            self._remove_own(nonce)
        self._sweep()

    def _remove_own(self, nonce: str) -> None:
        """Move the lock aside, then read it: one that another run put in place since is put back."""
        aside = f"{self.path}.released-{nonce}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved is not None and moved.holder.get("nonce") != nonce:
            _link(aside, self.path)
        _remove(aside)

    def _sweep(self) -> None:
        """Our claim, and the claims and drafts of runs that crashed (older than the grace period: a
        run is done with them in milliseconds)."""
        if self.claim:
            _remove(self.claim)
        for path in glob.glob(glob.escape(self.path) + ".taken-*") + glob.glob(
            glob.escape(self.path) + ".tmp-*"
        ):
            if _older(path, self.grace_s):
                _remove(path)


def agreed_lock(accelerator, output_dir: str, log=print) -> RunLock | None:
    """RunLock on the main process alone (the other ranks run under it), its refusal raised on every
    rank: each prints the same one line and exits 2, none waits in a collective for the main one."""
    lock, refusal = None, [""]
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir, log)
        except ConfigError as error:
            refusal[0] = str(error)
        except OSError as error:
            refusal[0] = (
                f"cannot take {os.path.join(output_dir, LOCK_FILE)}: {error}; choose a writable --output_dir"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal, from_process=0)
    if refusal[0]:
        raise ConfigError(refusal[0])
    return lock
