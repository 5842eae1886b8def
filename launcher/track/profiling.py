"""--profile_steps=A:B: a `torch.profiler` trace of optimizer steps A to B (counted from 1, as
logged), and on CUDA a memory snapshot of the same steps, in OUTPUT_DIR/profile/.

Each rank writes `rank{N}.pt.trace.json`, a Chrome trace that TensorBoard's profiler plugin
(`tensorboard --logdir OUTPUT_DIR/profile`) and Perfetto (ui.perfetto.dev) open; on CUDA also
`rank{N}_memory.pickle`, which PyTorch's memory viewer (pytorch.org/memory_viz) opens. A run that
ends (or is resumed) inside the window writes the steps it profiled.
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from launcher.config import profile_window


class StepProfiler:
    """Starts profiling when step A begins and writes the trace when step B ends. `at_step(done)`
    is called with the optimizer steps done: before the first step and after each one."""

    def __init__(self, steps: str, output_dir: str, rank: int, device: torch.device):
        self.window = profile_window(steps)
        self.directory = os.path.join(output_dir, "profile")
        self.rank, self.cuda = rank, device.type == "cuda"
        self.profiler: profile | None = None

    def at_step(self, done: int) -> None:
        if self.window is None:
            return
        first, last = self.window
        if self.profiler is None and first - 1 <= done < last:
            self._start()
        elif self.profiler is not None and done >= last:
            self.close()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def close(self) -> None:
        """Stop and write what was profiled (also where a run ends inside the window)."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        os.makedirs(self.directory, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(self.directory, f"rank{self.rank}.pt.trace.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(os.path.join(self.directory, f"rank{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
