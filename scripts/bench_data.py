"""Data pipeline throughput: shards -> decode -> train transforms -> batches, against a tight loop.

    python scripts/bench_data.py [--images=8192 --size=320 --batch_size=64 --workers=0,1,2 --rounds=3]

Writes `images` JPEGs (random crops of scikit-learn's two sample photos, `size` px, quality 90)
into 8 tar shards, then times, side by side in each round (each pipeline right after a tight loop,
so the ratio compares runs seconds apart on a machine whose speed drifts):
- tight loop: one process reading the same tar files (with Python's tarfile, as a hand-written
  loop would) and running the same decode + transforms on each sample, no batching, no
  DataLoader: what one core can do;
- the same tight loop reading the tars with the launcher's own reader (launcher/data/tar_reader.py),
  so the pipeline's remaining overhead shows apart from its faster tar reading;
- the launcher's pipeline (`SplitLoader`, training mode: shard layout, shuffle buffer, per-sample
  seeded augmentation, whole batches assembled in the workers) with 0, 1 and 2 DataLoader workers,
  each epoch timed from creating the loader to its last batch.
Prints images/s and each pipeline's ratio to (workers x tight loop), i.e. per core, as medians
over rounds, against both tight loops; target: 2 workers >= 0.85 x the tarfile tight loop.
Normalisation to float is not in either: the recipes do it per batch on the training device
(`Shards.batch_transform`), so workers move uint8.

    python scripts/bench_data.py --photos=8 [--max_side=512 --rounds=3]

measures only shards that store what training reads: `photos` 12 MP phone photos
(scripts/photo_sets.py) shrunk as `launcher shards --max_side` does, then the launcher's default
training path (`SplitLoader`, no workers, `presets.train_transform`) on those shards against the
torchvision reference on the originals (PIL decode, RandomResizedCrop + flip on the PIL image),
both in one process: img/s per core and the ratio (target >= 25x at --max_side=512).
"""

from __future__ import annotations

import collections
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time

import fire
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launcher, scripts
from launcher.data.spec import Shards  # noqa: E402
from launcher.data.loader import SplitLoader  # noqa: E402
from launcher.data.writer import write_shards  # noqa: E402
from launcher.data.tar_reader import tar_files  # noqa: E402
from launcher.data.writer import fit_sample  # noqa: E402
from launcher.presets import train_transform  # noqa: E402
from scripts.photo_sets import phone_photos  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def sample_transform(crop: int) -> v2.Compose:
    """ImageNet-style augmentation, on uint8 tensors."""
    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()])


def make_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photos, shipped with scikit-learn
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size // 2, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[d] - side)) for d in (0, 1))
        image = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_bench_shards(directory: str, images: int, size: int) -> str:
    samples = ({"__key__": f"img{i:06d}", "jpg": data, "cls": i % 10}
               for i, data in enumerate(make_jpegs(images, size)))
    write_shards(samples, directory, max_count=max(images // 8, 1), classes=[str(c) for c in range(10)])
    return directory


def tarfile_jpegs(path: str):
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                yield tar.extractfile(member).read()


def launcher_jpegs(path: str):
    return (data for name, data in tar_files(path) if name.endswith(".jpg"))


READERS = {"tarfile": tarfile_jpegs, "launcher's reader": launcher_jpegs}  # the tight loop's, for the ratios


def tight_loop(directory: str, transform, jpegs=tarfile_jpegs) -> float:
    """Images/s of one process doing only read + decode + transform, sample by sample."""
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))
    start, count = time.perf_counter(), 0
    for path in paths:
        for data in jpegs(path):
            image = Image.open(io.BytesIO(data))
            image.load()
            transform(image)
            count += 1
    return count / (time.perf_counter() - start)


def pipeline(directory: str, transform, workers: int, batch_size: int, epoch: int) -> float:
    split = SplitLoader(Shards(directory, transform, shuffle_buffer=256), rank=0, world=1, seed=0,
                        batch_size=batch_size, num_workers=workers, training=True)
    split.batches_per_epoch = split.total // batch_size
    start, count = time.perf_counter(), 0
    for batch in split.loader(epoch):
        count += len(batch.keys)
    return count / (time.perf_counter() - start)


def reference_transform(crop: int):
    """torchvision's ImageNet reference: RandomResizedCrop + flip on the PIL image, then a uint8 tensor."""
    return v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])


def reference_loop(files: list[bytes], transform, repeat: int) -> float:
    """Images/s of one process decoding each JPEG with PIL and running `transform` on it."""
    start = time.perf_counter()
    for _ in range(repeat):
        for data in files:
            transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return repeat * len(files) / (time.perf_counter() - start)


