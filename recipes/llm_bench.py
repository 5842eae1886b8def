"""A Llama of a set size, randomly initialised, trained on random tokens: the recipe of the LM
throughput benchmark (`python scripts/bench_gpu.py --lm`), no files read.

    python -m launcher recipes/llm_bench --data_parallel=fsdp --compile --mixed_precision=bf16
    python -m launcher recipes/llm_bench --size=tiny --seq_len=64 --max_steps=5    # on a CPU

Every row is `seq_len` + 1 tokens drawn uniformly from the vocabulary (seeded by its index), so a
batch is `batch_size` x `seq_len` tokens: tokens/s = samples/s x seq_len. The loss and the shard
units (decoder layers) are recipes/llm_finetune's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from launcher import ConfigError, DataSpec, TrainConfig
from recipes.llm_finetune import compute_loss, shard_units  # noqa: F401

# LlamaConfig fields by size. 1b: Llama-3.2-1B's shape (1.24 B parameters, the embedding tied to the head).
SIZES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    ),
}


@dataclass
class Config(TrainConfig):
    size: Literal["1b", "tiny"] = "1b"  # the Llama's shape (SIZES)
    seq_len: int = 2048  # tokens per row
    rows: int = 100_000  # random rows per epoch
    output_dir: str = "runs/llm_bench"
    batch_size: int = 4
    lr: float = 1e-4
    num_workers: int = 0  # a row is one randint: nothing for workers to do
    wandb_mode: str = "disabled"


class RandomTokens(Dataset):
    """`rows` rows of `seq_len` + 1 uniform token ids; row i drawn from seed i, so every read is the same."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int):
        self.rows, self.seq_len, self.vocab_size = rows, seq_len, vocab_size

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.randint(
            self.vocab_size, (self.seq_len + 1,), generator=torch.Generator().manual_seed(index)
        )
        return {"input_ids": row[:-1], "labels": row[1:]}


def llama_config(cfg: Config):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[cfg.size], max_position_embeddings=cfg.seq_len)


def build_model(cfg: Config) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(cfg))


def hf_model(cfg: Config, model: nn.Module) -> None:
    """No OUTPUT_DIR/hf/: a benchmark's random weights are not worth a second copy."""
    return None


def build_data(cfg: Config) -> DataSpec:
    if cfg.seq_len < 1 or cfg.rows < 1:
        raise ConfigError(f"--seq_len and --rows must be >= 1, got {cfg.seq_len} and {cfg.rows}")
    vocab = SIZES[cfg.size]["vocab_size"]
    return DataSpec(train=RandomTokens(cfg.rows, cfg.seq_len, vocab))
