"""A test recipe: a transformers LlamaForCausalLM built from a local save_pretrained directory
(--model_dir: its config.json, then its weights through launcher.load_weights), trained on random
tokens. The launcher writes OUTPUT_DIR/hf/ because the model is a transformers model, with the
tokenizer files of model_dir (tokenizer_dir). With --loaded_dir each process writes a digest of
every tensor it loaded to loaded_dir/rank-R.json, for the tests to compare with transformers' load."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from launcher import DataSpec, TrainConfig, load_weights


@dataclass
class Config(TrainConfig):
    model_dir: str = ""  # a save_pretrained directory (config.json and weights)
    loaded_dir: str = ""  # where each process writes the digests of the weights it loaded ("": nowhere)
    seq_len: int = 16  # tokens per sample
    samples: int = 64  # random training samples (and 16 validation ones)
    batch_size: int = 8
    max_steps: int = 3
    lr: float = 1e-2
    warmup_steps: int = 0
    log_every: int = 1
    num_workers: int = 0
    output_dir: str = "runs/hf_llama"
    wandb_mode: str = "disabled"


def digests(model: torch.nn.Module) -> dict[str, str]:
    return {
        name: hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()
        for name, tensor in model.state_dict().items()
    }


def build_model(cfg: Config):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(cfg.model_dir)
    )
    load_weights(model, cfg.model_dir, head="")
    # FSDP loads once sharded (meta_build)
    if cfg.loaded_dir and not any(p.is_meta for p in model.parameters()):
        os.makedirs(cfg.loaded_dir, exist_ok=True)
        with open(os.path.join(cfg.loaded_dir, f"rank-{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(digests(model), f)
    return model


def build_data(cfg: Config) -> DataSpec:
    tokens = torch.randint(
        0, 256, (cfg.samples + 16, cfg.seq_len), generator=torch.Generator().manual_seed(0)
    )
    samples = [{"input_ids": row, "labels": row} for row in tokens]
    return DataSpec(train=samples[: cfg.samples], val=samples[cfg.samples :])


def tokenizer_dir(cfg: Config) -> str:
    return cfg.model_dir
