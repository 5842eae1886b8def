"""A test recipe: a tiny Llama (transformers' LlamaForCausalLM, hidden 32, 2 layers, vocabulary
256) wrapped with peft's LoRA (rank 4 on q_proj and v_proj), trained on random tokens with the
model's own loss. The base's random weights come from `base_seed` (standing in for a pretrained
checkpoint), so a resume rebuilds the same frozen base; `layer_decay` < 1 gives each layer's
adapters their own LR."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launcher import DataSpec, Group, Schedule, TrainConfig, layer_decay


@dataclass
class Config(TrainConfig):
    hidden: int = 32  # the Llama's width
    layers: int = 2  # decoder layers
    vocab: int = 256  # token ids
    seq_len: int = 16  # tokens per sample
    lora_rank: int = 4  # LoRA's r (0: no LoRA, the whole model trains: the full checkpoint to compare with)
    base_seed: int = 0  # the base's random weights (another seed: another "pretrained" base)
    layer_decay: float = 1.0  # the adapters of layer i train at lr x layer_decay^(layers - i)
    output_dir: str = "runs/lora_llama"
    epochs: int = 1
    max_steps: int = 8
    batch_size: int = 4
    lr: float = 1e-2
    num_workers: int = 0
    log_every: int = 1
    wandb_mode: str = "disabled"


def base_model(cfg: Config):
    """The frozen base, before LoRA: random weights from the launcher's seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.base_seed)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=cfg.hidden,
            intermediate_size=2 * cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=cfg.vocab,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def build_model(cfg: Config):
    from peft import LoraConfig, get_peft_model

    if not cfg.lora_rank:
        return base_model(cfg)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=2 * cfg.lora_rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    return get_peft_model(base_model(cfg), lora)


def build_schedule(cfg: Config, model) -> Schedule:
    """One group per decoder layer (the last first), layer-decayed: peft's names keep the layer index
    (base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight)."""
    layers = [Group(f"layer{i}", [f"*.layers.{i}"]) for i in reversed(range(cfg.layers))]
    return Schedule(groups=[*layer_decay(layers, cfg.layer_decay), Group("rest")])


def build_data(cfg: Config) -> DataSpec:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab, (96, cfg.seq_len), generator=generator)
    samples = [{"input_ids": row, "labels": row} for row in tokens]
    return DataSpec(train=samples[:64], val=samples[64:])
