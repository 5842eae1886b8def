"""What one micro-batch computes: the loss (and what the task metrics need), in three styles.

1. `pair`: each sample is `(inputs, target)`; `model(inputs)` (a tuple of inputs is spread as
   `model(*inputs)`, a dict as `model(**inputs)`), then the loss chosen by `--loss` or returned by
   the recipe's `build_loss(cfg)`, `loss(outputs, targets)`, a mean.
2. `model_loss`: a dict batch and a model that computes its own loss (the Hugging Face
   convention): `model(**batch)` returns a dict or an object with `loss`, and `logits` if the
   task metrics should see them (compared with the batch's `labels`).
3. `compute_loss`: the recipe's `compute_loss(model, batch)` returns a mean loss, a
   `(loss_sum, count)` pair, or a `StepOutput`. With a count the loss is normalised by the count
   summed over the micro-batches of an optimizer step and over all ranks (tokens, say): the
   trainer back-propagates the sum and rescales the gradients once the count is known, so batch
   16 equals batch 8 with 2 accumulation steps and 2 processes with 4 x 2, for any lengths.

The split's `batch_transform` runs on the device on a pair's inputs, or on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from launcher.data.batch import to_device

STYLES = ("pair", "model_loss", "compute_loss")


@dataclass
class StepOutput:
    """What a step computed: `loss` (a mean, or with `count` a sum over `count` items) and the
    outputs and targets the task metrics compare (optional)."""

    loss: torch.Tensor
    count: torch.Tensor | int | None = None
    outputs: Any = None
    targets: Any = None


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _field(output: Any, name: str) -> Any:
    return output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)


def as_step_output(result: Any) -> StepOutput:
    """A compute_loss result as a StepOutput; TypeError for anything else."""
    if isinstance(result, StepOutput):
        return result
    if isinstance(result, torch.Tensor):
        return StepOutput(result)
    if isinstance(result, tuple) and len(result) == 2:
        return StepOutput(*result)
    if _field(result, "loss") is not None:
        return StepOutput(
            _field(result, "loss"),
            _field(result, "count"),
            _field(result, "outputs"),
            _field(result, "targets"),
        )
    raise TypeError(
        f"compute_loss returned {type(result).__name__}; return a loss tensor, (loss_sum, count) "
        "or launcher.StepOutput"
    )


def choose_style(data: Any, has_compute_loss: bool, has_build_loss: bool) -> str:
    """The step style for batches like `data`; ValueError naming the ways out."""
    if has_compute_loss:
        return "compute_loss"
    if isinstance(data, Mapping) and not has_build_loss:
        return "model_loss"
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return "pair"
    kind = (
        f"a dict (keys {', '.join(map(str, data))})"
        if isinstance(data, Mapping)
        else (
            f"a {len(data)}-item {type(data).__name__}"
            if isinstance(data, (tuple, list))
            else type(data).__name__
        )
    )
    raise ValueError(
        f"a batch is {kind}, which fits no step: make each sample an (inputs, target) pair, or a dict "
        "for a model that returns its own loss (no build_loss), or define compute_loss(model, batch) "
        "in the recipe"
    )


class Step:
    """One style of step, with its loss (pair) or the recipe's compute_loss."""

    def __init__(
        self,
        style: str,
        loss_fn: Callable | None = None,
        compute_loss: Callable | None = None,
        batch_transform: Callable | None = None,
    ):
        self.style, self.loss_fn, self.compute_loss = style, loss_fn, compute_loss
        self.batch_transform = batch_transform

    def prepare(self, data: Any, device: torch.device, channels_last: bool = False) -> Any:
        """The batch on `device`, with the split's batch transform applied."""
        data = to_device(data, device, channels_last)
        if self.batch_transform is None:
            return data
        if self.style == "pair":
            inputs, targets = data
            return (
                type(data)((self.batch_transform(inputs), targets))
                if isinstance(data, tuple)
                else [self.batch_transform(inputs), targets]
            )
        return self.batch_transform(data)

    def __call__(self, model: torch.nn.Module, data: Any) -> StepOutput:
        if self.style == "pair":
            inputs, targets = data
            outputs = call_model(model, inputs)
            return StepOutput(self.loss_fn(outputs, targets), None, outputs, targets)
        if self.style == "model_loss":
            output = model(**data)
            loss = _field(output, "loss")
            if loss is None:
                raise TypeError(
                    f"model(**batch) returned {type(output).__name__} without a 'loss'; return "
                    "{'loss': ..., 'logits': ...}, or give the recipe build_loss or compute_loss"
                )
            return StepOutput(loss, None, _field(output, "logits"), data.get("labels"))
        return as_step_output(self.compute_loss(model, data))
