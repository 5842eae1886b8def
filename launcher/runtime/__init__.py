"""The processes a run lives in: distribution (Accelerate, DDP), checkpoints, preemption and
requeue, initial weights."""
