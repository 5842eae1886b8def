"""Write a small Llama as `save_pretrained` writes a downloaded one: config.json, generation
config, model.safetensors and a tokenizer that AutoTokenizer loads offline. It stands in for a
real checkpoint (`huggingface-cli download ...`) in the tests and docs/fine-tuning.md.

    python scripts/make_tiny_llama.py --out data/tiny_llama
    python -m launcher recipes/llm_finetune_tiny --model_dir=data/tiny_llama

The tokenizer is byte-level with no merges: 256 byte tokens after <pad>, <s> and </s> (259 in
all), <s> put in front of every text, as Llama's tokenizer does. Its vocabulary is the model's.
The weights are a seeded random initialisation: the same arguments write the same bytes.
"""

from __future__ import annotations

import os

import fire

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


def byte_tokenizer():
    """A PreTrainedTokenizerFast over bytes: each UTF-8 byte is one token, <s> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):  # the 256 printable stand-ins of the bytes
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(  # input_ids and attention_mask, as Llama's (no token_type_ids)
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_llama(
    vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, tie_embeddings: bool, seed: int
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main(
    out: str = "data/tiny_llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie_embeddings: bool = False,
    seed: int = 0,
) -> str:
    """hidden: the residual width (the MLP is 2x); heads must divide it; kv_heads < heads: grouped-query
    attention."""
    if hidden % heads or heads % kv_heads:
        raise SystemExit(
            f"--heads must divide --hidden and --kv_heads divide --heads, got {hidden}, {heads}, {kv_heads}"
        )
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), hidden, layers, heads, kv_heads, tie_embeddings, seed)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, vocabulary {len(tokenizer)} -> {out}")
    return out


if __name__ == "__main__":
    fire.Fire(main)
