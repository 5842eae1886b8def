"""Write the demo's WebDataset shards from scikit-learn's digits (real data, no network).

    python scripts/make_demo_data.py --out data/digits

1,797 8x8 grey-scale digit images, stored as PNG bytes with their label as `cls`:
  OUT/train/     80 % of all ten classes (stratified, fixed seed), 8 shards
  OUT/val/       the held-out 20 %, 2 shards
  OUT/pretrain/  the training images of digits 0-4 only (the pretraining task), 4 shards
  OUT/pretrain_val/  the held-out images of digits 0-4, 1 shard
Each split directory holds an index.json (shard -> sample count, class names). The same train
and val images are also written as an ImageFolder tree, OUT/folder/{train,val}/CLASS/KEY.png
(for recipes/alexnet_folder and the other map-style examples).
"""

from __future__ import annotations

import os
import sys

import fire
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher.data.writer import encode_image, write_shards  # noqa: E402

CLASSES = [str(d) for d in range(10)]


def encode_png(pixels: np.ndarray) -> bytes:
    """8x8 digits hold 0..16; scale to 0..255 grey and PNG-encode."""
    return encode_image(Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L"), "png")


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: the same fraction of every class held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * val_fraction))
        val.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    return sorted(train), sorted(val)


def samples(images: np.ndarray, labels: np.ndarray, indices: list[int], order_seed: int):
    # Shards hold a shuffled order so each shard mixes all classes.
    for i in np.random.default_rng(order_seed).permutation(indices):
        yield {"__key__": f"digits-{i:04d}", "png": encode_png(images[i]), "cls": int(labels[i])}


def main(out: str = "data/digits", val_fraction: float = 0.2, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    train, val = split_indices(labels, val_fraction, seed)
    pretrain = [i for i in train if labels[i] < 5]
    pretrain_val = [i for i in val if labels[i] < 5]
    splits = {
        "train": (train, 8, CLASSES),
        "val": (val, 2, CLASSES),
        "pretrain": (pretrain, 4, CLASSES[:5]),
        "pretrain_val": (pretrain_val, 1, CLASSES[:5]),
    }
    for name, (indices, num_shards, classes) in splits.items():
        per_shard = -(-len(indices) // num_shards)
        index = write_shards(
            samples(images, labels, indices, seed + 1),
            os.path.join(out, name),
            max_count=per_shard,
            classes=classes,
        )
        print(
            f"{name}: {sum(index['shards'].values())} samples in {len(index['shards'])} shards "
            f"-> {os.path.join(out, name)}"
        )
    for name, indices in (("train", train), ("val", val)):
        write_folder(images, labels, indices, os.path.join(out, "folder", name))
    print(f"folder: {len(train)} + {len(val)} PNG files -> {os.path.join(out, 'folder')}")


def write_folder(images: np.ndarray, labels: np.ndarray, indices: list[int], root: str) -> None:
    for i in indices:
        directory = os.path.join(root, CLASSES[labels[i]])
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"digits-{i:04d}.png"), "wb") as f:
            f.write(encode_png(images[i]))


if __name__ == "__main__":
    fire.Fire(main)
