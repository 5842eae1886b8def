"""Hugging Face checkpoints in: a save_pretrained Llama (sharded, with an index; tied and untied
embeddings) loads whole and bitwise as transformers loads it; names are matched by one prefix for
the whole file; partial loads and damaged files are one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from torch import nn

from launcher.config import ConfigError
from launcher.runtime.weights import load_weights, match_keys, open_weights


def tiny_llama(tied: bool, seed: int = 0):
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pretrained(request, tmp_path_factory):
    """A save_pretrained directory in 20 KB shards (6-7 files and an index), and its config."""
    path = tmp_path_factory.mktemp("llama") / ("tied" if request.param else "untied")
    model = tiny_llama(request.param)
    model.save_pretrained(str(path), max_shard_size="20KB")
    return str(path), model.config


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    mine, theirs = a.state_dict(), b.state_dict()
    assert mine.keys() == theirs.keys()
    different = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    assert different == []


def test_a_save_pretrained_llama_loads_whole_and_bitwise_as_transformers_loads_it(pretrained):
    path, config = pretrained
    assert len([name for name in os.listdir(path) if name.endswith(".safetensors")]) > 2
    model = transformers.LlamaForCausalLM(config)  # other random weights
    lines = []
    report = load_weights(model, path, head="", log=lines.append)
    assert report == {"missing": [], "unexpected": [], "replaced": []}
    assert lines[0].startswith(f"loaded {20 if config.tie_word_embeddings else 21} tensors from {path}")
    assert_same_weights(model, transformers.LlamaForCausalLM.from_pretrained(path))
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_recipe_whose_keys_start_with_model_loads_a_causal_lm_and_a_bin_file(pretrained, tmp_path):
    path, config = pretrained
    reference = transformers.LlamaForCausalLM.from_pretrained(path)

    class Recipe(nn.Module):  # a recipe's own wrapper: model.model.layers..., model.lm_head...
        def __init__(self):
            super().__init__()
            self.model = transformers.LlamaForCausalLM(config)

    wrapped = Recipe()
    load_weights(wrapped, path, head="", log=lambda _: None)
    assert_same_weights(wrapped.model, reference)
    # pytorch_model.bin beside a config.json (read with weights_only), keys with `model.model.` in front
    torch.save(wrapped.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    model = transformers.LlamaForCausalLM(config)
    load_weights(model, str(tmp_path), head="", log=lambda _: None)
    assert_same_weights(model, reference)


def test_a_base_model_file_loads_into_a_causal_lm_when_the_head_is_tied_and_is_refused_otherwise(
    pretrained, tmp_path
):
    path, config = pretrained
    base = transformers.LlamaForCausalLM.from_pretrained(path).model  # names without `model.`
    from safetensors.torch import save_file

    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    model = transformers.LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        assert (
            load_weights(model, str(tmp_path / "base.safetensors"), head="", log=lambda _: None)["missing"]
            == []
        )
        assert torch.equal(model.lm_head.weight, base.embed_tokens.weight)
        return
    with pytest.raises(ConfigError) as refused:
        load_weights(model, str(tmp_path / "base.safetensors"), head="", log=lambda _: None)
    message = str(refused.value)
    assert (
        "\n" not in message
        and "leave 1 of the model's 21 trainable parameters unloaded: lm_head.weight" in message
    )
    report = load_weights(
        model, str(tmp_path / "base.safetensors"), head="", allow_missing=["lm_head.*"], log=lambda _: None
    )
    assert report["missing"] == ["lm_head.weight"]
    assert torch.equal(model.model.norm.weight, base.norm.weight)


def test_a_partial_load_is_refused_with_the_names():
    import tempfile

    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with tempfile.TemporaryDirectory() as directory:
        save_file(
            {"0.weight": torch.ones(4, 4), "0.bias": torch.ones(4)}, os.path.join(directory, "w.safetensors")
        )
        with pytest.raises(
            ConfigError,
            match=r"leave 4 of the model's 6 trainable parameters unloaded: 2.weight, "
            r"2.bias, 3.weight and 1 more \(the file names tensors like 0.bias, 0.weight\)",
        ):
            load_weights(model, os.path.join(directory, "w.safetensors"), log=lambda _: None)
        model[2].requires_grad_(False)  # frozen: not trained, so it may start as built
        load_weights(model, os.path.join(directory, "w.safetensors"), head="3", log=lambda _: None)
    assert torch.equal(model[0].weight, torch.ones(4, 4))


def test_keys_match_exactly_or_by_one_prefix_for_the_whole_file():
    causal = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    # `model.` is never stripped from one side
    assert match_keys(causal, causal) == {name: name for name in causal}
    assert match_keys([f"module.{n}" for n in causal], causal) == {n: f"module.{n}" for n in causal}
    assert match_keys([n.removeprefix("model.") for n in causal[:3]], causal) == {
        n: n.removeprefix("model.") for n in causal[:3]
    }
    peft = [f"base_model.model.{n}" for n in causal]
    assert match_keys(peft, causal) == dict(zip(causal, peft))
    assert match_keys(causal, [f"_orig_mod.{n}" for n in causal]) == {f"_orig_mod.{n}": n for n in causal}
    assert match_keys(["conv.weight"], ["fc.weight"]) == {}


def test_slices_read_only_what_is_asked_and_equal_the_whole_tensor(pretrained):
    path, _ = pretrained
    with open_weights(path) as files:
        assert files.shape("model.embed_tokens.weight") == (256, 32)
        whole = files.read("model.embed_tokens.weight")
        part = files.read_slice("model.embed_tokens.weight", (slice(128, 256), slice(0, 16)))
        assert torch.equal(part, whole[128:, :16])
        assert torch.equal(
            files.read_slice("model.norm.weight", (slice(0, 16),)), files.read("model.norm.weight")[:16]
        )


def test_a_damaged_index_or_shard_is_one_line_naming_the_file(pretrained, tmp_path):
    import shutil

    path, _ = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    index = copy / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = copy / weight_map["model.norm.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # torn
    with pytest.raises(ConfigError, match=f"weights file {shard} cannot be read") as torn:
        open_weights(str(copy))
    shard.unlink()
    with pytest.raises(
        ConfigError, match=f"weights index {index} names shard {shard.name}, which is missing"
    ) as gone:
        open_weights(str(copy))
    index.write_text('{"weight_map": ')
    with pytest.raises(ConfigError, match=f"weights index {index} is damaged") as damaged:
        open_weights(str(copy))
    assert all("\n" not in str(error.value) for error in (torn, gone, damaged))


# ---- weights out ---------------------------------------------------------------------------------


def test_the_final_weights_in_several_shards_and_the_hf_layout_load_back_bitwise(pretrained, tmp_path):
    """What a DDP run's main process writes (a whole model): model-*-of-*.safetensors with an index,
    and hf/ that transformers loads with the same weights and logits; the tokenizer files copied."""
    from tokenizers import Tokenizer, models

    from launcher.runtime.export import HFLayout, write_final_weights

    path, config = pretrained
    trained = transformers.LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.25)  # other than the pretrained weights
    tokenizer_dir = tmp_path / "tokenizer"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
        unk_token="[UNK]",
    ).save_pretrained(str(tokenizer_dir))
    out = tmp_path / "run"
    out.mkdir()
    # replaced by the shards, not left to be read
    (out / "model.safetensors").write_bytes(b"an earlier export")
    written = write_final_weights(
        str(out), trained, None, HFLayout("", str(tokenizer_dir)), 20_000, is_main=True
    )
    assert written == {"weights_file": str(out / "model.safetensors.index.json"), "hf_dir": str(out / "hf")}
    assert not (out / "model.safetensors").exists() and not (out / ".export").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2 and len(list((out / "hf").glob("model-*"))) > 2
    for source in (str(out), str(out / "hf")):
        reloaded = transformers.LlamaForCausalLM(config)
        load_weights(reloaded, source, head="", log=lambda _: None)
        assert_same_weights(reloaded, trained)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert_same_weights(exported, trained)
    assert exported.config.tie_word_embeddings == config.tie_word_embeddings
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported(tokens).logits, trained(tokens).logits)
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in index) != config.tie_word_embeddings  # tied: saved once, as transformers does
    assert (out / "hf" / "generation_config.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(str(out / "hf"))("a")["input_ids"] == [1]


def test_max_shard_size_takes_transformers_notation_and_refuses_anything_else():
    from launcher.config import TrainConfig, size_in_bytes

    assert (size_in_bytes("5GB"), size_in_bytes("20KB"), size_in_bytes("1.5 MiB")) == (
        5 * 10**9,
        20_000,
        1_572_864,
    )
    with pytest.raises(
        ConfigError, match="--max_shard_size must be a size like 5GB, 500MB or 20KB, got '5 gigs'"
    ):
        TrainConfig(max_shard_size="5 gigs").validate()
