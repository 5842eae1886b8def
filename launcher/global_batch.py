"""The global-batch arithmetic, in one place (as litgpt's `TrainArgs` methods): one optimizer step
takes `batch_size` samples per process per micro-batch, on `world_size` processes, over
`grad_accum_steps` micro-batches. The plan, the loader's epoch length, a resume on another number
of processes and the report of a finished run all ask a `GlobalBatch`, never multiply themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlobalBatch:
    batch_size: int  # samples per process per micro-batch (--batch_size)
    world_size: int  # data-parallel processes
    grad_accum_steps: int = 1  # micro-batches per optimizer step (--grad_accum_steps)

    @classmethod
    def of(cls, cfg, world_size: int) -> GlobalBatch:
        """The batch a config (a TrainConfig, or a saved config's dict) makes on `world_size` processes."""
        if isinstance(cfg, dict):
            return cls(cfg["batch_size"], world_size, cfg.get("grad_accum_steps", 1))
        return cls(cfg.batch_size, world_size, cfg.grad_accum_steps)

    @property
    def samples(self) -> int:
        """Samples per optimizer step, all processes together: the global batch."""
        return self.micro_batch_samples * self.grad_accum_steps

    @property
    def micro_batch_samples(self) -> int:
        """Samples per micro-batch, all processes together."""
        return self.batch_size * self.world_size

    def steps_in_samples(self, samples: int) -> int:
        """Whole optimizer steps that `samples` fill (0 when fewer than one global batch)."""
        return samples // self.samples

    def steps_in_micro_batches(self, micro_batches: int) -> int:
        """Whole optimizer steps in `micro_batches` per process."""
        return micro_batches // self.grad_accum_steps

    def micro_batches_in_steps(self, steps: int) -> int:
        """Micro-batches per process that `steps` optimizer steps take."""
        return steps * self.grad_accum_steps

    def samples_in_micro_batches(self, micro_batches: int) -> int:
        """Samples, all processes together, that `micro_batches` per process read."""
        return micro_batches * self.micro_batch_samples

    def samples_in_steps(self, steps: int) -> int:
        """Samples, all processes together, that `steps` optimizer steps read."""
        return steps * self.samples

    def on(self, world_size: int, batch_size: int) -> GlobalBatch | None:
        """The same global batch on `world_size` processes of `batch_size`, its accumulation
        recomputed; None when they do not divide it."""
        per_step = batch_size * world_size
        if self.samples % per_step:
            return None
        return GlobalBatch(batch_size, world_size, self.samples // per_step)

    def __str__(self) -> str:
        return (
            f"{self.batch_size} per device x {self.world_size} processes x {self.grad_accum_steps} "
            f"accumulation = {self.samples}"
        )