def shrunk_photos(photos: int, max_side: int, crop: int, rounds: int, batch_size: int = 32, copies: int = 32) -> dict:
    """12 MP photos shrunk to `max_side` as `launcher shards --max_side` does (timed once), written
    `copies` times each into shards; per round, the launcher's default training path over them
    (one process) right after the torchvision reference on the originals."""
    originals = phone_photos(photos)
    start = time.perf_counter()
    shrunk = [fit_sample({"__key__": str(i), "jpg": data}, max_side)["jpg"] for i, data in enumerate(originals)]
    shrink_rate = photos / (time.perf_counter() - start)
    reference = reference_transform(crop)
    rates: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as directory:
        samples = ({"__key__": f"p{i:06d}", "jpg": shrunk[i % photos], "cls": i % 10} for i in range(photos * copies))
        write_shards(samples, directory, max_count=max(photos * copies // 8, 1))
        pipeline(directory, train_transform(crop), 0, batch_size, epoch=0)  # warm-up
        for round_ in range(rounds):
            rates["reference"].append(reference_loop(originals, reference, repeat=1))
            rates["launcher"].append(pipeline(directory, train_transform(crop), 0, batch_size, epoch=round_ + 1))
    ratios = [ours / ref for ours, ref in zip(rates["launcher"], rates["reference"])]
    median = {name: statistics.median(values) for name, values in rates.items()}
    sizes = (statistics.mean(map(len, originals)) / 1e6, statistics.mean(map(len, shrunk)) / 1e3)
    print(f"{photos} 12 MP photos ({sizes[0]:.1f} MB each) -> uint8 RandomResizedCrop({crop}) + flip, 1 process, "
          f"{rounds} rounds; shrunk to --max_side={max_side} ({sizes[1]:.0f} KB each) at {shrink_rate:.1f} photos/s")
    print(f"  {'torchvision reference, originals':<42}{median['reference']:8.1f} images/s")
    print(f"  {f'launcher, shards at --max_side={max_side}':<42}{median['launcher']:8.1f} images/s   "
          f"launcher / reference = {statistics.median(ratios):.1f}x (rounds {min(ratios):.1f}-{max(ratios):.1f})")
    return {"images_per_s": median, "ratio": statistics.median(ratios), "shrink_photos_per_s": shrink_rate}


def main(images: int = 8192, size: int = 320, crop: int = 224, batch_size: int = 64,
         workers: str | tuple = (0, 1, 2), rounds: int = 3, photos: int = 0, max_side: int = 512) -> dict:
    if photos:  # only the 12 MP photos and their shrunk shards
        torch.set_num_threads(1)
        return shrunk_photos(photos, max_side, crop, rounds)
    if isinstance(workers, int):
        workers = (workers,)
    worker_counts = [int(w) for w in (workers.split(",") if isinstance(workers, str) else workers)]
    torch.set_num_threads(1)  # one core per process, as in DataLoader workers
    transform = sample_transform(crop)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_bench_shards(tmp, images, size)
        results: dict[str, list[float]] = collections.defaultdict(list)  # images/s per run
        ratios: dict[tuple[int, str], list[float]] = collections.defaultdict(list)  # (workers, reader)
        tight_loop(directory, transform)  # warm-up: page cache, lazy imports
        for round_ in range(rounds):
            for w in worker_counts:
                tights = {reader: tight_loop(directory, transform, jpegs) for reader, jpegs in READERS.items()}
                piped = pipeline(directory, transform, w, batch_size, epoch=round_)
                results[f"w{w}"].append(piped)
                for reader, tight in tights.items():
                    results[f"tight, {reader}"].append(tight)
                    ratios[w, reader].append(piped / (max(w, 1) * tight))
    median = {name: statistics.median(values) for name, values in results.items()}
    ratio = {key: statistics.median(values) for key, values in ratios.items()}
    print(f"{images} JPEGs {size}px -> uint8 RandomResizedCrop({crop}) + flip, batch {batch_size}, "
          f"{rounds} rounds, {os.cpu_count()} cores, torch {torch.__version__}")
    for reader in READERS:
        print(f"  {'tight loop, 1 process, ' + reader:<42}{median[f'tight, {reader}']:8.1f} images/s")
    for w in worker_counts:
        shown = ", ".join(f"{ratio[w, reader]:.3f} ({reader})" for reader in READERS)
        print(f"  {f'pipeline, {w} worker(s)':<42}{median[f'w{w}']:8.1f} images/s   "
              f"pipeline / ({max(w, 1)} x tight) = {shown}")
    return {"images_per_s": median, "ratio_per_core": {f"{w} workers, {reader}": value
                                                       for (w, reader), value in ratio.items()}}

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
