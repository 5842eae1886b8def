"""One pass over a validation split, shared by training's evaluations and `launcher evaluate`.

Each batch goes through the run's own step, so `loss` is the training loss on the validation
data, normalised the same way: a mean step's losses weighted by the samples of each batch, a
counted step's sums divided by the summed count (tokens), over every rank (one all-reduce). The
task metrics (launcher/train/metrics.py) are sums, all-reduced on compute. Every validation sample is
read exactly once across ranks and workers, so the metrics equal a single process's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from launcher.data.batch import Batch
from launcher.data.layout import tally_errors
from launcher.train.metrics import TaskMetrics, is_accuracy
from launcher.train.step import Step


@dataclass
class EvalResult:
    metrics: dict  # PREFIX/loss, the task's PREFIX/*, PREFIX/samples
    confusion: list[list[int]] | None = None
    unreadable: dict[str, int] = field(default_factory=dict)  # this rank's: shard -> samples
    first: tuple[Batch, Any, Any] | None = None  # (batch, data on the device, predictions) of the first batch


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    batches,
    step: Step,
    metrics: TaskMetrics,
    accelerator,
    prefix: str,
    channels_last: bool = False,
    on_errors: Callable[[list[dict]], None] | None = None,
    lockstep: Any = None,
) -> EvalResult:
    """The metrics of `model` (in eval mode, unwrapped: no DDP collectives, ranks may hold unequal
    shares) over `batches`; every rank must call it. FSDP (`lockstep`: a collated batch to fill
    with): every forward gathers parameters, a collective, so ranks run as many forwards as the one
    with the most batches, repeating one uncounted."""
    device = accelerator.device
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, its weight (samples or count), samples
    result = EvalResult({})
    for batch, counted in (
        in_lockstep(batches, lockstep, accelerator)
        if lockstep is not None
        else ((batch, True) for batch in batches)
    ):
        if on_errors is not None and counted:
            on_errors(batch.errors)
        if counted:
            tally_errors(batch.errors, result.unreadable)
        if batch.data is None:
            continue
        data = step.prepare(batch.data, device, channels_last)
        with accelerator.autocast():
            out = step(model, data)
        if not counted:
            continue
        weight = out.count if out.count is not None else batch.size
        loss = out.loss.detach().double() * (1 if out.count is not None else batch.size)
        sums += torch.stack(
            [
                loss.reshape(()),
                torch.as_tensor(weight, device=device, dtype=torch.float64).reshape(()),
                torch.tensor(float(batch.size), device=device, dtype=torch.float64),
            ]
        )
        predictions = metrics.update(out.outputs, out.targets)
        if result.first is None:
            result.first = (batch, data, predictions)
    loss_sum, weight, samples = accelerator.reduce(sums, "sum").tolist()
    loss = loss_sum / weight if weight else float("nan")
    values, result.confusion = metrics.compute(loss, prefix)
    result.metrics = {f"{prefix}/loss": loss, **values, f"{prefix}/samples": int(samples)}
    return result


_LOCKSTEP_FLAGS: dict[str, torch.Tensor] = {}  # one per device, held for the life of the process


def in_lockstep(batches, filler: Any, accelerator):
    """(batch, counted) until every rank has run out: a rank that has, or whose batch has no readable
    sample, runs `filler`, uncounted. One all-reduce of a flag per batch. The flag outlives the
    pass (docs/known-problems.md#the-gil-at-shutdown)."""
    flag = _LOCKSTEP_FLAGS.setdefault(str(accelerator.device), torch.zeros(1, device=accelerator.device))
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        flag.fill_(batch is not None)
        if not accelerator.reduce(flag, "sum").item():
            return
        if batch is not None:
            yield batch, True
        if batch is None or batch.data is None:
            yield Batch(data=filler), False


def format_metrics(result: dict, prefix: str) -> str:
    parts = []
    for key, value in result.items():
        name = key.split("/", 1)[1] if key.startswith(prefix + "/") else None
        if name is None or name in ("samples", "unreadable") or not isinstance(value, float):
            continue
        parts.append(f"{name} {100 * value:.2f} %" if is_accuracy(key) else f"{name} {value:.4g}")
    return ", ".join(parts) + f" of {result[prefix + '/samples']}"


def example_images(batch: Batch, data, predictions: torch.Tensor | None, count: int) -> list[tuple] | None:
    """Up to `count` (HWC uint8 image, prediction, label) from a classifier's batch of images, as the
    workers delivered it; None for inputs that are not images or outputs that are not classes."""
    if predictions is None or not isinstance(batch.data, (tuple, list)) or len(batch.data) != 2:
        return None
    images, targets = batch.data
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        return None
    images = images[:count]
    if images.dtype != torch.uint8:  # float input: show it rescaled to 0-255
        low, high = images.amin(), images.amax()
        images = ((images.float() - low) / (high - low + 1e-12) * 255).to(torch.uint8)
    return [
        (image.permute(1, 2, 0).numpy().copy(), int(p), int(t))  # a copy: the batch's buffer is reused
        for image, p, t in zip(images, predictions[:count].tolist(), targets[:count].tolist())
    ]
