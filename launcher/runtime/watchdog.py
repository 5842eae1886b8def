"""The hang watchdog: a thread that ends a rank which has made no progress for --hang_timeout_s.

Progress is a finished optimizer step, an evaluation batch, or a checkpoint save begun or done:
the loop calls `beat()` (one attribute write). A process that was stopped as a whole (SIGSTOP,
Slurm suspending the job) and resumed starts the clock again: its thread did not run either. A
rank waiting in a collective for a peer that died
without resetting its connection (a node gone, a frozen process) never returns from it; gloo's and
NCCL's own timeouts are 30 minutes or more and, on NCCL, not always acted on. When the time is up
the thread writes every thread's stack (faulthandler) to OUTPUT_DIR/hangs/rankR-stepS.txt, prints
one line, and ends the process with exit code 124 (as `timeout` does): the main thread is stuck in
native code, so nothing can be unwound, and a restart (torchrun's `--max_restarts`) or a requeue
takes over from the newest checkpoint. The line goes to stderr first; the stack file is written
after it, best-effort and for at most a few seconds (a full disk or a read-only remount must not
keep the hung process alive).

The same thread ends a rank whose launcher died: torchrun starts its ranks in sessions of their
own, so when `accelerate launch` (torchrun's agent) is killed (SIGKILL, the OOM killer) nothing
signals them, and they would train on with the devices and the output_dir's lock and nobody
watching. Under torchrun the thread checks once a second that the process that started this one is
still its parent, and otherwise prints one line, releases the lock and exits (76). The DataLoader
workers notice their own parent's end (torch's worker watchdog).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable

HANG_EXIT_CODE = 124
PARENT_GONE_EXIT_CODE = 76  # as a lost peer: the rest of the run is gone
STACK_WRITE_S = 5.0  # the most the stack file may take before the process exits anyway
# fault injection for the tests: "RANK:STEP", that rank freezes (SIGSTOP) after that step
HANG_AT = "LAUNCHER_TEST_HANG_AT"


class Watchdog:
    def __init__(
        self,
        timeout_s: float,
        output_dir: str,
        rank: int,
        step: Callable[[], int],
        before_exit: Callable[[], None] = lambda: None,
    ):
        self.timeout_s, self.output_dir, self.rank = timeout_s, output_dir, rank
        self.step, self.before_exit = step, before_exit
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.watch_parent = "TORCHELASTIC_RUN_ID" in os.environ  # started by torchrun (accelerate launch)
        self.parent = os.getppid()  # torchrun's agent there

    def start(self) -> None:
        """Watch from now on: for hangs unless the timeout is 0, and under torchrun for the launcher's end."""
        self.beat()
        if self.timeout_s > 0 or self.watch_parent:
            threading.Thread(target=self._watch, name="launcher-hang-watchdog", daemon=True).start()

    def beat(self) -> None:
        """Progress: the time starts again."""
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        interval = min(self.timeout_s / 4, 10.0) if self.timeout_s > 0 else 1.0
        if self.watch_parent:
            interval = min(interval, 1.0)
        woke = time.monotonic()
        while not self.stopped.wait(interval):
            if self.watch_parent and os.getppid() != self.parent:
                self._leave(
                    f"launcher: stopped: rank {self.rank}: the process that started it (pid {self.parent}, "
                    f"`accelerate launch` or torchrun) has ended; leaving at step {self.step()}; rerun "
                    "with --resume=auto to continue",
                    PARENT_GONE_EXIT_CODE,
                )
            now = time.monotonic()
            # the whole process was stopped (SIGSTOP, Slurm's suspend): not a hang
            if now - woke > 2 * interval + 1:
                self.beat()
            woke, idle = now, now - self.last
            if self.timeout_s > 0 and idle >= self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        step = self.step()
        path = os.path.join(self.output_dir, "hangs", f"rank{self.rank}-step{step}.txt")
        line = (
            f"launcher: hung: rank {self.rank}: no optimizer step, evaluation or save progressed for "
            f"{idle:.0f} s at step {step} (--hang_timeout_s={self.timeout_s:g}); every thread's stack is "
            f"in {path}"
        )
        self._leave(
            line,
            HANG_EXIT_CODE,
            lambda: _write_stacks(path, f"rank {self.rank}, step {step}: no progress for {idle:.0f} s"),
        )

    def _leave(self, line: str, code: int, then: Callable[[], None] = lambda: None) -> None:
        """Print `line` first, then do `then` and release the lock, each for at most STACK_WRITE_S
        seconds, and end the process with `code`."""
        try:
            sys.stderr.write(line + "\n")  # one write: another rank's line cannot run into it
            sys.stderr.flush()
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        for action in (then, self.before_exit):
            worker = threading.Thread(target=_quietly, args=(action,), daemon=True)
            worker.start()
            worker.join(STACK_WRITE_S)
        os._exit(code)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - best-effort: the process is leaving anyway
        pass


def _write_stacks(path: str, heading: str) -> None:
    """Every thread's stack into `path` (best-effort: on a full disk the line said where it would be)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{heading}; every thread's stack:\n\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)


def injected_hang(rank: int) -> int:
    """Tests: the step after which this rank freezes (LAUNCHER_TEST_HANG_AT=RANK:STEP), or -1."""
    spec = os.environ.get(HANG_AT, "")
    if not spec:
        return -1
    at_rank, _, at_step = spec.partition(":")
    return int(at_step) if int(at_rank) == rank else -1
