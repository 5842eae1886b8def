"""Data pieces shared by the digit recipes (not a recipe itself): shards, transforms, and a callback
that logs the worst-classified validation images.

The shards come from `python scripts/make_demo_data.py --out data/digits` (run by `make demo`).
"""

from __future__ import annotations

import os

import torch
from torchvision.transforms import v2

from launcher import DataSpec, Images, Shards
from launcher.data.index import read_index
from launcher.data.tar_reader import shard_samples
from launcher.presets import to_rgb  # PIL -> RGB; tensors decoded on the device (--data_on_gpu) pass through

MEAN, STD = [0.5] * 3, [0.5] * 3  # digits are grey on black: map [0, 1] to [-1, 1]


# Per sample, in the DataLoader workers: uint8 tensors (4x less to stack and move than float).
def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            to_rgb,
            v2.PILToTensor(),
            v2.Resize(image_size, antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([to_rgb, v2.PILToTensor(), v2.Resize(image_size, antialias=True)])


# Per batch, on the training device.
def normalize() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def digit_shards(data_dir: str, train_split: str, val_split: str, image_size: int) -> DataSpec:
    def split(name: str, transform: v2.Compose) -> Shards:
        return Shards(os.path.join(data_dir, name), transform, batch_transform=normalize())

    return DataSpec(
        train=split(train_split, train_transform(image_size)),
        val=split(val_split, eval_transform(image_size)),
    )


def first_samples(shards: Shards, count: int) -> list:
    """The first `count` readable samples of `shards`, decoded and transformed (unreadable ones skipped)."""
    samples = []
    for url in read_index(shards.urls, shards.index).urls:
        for raw in shard_samples(url, handler=lambda error: True):
            try:
                samples.append(shards.prepare(raw))
            except Exception:  # noqa: BLE001 - an unreadable sample is skipped, as in training
                continue
            if len(samples) == count:
                return samples
    return samples


class WorstClassified:
    """At each evaluation, the `count` validation images (of the first `pool`) whose true class the
    model finds least likely, captioned with prediction and label: `val/worst` (wandb images,
    TensorBoard images, PNG files named in metrics.jsonl). Every rank computes it (under FSDP each
    forward is a collective); only the main process's log writes."""

    all_ranks = True

    def __init__(self, data: DataSpec, count: int = 8, pool: int = 256):
        self.data, self.count, self.pool = data, count, pool
        self.images: torch.Tensor | None = None  # (pool, 3, H, W) uint8, read at the first evaluation
        self.labels: torch.Tensor | None = None

    @torch.no_grad()
    def on_evaluate(self, view, metrics) -> None:
        if self.images is None:
            samples = first_samples(self.data.val, self.pool)
            self.images = torch.stack([image for image, _ in samples])
            self.labels = torch.tensor([int(label) for _, label in samples])
        device = next(view.model.parameters()).device
        logits = view.model(self.data.val.batch_transform(self.images.to(device))).float().cpu()
        surprise = torch.nn.functional.cross_entropy(logits, self.labels, reduction="none")
        worst = surprise.topk(min(self.count, len(surprise))).indices.tolist()
        predicted = logits.argmax(1)
        captions = [f"predicted {int(predicted[i])}, label {int(self.labels[i])}" for i in worst]
        view.log({"val/worst": Images([self.images[i] for i in worst], captions)})
