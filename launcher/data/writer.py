"""Writing WebDataset tar shards plus the index.json that loaders read their sizes from.

Sources: any iterable of sample dicts, an ImageFolder tree (images kept as their original encoded
bytes, decoded once to catch corrupt files, read by several worker processes), or a
torchvision-style dataset of (PIL image, label). An ImageFolder or a dataset is written in a
seeded shuffled order (a real ImageFolder is sorted by class: unshuffled, each shard would hold
one or two classes), into shards of even sizes (`default_num_shards`); the same source and seed
give the same shards whatever the number of workers.

Images can be made smaller on the way (`max_side`: the longest side at most that many pixels, the
aspect ratio kept, never enlarged, as FFCV's `max_resolution`), so the shards hold what training
reads rather than 12 MP photos whose every byte each epoch would decode again; images already
small enough keep their bytes. index.json records each shard's image sides (read from the image
headers as they are written) for `launcher plan` to compare with the transforms' output.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator, Sequence

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from launcher.config import ConfigError
from launcher.data.index import INDEX_NAME


SHARD_MTIME = 946684800  # 2000-01-01 UTC: fixed, and not so old that `tar x` warns about it
# the extensions the writer stores images as
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff")
DEFAULT_QUALITY = 90  # JPEG quality of the images the writer encodes (FFCV's default; Pillow's own is 75)


def write_shards(samples: Iterable[dict], out_dir: str, *, max_count: int,
                 max_bytes: int = 1 << 30, classes: Sequence[str] = (),
                 prefix: str = "shard", shard_sizes: Sequence[int] = (), max_side: int = 0,
                 quality: int = DEFAULT_QUALITY) -> dict:
    """Write samples (dicts with __key__, an image extension and cls) to out_dir/PREFIX-NNNNNN.tar.

    Shard i holds at most shard_sizes[i] samples (given), max_count and max_bytes (always).
    `max_side` (0: off): images larger than that are shrunk to fit (`fit_sample`), at `quality`.
    Returns the index written beside them: {"shards": {name: count}, "classes": [...]}, and, when
    every sample has an integer `cls`, "class_counts": {name: [samples of class 0, 1, ...]}; when
    samples hold images, "image_sides": {name: {"short": median shorter side, "long": median
    longer side, "max": longest side}} (pixels).
    """
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, int] = {}
    labels: dict[str, collections.Counter] | None = {}  # None once a sample has no integer cls
    sizes: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    # A fixed, whole-second mtime: the same samples give byte-identical shards, and no member needs a
    # pax header (webdataset 1.0 writes tarfile's pax format, which adds one, 1 KiB and a second
    # header to parse, for every member whose mtime is a float, as time.time() is).
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=SHARD_MTIME) as writer:
        for sample in samples:
            name = os.path.basename(writer.fname)
            if name in counts and len(counts) <= len(shard_sizes) and counts[name] >= shard_sizes[len(counts) - 1]:
                writer.next_stream()
            if max_side:
                sample = fit_sample(sample, max_side, quality)
            writer.write(sample)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
            labels = _count_label(labels, name, sample)
            size = image_size(sample)
            if size:
                sizes[name].append(size)
    if not counts:
        first = pattern % 0  # ShardWriter opens its first file up front; leave nothing behind
        if os.path.exists(first):
            os.remove(first)
        raise ConfigError(f"no samples to write to {out_dir}: the source is empty or every sample was unreadable")
    index = {"shards": counts, "classes": list(classes)}
    if labels:
        width = max(len(classes), 1 + max(max(c) for c in labels.values()))
        index["class_counts"] = {name: [labels[name][i] for i in range(width)] for name in counts}
    if sizes:
        index["image_sides"] = {name: side_summary(sizes[name]) for name in counts if sizes[name]}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=1)
    return index


def _count_label(labels: dict | None, name: str, sample: dict) -> dict | None:
    """Add the sample's `cls` to its shard's class counts; None (no counts) once one has none."""
    label = sample.get("cls") if labels is not None else None
    if isinstance(label, bytes):
        label = label.decode(errors="replace")
    try:
        label = int(label)
    except (TypeError, ValueError):
        return None
    if label < 0:
        return None
    labels.setdefault(name, collections.Counter())[label] += 1
    return labels


# ---- image sizes: shrunk to what training reads, recorded in the index ----------------------------

def image_size(sample: dict) -> tuple[int, int] | None:
    """(width, height) of the sample's first image, from its header (no decode); None without one."""
    extension = next((e for e in IMAGE_FIELDS if e in sample), None)
    if extension is None:
        return None
    try:
        with Image.open(io.BytesIO(sample[extension])) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # the loader skips and reports it; the index just leaves it out of the sizes


