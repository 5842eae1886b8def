"""Data pipeline throughput on realistic photos: per-core decoders side by side, and the
launcher's pipeline against a tight loop.

    python scripts/bench_data.py [--images=2048 --size=0 --batch_size=64 --workers=0,1,2 --rounds=3
                                  --imagenet=256 --photos=8]

Two sets, cut and resized from scikit-learn's two sample photos, with Gaussian noise so that the
files are as dense as real photos (sizes printed): ImageNet-sized (500x375 JPEGs, about 110 KB)
and 12 MP phone photos (4032x3024, about 3 MB).

1. Decoders, per core: images per CPU-second of one process (one thread; `time.process_time`, so
   that other load on the machine does not count), JPEG bytes in memory -> uint8 224 crop
   (RandomResizedCrop + flip), each image through every way in turn, with the same crop, ratios
   to the reference per round:
   - torchvision's ImageNet reference: PIL decode, RandomResizedCrop on the PIL image, flip;
   - the launcher before decoding at the crop's size: `image_label` (PIL) + the preset's full-size path;
   - the launcher's default: `Shards.prepare` with `presets.train_transform` (launcher/data/scaled_decode.py:
     the DCT scale that covers the crop, or where none does, nvImageCodec decoding only the crop);
   - the candidates, with the same crop and resize: PIL `draft` and simplejpeg (`min_height`/
     `min_width`), each decoding the whole image at its DCT scale, and NVIDIA DALI's CPU
     `image_random_crop` (ROI decode, 1 thread) when it imports.
2. The pipeline: `images` JPEGs (`--size=0`: ImageNet-sized; N: N px squares) in 8 tar shards, then,
   side by side in each round (each pipeline right after a tight loop, so the ratio compares runs
   seconds apart on a machine whose speed drifts):
   - tight loop: one process reading the same tar files (with Python's tarfile, as a hand-written
     loop would) and running the same decode + transforms on each sample (`Shards.prepare`), no
     batching, no DataLoader: what one core can do;
   - the same tight loop reading the tars with the launcher's own reader (launcher/data/tar_reader.py),
     so the pipeline's remaining overhead shows apart from its faster tar reading;
   - the launcher's pipeline (`SplitLoader`, training mode: shard layout, shuffle buffer, per-sample
     seeded augmentation, whole batches assembled in the workers) with 0, 1 and 2 DataLoader workers,
     each epoch timed from creating the loader to its last batch.
   Prints images/s and each pipeline's ratio to (workers x tight loop), i.e. per core, as medians
   over rounds, against both tight loops; target: 2 workers >= 0.85 x the tarfile tight loop.
   That ratio needs the machine's cores free; beside it, images per CPU-second (the main process
   and its workers, from getrusage) over the tarfile loop's: the pipeline's own cost per image,
   which other load on the machine does not change.
Normalisation to float is not in either: the recipes do it per batch on the training device
(`Shards.batch_transform`), so workers move uint8.

    python scripts/bench_data.py --max_side=512 [--photos=8 --rounds=5]

measures only shards that store what training reads: the 12 MP photos shrunk as `launcher shards
--max_side` does (the writer's `fit_sample`), then the launcher's default training path over those
shards (`SplitLoader`, no workers, `presets.train_transform`) against the torchvision reference on
the originals, one process each, per round one right after the other: img/s and images per
CPU-second, and their ratios (target >= 25x at --max_side=512).
"""

from __future__ import annotations

import collections
import io
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

import fire
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher import presets  # noqa: E402
from launcher.data.decoders import image_label  # noqa: E402
from launcher.data.loader import SplitLoader  # noqa: E402
from launcher.data.scaled_decode import covering_size, decode_rgb  # noqa: E402
from launcher.data.spec import Shards  # noqa: E402
from launcher.data.tar_reader import tar_files  # noqa: E402
from launcher.data.writer import fit_sample, write_shards  # noqa: E402

