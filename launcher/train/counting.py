"""Losses summed over a count that varies from batch to batch (tokens): `compute_loss` returning
`(loss_sum, count)`. The gradient is the summed loss's over the count summed across the optimizer
step's micro-batches and all ranks, so batch 16 equals batch 8 with 2 accumulation steps and 2
processes with 4 x 2, for any lengths (the accumulation bug of transformers #34191).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from launcher.config import ConfigError
from launcher.runtime.sharding import local


class CountedLoss:
    def __init__(self, accelerator: Accelerator, world: int, counted: bool, parameters: list[torch.Tensor]):
        self.accelerator, self.world = accelerator, world
        self.counted = counted  # what the preflight batch returned: every step must do the same
        self.parameters = parameters
        self.step_counts: list = []  # the counts of this optimizer step's micro-batches so far

    def check(self, out) -> bool:
        """Whether this step's loss is a sum over `out.count` items (checked here, where it is cheap,
        to be so in every step); with accumulation the count joins the optimizer step's."""
        counted = out.count is not None
        if counted != self.counted:
            raise ConfigError(
                "compute_loss returned a count in some steps and not in others; return "
                "(loss_sum, count) always, or a mean always"
            )
        if counted and self.accelerator.gradient_accumulation_steps > 1:
            self.step_counts.append(out.count)  # an int or a device tensor: no host sync
        return counted

    def total(self, counts: list) -> torch.Tensor:
        """The count of an optimizer step: its micro-batches' summed over all ranks (a collective)."""
        device = self.accelerator.device
        total = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device) for c in counts]).sum()
        return self.accelerator.reduce(total, "sum") if self.world > 1 else total

    def loss(self, out) -> torch.Tensor:
        """The loss to back-propagate. With one micro-batch per optimizer step its count is the step's
        (over the ranks): the sum is divided before the backward, times the ranks that DDP averages
        over. With accumulation the later micro-batches' counts are not known yet: `normalise`."""
        if self.accelerator.gradient_accumulation_steps > 1:
            return out.loss
        scale = self.world / self.total([out.count]).clamp(min=1)
        return out.loss * scale.to(out.loss.dtype)

    def normalise(self) -> None:
        """With accumulation, at the optimizer step: the gradients of the summed losses divided by the
        count summed over the step's micro-batches and all ranks. DDP averaged them over the ranks and
        `backward` divided each micro-batch's by the accumulation steps, so both are multiplied back;
        no host sync."""
        steps = self.accelerator.gradient_accumulation_steps
        if steps == 1:
            return
        scale = (self.world * steps / self.total(self.step_counts).clamp(min=1)).float()
        grads = [local(p.grad) for p in self.parameters if p.grad is not None]  # FSDP: this rank's shards
        if grads:
            torch._foreach_mul_(grads, scale)
        self.step_counts = []
