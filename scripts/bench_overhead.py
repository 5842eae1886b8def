"""Launcher overhead: the same model and in-memory batches through the launcher and a plain loop.

    python scripts/bench_overhead.py [--steps=300 --repeats=5 --hidden=1024 --batch_size=128]

Both sides: an MLP, AdamW, an LR scheduler stepped per optimizer step, a DataLoader over the same
in-memory TensorDataset (shuffled, no workers). Timed rounds alternate between the two, after a
warm-up round each, and the median of each is reported with their ratio (target >= 0.97).
Startup (building the Accelerator, writing run files) is outside the timed region.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
import types

import fire
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher import DataSpec, TrainConfig  # noqa: E402
from launcher.loop import Trainer  # noqa: E402
from launcher.recipe import Recipe  # noqa: E402
from launcher.schedules import warmup_cosine  # noqa: E402


def build_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def make_dataset(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 256, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))


def plain_round(model, dataset, batch_size: int, steps: int) -> float:
    """A hand-written loop: what a user would write without the launcher. Returns steps/s."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_at = warmup_cosine(10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, steps))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return steps / (time.perf_counter() - start)


def launcher_trainer(dataset, hidden: int, batch_size: int, output_dir: str) -> Trainer:
    @dataclasses.dataclass
    class Config(TrainConfig):
        pass

    module = types.SimpleNamespace(
        Config=Config, build_model=lambda cfg: build_model(hidden),
        build_data=lambda cfg: DataSpec(train=dataset), __name__="bench")
    cfg = Config(output_dir=output_dir, batch_size=batch_size, epochs=10_000, num_workers=0,
                 warmup_steps=10, wandb_mode="disabled", log_every=100, resume="").resolved()
    trainer = Trainer(cfg, Recipe("bench", module))
    trainer.start()
    trainer.progress = types.SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None)
    return trainer


def launcher_round(trainer: Trainer, steps: int) -> float:
    start = time.perf_counter()
    trainer.train_epoch()  # one epoch of the in-memory dataset = `steps` optimizer steps
    trainer.epoch += 1
    return steps / (time.perf_counter() - start)


def main(steps: int = 300, warmup: int = 1, repeats: int = 5, hidden: int = 1024, batch_size: int = 128,
         threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)
    dataset = make_dataset(steps * batch_size)
    plain_model = build_model(hidden)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = launcher_trainer(dataset, hidden, batch_size, output_dir)
        for _ in range(warmup):
            plain_round(plain_model, dataset, batch_size, steps)
            launcher_round(trainer, steps)
        plain, ours = [], []
        for _ in range(repeats):  # alternate, so drift in machine speed hits both alike
            plain.append(plain_round(plain_model, dataset, batch_size, steps))
            ours.append(launcher_round(trainer, steps))
    plain_rate, our_rate = statistics.median(plain), statistics.median(ours)
    print(f"model: MLP 256-{hidden}-{hidden}-10, batch {batch_size}, {steps} steps x {repeats} rounds, "
          f"{torch.get_num_threads()} threads, device cpu")
    print(f"plain loop        {plain_rate:8.1f} steps/s   (rounds: {', '.join(f'{r:.1f}' for r in plain)})")
    print(f"launcher          {our_rate:8.1f} steps/s   (rounds: {', '.join(f'{r:.1f}' for r in ours)})")
    print(f"launcher / plain  {our_rate / plain_rate:8.3f}   (target >= 0.97)")


if __name__ == "__main__":
    fire.Fire(main)
