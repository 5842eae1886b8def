"""FSDP against DDP: the memory each process holds and the step rate, side by side in one run.

    python scripts/bench_fsdp.py                  # char LM of about 50 M parameters, 2 CPU processes
    python scripts/bench_fsdp.py --processes=8 --n_layer=24 --n_embd=2048 --block_size=1024 \\
        --batch_size=4 --precision=bf16 --steps=20    # a GPU node: about 1.2 B parameters

Both runs are the real CLI under `accelerate launch --multi_gpu --num_processes N` (GPUs where
present, else gloo over CPU processes), `recipes/char_lm` with the given size on the byte-level
text shards of `scripts/make_text_shards.py` (written once to --data_dir, default a temporary
directory), one right after the other: `--data_parallel=ddp`, then `--data_parallel=fsdp`. Each
run's summary.json gives each process's parameters and optimizer state (its shards under FSDP),
measured after training, and its peak resident memory (and peak GPU memory on GPUs); gradients
are as large as the trained parameters (every parameter trains here). Steps/s is the median of
the logged windows after the warm-up. Prints the table, FSDP / DDP for parameters + gradients +
optimizer state per process (target <= 0.55 on 2 processes: half, plus what FSDP pads), peak RSS
and steps/s (recorded; no target on CPU, where gloo's all-gathers cost more than they save).
`--out=FILE` writes the rows as JSON.
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
from scripts.processes import launch_command  # noqa: E402


def text_shards(data_dir: str) -> str:
    if not os.path.isfile(os.path.join(data_dir, "train", "index.json")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "make_text_shards.py"), f"--out={data_dir}"],
            check=True,
            capture_output=True,
        )
    return data_dir


def run(mode: str, args: dict, out: str) -> dict:
    """One launcher run; its memory per process (the largest over processes) and steps/s."""
    log_every = max(1, args["steps"] // 4)
    command = launch_command(
        "recipes/char_lm",
        f"--data_dir={args['data_dir']}",
        f"--output_dir={out}",
        f"--data_parallel={mode}",
        f"--n_layer={args['n_layer']}",
        f"--n_embd={args['n_embd']}",
        f"--n_head={args['n_head']}",
        f"--block_size={args['block_size']}",
        f"--batch_size={args['batch_size']}",
        f"--mixed_precision={args['precision']}",
        f"--max_steps={args['warmup'] + args['steps']}",
        f"--log_every={log_every}",
        "--warmup_steps=0",
        "--num_workers=0",
        "--checkpoint_epoch_end=False",
        "--keep_checkpoints=1",
        "--wandb_mode=disabled",
        processes=args["processes"],
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_fsdp.py: the {mode} run failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        memory = json.load(f)["memory_per_process"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [json.loads(line) for line in f]
    rates = [
        w["train/samples_per_s"] for w in windows if "train/samples_per_s" in w and w["step"] > args["warmup"]
    ]
    row = {
        name: max(m.get(name, 0.0) for m in memory)
        for name in ("params_mb", "optimizer_mb", "peak_rss_mb", "peak_gpu_mb")
    }
    row["grads_mb"] = row["params_mb"]  # every parameter trains
    row["state_mb"] = row["params_mb"] + row["grads_mb"] + row["optimizer_mb"]
    row["steps_per_s"] = statistics.median(rates) / (args["batch_size"] * args["processes"])
    return {"mode": mode, **row}


def main(
    processes: int = 2,
    n_layer: int = 8,
    n_embd: int = 704,
    n_head: int = 8,
    block_size: int = 64,
    batch_size: int = 2,
    precision: str = "no",
    steps: int = 8,
    warmup: int = 2,
    data_dir: str = "",
    out: str = "",
) -> dict:
    args = dict(
        processes=processes,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        block_size=block_size,
        batch_size=batch_size,
        precision=precision,
        steps=steps,
        warmup=warmup,
    )
    params = 12 * n_layer * n_embd**2 + (256 + block_size) * n_embd + 256 * n_embd
    print(
        f"char LM: {n_layer} blocks x {n_embd} wide, about {params / 1e6:.0f} M parameters; "
        f"{processes} processes x batch {batch_size} x {block_size} tokens, {precision} precision"
    )
    with tempfile.TemporaryDirectory() as scratch:
        args["data_dir"] = text_shards(data_dir or os.path.join(scratch, "text"))
        rows = [run(mode, args, os.path.join(scratch, mode)) for mode in ("ddp", "fsdp")]
    ddp, fsdp = rows
    print(
        f"{'':6}{'params MB':>11}{'grads MB':>10}{'optim MB':>10}{'state MB':>10}{'peak RSS MB':>13}"
        f"{'peak GPU MB':>13}{'steps/s':>9}"
    )
    for row in rows:
        print(
            f"{row['mode']:6}{row['params_mb']:>11.1f}{row['grads_mb']:>10.1f}{row['optimizer_mb']:>10.1f}"
            f"{row['state_mb']:>10.1f}{row['peak_rss_mb']:>13.0f}{row['peak_gpu_mb']:>13.0f}{row['steps_per_s']:>9.3f}"
        )
    ratios = {
        "state": fsdp["state_mb"] / ddp["state_mb"],
        "peak_rss": fsdp["peak_rss_mb"] / ddp["peak_rss_mb"],
        "steps_per_s": fsdp["steps_per_s"] / ddp["steps_per_s"],
    }
    print(
        f"fsdp / ddp per process: params + grads + optimizer state {ratios['state']:.3f} (target <= 0.55), "
        f"peak RSS {ratios['peak_rss']:.3f}, steps/s {ratios['steps_per_s']:.3f}"
    )
    result = {"args": {k: v for k, v in args.items() if k != "data_dir"}, "rows": rows, "ratios": ratios}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)  # the table is printed; the returned dict is for callers