def side_summary(sizes: list[tuple[int, int]]) -> dict[str, int]:
    """A shard's image sides in pixels: median shorter and longer side, and the longest side."""
    return {"short": round(statistics.median(min(s) for s in sizes)),
            "long": round(statistics.median(max(s) for s in sizes)), "max": max(max(s) for s in sizes)}


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is `max_side` (aspect ratio kept to the
    nearest pixel); unchanged when it already fits or `max_side` is 0 (never enlarged)."""
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return width, height
    return max(1, round(width * max_side / longest)), max(1, round(height * max_side / longest))


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longer side at most `max_side`: JPEGs decoded at the smallest DCT scale still
    at least that size (Pillow's `draft`), then a Lanczos resize (antialiased, as FFCV's INTER_AREA)."""
    size = fitted_size(*image.size, max_side)
    if size == image.size:
        return image
    image.draft(image.mode, size)  # a no-op for formats other than JPEG
    return image.resize(size, Image.Resampling.LANCZOS)


def fit_sample(sample: dict, max_side: int, quality: int = DEFAULT_QUALITY) -> dict:
    """`sample` with its first image shrunk to `max_side`, in its own format; byte for byte when it
    already fits or does not decode (the loader reports it)."""
    extension = next((e for e in IMAGE_FIELDS if e in sample), None)
    if extension is None:
        return sample
    try:
        with Image.open(io.BytesIO(sample[extension])) as image:
            if max(image.size) <= max_side:
                return sample
            return {**sample, extension: encode_image(shrink(image, max_side), extension, quality)}
    except (OSError, ValueError, Image.DecompressionBombError):
        return sample


# ---- how many shards --------------------------------------------------------------------------

TARGET_SHARDS = 32  # 8 processes x 4 DataLoader workers, each reading shards of its own
MIN_SHARD_SAMPLES = 16  # the default never cuts shards smaller than this


