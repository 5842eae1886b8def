"""`python -m launcher shards SOURCE OUT [--flag=value ...]`: an ImageFolder tree (or one holding
train/, val/ and test/) or a torchvision-style dataset written as WebDataset shards
(launcher.data.writer); `shards_command` parses its flags and prints its --help."""

from __future__ import annotations

import ast
import os
import random

from tqdm.auto import tqdm

from launcher.config import ConfigError
from launcher.data.writer import (
    DEFAULT_QUALITY,
    MIN_SHARD_SAMPLES,
    dataset_samples,
    folder_splits,
    shard_image_folder,
    shard_image_splits,
    shard_sizes,
    write_shards,
)

# flag -> (type, default, meaning): what --help prints and what shards_command accepts
OPTIONS = {
    "num_shards": (
        int,
        0,
        "shards per split, of even sizes; 0: 32 (8 processes x 4 workers) when each then holds "
        f">= {MIN_SHARD_SAMPLES} samples, else the largest power of two that does (1 for under "
        f"{2 * MIN_SHARD_SAMPLES} samples), more if --max_count needs them (a power of two, then a "
        "multiple of 32)",
    ),
    "shuffle": (
        bool,
        True,
        "write the samples in a seeded random order, so every shard mixes the classes "
        "(false: the source's order, e.g. class by class)",
    ),
    "seed": (int, 0, "the shuffle's seed"),
    "max_count": (int, 10_000, "at most this many samples per shard"),
    "max_bytes": (float, 1e9, "at most about this many bytes per shard (more shards when one reaches it)"),
    "workers": (int, 0, "processes reading and checking images; 0: one per CPU"),
    "reencode": (str, "", "png, jpg or webp: convert every image; empty: keep the original bytes"),
    "max_side": (
        int,
        0,
        "shrink images whose longer side is over this many pixels to that side, aspect ratio kept "
        "(as FFCV's max_resolution; e.g. 512 for 224 px training crops); smaller images keep their "
        "bytes; 0: keep every size",
    ),
    "quality": (
        int,
        DEFAULT_QUALITY,
        "JPEG (and WebP) quality, 1-100, of the images written anew (shrunk or re-encoded)",
    ),
    "prefix": (str, "shard", "shard file names: PREFIX-000000.tar, ..."),
}

SHORT_USAGE = "python -m launcher shards SOURCE OUT [--flag=value ...]"
USAGE = """\
usage: python -m launcher shards SOURCE OUT [--flag=value ...]

Write SOURCE as WebDataset shards (PREFIX-NNNNNN.tar) with an index.json (samples, class counts and
image sides per shard, class names) in OUT. With --max_side, larger images are stored shrunk (the
same format, keys and labels), so training decodes what it reads rather than the originals.

SOURCE is an ImageFolder directory (SOURCE/CLASS/IMAGE, labels from the sorted class folders,
original image bytes kept; every image decoded once, unreadable ones listed and left out); or a
directory holding train/, val/ and/or test/ ImageFolders, written to OUT/train, OUT/val and OUT/test
with one class list; or the dotted name of a torchvision-style dataset class or factory, called with
the other --key=value flags (e.g. torchvision.datasets.CIFAR10 --root=data/cifar --train=True), its
images PNG-encoded.

options (defaults shown):
{options}"""


def usage() -> str:
    import textwrap

    flags = {name: f"--{name}={_shown(default)}" for name, (_, default, _) in OPTIONS.items()}
    width = max(map(len, flags.values()))
    return USAGE.format(
        options="\n".join(
            textwrap.fill(
                meaning,
                100,
                initial_indent=f"  {flags[name]:<{width}}  ",
                subsequent_indent=" " * (width + 4),
            )
            for name, (_, _, meaning) in OPTIONS.items()
        )
    )


def _shown(value) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else repr(value)
        if isinstance(value, str)
        else f"{value:g}"
    )


