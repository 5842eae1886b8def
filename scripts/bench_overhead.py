"""Launcher overhead: the same model and in-memory batches through the launcher and a plain loop.

    python scripts/bench_overhead.py [--setting=both --steps=100 --repeats=15 --block=10]
    python scripts/bench_overhead.py --setting=mlp [--hidden=1024 --batch_size=128]
    python scripts/bench_overhead.py --setting=lm [--n_layer=2 --n_embd=64 --block_size=64 --lm_batch_size=16]
    python scripts/bench_overhead.py --noise_floor   # also: the plain loop against a copy of itself

`--setting` picks what is timed: `mlp`, `lm` or `both` (the default, so `make bench` and the test
cover both); `--steps`, `--warmup` and `--repeats` apply to each.

mlp: an MLP, AdamW, an LR scheduler stepped per optimizer step, a DataLoader over the same
in-memory TensorDataset (shuffled, no workers). Reported in steps/s.

lm: recipes/char_lm's causal Transformer on variable-length lines of standard-library source (in
memory, `--steps` x `--lm_batch_size` of them), padded per batch by char_lm's `collate`; both sides
take the summed per-token cross-entropy over the batch's real tokens (the launcher through
char_lm's `compute_loss` and its count, the plain loop dividing by hand: the same for 1 process
and no accumulation), AdamW, clipping to char_lm's max_grad_norm, its warm-up-cosine LR schedule
stepped per optimizer step. Both run on the launcher's device (a GPU if there is one). Reported
in tokens/s: the real (non-padding) labels of one epoch over each side's time.

Each round is one epoch of the in-memory data (`--steps` optimizer steps) through the launcher's
`train_epoch` alone (no evaluation or checkpoint falls inside it), with `--block` steps of the
plain loop run before each `--block` of its batches: the plain blocks are timed and taken out of
the epoch's time, and the rest is the launcher's. Blocks of 10 steps put the two sides a fraction
of a second apart, so a machine whose speed drifts by 10-20 % over seconds moves both alike (whole
rounds in turn do not), while each side runs with its own model and data warm in the caches: with
`--block=1` every step starts where the other loop's step has just evicted them, which costs the
launcher's step, whose batch passes through more Python, about 3 % more than the plain one's on
a 2-core VM. The ratio reported is the median of the per-round ratios, after `--warmup` rounds
(target >= 0.97). On both sides the optimizer and the LR schedule carry on from round to round,
over the launcher's total steps. On a GPU each plain block is timed between two device
synchronisations, and the launcher's queued work is waited for at the first: counted as the
launcher's.
Startup (building the Accelerator, writing run files) is outside the timed region.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import itertools
import json.decoder
import os
import statistics
import sys
import tempfile
import time
import types
import typing
from collections.abc import Iterator

import fire
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher import ConfigError, DataSpec, TrainConfig  # noqa: E402
from launcher.optim.schedules import warmup_cosine  # noqa: E402
from launcher.recipe import Recipe  # noqa: E402
from launcher.track.progress import Progress  # noqa: E402
from launcher.train.trainer import Trainer  # noqa: E402
from recipes import char_lm  # noqa: E402

SETTINGS = ("mlp", "lm", "both")
TEXT_MODULES = (argparse, dataclasses, inspect, json.decoder, typing)  # the LM's text: their source lines


# ---- mlp ------------------------------------------------------------------------------------


def build_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def make_dataset(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(samples, 256, generator=generator), torch.randint(0, 10, (samples,), generator=generator)
    )


def plain_mlp(model, dataset, batch_size: int, total_steps: int) -> Iterator[None]:
    """A hand-written loop: what a user would write without the launcher, one optimizer step per
    `next()`, epoch after epoch; the LR schedule runs over the launcher's total steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # the launcher's defaults
    lr_at = warmup_cosine(10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    model.train()
    while True:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            yield


def launcher_trainer(dataset, hidden: int, batch_size: int, output_dir: str) -> Trainer:
    @dataclasses.dataclass
    class Config(TrainConfig):
        pass

    module = types.SimpleNamespace(
        Config=Config,
        build_model=lambda cfg: build_model(hidden),
        build_data=lambda cfg: DataSpec(train=dataset),
        __name__="bench",
    )
    cfg = Config(
        output_dir=output_dir,
        batch_size=batch_size,
        epochs=10_000,
        num_workers=0,
        warmup_steps=10,
        wandb_mode="disabled",
        log_every=100,
        resume="",
    ).resolved()
    trainer = Trainer(cfg, Recipe("bench", module))
    trainer.start()
    trainer.run_log.progress = Progress("off", quiet=True, total=0, shown=False)
    return trainer


def paired_round(trainer: Trainer, plain_steps: Iterator[None], block: int) -> tuple[float, float]:
    """One epoch of the launcher with `block` plain steps before each `block` of its batches: (plain
    seconds, launcher seconds). The launcher's epoch takes exactly its batches (islice); its step
    count is a multiple of `block`, so both sides run as many steps."""
    device = trainer.accelerator.device
    original, plain = trainer.train_data.loader, 0.0
    wait = synchronize if device.type == "cuda" else (lambda device: None)  # nothing to wait for on CPU

    def loader(epoch, position):
        nonlocal plain
        batches = iter(original(epoch, position))
        # plain steps just before the launcher fetches a batch: both fetch after an update
        for taken in itertools.count():
            if taken % block == 0:
                wait(device)  # the launcher's queued work, counted as its own
                start = time.perf_counter()
                for _ in range(block):
                    next(plain_steps)
                wait(device)
                plain += time.perf_counter() - start
            batch = next(batches, None)
            if batch is None:
                return
            yield batch

    trainer.train_data.loader = loader
    start = time.perf_counter()
    try:
        trainer.train_epoch()
        wait(device)
    finally:
        del trainer.train_data.loader  # the method again
    trainer.state.epoch += 1
    return plain, time.perf_counter() - start - plain


def twin_round(
    plain_steps: Iterator[None], twin_steps: Iterator[None], steps: int, block: int, device
) -> tuple[float, float]:
    """The noise floor's round: the plain loop and a copy of it, `block` steps each in turn, as
    `paired_round` pairs them."""
    spent = [0.0, 0.0]
    wait = synchronize if device.type == "cuda" else (lambda device: None)
    for _ in range(steps // block):
        for side, stepper in enumerate((plain_steps, twin_steps)):
            wait(device)
            start = time.perf_counter()
            for _ in range(block):
                next(stepper)
            wait(device)
            spent[side] += time.perf_counter() - start
    return spent[0], spent[1]


def run_mlp(
    steps: int, warmup: int, repeats: int, block: int, hidden: int, batch_size: int, noise_floor: bool
) -> None:
    dataset = make_dataset(steps * batch_size)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = launcher_trainer(dataset, hidden, batch_size, output_dir)
        total = trainer.plan.schedule_steps
        plain_steps = plain_mlp(build_model(hidden), dataset, batch_size, total)
        rounds = [paired_round(trainer, plain_steps, block) for _ in range(warmup + repeats)][warmup:]
        if noise_floor:
            twin = plain_mlp(build_model(hidden), dataset, batch_size, total)
            report_noise_floor(
                [twin_round(plain_steps, twin, steps, block, torch.device("cpu")) for _ in range(repeats)]
            )
    report(
        f"model: MLP 256-{hidden}-{hidden}-10, batch {batch_size}, "
        f"{steps} steps x {repeats} rounds in blocks of {block}, {torch.get_num_threads()} threads, "
        "device cpu",
        "steps/s",
        steps,
        rounds,
    )


# ---- lm -------------------------------------------------------------------------------------


def make_text_samples(count: int) -> list[dict]:
    """`count` lines of standard-library source as {"tokens": (L,) uint8} byte samples, the
    lines taken in order (cycled if there are fewer): 4 bytes and longer, mostly 20 to 80."""
    lines = [
        line.encode()
        for module in TEXT_MODULES
        for line in inspect.getsource(module).splitlines()
        if len(line.strip()) > 3
    ]
    return [
        {"tokens": torch.tensor(list(line), dtype=torch.uint8)}
        for line in itertools.islice(itertools.cycle(lines), count)
    ]


def real_tokens(samples: list[dict], max_tokens: int) -> int:
    """Non-ignored labels of one pass over `samples`: collate cuts each to max_tokens and predicts all
    but the first."""
    return sum(min(len(sample["tokens"]), max_tokens) - 1 for sample in samples)


def lm_config(output_dir: str, n_layer: int, n_embd: int, block_size: int, batch_size: int) -> char_lm.Config:
    return char_lm.Config(
        output_dir=output_dir,
        n_layer=n_layer,
        n_embd=n_embd,
        block_size=block_size,
        batch_size=batch_size,
        epochs=10_000,
        max_steps=0,
        num_workers=0,
        wandb_mode="disabled",
        log_every=100,
        resume="",
    ).resolved()


def lm_trainer(cfg: char_lm.Config, samples: list[dict], steps: int) -> Trainer:
    module = types.SimpleNamespace(
        Config=type(cfg),
        build_model=char_lm.build_model,
        compute_loss=char_lm.compute_loss,
        build_data=lambda cfg: DataSpec(
            train=samples, collate=functools.partial(char_lm.collate, max_tokens=cfg.block_size + 1)
        ),
        __name__="bench_lm",
    )
    trainer = Trainer(cfg, Recipe("bench_lm", module))
    if trainer.plan.micro_batches_per_epoch != steps:  # tokens/s assumes every sample once per round
        raise RuntimeError(
            f"the launcher's epoch has {trainer.plan.micro_batches_per_epoch} batches, not {steps}"
        )
    trainer.start()
    trainer.run_log.progress = Progress("off", quiet=True, total=0, shown=False)
    return trainer


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work."""
    torch.cuda.synchronize(device)


def plain_lm(
    model: nn.Module, samples: list[dict], cfg: char_lm.Config, device: torch.device, total_steps: int
) -> Iterator[None]:
    """The char LM's step written by hand, one optimizer step per `next()`: summed cross-entropy /
    the batch's real tokens, AdamW, clipping, the LR schedule over the launcher's total steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_at = warmup_cosine(cfg.warmup_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps))
    loader = DataLoader(
        samples,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=functools.partial(char_lm.collate, max_tokens=cfg.block_size + 1),
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    model.train()
    while True:
        for batch in loader:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            logits = model(input_ids)
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=char_lm.IGNORE, reduction="sum"
            )
            (loss_sum / (labels != char_lm.IGNORE).sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            yield


def run_lm(
    steps: int,
    warmup: int,
    repeats: int,
    block: int,
    n_layer: int,
    n_embd: int,
    block_size: int,
    batch_size: int,
    noise_floor: bool,
) -> None:
    samples = make_text_samples(steps * batch_size)
    tokens = real_tokens(samples, block_size + 1)
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = lm_config(output_dir, n_layer, n_embd, block_size, batch_size)
        trainer = lm_trainer(cfg, samples, steps)
        device = trainer.accelerator.device  # the plain loop runs where the launcher does
        total = trainer.plan.schedule_steps

        def plain_model():
            torch.manual_seed(cfg.seed)  # the launcher's initial weights too
            return char_lm.build_model(cfg).to(device)

        plain_steps = plain_lm(plain_model(), samples, cfg, device, total)
        rounds = [paired_round(trainer, plain_steps, block) for _ in range(warmup + repeats)][warmup:]
        if noise_floor:
            twin = plain_lm(plain_model(), samples, cfg, device, total)
            report_noise_floor([twin_round(plain_steps, twin, steps, block, device) for _ in range(repeats)])
    report(
        f"model: char LM n_layer {n_layer}, n_embd {n_embd}, block {block_size}, batch {batch_size}, "
        f"{steps} steps x {repeats} rounds in blocks of {block}, {tokens} tokens per round, "
        f"{torch.get_num_threads()} threads, device {device.type}",
        "tokens/s",
        tokens,
        rounds,
    )


# ---- both -----------------------------------------------------------------------------------


def report(model_line: str, unit: str, work: int, rounds: list[tuple[float, float]]) -> None:
    """Each side's median rate (`work` per round over its seconds), and the median of the per-round
    ratios, launcher over plain."""
    plain = [work / p for p, _ in rounds]
    ours = [work / o for _, o in rounds]
    ratio = statistics.median(p / o for p, o in rounds)
    print(model_line)
    for name, rates in (("plain loop", plain), ("launcher", ours)):
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"{name:<18}{statistics.median(rates):8.1f} {unit}   (rounds: {each})")
    print(f"launcher / plain  {ratio:8.3f}   (target >= 0.97)", flush=True)


def report_noise_floor(rounds: list[tuple[float, float]]) -> None:
    """The same median of per-round ratios for the plain loop against a second copy of itself, step
    by step: what this machine gives for no difference at all."""
    ratios = [p / t for p, t in rounds]
    spread = max(abs(r - 1) for r in ratios)
    print(
        f"noise floor: plain / plain {statistics.median(ratios):.3f} "
        f"(per-round ratios within {spread:.1%} of 1)",
        flush=True,
    )


def main(
    setting: str = "both",
    steps: int = 100,
    warmup: int = 1,
    repeats: int = 15,
    block: int = 10,
    hidden: int = 1024,
    batch_size: int = 128,
    threads: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    block_size: int = 64,
    lm_batch_size: int = 16,
    noise_floor: bool = False,
) -> None:
    """--hidden and --batch_size size the MLP; --n_layer, --n_embd, --block_size (tokens) and
    --lm_batch_size (sequences) the char LM; --threads: torch's CPU threads (0: torch's default);
    --noise_floor also times the plain loop against a second copy of itself, the same way; --block:
    steps each side runs in turn (a divisor of --steps)."""
    if setting not in SETTINGS:
        raise ConfigError(f"--setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(
            f"--steps and --repeats must be >= 1 and --warmup >= 0, got {steps}, {repeats}, {warmup}"
        )
    if block < 1 or steps % block:
        raise ConfigError(f"--block must divide --steps ({steps}), got {block}")
    if threads:
        torch.set_num_threads(threads)
    if setting in ("mlp", "both"):
        run_mlp(steps, warmup, repeats, block, hidden, batch_size, noise_floor)
    if setting in ("lm", "both"):
        run_lm(steps, warmup, repeats, block, n_layer, n_embd, block_size, lm_batch_size, noise_floor)


if __name__ == "__main__":
    fire.Fire(main)
