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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher.data.spec import Shards  # noqa: E402
from launcher.data.loader import SplitLoader  # noqa: E402
from launcher.data.writer import write_shards  # noqa: E402
from launcher.data.tar_reader import tar_files  # noqa: E402

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


def main(images: int = 8192, size: int = 320, crop: int = 224, batch_size: int = 64,
         workers: str | tuple = (0, 1, 2), rounds: int = 3) -> dict:
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
