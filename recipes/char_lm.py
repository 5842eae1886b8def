"""A small causal Transformer (nanoGPT-like) that models Python source byte by byte.

    python scripts/make_text_shards.py --out data/text
    python -m launcher recipes/char_lm
    accelerate launch -m launcher recipes/char_lm --n_layer=6 --n_embd=256

Tokens are bytes (vocabulary 256). Shard samples are chunks of 32 to 129 bytes; `collate` cuts
each to block_size + 1 tokens and pads the batch to its longest chunk, the labels being the inputs
shifted by one with -100 at the padding. `compute_loss` sums the per-token cross-entropy and
returns the count of real tokens, so the launcher divides by the tokens of the whole optimizer
step (every micro-batch, every rank): padding weighs nothing and long chunks weigh more.

At each evaluation a callback (`GeneratedText`) logs the model's greedy continuation of a few
fixed prompts: a table in wandb, text in TensorBoard and in metrics.jsonl (`val/generated`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from launcher import ConfigError, DataSpec, Shards, StepOutput, Table, TrainConfig, fields

IGNORE = -100  # label of padded positions: F.cross_entropy's ignore_index
PROMPTS = ("def ", "import ", "class ", "    return ")  # continued at each evaluation (GeneratedText)


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/text"  # train/ and val/ shards written by scripts/make_text_shards.py
    block_size: int = 128  # tokens of context at most (longer chunks are cut to block_size + 1)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block (n_embd must be a multiple)
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # on attention weights and after each residual branch (0: off)
    vocab_size: int = 256  # byte-level tokens
    #: bytes generated after each of PROMPTS at each evaluation, logged as val/generated (0: none)
    sample_tokens: int = 48
    output_dir: str = "runs/char_lm"
    epochs: int = 1
    # 500 steps (about half an epoch): a couple of minutes on 2 CPU cores, down to ~2 nats per byte.
    max_steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = (
            t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.residual_dropout(self.proj(y.transpose(1, 2).reshape(batch, time, width)))


class Block(nn.Module):
    """Pre-LayerNorm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.block_size = cfg.block_size
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled down by the depth
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) tokens -> (N, T, vocab_size) logits of each next token."""
        if input_ids.shape[1] > self.block_size:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed block_size={self.block_size}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_dropout(self.token_embed(input_ids) + self.position_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def collate(samples: list[dict], max_tokens: int) -> dict[str, torch.Tensor]:
    """{"tokens": (L,)} samples -> {"input_ids": (N, T) long, "labels": (N, T) long}, T = longest - 1."""
    sequences = [sample["tokens"][:max_tokens].long() for sample in samples]
    padded = pad_sequence(sequences, batch_first=True, padding_value=IGNORE)
    # padding read as byte 0: causal, so only later positions see it
    return {"input_ids": padded[:, :-1].clamp(min=0), "labels": padded[:, 1:]}


def build_model(cfg: Config) -> nn.Module:
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd must be a multiple of --n_head, got {cfg.n_embd} and {cfg.n_head}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    return CharTransformer(cfg)


def build_data(cfg: Config) -> DataSpec:
    if cfg.block_size < 1:
        raise ConfigError(f"--block_size must be >= 1, got {cfg.block_size}")
    decode = fields(tokens="tokens.npy")
    return DataSpec(
        train=Shards(f"{cfg.data_dir}/train", decode=decode),
        val=Shards(f"{cfg.data_dir}/val", decode=decode),
        collate=functools.partial(collate, max_tokens=cfg.block_size + 1),
    )


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return StepOutput(loss=loss_sum, count=(labels != IGNORE).sum(), outputs=logits, targets=labels)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, tokens: int, block_size: int) -> str:
    """Greedy decoding: the most likely next byte, `tokens` times (the same weights write the same text)."""
    start = list(prompt.encode())
    ids = torch.tensor([start], device=next(model.parameters()).device)
    for _ in range(tokens):
        logits = model(ids[:, -block_size:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return bytes(ids[0, len(start) :].tolist()).decode("utf-8", errors="replace")


class GeneratedText:
    """At each evaluation, the continuation of PROMPTS as a table (prompt, continuation). Every rank
    generates (under FSDP each forward is a collective); only the main process's log writes."""

    all_ranks = True

    def __init__(self, tokens: int, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def on_evaluate(self, view, metrics) -> None:
        rows = [[prompt, generate(view.model, prompt, self.tokens, self.block_size)] for prompt in PROMPTS]
        view.log({"val/generated": Table(["prompt", "continuation"], rows)})


def callbacks(cfg: Config) -> list:
    return [GeneratedText(cfg.sample_tokens, cfg.block_size)] if cfg.sample_tokens else []
