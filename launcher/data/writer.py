"""Writing WebDataset tar shards plus the index.json that loaders read their sizes from.

Sources: any iterable of sample dicts, an ImageFolder tree (images kept as their original encoded
bytes, decoded once to catch corrupt files, read by several worker processes), or a
torchvision-style dataset of (PIL image, label). Shard order follows the source order, so the
same source gives the same shards whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator, Sequence

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from launcher.config import ConfigError
from launcher.data.index import INDEX_NAME


SHARD_MTIME = 946684800  # 2000-01-01 UTC: fixed, and not so old that `tar x` warns about it


def write_shards(samples: Iterable[dict], out_dir: str, *, max_count: int,
                 max_bytes: int = 1 << 30, classes: Sequence[str] = (),
                 prefix: str = "shard") -> dict:
    """Write samples (dicts with __key__, an image extension and cls) to out_dir/PREFIX-NNNNNN.tar.

    Returns the index written beside them: {"shards": {name: count}, "classes": [...]}.
    """
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, int] = {}
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    # A fixed, whole-second mtime: the same samples give byte-identical shards, and no member needs a
    # pax header (webdataset 1.0 writes tarfile's pax format, which adds one, 1 KiB and a second
    # header to parse, for every member whose mtime is a float, as time.time() is).
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=SHARD_MTIME) as writer:
        for sample in samples:
            writer.write(sample)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        first = pattern % 0  # ShardWriter opens its first file up front; leave nothing behind
        if os.path.exists(first):
            os.remove(first)
        raise ConfigError(f"no samples to write to {out_dir}: the source is empty or every sample was unreadable")
    index = {"shards": counts, "classes": list(classes)}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=1)
    return index


# ---- from an ImageFolder tree or a torchvision-style dataset ----------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


@dataclass
class FolderItem:
    path: str
    relative: str  # path under the root: the stable identity of the sample
    label: int
    class_name: str
    key: str = ""


def folder_items(root: str) -> tuple[list[FolderItem], list[str]]:
    """ImageFolder layout: one sub-directory per class, sorted class names -> labels 0..N-1."""
    if not os.path.isdir(root):
        raise ConfigError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    items = []
    for label, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(os.path.join(root, name))):
            for file in sorted(files):
                if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                    path = os.path.join(directory, file)
                    items.append(FolderItem(path, os.path.relpath(path, root), label, name))
    taken: set[str] = set()
    for item in items:  # keys unique and stable: the path, made safe, with a hash if that collides
        key = sample_key(item.relative)
        if key in taken:
            key = f"{key}_{hashlib.sha1(item.relative.encode()).hexdigest()[:8]}"
        taken.add(key)
        item.key = key
    if not items:
        raise ConfigError(f"no images found in {root}: expected ROOT/CLASS_NAME/IMAGE files "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items, classes


def sample_key(relative: str) -> str:
    """A WebDataset key from a relative path: no dots (they separate a key from its fields)."""
    return re.sub(r"[^A-Za-z0-9_/-]", "_", os.path.splitext(relative)[0])


def read_folder_item(item: FolderItem, reencode: str = "") -> dict | str:
    """The sample for one image file, or an error string if it cannot be decoded."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated or corrupt files fail here, not in training
            extension = FORMAT_EXTENSIONS.get(image.format or "", "")
            if reencode:
                data, extension = encode_image(image, reencode), reencode
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"{item.path}: {type(error).__name__}: {error}"
    if not extension:
        return f"{item.path}: unsupported image format; pass --reencode=png or jpg"
    return {"__key__": item.key, extension: data, "cls": item.label,
            "json": json.dumps({"path": item.relative, "class": item.class_name}).encode()}


def encode_image(image: Image.Image, extension: str) -> bytes:
    buffer = io.BytesIO()
    mode = "RGB" if extension in ("jpg", "jpeg") and image.mode not in ("L", "RGB") else image.mode
    image.convert(mode).save(buffer, format="JPEG" if extension in ("jpg", "jpeg") else extension.upper())
    return buffer.getvalue()


def dataset_samples(dataset, extension: str = "png") -> Iterator[dict]:
    """Samples from a torchvision-style dataset of (PIL image, label): encoded once, keys by index."""
    width = len(str(max(len(dataset) - 1, 0)))
    for i in range(len(dataset)):
        image, label = dataset[i][:2]
        yield {"__key__": f"{i:0{width}d}", extension: encode_image(image, extension), "cls": int(label)}


def shard_image_folder(root: str, out_dir: str, *, max_count: int, max_bytes: int, workers: int,
                       reencode: str = "", prefix: str = "shard", log=print) -> dict:
    """Write an ImageFolder tree as shards; unreadable images are reported and left out."""
    items, classes = folder_items(root)
    skipped: list[str] = []

    def good_samples():
        with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
            results = pool.imap(partial(read_folder_item, reencode=reencode), items, chunksize=16)
            for result in tqdm(results, total=len(items), unit="img", desc="shards", disable=None):
                if isinstance(result, str):
                    skipped.append(result)
                else:
                    yield result

    index = write_shards(good_samples(), out_dir, max_count=max_count, max_bytes=max_bytes,
                         classes=classes, prefix=prefix)
    for problem in skipped:
        log(f"skipped unreadable image {problem}")
    total = sum(index["shards"].values())
    log(f"wrote {total} samples in {len(index['shards'])} shards to {out_dir}; "
        f"{len(skipped)} unreadable image(s) left out")
    return {**index, "skipped": skipped}
