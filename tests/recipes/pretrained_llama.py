"""A test recipe: a causal LM fine-tuned from a save_pretrained directory (`--weights`), the model
built from its config.json and loaded with launcher.load_weights inside build_model, as a user's
recipe would. The data are fixed random token sequences; the model returns its own loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 - imported before the model is built

from launcher import DataSpec, TrainConfig, load_weights


@dataclass
class Config(TrainConfig):
    # a save_pretrained directory: its config.json builds the model, its safetensors load into it
    weights: str = ""
    sequence: int = 16  # tokens per sample
    samples: int = 64  # training samples (16 more for validation)
    batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 0
    epochs: int = 1
    log_every: int = 1
    output_dir: str = "runs/pretrained_llama"


def build_model(cfg: Config):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.weights))
    load_weights(model, cfg.weights, head="")
    return model


def build_data(cfg: Config) -> DataSpec:
    vocab = AutoConfig.from_pretrained(cfg.weights).vocab_size
    tokens = torch.randint(
        vocab, (cfg.samples + 16, cfg.sequence), generator=torch.Generator().manual_seed(0)
    )
    samples = [{"input_ids": row, "labels": row} for row in tokens]
    return DataSpec(train=samples[: cfg.samples], val=samples[cfg.samples :])


def hf_model(cfg: Config, model):
    return None  # no OUTPUT_DIR/hf/: the tests check loading (tests/e2e/test_hf_e2e.py checks the export)