IMAGENET_SIZE = (375, 500)  # height, width: ImageNet's most common size
PHOTO_SIZE = (3024, 4032)  # a 12 MP phone photo
# Noise (standard deviation, uint8 units) and JPEG quality that make files as dense as real ones:
# about 110 KB for ImageNet-sized images, 2-4 MB for 12 MP photos.
IMAGENET_NOISE, IMAGENET_QUALITY = 4.0, 96
PHOTO_NOISE, PHOTO_QUALITY = 5.0, 92


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # two 427 x 640 RGB photos, shipped with scikit-learn


def _encode(array: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def imagenet_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """500x375 windows of the sample photos, with noise."""
    photos, rng = _photos(), np.random.default_rng(seed)
    height, width = IMAGENET_SIZE
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = (int(rng.integers(0, photo.shape[d] - side + 1)) for d, side in ((0, height), (1, width)))
        window = photo[top : top + height, left : left + width].astype(np.float32)
        out.append(_encode(window + rng.normal(0, IMAGENET_NOISE, window.shape), IMAGENET_QUALITY))
    return out


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """4:3 windows of the sample photos, resized to 12 MP, with sensor-like noise."""
    photos, rng = _photos(), np.random.default_rng(seed)
    height, width = PHOTO_SIZE
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = photo.shape[0] * 4 // 3
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        large = np.asarray(
            Image.fromarray(photo[:, left : left + side]).resize((width, height), Image.BICUBIC), np.int16
        )
        out.append(_encode(large + rng.normal(0, PHOTO_NOISE, large.shape).astype(np.int16), PHOTO_QUALITY))
    return out


def square_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Random square crops of the sample photos, `size` px, quality 90 (small, fast sets for tests)."""
    photos, rng = _photos(), np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size // 2, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[d] - side)) for d in (0, 1))
        out.append(
            _encode(
                np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))),
                90,
            )
        )
    return out


# ---- 1. decoders, per core ------------------------------------------------------------------


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def reference(crop: int) -> Callable[[bytes], torch.Tensor]:
    """torchvision's references/classification: PIL decode, RRC on the PIL image, flip, to tensor."""
    transform = v2.Compose(
        [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
    )
    return lambda data: transform(_pil(data).convert("RGB"))


def launcher_full_size(crop: int) -> Callable[[bytes], torch.Tensor]:
    """The launcher's default before decoding at the crop's size: image_label's PIL image, whole, into
    the preset."""
    transform, decode = presets.train_transform(crop), image_label()
    return lambda data: transform(decode({"jpg": data, "cls": b"0"})[0])


def launcher_default(crop: int) -> Callable[[bytes], torch.Tensor]:
    """`Shards.prepare` with the preset, as a recipe's training split runs it."""
    prepare = Shards(".", presets.train_transform(crop)).prepare
    return lambda data: prepare({"jpg": data, "cls": b"0"})[0]


def scaled_candidate(
    crop: int, decode: Callable[[bytes, int, int], torch.Tensor]
) -> Callable[[bytes], torch.Tensor]:
    """The crop drawn from the header's size, `decode(data, min_height, min_width)`, crop, resize, flip."""
    random_crop, flip = v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()

    def run(data: bytes) -> torch.Tensor:
        width, height = _pil(data).size
        box = random_crop.make_params([torch.empty(0, height, width)])
        image = decode(
            data, covering_size(crop, box["height"], height), covering_size(crop, box["width"], width)
        )
        y, x = image.shape[1] / height, image.shape[2] / width
        top, left = round(box["top"] * y), round(box["left"] * x)
        image = functional.resized_crop(
            image,
            top,
            left,
            max(round(box["height"] * y), 1),
            max(round(box["width"] * x), 1),
            [crop, crop],
            antialias=True,
        )
        return flip(image)

    return run


def pil_draft(data: bytes, min_height: int, min_width: int) -> torch.Tensor:
    """Pillow's DCT-domain downscale: `draft` picks the smallest scale >= the requested size."""
    image = _pil(data)
    image.draft("RGB", (min_width, min_height))
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def dali_cpu(crop: int, batch: int = 32) -> Callable[[list[bytes]], int] | None:
    """NVIDIA DALI's CPU pipeline (ROI-decoding random crop, resize, flip), 1 thread; None if it does
    not import."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    feed: list[np.ndarray] = []

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpegs = fn.external_source(source=lambda: feed, batch=True, no_copy=False)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=crop, resize_y=crop, antialias=True)
        return fn.flip(images, horizontal=fn.random.coin_flip())

    built = pipe()
    try:
        built.build()
    except RuntimeError as error:  # e.g. no nvImageCodec library: DALI's CPU decoder needs it too
        print(f"(NVIDIA DALI left out: {str(error).splitlines()[-1][:120]})")
        return None

    def run(jpegs: list[bytes]) -> int:
        for start in range(0, len(jpegs) - batch + 1, batch):
            feed[:] = [np.frombuffer(d, np.uint8) for d in jpegs[start : start + batch]]
            built.run()
        return len(jpegs) // batch * batch

    return run


def compare_decoders(sets: dict[str, list[bytes]], crop: int, rounds: int) -> dict:
    """Per-core images/s of each way on each set, and its ratio to the reference (medians over rounds)."""
    ways = {
        "torchvision reference (PIL, RRC on the PIL image)": reference(crop),
        "launcher before (image_label + full-size preset)": launcher_full_size(crop),
        "launcher default (image_label + presets.train_transform)": launcher_default(crop),
        "PIL draft + crop + resize": scaled_candidate(crop, pil_draft),
        "simplejpeg at the DCT scale, whole image + crop + resize": scaled_candidate(crop, decode_rgb),
    }
    dali = dali_cpu(crop)
    rates: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    ratios: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for run in ways.values():  # warm-up: lazy imports, first allocations
        for data in next(iter(sets.values()))[:2]:
            run(data)
    for set_name, jpegs in sets.items():
        for _ in range(rounds):
            seconds = dict.fromkeys(ways, 0.0)  # CPU seconds of this process
            for i, data in enumerate(jpegs):
                for way, run in ways.items():  # image by image: the machine's drift hits every way alike
                    torch.default_generator.manual_seed(i)  # the same crop for every way
                    start = time.process_time()
                    run(data)
                    seconds[way] += time.process_time() - start
            measured = {way: len(jpegs) / spent for way, spent in seconds.items()}
            if dali is not None and len(jpegs) >= 32:
                start = time.process_time()  # DALI's threads included
                measured["NVIDIA DALI CPU, 1 thread (image_random_crop)"] = dali(jpegs) / (
                    time.process_time() - start
                )
            for way, rate in measured.items():
                rates[set_name, way].append(rate)
                ratios[set_name, way].append(rate / measured[next(iter(ways))])
    return {key: (statistics.median(rates[key]), statistics.median(ratios[key])) for key in rates}


# ---- 2. pipeline against a tight loop -------------------------------------------------------


def write_bench_shards(directory: str, jpegs: list[bytes]) -> str:
    samples = ({"__key__": f"img{i:06d}", "jpg": data, "cls": i % 10} for i, data in enumerate(jpegs))
    write_shards(samples, directory, max_count=max(len(jpegs) // 8, 1), classes=[str(c) for c in range(10)])
    return directory


def tarfile_jpegs(path: str):
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                yield tar.extractfile(member).read()


def launcher_jpegs(path: str):
    return (data for name, data in tar_files(path) if name.endswith(".jpg"))


READERS = {"tarfile": tarfile_jpegs, "launcher's reader": launcher_jpegs}  # the tight loop's, for the ratios


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its ended children (DataLoader workers are joined
    when their epoch ends)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tight_loop(directory: str, transform, jpegs=tarfile_jpegs) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one process doing only read + decode + transform (as the
    pipeline does: `Shards.prepare`), sample by sample."""
    prepare = Shards(directory, transform).prepare
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for path in paths:
        for data in jpegs(path):
            prepare({"jpg": data, "cls": b"0"})
            count += 1
    return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu)


def pipeline(directory: str, transform, workers: int, batch_size: int, epoch: int) -> tuple[float, float]:
    """(images/s, images per CPU-second of the main process and its workers) of one training epoch."""
    split = SplitLoader(
        Shards(directory, transform, shuffle_buffer=256),
        rank=0,
        world=1,
        seed=0,
        batch_size=batch_size,
        num_workers=workers,
        training=True,
    )
    split.batches_per_epoch = split.total // batch_size
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for batch in split.loader(epoch):
        count += len(batch.keys)
    return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu)


