"""Data-parallel scaling on CPU: 2 processes (gloo, 1 thread each) against twice one process.

    python scripts/bench_ddp_cpu.py [--arch=resnet18 --image_size=64 --batch_size=32 --steps=40 --rounds=3]
                                    [--comm_hook=no|fp16|bf16]

Both run the real CLI (`recipes/resnet_bench` with `--synthetic_data`, so no input pipeline is
timed) with OMP_NUM_THREADS=1, one right after the other in each round; img/s is the median of
the launcher's logged windows after the warm-up, summed over processes for the 2-process run.
Each round also runs a plain hand-written DDP loop (torch.multiprocessing, gloo, the same model,
batch, AdamW and normalisation, one thread) on 1 and 2 processes, to tell the launcher's share of
the gap from what DDP over gloo costs on this machine, and two independent plain loops at once
(no process group: what two processes sharing this machine's cores, caches and memory reach with
no communication, the ceiling for the others). Prints the median over rounds of 2-process img/s /
(2 x 1-process img/s) for each; target >= 0.85. Below the ceiling, the gap is the gradient
all-reduce over gloo and the wait for the slower rank. `--comm_hook=fp16|bf16` compresses the
gradients for the all-reduce on both sides (the launcher's `--ddp_comm_hook`, torch's hook in the
plain loop).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.bench_gpu import DEFAULT_RECIPE, make_shards  # noqa: E402
from scripts.processes import free_port, launch_command  # noqa: E402


def run(processes: int, args: dict, out: str) -> float:
    command = launch_command(
        DEFAULT_RECIPE,
        f"--data_dir={args['data_dir']}",
        f"--arch={args['arch']}",
        f"--image_size={args['image_size']}",
        "--num_classes=10",
        f"--batch_size={args['batch_size']}",
        "--num_workers=0",
        "--synthetic_data=True",
        f"--max_steps={args['warmup'] + args['steps']}",
        "--epochs=1000",
        f"--log_every={max(1, args['steps'] // 4)}",
        f"--output_dir={out}",
        "--wandb_mode=disabled",
        "--checkpoint_epoch_end=False",
        "--keep_checkpoints=1",
        f"--ddp_comm_hook={args['comm_hook']}",
        processes=processes,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"launcher failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [json.loads(line) for line in f]
    # train/samples_per_s is already global (per-rank samples x world size).
    return statistics.median(
        w["train/samples_per_s"] for w in windows if "train/samples_per_s" in w and w["step"] > args["warmup"]
    )


def plain_worker(rank: int, world: int, port: int, args: dict, results) -> None:
    """One process of a hand-written DDP loop: the same model, batch, AdamW and normalisation."""
    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision

    from launcher.presets import normalize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args["arch"], weights=None, num_classes=10)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
        if args["comm_hook"] != "no":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, getattr(default_hooks, f"{args['comm_hook']}_compress_hook"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = (args["batch_size"], 3, args["image_size"], args["image_size"])
    images, labels = (
        torch.randint(0, 256, size, dtype=torch.uint8),
        torch.randint(0, 10, (args["batch_size"],)),
    )
    norm = normalize()
    for step in range(args["warmup"] + args["steps"]):
        if step == args["warmup"]:
            start = time.perf_counter()
        loss = F.cross_entropy(model(norm(images)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    results.put(time.perf_counter() - start)
    if world > 1:
        dist.destroy_process_group()


def plain_run(processes: int, args: dict, ddp: bool = True) -> float:
    """img/s of the hand-written loop on `processes` processes (the slowest rank's time); `ddp` False:
    as many independent single-process loops at once, what the machine allows with no communication."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    world = processes if ddp else 1  # each process a world of its own: no process group
    workers = [
        context.Process(target=plain_worker, args=(rank, world, port, args, results))
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise SystemExit(f"plain DDP process exited {worker.exitcode}")
    elapsed = max(results.get() for _ in workers)
    return processes * args["steps"] * args["batch_size"] / elapsed


def main(
    arch: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 32,
    steps: int = 40,
    warmup: int = 10,
    rounds: int = 3,
    comm_hook: str = "no",
    out: str = "",
) -> None:
    images = max(64, 2 * batch_size)  # --synthetic_data reads none, but the split must hold a global batch
    data_dir = make_shards(
        os.path.join(tempfile.gettempdir(), f"bench_ddp_{image_size}_{images}"),
        images,
        round(image_size * 1.15),
        10,
    )
    args = dict(
        arch=arch,
        image_size=image_size,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        data_dir=data_dir,
        comm_hook=comm_hook,
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(rounds):
            row = {
                "one": run(1, args, os.path.join(scratch, f"one{i}")),
                "two": run(2, args, os.path.join(scratch, f"two{i}")),
                "plain_one": plain_run(1, args),
                "plain_two": plain_run(2, args),
                "apart_two": plain_run(2, args, ddp=False),
            }
            row["ratio"] = row["two"] / (2 * row["one"])
            row["plain_ratio"] = row["plain_two"] / (2 * row["plain_one"])
            row["apart_ratio"] = row["apart_two"] / (2 * row["plain_one"])
            rows.append(row)
            print(
                f"round {i}: launcher 1 process {row['one']:.1f} img/s, 2 processes {row['two']:.1f}, "
                f"ratio {row['ratio']:.3f}; plain DDP 1 process {row['plain_one']:.1f}, "
                f"2 processes {row['plain_two']:.1f}, ratio {row['plain_ratio']:.3f}; "
                f"2 independent processes {row['apart_two']:.1f}, ratio {row['apart_ratio']:.3f}",
                flush=True,
            )
    ratio = statistics.median(r["ratio"] for r in rows)
    plain_ratio = statistics.median(r["plain_ratio"] for r in rows)
    apart_ratio = statistics.median(r["apart_ratio"] for r in rows)
    print(
        f"{arch} {image_size}px batch {batch_size}/process, synthetic, gloo, 1 thread each, "
        f"comm hook {comm_hook}: "
        f"2 processes / (2 x 1 process) = {ratio:.3f} through the launcher, {plain_ratio:.3f} in a plain "
        f"DDP loop, {apart_ratio:.3f} for two independent plain loops side by side, no communication "
        f"(this machine's ceiling; medians of {rounds}; target >= 0.85)"
    )
    if out:
        with open(out, "w") as f:
            json.dump(
                {"rounds": rows, "median": ratio, "plain_median": plain_ratio, "apart_median": apart_ratio}, f
            )


if __name__ == "__main__":
    fire.Fire(main)