def shards_command(argv: list[str]) -> int:
    """`launcher shards ARGV`: --help on stdout, or the shards written; bad input is a ConfigError."""
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(usage())
        return 0
    positional, flags = [], {}
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value:
            if OPTIONS.get(name, (None,))[0] is bool:
                value = "true"
            elif name.startswith("no") and OPTIONS.get(name[2:], (None,))[0] is bool:
                name, value = name[2:], "false"
            else:
                value = next(args, None)
                if value is None:
                    raise ConfigError(f"--{name} needs a value; usage: {SHORT_USAGE}")
        flags[name] = _parse(name, value)
    if len(positional) != 2:
        raise ConfigError(
            f"shards takes SOURCE and OUT, got {len(positional)} argument(s) "
            f"{' '.join(positional)}; usage: {SHORT_USAGE} (see --help)"
        )
    make_shards(*positional, **flags)
    return 0


def _parse(name: str, value: str):
    """A flag's value by its declared type; a dataset's own flags as Python literals, else strings."""
    if name not in OPTIONS:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    kind, default, _ = OPTIONS[name]
    if kind is bool:
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"--{name} expects true or false, got {value!r}")
        return lowered in ("true", "1", "yes")
    try:
        return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except ValueError:
        raise ConfigError(f"--{name} expects {kind.__name__}, got {value!r}") from None


def make_shards(
    source: str,
    out: str,
    max_count: int = 10_000,
    max_bytes: float = 1e9,
    workers: int = 0,
    reencode: str = "",
    max_side: int = 0,
    quality: int = DEFAULT_QUALITY,
    prefix: str = "shard",
    num_shards: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    **dataset_kwargs,
) -> None:
    """Write SOURCE as WebDataset shards with an index.json in OUT (flags: OPTIONS; usage())."""
    if reencode not in ("", "png", "jpg", "webp"):
        raise ConfigError(f"--reencode must be png, jpg or webp (or empty to keep bytes), got {reencode!r}")
    for name, value, least in (
        ("num_shards", num_shards, 0),
        ("max_count", max_count, 1),
        ("max_bytes", max_bytes, 1),
        ("max_side", max_side, 0),
        ("quality", quality, 1),
    ):
        if value < least:
            raise ConfigError(f"--{name} must be >= {least}, got {value:g}")
    if quality > 100:
        raise ConfigError(f"--quality must be 1 to 100 (JPEG quality; 90 is the default), got {quality}")
    workers = workers or os.cpu_count() or 1
    if os.path.isdir(source):
        if dataset_kwargs:
            raise ConfigError(
                f"unknown flag --{next(iter(dataset_kwargs))} for an image folder; see "
                "python -m launcher shards --help"
            )
        options = dict(
            max_count=max_count,
            max_bytes=int(max_bytes),
            workers=workers,
            reencode=reencode,
            max_side=max_side,
            quality=quality,
            prefix=prefix,
            num_shards=num_shards,
            shuffle=shuffle,
            seed=seed,
        )
        if folder_splits(source):
            shard_image_splits(source, out, **options)
        else:
            shard_image_folder(source, out, **options)
        return
    dataset = _build_dataset(source, dataset_kwargs)
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    samples = dataset_samples(dataset, reencode or "png", order, max_side, quality)
    index = write_shards(
        tqdm(samples, total=len(dataset), unit="img", disable=None),
        out,
        max_count=max_count,
        max_bytes=int(max_bytes),
        classes=classes,
        prefix=prefix,
        shard_sizes=shard_sizes(len(dataset), num_shards, max_count),
    )
    print(f"wrote {sum(index['shards'].values())} samples in {len(index['shards'])} shards to {out}")


def _build_dataset(name: str, kwargs: dict):
    import importlib

    module_name, _, attr = name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError, ValueError):
        factory = None
    if factory is None:
        raise ConfigError(
            f"shard source {name!r} is neither a directory nor an importable dataset "
            "(e.g. torchvision.datasets.CIFAR10 --root=DIR)"
        )
    return factory(**kwargs)
