"""Throughput, logged with each training log record (every --log_every steps):

- `train/tokens_per_s`, for LM-shaped batches: those holding a 2-D integer tensor of token ids.
  The tokens counted are the positions with a label (labels != -100, the ignore index of torch's
  cross-entropy and Hugging Face), where the batch has labels (a `labels` field, or the targets of
  an (inputs, targets) pair); else the attention mask's ones; else every id. Summed over ranks.
- `train/flops_per_sample`: the model's forward FLOPs for one training sample, counted once by
  `torch.utils.flop_counter.FlopCounterMode` in the pre-flight's forward (launcher/train/preflight.py),
  divided by the pre-flight batch's samples. A training step costs three times that (forward,
  and a backward of twice its FLOPs), the usual estimate.
- `train/mfu`: model FLOPs utilisation, 3 x flops_per_sample x samples/s per device over the
  device's peak dense bf16 FLOPS: --peak_tflops, else `PEAK_TFLOPS` by the GPU's name. Left out
  where the peak is unknown (CPUs, GPUs not in the table).
- `train/step_time`: wall seconds per optimizer step (this rank's, the main process logs it);
  `train/ready_time_min`, `train/ready_time_max` and `train/slowest_rank`: each rank's mean time
  from a step's start to its last micro-batch's backward, where DDP's gradient all-reduce makes
  every rank wait for the others. Up to there a rank waits for no one, so its time shows its own
  data loading and forward passes: the slowest rank is the straggler the others wait for.
  Gathered across ranks once per log step (one small all-gather). On CUDA the times come from
  CUDA events (read at the log step), since the host runs ahead of the kernels it queues.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

IGNORE_INDEX = -100  # labels that do not count (padding, prompts)
# Peak dense bf16 tensor-core TFLOPS (vendor data sheets), matched in order against
# torch.cuda.get_device_name(): the first name found in it wins.
PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("A6000", 155.0),
    ("V100", 125.0),
)


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """The device's peak FLOPS: `peak_tflops` (--peak_tflops) if given, else from `PEAK_TFLOPS` for a GPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for known, tflops in PEAK_TFLOPS if known in name), None)


class FlopCount:
    """FLOPs of what runs inside it (torch's FlopCounterMode: matrix multiplies, convolutions,
    attention), as `total`."""

    def __enter__(self) -> FlopCount:
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        self.total = self.mode.get_total_flops()


def tokens_in(data: Any) -> torch.Tensor | int | None:
    """The tokens of an LM-shaped batch (see the module docstring), or None for other batches. A
    count is a tensor where the batch's own are (no wait for a device: read at the log step)."""
    if isinstance(data, dict):
        labels, mask = data.get("labels"), data.get("attention_mask")
        ids = next((v for v in data.values() if _token_ids(v)), None)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        ids, labels, mask = (data[0] if _token_ids(data[0]) else None), data[1], None
    else:
        return None
    if _token_ids(labels):
        return (labels != IGNORE_INDEX).sum()
    if ids is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return mask.sum()
    return ids.numel()


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == 2
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


class StepClock:
    """This rank's step times: the wall time per step, and the time from a step's start to its
    last backward ("ready"); CUDA events on a GPU, read only when logged."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ready_times: list = []  # per step: seconds, or (start, ready) CUDA events
        self.started: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, fresh: bool = False) -> None:
        """A step's first micro-batch is about to be fetched (if no step is under way, or `fresh`:
        an epoch begins, and the start noted after the last one's final step is stale)."""
        if self.started is None or fresh:
            self.started = self._now()

    def ready(self) -> None:
        """The step's last backward is about to run."""
        if self.started is not None:
            self.ready_times.append((self.started, self._now()))
            self.started = None

    def mean_ready(self) -> tuple[float, int]:
        """(mean seconds to ready, steps) over the steps since the last call."""
        times, self.ready_times = self.ready_times, []
        if not times:
            return 0.0, 0
        if self.cuda:
            times[-1][1].synchronize()
            return sum(start.elapsed_time(end) for start, end in times) / 1000 / len(times), len(times)
        return sum(end - start for start, end in times) / len(times), len(times)


class Throughput:
    """Counts tokens and step times between log steps and makes their part of the log record."""

    def __init__(self, accelerator, flops_per_sample: float | None, peak_tflops: float = 0.0):
        self.accelerator, self.world = accelerator, accelerator.num_processes
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops(accelerator.device, peak_tflops)
        self.clock = StepClock(accelerator.device)
        self.tokens: torch.Tensor | int = 0  # since the last log step, this rank's
        self.lm_shaped = True  # until a batch is not

    def batch(self, data: Any) -> None:
        """A training micro-batch (on the host, before its move to the device)."""
        if self.lm_shaped:
            count = tokens_in(data)
            self.lm_shaped = count is not None
            self.tokens = self.tokens + count if count is not None else 0

    def record(self, samples_per_s: float, elapsed: float) -> dict:
        """The log record's throughput fields for the optimizer steps of the last `elapsed` seconds,
        in which all ranks together read `samples_per_s`. Every rank calls it (a gather)."""
        acc = self.accelerator
        ready, steps = self.clock.mean_ready()
        mine = torch.tensor([[float(self.tokens), ready]], dtype=torch.float64, device=acc.device)
        gathered = acc.gather(mine).cpu() if self.world > 1 else mine.cpu()
        self.tokens = 0
        ready = gathered[:, 1]
        record = {
            "train/step_time": elapsed / max(steps, 1),
            "train/ready_time_min": float(ready.min()),
            "train/ready_time_max": float(ready.max()),
            "train/slowest_rank": int(ready.argmax()),
        }
        if self.lm_shaped:
            record["train/tokens_per_s"] = float(gathered[:, 0].sum()) / elapsed
        if self.flops_per_sample:
            record["train/flops_per_sample"] = self.flops_per_sample
            if self.peak:  # 3: forward and backward (twice the forward's FLOPs)
                record["train/mfu"] = 3 * self.flops_per_sample * samples_per_s / self.world / self.peak
        return record