def compare_pipeline(
    jpegs: list[bytes], transform, worker_counts: list[int], batch_size: int, rounds: int
) -> dict:
    """Median images/s of the tight loops and pipelines, each pipeline's ratio to (workers x tight
    loop), and its images per CPU-second over the tarfile loop's (key (workers, "CPU"))."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_bench_shards(tmp, jpegs)
        results: dict[str, list[float]] = collections.defaultdict(list)  # images/s per run
        ratios: dict[tuple[int, str], list[float]] = collections.defaultdict(list)  # (workers, reader)
        tight_loop(directory, transform)  # warm-up: page cache, lazy imports
        for round_ in range(rounds):
            for w in worker_counts:
                tights = {reader: tight_loop(directory, transform, read) for reader, read in READERS.items()}
                piped, piped_per_cpu = pipeline(directory, transform, w, batch_size, epoch=round_)
                results[f"w{w}"].append(piped)
                for reader, (tight, _) in tights.items():
                    results[f"tight, {reader}"].append(tight)
                    ratios[w, reader].append(piped / (max(w, 1) * tight))
                ratios[w, "CPU"].append(piped_per_cpu / tights["tarfile"][1])
    return (
        {name: statistics.median(values) for name, values in results.items()},
        {key: statistics.median(values) for key, values in ratios.items()},
    )


def shrunk_photos(
    photos: int, max_side: int, crop: int, rounds: int, batch_size: int = 32, copies: int = 32
) -> dict:
    """12 MP photos shrunk to `max_side` as `launcher shards --max_side` does (timed once), written
    `copies` times each into shards; per round, the torchvision reference on the originals, then
    the launcher's default training path over the shards: median img/s, images per CPU-second and
    the ratios of each."""
    originals = photo_jpegs(photos, seed=1)
    start = time.perf_counter()
    shrunk = [
        fit_sample({"__key__": str(i), "jpg": data}, max_side)["jpg"] for i, data in enumerate(originals)
    ]
    shrink_rate = photos / (time.perf_counter() - start)
    decode_crop = reference(crop)
    rates: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as directory:
        samples = (
            {"__key__": f"p{i:06d}", "jpg": shrunk[i % photos], "cls": i % 10} for i in range(photos * copies)
        )
        write_shards(samples, directory, max_count=max(photos * copies // 8, 1))
        pipeline(directory, presets.train_transform(crop), 0, batch_size, epoch=0)  # warm-up
        for round_ in range(rounds):
            start, cpu = time.perf_counter(), cpu_seconds()
            for data in originals:
                decode_crop(data)
            rates["reference"].append(photos / (time.perf_counter() - start))
            rates["reference per CPU-s"].append(photos / (cpu_seconds() - cpu))
            ours, ours_per_cpu = pipeline(
                directory, presets.train_transform(crop), 0, batch_size, epoch=round_ + 1
            )
            rates["launcher"].append(ours)
            rates["launcher per CPU-s"].append(ours_per_cpu)
            rates["ratio"].append(ours / rates["reference"][-1])
            rates["ratio per CPU-s"].append(ours_per_cpu / rates["reference per CPU-s"][-1])
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"12 MP photos ({_kb(originals)}) -> uint8 RandomResizedCrop({crop}) + flip, 1 process; shrunk to "
        f"--max_side={max_side} ({_kb(shrunk)}) at {shrink_rate:.1f} photos/s"
    )
    print(
        f"  {'torchvision reference, originals':<42}{median['reference']:8.1f} images/s "
        f"({median['reference per CPU-s']:.1f} per CPU-second)"
    )
    print(
        f"  {f'launcher, shards at --max_side={max_side}':<42}{median['launcher']:8.1f} images/s "
        f"({median['launcher per CPU-s']:.1f} per CPU-second)"
    )
    rounds_range = f"{min(rates['ratio']):.1f}-{max(rates['ratio']):.1f}"
    print(
        f"  launcher / reference: {median['ratio']:.1f}x (rounds {rounds_range}), "
        f"per CPU-second {median['ratio per CPU-s']:.1f}x"
    )
    return {**median, "shrink_photos_per_s": shrink_rate}


def _kb(jpegs: list[bytes]) -> str:
    return f"{len(jpegs)} JPEGs, {statistics.mean(map(len, jpegs)) / 1e3:,.0f} KB on average"


def main(
    images: int = 2048,
    size: int = 0,
    crop: int = 224,
    batch_size: int = 64,
    workers: str | tuple = (0, 1, 2),
    rounds: int = 3,
    imagenet: int = 256,
    photos: int = 8,
    max_side: int = 0,
) -> dict:
    if max_side:  # only the 12 MP photos against their shards written at --max_side
        torch.set_num_threads(1)
        return shrunk_photos(photos, max_side, crop, rounds)
    if isinstance(workers, int):
        workers = (workers,)
    worker_counts = [int(w) for w in (workers.split(",") if isinstance(workers, str) else workers)]
    torch.set_num_threads(1)  # one core per process, as in DataLoader workers
    print(
        f"{os.cpu_count()} cores, torch {torch.__version__}, {rounds} rounds, medians; uint8 "
        f"RandomResizedCrop({crop}) + flip"
    )
    sets = {
        "ImageNet-sized 500x375": imagenet_jpegs(imagenet),
        "12 MP photos 4032x3024": photo_jpegs(photos, seed=1),
    }
    decoders = compare_decoders({name: jpegs for name, jpegs in sets.items() if jpegs}, crop, rounds)
    for set_name, jpegs in sets.items():
        if jpegs:
            print(f"decoders, per core: {set_name}, {_kb(jpegs)}")
        for (name, way), (rate, ratio) in decoders.items():
            if name == set_name:
                print(f"  {way:<58}{rate:8.1f} images/s per core  {ratio:5.2f}x the reference")
    jpegs = imagenet_jpegs(images, seed=2) if size == 0 else square_jpegs(images, size)
    median, ratio = compare_pipeline(jpegs, presets.train_transform(crop), worker_counts, batch_size, rounds)
    print(
        f"pipeline: {_kb(jpegs)} ({'500x375' if size == 0 else f'{size}px'}), launcher default transform, "
        f"batch {batch_size}"
    )
    for reader in READERS:
        print(f"  {'tight loop, 1 process, ' + reader:<42}{median[f'tight, {reader}']:8.1f} images/s")
    for w in worker_counts:
        shown = ", ".join(f"{ratio[w, reader]:.3f} ({reader})" for reader in READERS)
        print(
            f"  {f'pipeline, {w} worker(s)':<42}{median[f'w{w}']:8.1f} images/s   "
            f"pipeline / ({max(w, 1)} x tight) = {shown}; "
            f"per CPU-second: {ratio[w, 'CPU']:.3f} of the tarfile loop's"
        )
    return {
        "decoders": {f"{name}: {way}": value for (name, way), value in decoders.items()},
        "images_per_s": median,
        "ratio_per_core": {f"{w} workers, {reader}": value for (w, reader), value in ratio.items()},
    }


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
