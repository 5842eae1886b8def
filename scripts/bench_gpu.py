"""Training throughput on one device: the launcher side by side with a plain hand-written loop.

    python scripts/bench_gpu.py                       # ResNet-50, 224 px, batch 256: for a GPU
    python scripts/bench_gpu.py --recipe=recipes/resnet_pretrain --data_dir=data/digits   # the demo's recipe
    python scripts/bench_gpu.py --arch=resnet18 --image_size=32 --batch_size=8 --steps=6 --warmup=2 \\
        --images=64 --compile=False --precision=no    # small enough for a CPU (the test runs this)

--recipe is any recipe whose training split is `Shards` (default recipes/resnet_bench: a
torchvision model on JPEG shards); --arch, --image_size, --batch_size, --classes and --data_dir
override its fields of those names (num_classes for --classes) and, left out, keep the
recipe's. For every combination of --data (synthetic, shards, gpu_decode), --compile,
--precision (no, bf16) and --channels_last, it runs, one right after the other:
- the launcher: `python -m launcher RECIPE` (subprocess, the real CLI) with the matching fields
  (`--synthetic_data`, `--data_on_gpu` for gpu_decode, `--compile`, `--mixed_precision`,
  `--channels_last`), img/s from its metrics.jsonl windows after the warm-up;
- a plain loop: the recipe's model, AdamW, cross-entropy (gradients clipped where the recipe
  sets max_grad_norm), autocast, channels_last and `model.compile()`, fed by a plain webdataset
  + DataLoader pipeline over the same shards with the recipe's per-sample transform in the
  workers (shards), or with workers reading bytes only and the images decoded on the device
  (`decode_jpeg(device=...)`; other formats on the host, as the launcher does) and transformed
  there (gpu_decode), or, synthetic, one batch read once and copied to the device each step
  from pinned memory; the recipe's batch transform on the device in all three.
It prints img/s of both, launcher / plain, real shards / synthetic, and model FLOPs utilisation
(3 x forward FLOPs per image, counted by torch.utils.flop_counter, over the device's peak; pass
--peak_tflops where the device is not in PEAK_TFLOPS). For recipes/resnet_bench, the shards are
`images` JPEG crops of scikit-learn's two sample photos (real JPEG decoding, offline), written
once to --data_dir (default: a temporary directory); the demo's shards come from
`python scripts/make_demo_data.py --out data/digits` (or `make demo`).
`--image_set=imagenet` writes ImageNet-sized JPEGs instead (scripts/bench_data.py's: 500 x 375,
about 110 KB, as users' data; the default `crops` are small squares of --image_size x 1.15),
for the targets of real shards and `--data_on_gpu` against synthetic data (16 workers at most):

    python scripts/bench_gpu.py --image_set=imagenet --precision=bf16 --channels_last=True --compile=False \
        --workers=16 --out=imagenet.json

`--smoke` runs any of these settings at a CPU size (ResNet-18, 16 px, batch 4, 2 steps after 1,
32 images, 10 classes, eager, 1 worker, in place of those flags): the test runs the code paths so.
`--out=FILE` writes the rows as JSON after each one, so a job stopped by its time limit keeps
what it measured. All 24 settings take long on a GPU (each compiled run compiles twice: launcher
and plain loop); the targets need only bf16 with channels-last, which one job can run first:

    python scripts/bench_gpu.py --precision=bf16 --channels_last=True --out=gpu.json

`--fsdp` measures sharding instead, on every GPU of the node: scripts/bench_fsdp.py's FSDP against
DDP comparison with a char LM of --fsdp_layers blocks x --fsdp_width (default 24 x 2048, about
1.2 B parameters; 1024 tokens, batch 4 per GPU, bf16), --steps timed after --warmup, on the
text shards in --data_dir (written there, or in a temporary directory, when absent):

    python scripts/bench_gpu.py --fsdp --steps=20 --warmup=5 --out=fsdp.json

`--lm` measures a language model instead: tokens/s and MFU of a Llama of --lm_size (1b:
Llama-3.2-1B's shape; tiny for a CPU), random init on random tokens, --lm_batch x --lm_seq tokens
per step, FSDP on one process, --lm_compile, --lm_precision; the launcher against a plain FSDP2
loop (scripts/bench_lm.py):

    python scripts/bench_gpu.py --lm --steps=20 --warmup=10 --out=lm.json
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launcher.config import ConfigError, TrainConfig  # noqa: E402
from launcher.data.device_decode import decoding_stream, is_jpeg  # noqa: E402
from launcher.data.index import read_index  # noqa: E402
from launcher.data.spec import Shards  # noqa: E402
from launcher.data.writer import write_shards  # noqa: E402
from launcher.overrides import apply_overrides  # noqa: E402
from launcher.recipe import Recipe, load_recipe  # noqa: E402

DEFAULT_RECIPE = os.path.join(ROOT, "recipes", "resnet_bench.py")

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
            Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size)).save(
                buffer, format="JPEG", quality=90
            )
            yield {"__key__": f"bench-{i:07d}", "jpg": buffer.getvalue(), "cls": i % classes}

    write_shards(samples(), out, max_count=max(1, images // 16), classes=[str(c) for c in range(classes)])
    return out


def make_imagenet_shards(out: str, images: int, classes: int, seed: int = 0) -> str:
    """`images` ImageNet-sized JPEGs (scripts/bench_data.py's), written once to `out`."""
    if os.path.isfile(os.path.join(out, "index.json")):
        return out
    from scripts.bench_data import imagenet_jpegs

    samples = (
        {"__key__": f"bench-{i:07d}", "jpg": data, "cls": i % classes}
        for i, data in enumerate(imagenet_jpegs(images, seed))
    )
    write_shards(samples, out, max_count=max(1, images // 16), classes=[str(c) for c in range(classes)])
    return out


SMOKE = dict(
    arch="resnet18",
    image_size=16,
    batch_size=4,
    steps=2,
    warmup=1,
    images=32,
    classes=10,
    compile=False,
    workers=1,
)  # --smoke: a CPU size for every setting's code path


def forward_flops(recipe: Recipe, cfg: TrainConfig, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of the recipe's model on one input of `shape`."""
    from torch.utils.flop_counter import FlopCounterMode

    model = recipe.build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
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
    command = [
        sys.executable,
        "-m",
        "launcher",
        args["recipe"],
        *[f"--{name}={value}" for name, value in args["overrides"].items()],
        f"--num_workers={args['workers']}",
        f"--max_steps={args['warmup'] + args['steps']}",
        "--epochs=1000",
        f"--log_every={log_every}",
        f"--output_dir={out}",
        f"--synthetic_data={setting['data'] == 'synthetic'}",
        f"--data_on_gpu={setting['data'] == 'gpu_decode'}",
        f"--compile={setting['compile']}",
        f"--mixed_precision={setting['precision']}",
        f"--channels_last={setting['channels_last']}",
        "--checkpoint_epoch_end=False",
        "--keep_checkpoints=1",
        "--wandb_mode=disabled",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"launcher failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [json.loads(line) for line in f]
    rates = [
        w["train/samples_per_s"] for w in windows if "train/samples_per_s" in w and w["step"] > args["warmup"]
    ]
    return statistics.median(rates)


def plain_run(setting: dict, recipe: Recipe, cfg: TrainConfig, shards: Shards, args: dict) -> float:
    """img/s of a loop written by hand: the recipe's model and its training `shards`, no launcher."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = recipe.build_model(cfg).to(device)
    memory = torch.channels_last if setting["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory)
    if setting["compile"]:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_transform = shards.batch_transform or (lambda images: images)
    dtype = torch.bfloat16 if setting["precision"] == "bf16" else None
    batches = {
        "synthetic": lambda: synthetic_batches(shards, cfg.batch_size),
        "shards": lambda: shard_batches(shards, cfg.batch_size, args["workers"]),
        "gpu_decode": lambda: gpu_decoded_batches(shards, cfg.batch_size, args["workers"], device),
    }
    model.train()
    start = None
    for step, (images, labels) in enumerate(
        itertools.islice(batches[setting["data"]](), args["warmup"] + args["steps"])
    ):
        if step == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(batch_transform(images)), labels)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args["steps"] * cfg.batch_size / (time.perf_counter() - start)


def sample_pipeline(shards: Shards, batch_size: int, decode: bool):
    """webdataset over the split's shards: batches of transformed images (decode) or of encoded bytes."""
    import webdataset as wds

    urls = read_index(shards.urls, shards.index).urls
    images = ";".join(shards.image_keys)  # the first of these keys a sample has
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False
    ).shuffle(shards.shuffle_buffer)
    if decode:
        return (
            dataset.decode("pil")
            .to_tuple(images, "cls")
            .map_tuple(shards.transform, int)
            .batched(batch_size, partial=False)
        )
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    return (
        dataset.to_tuple(images, "cls")
        .map_tuple(as_tensor, int)
        .batched(
            batch_size,
            partial=False,
            collation_fn=lambda samples: ([s[0] for s in samples], torch.tensor([s[1] for s in samples])),
        )
    )


def repeated(loader):
    return itertools.chain.from_iterable(itertools.repeat(loader))  # epochs back to back


def synthetic_batches(shards: Shards, batch_size: int):
    """One batch read once, fed every step: no I/O in the loop (pinned, so copied as the launcher's)."""
    images, labels = next(iter(sample_pipeline(shards, batch_size, decode=True)))
    labels = torch.as_tensor(labels)  # webdataset collates ints to numpy (a DataLoader converts them)
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return itertools.repeat((images, labels))


def shard_batches(shards: Shards, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(
        sample_pipeline(shards, batch_size, decode=True),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    return repeated(loader)


def gpu_decoded_batches(shards: Shards, batch_size: int, workers: int, device: torch.device):
    """Workers read bytes only; the images are decoded on `device` (JPEGs in one call per batch on a
    GPU), then transformed there."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    loader = torch.utils.data.DataLoader(
        sample_pipeline(shards, batch_size, decode=False), batch_size=None, num_workers=workers
    )
    for encoded, labels in repeated(loader):
        if device.type == "cuda" and all(map(is_jpeg, encoded)):
            # as the launcher does: nvJPEG may write blocks still in use
            with decoding_stream(device) as settle:
                # nvJPEG, one call per batch
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
                settle(images)
        else:
            # on the host, one by one: other formats, and a CPU (torchvision 0.19 batches JPEGs on a GPU only)
            images = [
                decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True) for data in encoded
            ]
        yield torch.stack([shards.transform(image) for image in images]), labels


def save(path: str, report: dict) -> None:
    """Write `report` as JSON through a temporary file, so `path` always holds a whole report."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def settings(data, compile, precision, channels_last) -> list[dict]:
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731 - fire gives a value or a tuple
    return [
        dict(data=d, compile=c, precision=p, channels_last=cl)
        for d, c, p, cl in itertools.product(
            as_list(data), as_list(compile), as_list(precision), as_list(channels_last)
        )
    ]


def configure(
    recipe_spec: str, overrides: dict, images: int, image_set: str = "crops"
) -> tuple[Recipe, TrainConfig, dict, Shards]:
    """The recipe, its config with `overrides` applied as the CLI applies them, the overrides to pass
    on, and its training split; for recipes/resnet_bench, JPEG shards (`image_set`: crops or
    imagenet) are written to its data_dir unless already there."""
    try:
        recipe = load_recipe(recipe_spec)
        cfg = apply_overrides(recipe.default_config(), overrides)
        if recipe.name == "resnet_bench":  # its JPEG shards, written once where they go
            directory = overrides.get("data_dir") or os.path.join(
                tempfile.gettempdir(), f"bench_gpu_{image_set}_{cfg.image_size}_{images}"
            )
            written = (
                make_imagenet_shards(directory, images, cfg.num_classes)
                if image_set == "imagenet"
                else make_shards(directory, images, round(cfg.image_size * 1.15), cfg.num_classes)
            )
            overrides = {**overrides, "data_dir": written}
            cfg = apply_overrides(cfg, {"data_dir": overrides["data_dir"]})
        train = recipe.build_data(cfg).train
        if not isinstance(train, Shards):
            raise ConfigError(
                f"recipe {recipe.name}'s training split is a {type(train).__name__} dataset, not Shards; "
                "the plain loop reads WebDataset shards, so pick a recipe whose build_data gives Shards"
            )
        read_index(train.urls, train.index)  # missing shards: one line here, before anything runs
    except ConfigError as error:
        raise SystemExit(f"bench_gpu.py: {error}") from None
    return recipe, cfg, overrides, train


def main(
    recipe: str = DEFAULT_RECIPE,
    arch: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    classes: int | None = None,
    steps: int = 40,
    warmup: int = 15,
    images: int = 8192,
    workers: int = 0,
    data=("synthetic", "shards", "gpu_decode"),
    compile=(False, True),
    precision=("no", "bf16"),
    channels_last=(False, True),
    data_dir: str = "",
    peak_tflops: float = 0.0,
    out: str = "",
    fsdp: bool = False,
    fsdp_processes: int = 0,
    fsdp_layers: int = 24,
    fsdp_width: int = 2048,
    fsdp_block: int = 1024,
    fsdp_batch: int = 4,
    fsdp_precision: str = "bf16",
    lm: bool = False,
    lm_size: str = "1b",
    lm_seq: int = 2048,
    lm_batch: int = 4,
    lm_compile: bool = True,
    lm_precision: str = "bf16",
    image_set: str = "crops",
    smoke: bool = False,
) -> None:
    if lm:  # a Llama's tokens/s and MFU under FSDP and compile (scripts/bench_lm.py)
        from scripts.bench_lm import main as bench_lm

        bench_lm(
            size=lm_size,
            seq_len=lm_seq,
            batch_size=lm_batch,
            compile=lm_compile,
            precision=lm_precision,
            steps=steps,
            warmup=warmup,
            peak_tflops=peak_tflops,
            out=out and os.path.abspath(out),
        )
        return
    if fsdp:  # the node's GPUs: FSDP against DDP on the char LM (scripts/bench_fsdp.py)
        from scripts.bench_fsdp import main as bench_fsdp

        processes = fsdp_processes or torch.cuda.device_count()
        if processes < 2:
            raise SystemExit(
                "bench_gpu.py --fsdp compares sharding over 2 or more GPUs; this node has "
                f"{torch.cuda.device_count()}: pass --fsdp_processes=N to use CPU processes"
            )
        bench_fsdp(
            processes=processes,
            n_layer=fsdp_layers,
            n_embd=fsdp_width,
            n_head=max(1, fsdp_width // 128),
            block_size=fsdp_block,
            batch_size=fsdp_batch,
            precision=fsdp_precision,
            steps=steps,
            warmup=warmup,
            data_dir=data_dir,
            out=out,
        )
        return
    if image_set not in ("crops", "imagenet"):
        raise SystemExit(f"bench_gpu.py: --image_set must be crops or imagenet, got {image_set!r}")
    if smoke:  # SMOKE's sizes in place of those flags
        arch, image_size, batch_size, steps, warmup, images, classes, compile, workers = SMOKE.values()
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 2))
    given = {
        "arch": arch,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_classes": classes,
        "data_dir": data_dir and os.path.abspath(data_dir),
    }
    out = out and os.path.abspath(out)
    recipe = os.path.abspath(recipe) if "/" in recipe or recipe.endswith(".py") else recipe
    # both sides read a recipe's relative paths (data/digits) from the repository, as `make demo`
    os.chdir(ROOT)
    found, cfg, overrides, shards = configure(
        recipe, {k: v for k, v in given.items() if v not in (None, "")}, images, image_set
    )
    args = dict(recipe=found.source_path, overrides=overrides, steps=steps, warmup=warmup, workers=workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    shape = tuple(next(iter(sample_pipeline(shards, 1, decode=True)))[0].shape[1:])
    train_flops = 3 * forward_flops(found, cfg, shape)
    model_name = getattr(cfg, "arch", found.name)
    print(
        f"{found.name} ({model_name}, inputs {shape}), batch {cfg.batch_size}, {steps} timed steps after "
        f"{warmup}, {workers} workers, on {name}"
    )
    print(
        f"{'data':<10} {'compile':<8} {'precision':<9} {'ch_last':<8} "
        f"{'launcher img/s':>15} {'plain img/s':>12} {'ratio':>6} {'MFU':>6}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, setting in enumerate(settings(data, compile, precision, channels_last)):
            ours = launcher_run(setting, args, os.path.join(scratch, f"run{i}"))
            plain = plain_run(setting, found, cfg, shards, args)
            peak = peak_flops(device, setting["precision"], peak_tflops)
            mfu = ours * train_flops / peak if peak else None
            rows.append({**setting, "launcher": ours, "plain": plain, "ratio": ours / plain, "mfu": mfu})
            if out:  # after every row: a run stopped by a job's time limit keeps what it measured
                save(
                    out,
                    {
                        "device": name,
                        "recipe": found.name,
                        "arch": model_name,
                        "input_shape": list(shape),
                        "batch_size": cfg.batch_size,
                        "rows": rows,
                    },
                )
            print(
                f"{setting['data']:<10} {str(setting['compile']):<8} {setting['precision']:<9} "
                f"{str(setting['channels_last']):<8} {ours:>15.1f} {plain:>12.1f} {ours / plain:>6.3f} "
                + (f"{100 * mfu:>5.1f}%" if mfu is not None else f"{'-':>6}"),
                flush=True,
            )
    for row in rows:
        if row["data"] != "synthetic":
            twin = next(
                (
                    r
                    for r in rows
                    if r["data"] == "synthetic"
                    and all(r[k] == row[k] for k in ("compile", "precision", "channels_last"))
                ),
                None,
            )
            if twin:
                print(
                    f"{row['data']} / synthetic (compile={row['compile']}, {row['precision']}, channels_last="
                    f"{row['channels_last']}): launcher {row['launcher'] / twin['launcher']:.3f}, "
                    f"plain {row['plain'] / twin['plain']:.3f}"
                )


if __name__ == "__main__":
    fire.Fire(main)
