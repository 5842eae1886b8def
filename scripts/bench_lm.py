"""LM training throughput on one device: tokens/s and MFU of a ~1B Llama under FSDP (one
process) and torch.compile, the launcher side by side with a plain hand-written loop.

    python scripts/bench_gpu.py --lm --out=lm.json                  # Llama-3.2-1B's shape, bf16, on a GPU
    python scripts/bench_gpu.py --lm --lm_size=tiny --lm_seq=64 --lm_batch=2 --lm_compile=False \\
        --lm_precision=no --steps=3 --warmup=1                      # a CPU's size (the test runs it)

Both sides train recipes/llm_bench (a LlamaForCausalLM from a LlamaConfig, random init, rows of
random tokens, the loss of recipes/llm_finetune):
- the launcher: `python -m launcher recipes/llm_bench --data_parallel=fsdp` (subprocess, the real
  CLI) with `--compile` and `--mixed_precision`; tokens/s = the median of its logged samples/s
  after the warm-up x seq_len;
- a plain loop: the same model, fully_shard on each decoder layer and then the root (bf16
  parameters, fp32 gradient reduction, as torchtitan), each layer compiled before sharding, AdamW,
  the same batches, timed over --steps after --warmup.
MFU = tokens/s x FLOPs per token / the device's peak (bench_gpu.PEAK_TFLOPS, or --peak_tflops).
FLOPs per token, as torchtitan and PaLM count them: 6 x the weights of every matrix multiply (the
linear layers and the output head, tied or not) + 12 x layers x width x seq_len (attention's
scores and values, the causal half included). Embedding lookups and norms are not counted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launcher.overrides import apply_overrides  # noqa: E402
from recipes import llm_bench  # noqa: E402
from recipes.llm_finetune import compute_loss, shard_units  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "llm_bench.py")


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights + 12 x layers x width x seq_len (torchtitan's count)."""
    config = model.config
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * matmul_weights + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def launcher_run(cfg: llm_bench.Config, setting: dict, steps: int, warmup: int, out: str) -> float:
    """tokens/s of the real CLI: the median of its logged windows after the warm-up, x seq_len."""
    log_every = max(1, steps // 4)
    command = [
        sys.executable,
        "-m",
        "launcher",
        RECIPE,
        f"--size={cfg.size}",
        f"--seq_len={cfg.seq_len}",
        f"--batch_size={cfg.batch_size}",
        "--data_parallel=fsdp",
        f"--compile={setting['compile']}",
        f"--mixed_precision={setting['precision']}",
        f"--max_steps={warmup + steps}",
        f"--log_every={log_every}",
        f"--output_dir={out}",
        "--checkpoint_epoch_end=False",
        "--keep_checkpoints=1",
        "--wandb_mode=disabled",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"launcher failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [json.loads(line) for line in f]
    rates = [w["train/samples_per_s"] for w in windows if "train/samples_per_s" in w and w["step"] > warmup]
    return statistics.median(rates) * cfg.seq_len


def sharded_model(cfg: llm_bench.Config, setting: dict, device: torch.device) -> nn.Module:
    """The recipe's model on `device`, each decoder layer compiled then fully_shard-ed, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = llm_bench.build_model(cfg).to(device)
    bf16 = setting["precision"] == "bf16"
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    mesh = init_device_mesh(device.type, (1,))
    for layer in shard_units(cfg, model):
        if setting["compile"]:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def plain_run(cfg: llm_bench.Config, setting: dict, steps: int, warmup: int, device: torch.device) -> float:
    """tokens/s of a loop written by hand, FSDP2 on a 1-process group, no launcher."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sharded_model(cfg, setting, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rows = llm_bench.build_data(cfg).train
        start = None
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                start = time.perf_counter()
            samples = [rows[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
            batch = {
                key: torch.stack([s[key] for s in samples]).to(device, non_blocking=True)
                for key in samples[0]
            }
            compute_loss(model, batch).loss.div(cfg.batch_size * cfg.seq_len).backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(
    size: str = "1b",
    seq_len: int = 2048,
    batch_size: int = 4,
    compile: bool = True,
    precision: str = "bf16",
    steps: int = 20,
    warmup: int = 10,
    peak_tflops: float = 0.0,
    out: str = "",
) -> dict:
    from scripts.bench_gpu import peak_flops, save

    cfg = apply_overrides(llm_bench.Config(), {"size": size, "seq_len": seq_len, "batch_size": batch_size})
    setting = {"compile": compile, "precision": precision}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with torch.device("meta"):  # the shape alone: no memory, no initialisation
        per_token = flops_per_token(llm_bench.build_model(cfg), cfg.seq_len)
    print(
        f"llm_bench ({size}, {per_token / 1e9:.2f} GFLOP per token), {batch_size} x {seq_len} tokens, "
        f"FSDP on 1 process, compile={compile}, {precision}, {steps} timed steps after {warmup}, on {name}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        ours = launcher_run(cfg, setting, steps, warmup, os.path.join(scratch, "run"))
    plain = plain_run(cfg, setting, steps, warmup, device)
    peak = peak_flops(device, precision, peak_tflops)
    row = {
        **setting,
        "size": size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "device": name,
        "flops_per_token": per_token,
        "launcher_tokens_per_s": ours,
        "plain_tokens_per_s": plain,
        "ratio": ours / plain,
        "launcher_mfu": ours * per_token / peak if peak else None,
        "plain_mfu": plain * per_token / peak if peak else None,
    }
    if out:
        save(out, row)
    mfu = lambda value: f"{100 * value:.1f}%" if value is not None else "-"  # noqa: E731
    print(
        f"launcher {ours:.0f} tokens/s (MFU {mfu(row['launcher_mfu'])}), plain {plain:.0f} tokens/s "
        f"(MFU {mfu(row['plain_mfu'])}), launcher / plain {row['ratio']:.3f}",
        flush=True,
    )
    return row
