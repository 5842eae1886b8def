"""Training throughput on one device: the launcher side by side with a plain hand-written loop.

    python scripts/bench_gpu.py                       # ResNet-50, 224 px, batch 256: for a GPU
    python scripts/bench_gpu.py --arch=resnet18 --image_size=32 --batch_size=8 --steps=6 --warmup=2 \\
        --images=64 --compile=False --precision=no    # small enough for a CPU (the test runs this)

For every combination of --data (synthetic, shards, gpu_decode), --compile, --precision (no,
bf16) and --channels_last, it runs, one right after the other:
- the launcher: `python -m launcher recipes/resnet_bench` (subprocess, the real CLI) with the
  matching fields (`--synthetic_data`, `--data_on_gpu` for gpu_decode, `--compile`,
  `--mixed_precision`, `--channels_last`), img/s from its metrics.jsonl windows after the warm-up;
- a plain loop: the same model, AdamW, cross-entropy, autocast, channels_last and
  `model.compile()`, fed by a plain webdataset + DataLoader pipeline with the same transforms in
  the workers (shards), or with workers reading bytes only and `decode_jpeg(device=...)` plus the
  transforms on the device (gpu_decode), or, synthetic, one fixed pinned batch copied to the
  device each step, as the launcher does.
It prints img/s of both, launcher / plain, real shards / synthetic, and model FLOPs utilisation
(3 x forward FLOPs per image, counted by torch.utils.flop_counter, over the device's peak; pass
--peak_tflops where the device is not in PEAK_TFLOPS). The shards are `images` JPEG crops of
scikit-learn's two sample photos (real JPEG decoding, offline), written once to --data_dir.
`--out=FILE` writes the rows as JSON after each one, so a job stopped by its time limit keeps
what it measured. All 24 settings take long on a GPU (each compiled run compiles twice: launcher
and plain loop); the targets need only bf16 with channels-last, which one job can run first:

    python scripts/bench_gpu.py --precision=bf16 --channels_last=True --out=gpu.json
"""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launcher.presets import normalize, train_transform  # noqa: E402
from launcher.shards import write_shards  # noqa: E402

# Dense peak TFLOP/s by device name fragment: (bf16 tensor cores, fp32 with TF32 convolutions).
PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L4": (121.0, 60.0)}


