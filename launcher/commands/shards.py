"""`python -m launcher shards SOURCE OUT`: an ImageFolder tree or a torchvision-style dataset
written as WebDataset shards (launcher.data.writer)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

from launcher.config import ConfigError
from launcher.data.writer import dataset_samples, shard_image_folder, write_shards


def make_shards(source: str, out: str, max_count: int = 10_000, max_bytes: float = 1e9,
                workers: int = 0, reencode: str = "", prefix: str = "shard", **dataset_kwargs) -> None:
    """Write SOURCE as WebDataset shards with an index.json in OUT.

    SOURCE is an ImageFolder directory (ROOT/CLASS/IMAGE; original bytes kept), or the dotted name
    of a torchvision-style dataset class or factory, called with the remaining --key=value flags
    (e.g. `torchvision.datasets.CIFAR10 --root=data/cifar --train=True`); its images are PNG-encoded.
    """
    if reencode not in ("", "png", "jpg", "webp"):
        raise ConfigError(f"--reencode must be png, jpg or webp (or empty to keep bytes), got {reencode!r}")
    workers = workers or os.cpu_count() or 1
    if os.path.isdir(source):
        if dataset_kwargs:
            raise ConfigError(f"unknown flag --{next(iter(dataset_kwargs))} for an image folder")
        shard_image_folder(source, out, max_count=max_count, max_bytes=int(max_bytes), workers=workers,
                           reencode=reencode, prefix=prefix)
        return
    dataset = _build_dataset(source, dataset_kwargs)
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    index = write_shards(tqdm(dataset_samples(dataset, reencode or "png"), total=len(dataset), unit="img",
                              disable=None), out, max_count=max_count, max_bytes=int(max_bytes),
                         classes=classes, prefix=prefix)
    print(f"wrote {sum(index['shards'].values())} samples in {len(index['shards'])} shards to {out}")


def _build_dataset(name: str, kwargs: dict):
    import importlib

    module_name, _, attr = name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError, ValueError):
        factory = None
    if factory is None:
        raise ConfigError(f"shard source {name!r} is neither a directory nor an importable dataset "
                          "(e.g. torchvision.datasets.CIFAR10 --root=DIR)")
    return factory(**kwargs)
