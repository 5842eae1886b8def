"""The hang watchdog: a thread that ends a rank which has made no progress for --hang_timeout_s.

Progress is a finished optimizer step, an evaluation batch, or a checkpoint save begun or done:
the loop calls `beat()` (one attribute write). A process that was stopped as a whole (SIGSTOP,
Slurm suspending the job) and resumed starts the clock again: its thread did not run either. A rank waiting in a collective for a peer that died
without resetting its connection (a node gone, a frozen process) never returns from it; gloo's and
NCCL's own timeouts are 30 minutes or more and, on NCCL, not always acted on. When the time is up
the thread writes every thread's stack (faulthandler) to OUTPUT_DIR/hangs/rankR-stepS.txt, prints
one line, and ends the process with exit code 124 (as `timeout` does): the main thread is stuck in
native code, so nothing can be unwound, and a restart (torchrun's `--max_restarts`) or a requeue
takes over from the newest checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable


HANG_EXIT_CODE = 124
HANG_AT = "LAUNCHER_TEST_HANG_AT"  # fault injection for the tests: "RANK:STEP", that rank freezes (SIGSTOP) after that step


class Watchdog:
    def __init__(self, timeout_s: float, output_dir: str, rank: int, step: Callable[[], int],
                 before_exit: Callable[[], None] = lambda: None):
        self.timeout_s, self.output_dir, self.rank = timeout_s, output_dir, rank
        self.step, self.before_exit = step, before_exit
        self.last = time.monotonic()
        self.stopped = threading.Event()

    def start(self) -> None:
        """Watch from now on (nothing with a timeout of 0)."""
        self.beat()
        if self.timeout_s > 0:
            threading.Thread(target=self._watch, name="launcher-hang-watchdog", daemon=True).start()

    def beat(self) -> None:
        """Progress: the time starts again."""
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        interval = min(self.timeout_s / 4, 10.0)
        woke = time.monotonic()
        while not self.stopped.wait(interval):
            now = time.monotonic()
            if now - woke > 2 * interval + 1:  # the whole process was stopped (SIGSTOP, Slurm's suspend): not a hang
                self.beat()
            woke, idle = now, now - self.last
            if idle >= self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        step = self.step()
        path = os.path.join(self.output_dir, "hangs", f"rank{self.rank}-step{step}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"rank {self.rank}, step {step}: no progress for {idle:.0f} s; every thread's stack:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        try:
            self.before_exit()
        finally:
            print(f"launcher: hung: rank {self.rank}: no optimizer step, evaluation or save progressed for "
                  f"{idle:.0f} s at step {step} (--hang_timeout_s={self.timeout_s:g}); every thread's stack is "
                  f"in {path}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(HANG_EXIT_CODE)


def injected_hang(rank: int) -> int:
    """Tests: the step after which this rank freezes (LAUNCHER_TEST_HANG_AT=RANK:STEP), or -1."""
    spec = os.environ.get(HANG_AT, "")
    if not spec:
        return -1
    at_rank, _, at_step = spec.partition(":")
    return int(at_step) if int(at_rank) == rank else -1