def make_shards(out: str, images: int, size: int, classes: int, seed: int = 0) -> str:
    """`images` JPEGs (quality 90, `size` px) cut from the two scikit-learn sample photos."""
    if os.path.isfile(os.path.join(out, "index.json")):
        return out
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(images):
            photo = photos[i % len(photos)]
            side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2])))
            top, left = (int(rng.integers(0, photo.shape[d] - side)) for d in (0, 1))
            buffer = io.BytesIO()
            Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size)).save(
                buffer, format="JPEG", quality=90)
            yield {"__key__": f"bench-{i:07d}", "jpg": buffer.getvalue(), "cls": i % classes}

    write_shards(samples(), out, max_count=max(1, images // 16), classes=[str(c) for c in range(classes)])
    return out


def forward_flops(arch: str, image_size: int, classes: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.get_model(arch, weights=None, num_classes=classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, precision: str, override: float) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None


def launcher_run(setting: dict, args: dict, out: str) -> float:
    """img/s of the real CLI: the median of its logged windows after the warm-up."""
    log_every = max(1, args["steps"] // 4)
    command = [sys.executable, "-m", "launcher", os.path.join(ROOT, "recipes", "resnet_bench.py"),
               f"--data_dir={args['data_dir']}", f"--arch={args['arch']}", f"--image_size={args['image_size']}",
               f"--num_classes={args['classes']}", f"--batch_size={args['batch_size']}",
               f"--num_workers={args['workers']}", f"--max_steps={args['warmup'] + args['steps']}",
               "--epochs=1000", f"--log_every={log_every}", f"--output_dir={out}",
               f"--synthetic_data={setting['data'] == 'synthetic'}", f"--data_on_gpu={setting['data'] == 'gpu_decode'}",
               f"--compile={setting['compile']}",
               f"--mixed_precision={setting['precision']}", f"--channels_last={setting['channels_last']}",
               "--checkpoint_epoch_end=False", "--keep_checkpoints=1", "--wandb_mode=disabled"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"launcher failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [json.loads(line) for line in f]
    rates = [w["train/samples_per_s"] for w in windows if "train/samples_per_s" in w and w["step"] > args["warmup"]]
    return statistics.median(rates)


def plain_run(setting: dict, args: dict) -> float:
    """img/s of a loop written by hand: the same work, no launcher."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args["arch"], weights=None, num_classes=args["classes"]).to(device)
    memory = torch.channels_last if setting["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory)
    if setting["compile"]:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norm = normalize()
    dtype = torch.bfloat16 if setting["precision"] == "bf16" else None
    batches = {"synthetic": synthetic_batches, "shards": shard_batches,
               "gpu_decode": lambda a: gpu_decoded_batches(a, device)}[setting["data"]](args)
    model.train()
    start = None
    for step, (images, labels) in enumerate(itertools.islice(batches, args["warmup"] + args["steps"])):
        if step == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(norm(images)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args["steps"] * args["batch_size"] / (time.perf_counter() - start)


def synthetic_batches(args: dict):
    generator = torch.Generator().manual_seed(0)
    size = (args["batch_size"], 3, args["image_size"], args["image_size"])
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, args["classes"], (args["batch_size"],), generator=generator)
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return itertools.repeat((images, labels))


def shard_batches(args: dict):
    import glob

    import webdataset as wds

    transform = train_transform(args["image_size"])
    urls = sorted(glob.glob(os.path.join(args["data_dir"], "*.tar")))
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
               .shuffle(256).decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int)
               .batched(args["batch_size"], partial=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args["workers"],
                                         pin_memory=torch.cuda.is_available())
    return itertools.chain.from_iterable(itertools.repeat(loader))  # epochs back to back


def gpu_decoded_batches(args: dict, device: torch.device):
    """Workers read bytes only; JPEGs decoded on `device` in one call per batch, then augmented there."""
    import glob

    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_jpeg

    transform = train_transform(args["image_size"])
    urls = sorted(glob.glob(os.path.join(args["data_dir"], "*.tar")))
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
               .shuffle(256).to_tuple("jpg", "cls")
               .map_tuple(lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8), int)
               .batched(args["batch_size"], partial=False,
                        collation_fn=lambda samples: ([s[0] for s in samples], torch.tensor([s[1] for s in samples]))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args["workers"])
    for encoded, labels in itertools.chain.from_iterable(itertools.repeat(loader)):
        if device.type == "cuda":  # nvJPEG, one call per batch
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        else:  # torchvision 0.19 decodes a list of JPEGs on the GPU only
            images = [decode_jpeg(data, mode=ImageReadMode.RGB) for data in encoded]
        yield torch.stack([transform(image) for image in images]), labels


def save(path: str, report: dict) -> None:
    """Write `report` as JSON through a temporary file, so `path` always holds a whole report."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def settings(data, compile, precision, channels_last) -> list[dict]:
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731 - fire gives a value or a tuple
    return [dict(data=d, compile=c, precision=p, channels_last=cl)
            for d, c, p, cl in itertools.product(as_list(data), as_list(compile), as_list(precision), as_list(channels_last))]


def main(arch: str = "resnet50", image_size: int = 224, batch_size: int = 256, steps: int = 40, warmup: int = 15,
         images: int = 8192, classes: int = 1000, workers: int = 0, data=("synthetic", "shards", "gpu_decode"),
         compile=(False, True), precision=("no", "bf16"), channels_last=(False, True), data_dir: str = "",
         peak_tflops: float = 0.0, out: str = "") -> None:
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 2))
    data_dir = make_shards(data_dir or os.path.join(tempfile.gettempdir(), f"bench_gpu_{image_size}_{images}"),
                           images, round(image_size * 1.15), classes)
    args = dict(arch=arch, image_size=image_size, batch_size=batch_size, steps=steps, warmup=warmup,
                classes=classes, workers=workers, data_dir=data_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    train_flops = 3 * forward_flops(arch, image_size, classes)
    print(f"{arch} {image_size}px, batch {batch_size}, {steps} timed steps after {warmup}, {workers} workers, on {name}")
    print(f"{'data':<10} {'compile':<8} {'precision':<9} {'ch_last':<8} {'launcher img/s':>15} {'plain img/s':>12} "
          f"{'ratio':>6} {'MFU':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, setting in enumerate(settings(data, compile, precision, channels_last)):
            ours = launcher_run(setting, args, os.path.join(scratch, f"run{i}"))
            plain = plain_run(setting, args)
            peak = peak_flops(device, setting["precision"], peak_tflops)
            mfu = ours * train_flops / peak if peak else None
            rows.append({**setting, "launcher": ours, "plain": plain, "ratio": ours / plain, "mfu": mfu})
            if out:  # after every row: a run stopped by a job's time limit keeps what it measured
                save(out, {"device": name, "arch": arch, "image_size": image_size, "batch_size": batch_size,
                           "rows": rows})
            print(f"{setting['data']:<10} {str(setting['compile']):<8} {setting['precision']:<9} "
                  f"{str(setting['channels_last']):<8} {ours:>15.1f} {plain:>12.1f} {ours / plain:>6.3f} "
                  + (f"{100 * mfu:>5.1f}%" if mfu is not None else f"{'-':>6}"), flush=True)
    for row in rows:
        if row["data"] != "synthetic":
            twin = next((r for r in rows if r["data"] == "synthetic" and all(
                r[k] == row[k] for k in ("compile", "precision", "channels_last"))), None)
            if twin:
                print(f"{row['data']} / synthetic (compile={row['compile']}, {row['precision']}, channels_last="
                      f"{row['channels_last']}): launcher {row['launcher'] / twin['launcher']:.3f}, "
                      f"plain {row['plain'] / twin['plain']:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
