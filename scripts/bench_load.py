"""Starting from a pretrained model on N processes: each process's peak host memory to build and
load it, and the seconds that takes, FSDP's meta-device path against DDP's whole model, side by side.

    nice python scripts/bench_load.py                          # a ~500 M-parameter Llama, 2 CPU processes
    python scripts/bench_load.py --layers=2 --hidden=256 --vocab=8000   # a quick check (~10 M)

A LlamaForCausalLM of the given size (untied embeddings) is written once with save_pretrained (1 GB
shards and an index) to --model_dir (default a temporary directory). Each mode is then the real CLI
under `accelerate launch --num_processes N` on tests/recipes/pretrained_llama, which builds the
model from the directory's config.json and calls load_weights on it in build_model, as a user's
recipe does: `--data_parallel=ddp` (every process builds the whole model on the host and loads the
whole of it), then `--data_parallel=fsdp` (every process builds it on the meta device, is sharded,
and reads only its shards' rows). One step of plain SGD follows, then the final export. From each
run's summary.json: per process, the peak resident MB once the model was built and loaded minus
that before it was built, and the seconds building and loading took (the largest over processes);
the run's wall time, export included. Prints the table and FSDP / DDP; `--out=FILE` writes JSON.

    nice python scripts/bench_load.py --io_only     # load and export alone, in this process

`--io_only` times, in one process and side by side, what the launcher does against what
transformers does: the load (`load_weights` into a model built from config.json, against
`from_pretrained`) and the export (`launcher.runtime.export.write_hf`, one tensor at a time,
against `save_pretrained`), each the best of `--rounds`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.processes import launch_command  # noqa: E402

RECIPE = "tests/recipes/pretrained_llama"


def write_model(model_dir: str, layers: int, hidden: int, intermediate: int, vocab: int) -> float:
    """The Llama in save_pretrained's layout, unless it is there; its fp32 MB."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        size = sum(p.numel() * 4 for p in transformers.LlamaForCausalLM(config).parameters()) / 2**20
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        transformers.LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size="1GB")
    return size


def run(mode: str, model_dir: str, processes: int, out: str) -> dict:
    command = launch_command(
        RECIPE,
        f"--weights={model_dir}",
        f"--output_dir={out}",
        f"--data_parallel={mode}",
        "--max_steps=1",
        "--batch_size=1",
        "--sequence=8",
        "--optimizer=sgd",
        "--momentum=0",
        "--checkpoint_epoch_end=False",
        "--keep_checkpoints=1",
        "--wandb_mode=disabled",
        processes=processes,
    )
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench_load.py: the {mode} run failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        memory = json.load(f)["memory_per_process"]
    return {
        "mode": mode,
        "load_mb": max(m["load_peak_rss_mb"] - m["baseline_rss_mb"] for m in memory),
        "baseline_mb": max(m["baseline_rss_mb"] for m in memory),
        "peak_rss_mb": max(m["peak_rss_mb"] for m in memory),
        "build_s": max(m["build_s"] for m in memory),
        "run_s": wall,
    }


def best_seconds(action, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def io_times(model_dir: str, rounds: int) -> dict:
    """Seconds to load and to export the model, the launcher's way and transformers', in this process."""
    import torch
    import transformers

    from launcher.runtime.export import write_hf
    from launcher.runtime.weights import load_weights

    torch.set_num_threads(1)  # one core each way: the machine's other core is not the benchmark's
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    shard = 10**9  # 1 GB shards, as write_model's
    with tempfile.TemporaryDirectory() as scratch:
        times = {
            "load_launcher_s": best_seconds(
                lambda: load_weights(model, model_dir, log=lambda _: None), rounds
            ),
            "load_transformers_s": best_seconds(
                lambda: transformers.AutoModelForCausalLM.from_pretrained(model_dir), rounds
            ),
            "export_launcher_s": best_seconds(
                lambda: write_hf(os.path.join(scratch, "launcher"), model, "", shard, True), rounds
            ),
            "export_transformers_s": best_seconds(
                lambda: model.save_pretrained(os.path.join(scratch, "transformers"), max_shard_size=shard),
                rounds,
            ),
        }
    for what in ("load", "export"):
        times[f"{what}_ratio"] = times[f"{what}_launcher_s"] / times[f"{what}_transformers_s"]
        print(
            f"{what}: launcher {times[f'{what}_launcher_s']:.2f} s, "
            f"transformers {times[f'{what}_transformers_s']:.2f} s, "
            f"launcher / transformers {times[f'{what}_ratio']:.2f}"
        )
    return times


def main(
    processes: int = 2,
    layers: int = 14,
    hidden: int = 1536,
    intermediate: int = 4096,
    vocab: int = 32000,
    model_dir: str = "",
    out: str = "",
    io_only: bool = False,
    rounds: int = 3,
) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_dir or os.path.join(scratch, "llama")
        model_mb = write_model(model_dir, layers, hidden, intermediate, vocab)
        print(
            f"Llama: {layers} layers x {hidden} wide, vocab {vocab}: "
            f"{model_mb / 4 * 2**20 / 1e6:.0f} M parameters, {model_mb:.0f} MB in fp32; {processes} processes"
        )
        if io_only:
            return io_times(model_dir, rounds)
        rows = [run(mode, model_dir, processes, os.path.join(scratch, mode)) for mode in ("ddp", "fsdp")]
    print(
        f"{'':6}{'load MB':>9}{'x model':>9}{'baseline MB':>13}{'peak RSS MB':>13}{'build s':>9}{'run s':>8}"
    )
    for row in rows:
        print(
            f"{row['mode']:6}{row['load_mb']:>9.0f}{row['load_mb'] / model_mb:>9.2f}"
            f"{row['baseline_mb']:>13.0f}{row['peak_rss_mb']:>13.0f}{row['build_s']:>9.1f}{row['run_s']:>8.1f}"
        )
    ddp, fsdp = rows
    ratios = {name: fsdp[name] / ddp[name] for name in ("load_mb", "build_s", "run_s")}
    print(
        f"fsdp / ddp per process: memory to build and load {ratios['load_mb']:.3f}, "
        f"seconds to build and load {ratios['build_s']:.3f}, whole run {ratios['run_s']:.3f}"
    )
    result = {"model_mb": model_mb, "processes": processes, "rows": rows, "ratios": ratios}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
