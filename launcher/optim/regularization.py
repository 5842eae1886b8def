"""EMA of the weights, and MixUp / CutMix on training batches.

EMA: torch's `AveragedModel` (parameters and buffers), with timm's warm-up of the decay,
min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated by the random
initialisation. Updated after every optimizer step that was applied; identical on every rank
(DDP keeps the weights identical), evaluated beside the raw weights, saved in checkpoints.

MixUp / CutMix: torchvision.transforms.v2's, on the device, per batch; labels become class
probabilities, which cross-entropy and BCE take as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from launcher.config import ConfigError


class EMA(AveragedModel):
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay used for the update after `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def _average(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor
    ) -> None:
        # FSDP: parameters are DTensors, buffers plain tensors; each rank averages its own shards.
        averaged, current = [_local(t) for t in averaged], [_local(t) for t in current]
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - self.decay_at(int(updates)))
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the model
            torch._foreach_copy_(averaged, current)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int | None):
    """(inputs, targets) -> (mixed inputs, class probabilities), or None when both are off."""
    if not mixup_alpha and not cutmix_alpha:
        return None
    if not num_classes:
        raise ConfigError(
            "MixUp/CutMix need the number of classes: give the data class names "
            "(the shard index, or a dataset with .classes) or the recipe a num_classes field"
        )
    from torchvision.transforms import v2  # only where MixUp/CutMix is on (see launcher.presets)

    mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []) + (
        [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else []
    )
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