def default_num_shards(samples: int, max_count: int) -> int:
    """Shards for `samples`: TARGET_SHARDS when each then holds MIN_SHARD_SAMPLES or more, else the
    largest power of two that does (1 for a tiny source); more if --max_count needs more, rounded
    up to a power of two, then to a multiple of 32: 2, 4 or 8 processes x 4 workers get as many each."""
    small = min(TARGET_SHARDS, samples // MIN_SHARD_SAMPLES)
    wanted = max(1 << max(small.bit_length() - 1, 0), -(-samples // max(max_count, 1)))
    if wanted > TARGET_SHARDS:
        return -(-wanted // TARGET_SHARDS) * TARGET_SHARDS
    return 1 << (wanted - 1).bit_length()


def shard_sizes(samples: int, num_shards: int, max_count: int) -> list[int]:
    """Even shard sizes (they differ by one at most) for `samples` in `num_shards` (0: the default)."""
    count = num_shards or default_num_shards(samples, max_count)
    count = max(1, min(count, samples))
    sizes = [samples // count + (i < samples % count) for i in range(count)]
    if sizes[0] > max_count:
        raise ConfigError(f"--num_shards={num_shards} puts {sizes[0]} samples in a shard, more than "
                          f"--max_count={max_count}; raise --num_shards or --max_count")
    return sizes


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


def class_folders(root: str) -> list[str]:
    """The sorted names of root's sub-directories (hidden ones left out)."""
    if not os.path.isdir(root):
        raise ConfigError(f"image folder {root} does not exist")
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def folder_items(root: str, classes: Sequence[str] | None = None) -> tuple[list[FolderItem], list[str]]:
    """ImageFolder layout: one sub-directory per class, sorted class names -> labels 0..N-1
    (`classes`: labels from this list instead, for splits that share one; missing folders hold none)."""
    found = class_folders(root)  # also refuses a missing root
    classes = list(classes) if classes is not None else found
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


def read_folder_item(item: FolderItem, reencode: str = "", max_side: int = 0,
                     quality: int = DEFAULT_QUALITY) -> dict | str:
    """The sample for one image file (shrunk to `max_side` if larger), or an error string if it
    cannot be decoded."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            extension = FORMAT_EXTENSIONS.get(image.format or "", "")
            too_large = max_side and max(image.size) > max_side
            if too_large:
                image.draft(image.mode, fitted_size(*image.size, max_side))  # decode no more than needed
            image.load()  # a full decode: truncated or corrupt files fail here, not in training
            if reencode or (too_large and extension):
                extension = reencode or extension
                data = encode_image(shrink(image, max_side), extension, quality)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"{item.path}: {type(error).__name__}: {error}"
    if not extension:
        return f"{item.path}: unsupported image format; pass --reencode=png or jpg"
    return {"__key__": item.key, extension: data, "cls": item.label,
            "json": json.dumps({"path": item.relative, "class": item.class_name}).encode()}


def encode_image(image: Image.Image, extension: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """`image` in the format of `extension`; JPEG and WebP at `quality` (PNG is lossless)."""
    buffer = io.BytesIO()
    jpeg = extension in ("jpg", "jpeg")
    mode = "RGB" if jpeg and image.mode not in ("L", "RGB") else image.mode
    image.convert(mode).save(buffer, format="JPEG" if jpeg else extension.upper(), quality=quality)
    return buffer.getvalue()


def dataset_samples(dataset, extension: str = "png", order: Sequence[int] | None = None, max_side: int = 0,
                    quality: int = DEFAULT_QUALITY) -> Iterator[dict]:
    """Samples from a torchvision-style dataset of (PIL image, label): shrunk to `max_side` if
    larger, encoded once, keys by index; in `order` (indices) if given."""
    width = len(str(max(len(dataset) - 1, 0)))
    for i in range(len(dataset)) if order is None else order:
        image, label = dataset[i][:2]
        yield {"__key__": f"{i:0{width}d}", extension: encode_image(shrink(image, max_side), extension, quality),
               "cls": int(label)}


SPLITS = ("train", "val", "test")


def folder_splits(root: str) -> list[str]:
    """The split folders (train/, val/, test/) that root holds; empty when root holds classes.
    A root mixing split folders with others is refused: its classes would include "train"."""
    folders = class_folders(root)
    splits = [name for name in SPLITS if name in folders]
    others = [name for name in folders if name not in SPLITS]
    if splits and others:
        raise ConfigError(f"{root} holds split folders ({', '.join(splits)}) and other folders "
                          f"({', '.join(others[:3])}); give it only train/, val/ and test/ (each ROOT/SPLIT/CLASS/IMAGE), "
                          "or only class folders")
    return splits


def nested_folders(root: str, classes: Sequence[str]) -> list[str]:
    """CLASS/SUB paths of the sub-folders inside class folders (their images take the class's label)."""
    found = []
    for name in classes:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            found += [f"{name}/{d.name}" for d in sorted(os.scandir(path), key=lambda d: d.name) if d.is_dir()]
    return found


def shard_image_folder(root: str, out_dir: str, *, max_count: int, max_bytes: int, workers: int,
                       reencode: str = "", max_side: int = 0, quality: int = DEFAULT_QUALITY, prefix: str = "shard",
                       num_shards: int = 0, shuffle: bool = True,
                       seed: int = 0, classes: Sequence[str] | None = None, log=print) -> dict:
    """Write an ImageFolder tree as shards; unreadable images are reported and left out.

    Samples are shuffled (seeded by `seed`) unless `shuffle` is False, and cut into `num_shards`
    shards of even sizes (0: `default_num_shards`). `classes`: the label list (default: root's folders).
    `max_side` (0: off): larger images are shrunk to fit in the workers, at JPEG/WebP `quality`."""
    items, classes = folder_items(root, classes)
    nested = nested_folders(root, classes)
    if nested:
        log(f"WARNING: {len(nested)} class folder(s) of {root} hold sub-folders ({', '.join(nested[:3])}"
            f"{', ...' if len(nested) > 3 else ''}): their images take the class folder's label; if the classes "
            "are a level deeper, give that folder as SOURCE")
    if shuffle:
        random.Random(seed).shuffle(items)  # keys come from paths, so they do not depend on the order
    skipped: list[str] = []

    def good_samples():
        with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
            read = partial(read_folder_item, reencode=reencode, max_side=max_side, quality=quality)
            results = pool.imap(read, items, chunksize=16)
            for result in tqdm(results, total=len(items), unit="img", desc="shards", disable=None):
                if isinstance(result, str):
                    skipped.append(result)
                else:
                    yield result

    index = write_shards(good_samples(), out_dir, max_count=max_count, max_bytes=max_bytes,
                         classes=classes, prefix=prefix, shard_sizes=shard_sizes(len(items), num_shards, max_count))
    for problem in skipped:
        log(f"skipped unreadable image {problem}")
    total = sum(index["shards"].values())
    log(f"wrote {total} samples in {len(index['shards'])} shards to {out_dir}; "
        f"{len(skipped)} unreadable image(s) left out")
    return {**index, "skipped": skipped}


def shard_image_splits(root: str, out_dir: str, *, seed: int = 0, log=print, **options) -> dict[str, dict]:
    """ROOT/{train,val,test}/CLASS/IMAGE as OUT/{train,val,test}/ shards, every split labelled from
    one class list (the class folders of all splits, sorted). Options: those of shard_image_folder."""
    splits = folder_splits(root)
    found = {split: class_folders(os.path.join(root, split)) for split in splits}
    classes = sorted(set().union(*found.values()))
    for split in splits:
        missing = [name for name in classes if name not in found[split]]
        if missing:
            log(f"WARNING: {split}/ has no folder for {len(missing)} of the {len(classes)} classes "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return {split: shard_image_folder(os.path.join(root, split), os.path.join(out_dir, split), classes=classes,
                                      seed=derive_split_seed(seed, split), log=log, **options)
            for split in splits}


def derive_split_seed(seed: int, split: str) -> int:
    """Each split's shuffle seed: the same for a split whatever other splits there are."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little")
