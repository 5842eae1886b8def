"""Preemption and Ctrl-C: SIGUSR1, SIGTERM and SIGINT stop a run cleanly at the next optimizer step.

The signal handler only records the signal. At each optimizer-step boundary the loop asks
`agreed()`: an all-reduce (MAX) over a CPU (gloo) group, so every rank sees the signal at the
same step even if only one received it, and a GPU run pays no device sync for it. The all-reduce
started at one step is waited on at the next, so no step blocks the host on a network round
trip; a signal is acted on one step later. The loop then checkpoints, closes the tracker and
raises `Preempted` (exit code 75, EX_TEMPFAIL: "try again").
Under Slurm, a SIGUSR1 (the `--signal=USR1@SECONDS` warning before the time limit) also requeues
the job with `scontrol requeue $SLURM_JOB_ID`, and the requeued job's `--resume=auto` continues
it. A SIGTERM (scancel, node shutdown) checkpoints and exits without requeueing.

A SIGINT (Ctrl-C) does the same and raises `Interrupted` (exit code 130, 128 + SIGINT: the shell's
code for a run a person stopped, and what `accelerate launch` itself exits with after a Ctrl-C, so
one process and several end alike; 75 would tell a requeueing wrapper to try again). A second
SIGINT, or a SIGTERM after it, exits at once: one line, no checkpoint. The terminal sends a Ctrl-C
to its foreground process group: a single process and its DataLoader workers, or under `accelerate
launch` torchrun's agent alone (it starts each rank in a session of its own), which sends SIGINT to
each rank's process group (the rank and its workers), waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
(30) and then sends SIGKILL; a second Ctrl-C interrupts that wait, and the agent sends SIGTERM. A
worker forked from a rank inherits this handler and ignores the signal: its
rank decides (torch's workers exit quietly on a KeyboardInterrupt, and the rank would then lose
them before it could checkpoint). A process started with SIGINT ignored (a script's background
job) keeps ignoring it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from launcher.config import RunStopped

PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
SECOND_INTERRUPT = (
    "launcher: interrupted again: stopped at once, without a checkpoint; --resume=auto continues "
    "from the newest one\n"
)


class Preempted(RunStopped):
    exit_code = PREEMPTED_EXIT_CODE


class Interrupted(RunStopped):
    """Ctrl-C: the checkpoint is written; the message is the whole line ("launcher: interrupted at ...")."""

    exit_code = INTERRUPTED_EXIT_CODE
    heading = ""


class StopSignals:
    """Records SIGUSR1/SIGTERM/SIGINT; `agreed()` is a collective: every rank calls it at the same step.
    `before_exit` runs before a second SIGINT ends the process (the run lock's release); the main
    process (`says`) prints the line."""

    def __init__(self, world_size: int, before_exit: Callable[[], None] = lambda: None, says: bool = True):
        self.received = 0  # the signal number, 0 for none
        self.interrupts = 0  # SIGINTs received
        self.pid = os.getpid()  # a forked DataLoader worker runs the inherited handler in another process
        self.before_exit, self.says = before_exit, says
        self.previous = {
            sig: signal.signal(sig, self._record)
            for sig in SIGNALS
            if not (sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN)
        }
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # CPU flag: no device sync per step
        self.world_size = world_size
        # One flag for every all-reduce, held here for the life of this object. gloo's worker
        # thread drops its reference to a finished all-reduce a moment after wait() returns; a
        # tensor whose last reference goes there needs the GIL to free, and torch before
        # pytorch#154976 (June 2025; 2.7 included) holds the GIL while destroy_process_group joins
        # that thread: both wait forever (docs/known-problems.md#the-gil-at-shutdown).
        self.flag = torch.zeros(2, dtype=torch.int64)  # [signal, -(the step of a checkpoint written)]
        self.pending = None  # the all-reduce the previous call started
        # the step of the checkpoint every rank had finished writing, by the previous call
        self.all_ready = -1

    def _record(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return  # a DataLoader worker: its rank acts on the signal
        if self.interrupts and signum in (signal.SIGINT, signal.SIGTERM):  # torchrun's, after a second Ctrl-C
            self._exit_now()
        self.interrupts += signum == signal.SIGINT
        if signum != signal.SIGINT or not self.received:  # preemption outranks a Ctrl-C (as in agreed's MAX)
            self.received = signum  # nothing else: the loop acts at a step boundary

    def _exit_now(self) -> None:
        """os.write and os._exit: safe wherever the main thread was (even in a checkpoint's write)."""
        try:
            sys.stdout.flush()  # the lines printed so far
        except (RuntimeError, OSError, ValueError):
            pass  # the main thread was writing to it (a reentrant flush raises)
        if self.says:
            os.write(2, SECOND_INTERRUPT.encode())
        self.before_exit()
        os._exit(INTERRUPTED_EXIT_CODE)

    def agreed(self, now: bool = False, ready: int = -1) -> int:
        """The signal any rank had received by the previous call (0: none), or by this one with
        `now`, which waits for a fresh all-reduce. A collective: every rank calls it at the same
        points, with the same `now`. Each rank also reports `ready`, the step of a checkpoint whose
        background write it has finished (-1: none); `all_ready` is then that step once every rank
        has reported it (one call later), for the asynchronous saves to be put in place."""
        if self.world_size == 1:
            self.all_ready = ready
            return self.received
        signum = self.drain()
        if signum:
            return signum
        self.flag[0], self.flag[1] = self.received, -ready  # one MAX: the signal, and the least ready step
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.drain() if now else 0

    def drain(self) -> int:
        """Wait for the all-reduce in flight, if any: its signal (0: none). Call it on every rank
        before the process group goes away."""
        if self.pending is None:
            return 0
        work, self.pending = self.pending, None
        work.wait()
        self.all_ready = -int(self.flag[1])
        return int(self.flag[0])

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def slurm_job_to_requeue(signum: int) -> str:
    """The Slurm batch job a SIGUSR1 requeues ("": another signal, or not under Slurm)."""
    return os.environ.get("SLURM_JOB_ID", "") if signum == signal.SIGUSR1 else ""


def requeue_slurm_job(job: str) -> str:
    """Requeue Slurm batch job `job`: "" once requeued, else why it was not, for the log."""
    # The requeue sends SIGTERM to every process of the job, this scontrol included, and on a busy
    # node that can land before it exits: the job is requeued but the log said it failed. A blocked
    # signal stays blocked across fork and exec, so scontrol finishes; here the SIGTERM waits for
    # the unblock and reaches the handler that records it.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        return f"scontrol requeue {job} failed: {why}"
    return ""
