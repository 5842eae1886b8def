"""Learning-rate schedules as pure functions of the optimizer step.

Each returns a multiplier of a group's base LR, for `torch.optim.lr_scheduler.LambdaLR`,
which the loop steps once per optimizer step (never per micro-batch).
"""

from __future__ import annotations

import math
from typing import Callable

LRFunction = Callable[[int, int], float]  # (optimizer step, total optimizer steps) -> multiplier


def warmup_cosine(warmup_steps: int, min_ratio: float = 0.0) -> LRFunction:
    """1. Linear warm-up from 0 over `warmup_steps`; 2. cosine decay to `min_ratio` at the end."""

    def multiplier(step: int, total_steps: int) -> float:
        if step < warmup_steps:  # phase 1
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)  # phase 2
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def constant() -> LRFunction:
    return lambda step, total_steps: 1.0


def unfreeze_warmup(start_step: int, warmup_steps: int) -> Callable[[int], float]:
    """A group unfrozen at `start_step`: 1. LR 0 before it; 2. linear warm-up over `warmup_steps`
    (the first update after the unfreeze at 1/(warmup_steps + 1)); 3. 1 after."""

    def multiplier(step: int) -> float:
        if step < start_step:  # phase 1
            return 0.0
        return min(1.0, (step - start_step + 1) / (warmup_steps + 1))  # phases 2 and 3

    return multiplier
