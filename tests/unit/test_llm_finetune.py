"""recipes/llm_finetune's parts in process: the docstring examples against Python's own
docstrings, the loss mask (completion tokens only), the split, the cache, the shard units of a
plain and a LoRA-wrapped Llama, and the errors for a missing model directory."""

from __future__ import annotations

import dataclasses
import inspect
import json
import textwrap

import pytest
import torch

from launcher.config import ConfigError
from recipes import llm_finetune
from recipes.llm_finetune_tiny import Config as TinyConfig
from scripts.make_tiny_llama import byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_an_example_is_a_signature_then_the_docstring_summary_of_the_function():
    examples = {e["name"]: e for e in llm_finetune.module_examples("textwrap")}
    dedent = examples["textwrap.dedent"]
    assert dedent["prompt"] == f'# textwrap.dedent\ndef dedent{inspect.signature(textwrap.dedent)}:\n    """'
    summary = inspect.getdoc(textwrap.dedent).split("\n\n")[0]
    assert dedent["completion"] == summary.replace("\n", "\n    ") + '"""'
    wrap = examples["textwrap.TextWrapper.wrap"]  # a method: named with its class
    assert wrap["prompt"].startswith("# textwrap.TextWrapper.wrap\ndef wrap(self, text):")
    assert wrap["completion"].startswith(inspect.getdoc(textwrap.TextWrapper.wrap).split("\n")[0])


def test_the_loss_mask_covers_the_completion_and_its_end_token_only(tokenizer):
    short = {"prompt": '# f\ndef f():\n    """', "completion": 'Return one."""'}
    long = {"prompt": '# g\ndef g(a, b):\n    """', "completion": 'Add a and b, then return the sum."""'}
    samples = [llm_finetune.tokenize(e, tokenizer, block_size=128) for e in (short, long)]
    batch = llm_finetune.collate(samples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(samples[1]["tokens"]) - 1)
    for row, (example, sample) in enumerate(zip((short, long), samples)):
        labels, inputs = batch["labels"][row], batch["input_ids"][row]
        kept = labels != llm_finetune.IGNORE
        # the trained tokens decode to the completion and end with </s>; nothing of the prompt or the padding
        assert tokenizer.decode(labels[kept]) == example["completion"] + tokenizer.eos_token
        first = sample["prompt_tokens"] - 1  # the input position whose next token is the completion's first
        assert not kept[:first].any() and kept[first : first + kept.sum()].all()
        # labels = inputs shifted
        assert torch.equal(inputs[: len(sample["tokens"]) - 1], sample["tokens"][:-1])
        assert torch.equal(labels[kept], sample["tokens"][first + 1 :])
    assert (batch["input_ids"][0, len(samples[0]["tokens"]) :] == tokenizer.pad_token_id).all()


def test_a_long_example_is_cut_to_block_size_and_a_prompt_without_room_is_dropped(tokenizer):
    example = {"prompt": '# h\ndef h():\n    """', "completion": "x" * 200}
    cut = llm_finetune.tokenize(example, tokenizer, block_size=40)
    assert len(cut["tokens"]) == 41 and cut["prompt_tokens"] < 40
    assert llm_finetune.tokenize(example, tokenizer, block_size=cut["prompt_tokens"]) is None


def test_the_split_depends_on_each_name_alone_and_is_cached(tmp_path):
    alone = llm_finetune.docstring_pairs(("shlex",), val_percent=30)
    together = llm_finetune.docstring_pairs(("heapq", "shlex"), val_percent=30)
    for split in ("train", "val"):
        assert [e for e in together[split] if e["name"].startswith("shlex.")] == alone[split]
    assert alone["val"] and not {e["name"] for e in alone["train"]} & {e["name"] for e in alone["val"]}
    cfg = dataclasses.replace(TinyConfig(), modules=("shlex",), val_percent=30, data_dir=str(tmp_path))
    assert llm_finetune.cached_pairs(cfg) == alone
    (cached,) = tmp_path.glob("docstrings-*.json")
    assert json.loads(cached.read_text()) == alone
    cached.write_text(json.dumps({"train": alone["val"], "val": []}))  # read back, not extracted again
    assert llm_finetune.cached_pairs(cfg)["train"] == alone["val"]


def test_the_shard_units_are_the_decoder_layers_with_and_without_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(vocab_size=259, hidden=32, layers=2, heads=4, kv_heads=2, tie_embeddings=True, seed=0)
    assert llm_finetune.shard_units(TinyConfig(), model) == list(model.model.layers)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert llm_finetune.shard_units(TinyConfig(), wrapped) == list(wrapped.base_model.model.model.layers)


@pytest.mark.parametrize("model_dir", ["", "missing/dir"])
def test_a_model_directory_without_config_json_is_refused(model_dir):
    cfg = dataclasses.replace(TinyConfig(), model_dir=model_dir)
    for build in (llm_finetune.build_model, llm_finetune.build_data):
        with pytest.raises(
            ConfigError, match="--model_dir must name a Hugging Face model directory with config.json"
        ):
            build(cfg)
