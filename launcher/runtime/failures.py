"""What clusters do to unattended runs, each turned into one line and an exit code.

- A peer process ended (its connection reset or closed under a collective): `LostPeer`, exit 76.
- A DataLoader worker killed (the kernel's OOM killer, most often) or gone: `WorkerLost`, exit 76.
- No space left while writing a checkpoint: `DiskFull`, exit 74 (sysexits' EX_IOERR); the
  temporary directory is removed, and the checkpoints before it stay as they were. Any other write
  that finds the disk full (metrics, best.json, the final weights) is 74 too, naming the file.

76 is the restart path: under `accelerate launch --max_restarts=N` (torchrun) any failed rank
restarts them all, and `--resume=auto` continues from the newest intact checkpoint; a Slurm batch
script can requeue on it. A process that lost its peers does not tear its process group down (that
waits on the dead peer too): it prints its line and leaves with `os._exit` (`hard_exit`).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time

from launcher.config import RunStopped
from launcher.durable import DISK_FULL_EXIT_CODE, DiskFull, first_cause, no_space  # noqa: F401 - the failures' vocabulary

RESTART_EXIT_CODE = 76  # sysexits' EX_PROTOCOL: a peer or a worker went away; restarting helps
DISK_FULL_AT = "LAUNCHER_TEST_DISK_FULL_AT"  # fault injection for the tests: ENOSPC in the save at this step

# What gloo, NCCL and the TCP store say when the process at the other end is gone.
PEER_GONE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Socket closed",
    "ECONNRESET",
    "EPIPE",
    "remote process exited",
    "NCCL communicator was aborted",
    "ncclRemoteError",
    "failed to recv, got 0 bytes",
)
WORKER_GONE = re.compile(
    r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)


class LostPeer(RunStopped):
    exit_code = RESTART_EXIT_CODE
    hard_exit = True  # destroying the process group would wait on the dead peer


class WorkerLost(RunStopped):
    exit_code = RESTART_EXIT_CODE
    hard_exit = True  # the other ranks wait in a collective: they see a lost peer, and restart with this one


def failure_of(
    error: BaseException, rank: int, step: int, splits, terminated: bool = False
) -> RunStopped | None:
    """A lost peer or DataLoader worker as its one-line error, or None for any other error. `splits`:
    the run's SplitLoaders (None for a missing split), whose `worker_pids` name a dead worker;
    `terminated`: this rank has received a SIGTERM (which its workers got too)."""
    if isinstance(error, RunStopped):
        return None
    workers = {
        pid: ("training" if split.training else "validation", index)
        for split in splits
        if split is not None
        for pid, index in split.worker_pids.items()
    }
    try:
        return worker_lost(error, rank, step, workers, terminated) or lost_contact(error, rank, step)
    except RuntimeError as later:  # torch's SIGCHLD handler naming a dead worker, raised meanwhile
        return worker_lost(later, rank, step, workers, terminated) or lost_contact(later, rank, step)


def lost_contact(error: BaseException, rank: int, step: int) -> LostPeer | None:
    """The one-line error for a collective whose peer went away, or None for any other error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not any(marker in text for marker in PEER_GONE):
        return None
    why = next(marker for marker in PEER_GONE if marker in text).lower()
    return LostPeer(
        f"rank {rank}: lost contact with the other processes at step {step} ({why}): another "
        "process ended; see its log"
    )


def worker_lost(
    error: BaseException, rank: int, step: int, workers: dict[int, tuple[str, int]], terminated: bool = False
) -> WorkerLost | None:
    """The one-line error for a DataLoader worker that died, or None. `workers`: pid -> (split, worker
    index) of the loaders alive (launcher/data/loader.py). torch reports a dead worker by its pid;
    a worker that dies while handing a batch over (its tensors' file descriptors) leaves the main
    process a ConnectionResetError or EOFError from the DataLoader instead: then the worker is the
    one no longer running."""
    found = WORKER_GONE.search(str(error)) if isinstance(error, RuntimeError) else None
    if found is not None:
        pid, description = int(found.group(1).split(",")[0]), found.group(2)
    elif isinstance(error, (ConnectionError, EOFError)) and _raised_in_dataloader(error):
        pid, description = _ended(workers), None
    else:
        return None
    split, index = workers.get(pid, ("", -1))
    worker = (
        f"DataLoader worker {index} (pid {pid}) of the {split} data" if index >= 0 else "a DataLoader worker"
    )
    if description is None and terminated:
        description = signal.strsignal(signal.SIGTERM)  # the worker got the rank's SIGTERM too
    if description is None:
        cause = (
            "it ended unexpectedly: killed, most likely by the kernel's out-of-memory killer "
            "(`dmesg` says), or exited (its traceback, if any, is above)"
            if found is not None
            else f"it ended while handing a batch over ({type(error).__name__}), most likely killed by the "
            "kernel's out-of-memory killer (`dmesg` says); lower --num_workers, --prefetch_factor or "
            "--batch_size, or give the job more memory"
        )
    else:
        name = next(
            (s.name for s in signal.Signals if signal.strsignal(s) == description.strip()),
            description.strip(),
        )
        cause = (
            f"killed by {name}, most likely by the kernel's out-of-memory killer (`dmesg` says); lower "
            "--num_workers, --prefetch_factor or --batch_size, or give the job more memory"
            if name == "SIGKILL"
            else f"ended by {name}, sent to all of its rank's processes (torchrun stopping the ranks after "
            "another one failed, or the job ending); see the first error above"
            if name in ("SIGTERM", "SIGINT")
            else f"killed by {name}: a crash in the dataset's code or a library it calls"
        )
    return WorkerLost(f"rank {rank}: {worker} ended at step {step}: {cause}")


def _raised_in_dataloader(error: BaseException) -> bool:
    tb, where = error.__traceback__, os.path.join("torch", "utils", "data", "dataloader.py")
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(where):
            return True
        tb = tb.tb_next
    return False


def _ended(workers: dict[int, tuple[str, int]]) -> int:
    """The pid of a worker no longer running (0: none). A dying process closes its sockets before it
    becomes a zombie, so the reset may come first: look again for up to a second."""
    for _ in range(20):
        ended = next((pid for pid in workers if not running(pid)), 0)
        if ended or not workers:
            return ended
        time.sleep(0.05)
    return 0


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def disk_full(error: BaseException, path: str) -> DiskFull | None:
    """The one-line error for a checkpoint write under `path` that found no space left, or None."""
    free = no_space(error, path)
    if free is None:
        return None
    return DiskFull(
        f"no space left writing checkpoint {path} ({free:.1f} MiB free there); the checkpoints "
        "before it are intact; free some space or move --output_dir, then rerun with --resume=auto"
    )


def inject_disk_full(step: int) -> None:
    """Tests: the save at step LAUNCHER_TEST_DISK_FULL_AT fails as a full disk would, midway."""
    if os.environ.get(DISK_FULL_AT) == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
