"""A pretrained model larger than its shards, on 2 processes: under --data_parallel=fsdp each rank
builds it on the meta device and reads only its shards' rows from the save_pretrained files; under
DDP it is built and loaded whole (in 1 process with the same global batch). The same losses for 10
steps; the peak host memory of loading
(summary.json) under 0.6x the model's fp32 bytes above the process's baseline with FSDP, over 1x
with DDP."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import launcher, metrics

RECIPE = "tests/recipes/pretrained_llama"
# 60 M parameters, 229 MiB in fp32, nearly all in the untied embedding and LM head (36000 x 768 each)
LLAMA = dict(
    hidden_size=768,
    intermediate_size=1024,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=36000,
    tie_word_embeddings=False,
)
# plain SGD: no optimizer state, so that the whole-model run's memory stays that of the model
ARGS = [
    "--max_steps=10",
    "--sequence=8",
    "--optimizer=sgd",
    "--momentum=0",
    "--lr=0.05",
    "--checkpoint_every=0",
    "--checkpoint_epoch_end=False",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_fsdp")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.save_pretrained(root / "llama", max_shard_size="150MB")  # 3 files and an index
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    out = {"model_mb": model_mb}
    # The whole-model path in 1 process with the global batch of the 2 FSDP ranks: the same losses
    for mode, processes, batch in (("ddp", 1, 2), ("fsdp", 2, 1)):
        out[mode] = root / mode
        out[f"{mode}_stdout"] = launcher(
            RECIPE,
            f"--weights={root / 'llama'}",
            f"--output_dir={out[mode]}",
            f"--data_parallel={mode}",
            f"--batch_size={batch}",
            *ARGS,
            processes=processes,
            timeout=600,
        ).stdout
    return out


def losses(run_dir, key: str) -> list[float]:
    return [m[key] for m in metrics(run_dir) if key in m]


def loading_mb(run_dir) -> list[float]:
    """Each rank's peak resident MB once the model was built and loaded, above that before it was built."""
    memory = json.loads((run_dir / "summary.json").read_text())["memory_per_process"]
    return [rank["load_peak_rss_mb"] - rank["baseline_rss_mb"] for rank in memory]


def test_the_meta_built_fsdp_model_trains_to_the_losses_of_the_whole_model(runs):
    for key in ("train/loss", "val/loss"):
        ddp, fsdp = losses(runs["ddp"], key), losses(runs["fsdp"], key)
        assert len(ddp) == len(fsdp) > 0 and max(abs(a - b) for a, b in zip(ddp, fsdp)) < 1e-5, key
    assert (
        len(losses(runs["fsdp"], "train/loss")) == 10 and len(set(losses(runs["fsdp"], "train/loss"))) == 10
    )


def test_each_fsdp_rank_loads_only_its_shards_where_ddp_holds_the_whole_model(runs):
    model_mb = runs["model_mb"]
    assert all(mb < 0.6 * model_mb for mb in loading_mb(runs["fsdp"])), (loading_mb(runs["fsdp"]), model_mb)
    assert all(mb > 1.0 * model_mb for mb in loading_mb(runs["ddp"])), (loading_mb(runs["ddp"]), model_mb)


def test_the_plan_says_what_building_takes_before_and_after_sharding(runs):
    line = next(line for line in runs["fsdp_stdout"].splitlines() if line.startswith("  building the model"))
    whole, per_process = runs["model_mb"], runs["model_mb"] / 2
    assert (
        f"{whole:.1f} MB of parameters whole before sharding, {per_process:.1f} MB per process after" in line
    )
