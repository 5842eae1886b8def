"""Models built without memory (launcher/runtime/meta_build.py), on 2 forked gloo ranks: a
save_pretrained Llama built on the meta device, sharded, and loaded slice by slice equals
transformers' own load bitwise (tied and untied, with its rotary buffers), gives the whole model's
logits, and a model without weights is initialised to the same values on 2 ranks as on 1."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file, save_file

from conftest import spawn_or_fail
from launcher.config import TrainConfig
from launcher.runtime import meta_build, sharding
from launcher.runtime.weights import load_weights

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 7]])


def llama_config(tied: bool) -> transformers.LlamaConfig:
    # 250 rows: the embedding splits 125/125, the 2 key-value heads x 8 = 16 rows 8/8, odd sizes pad
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        tie_word_embeddings=tied,
    )


def build_sharded(config, weights: str | None) -> torch.nn.Module:
    """What training does under FSDP: built empty (the load recorded), sharded, then materialised."""
    with meta_build.empty_model() as loads:
        model = transformers.LlamaForCausalLM(config)
        if weights:
            load_weights(model, weights, head="", log=lambda _: None)
    assert meta_build.is_empty(model) and len(loads) == (1 if weights else 0)
    units = sharding.find_units(model, None, 0)
    sharding.shard(model, units, TrainConfig(), torch.device("cpu"))
    meta_build.materialise(
        model, torch.device("cpu"), loads, load_weights, meta_build.module_init(model, lambda _: None)
    )
    return model


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor whole (a collective), tied ones under each name, cloned for safetensors."""
    return {name: sharding.full(tensor).clone() for name, tensor in model.state_dict().items()}


def _rank(rank: int, store: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for name in ("tied", "untied"):
            loaded = build_sharded(llama_config(tied=name == "tied"), f"{root}/{name}")
            assert all(sharding.local(p).shape[0] < p.shape[0] for p in loaded.parameters() if p.shape[0] > 1)
            tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
            with torch.no_grad():
                logits = loaded(TOKENS).logits
            sharding.reshard(loaded)
            whole = gathered(loaded)
            if rank == 0:
                save_file(
                    {**whole, "logits": logits.contiguous(), "tied": torch.tensor(tied)},
                    f"{root}/{name}.loaded",
                )
        torch.manual_seed(0)
        initialised = gathered(build_sharded(llama_config(tied=False), None))
        if rank == 0:
            save_file(initialised, f"{root}/initialised.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Both Llamas written with save_pretrained in 20 KB shards, built and loaded on 2 ranks (one spawn)."""
    root = tmp_path_factory.mktemp("meta_build")
    for name in ("tied", "untied"):
        torch.manual_seed(1)
        transformers.LlamaForCausalLM(llama_config(name == "tied")).save_pretrained(
            root / name, max_shard_size="20KB"
        )
    spawn_or_fail(_rank, (str(root / "store"), str(root)), nprocs=2)
    return root


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_a_sharded_meta_built_llama_loads_its_slices_bitwise_as_transformers_loads_it(sharded_run, name):
    weights, loaded = str(sharded_run / name), load_file(str(sharded_run / f"{name}.loaded"))
    # shards and an index
    assert len([name for name in os.listdir(weights) if name.endswith(".safetensors")]) > 2
    reference = transformers.LlamaForCausalLM.from_pretrained(weights)
    # the rotary inv_freq, not persistent
    expected = {**reference.state_dict(), **dict(reference.named_buffers())}
    assert sorted(set(loaded) - {"logits", "tied"}) == sorted(reference.state_dict())
    assert [name for name in reference.state_dict() if not torch.equal(loaded[name], expected[name])] == []
    assert bool(loaded["tied"]) == reference.config.tie_word_embeddings  # the LM head is still the embedding
    with torch.no_grad():
        assert torch.equal(loaded["logits"], reference(TOKENS).logits)


def test_a_meta_built_model_without_weights_is_initialised_alike_on_2_ranks_and_on_1(sharded_run):
    initialised = load_file(str(sharded_run / "initialised.safetensors"))
    torch.manual_seed(0)
    with meta_build.empty_model():
        model = transformers.LlamaForCausalLM(llama_config(tied=False))
    meta_build.materialise(
        model, torch.device("cpu"), [], load_weights, meta_build.module_init(model, lambda _: None)
    )
    whole = model.state_dict()
    assert [name for name in whole if not torch.equal(initialised[name], whole[name])] == []
    assert torch.equal(whole["model.norm.weight"], torch.ones(32))  # transformers' own _init_weights
    # initializer_range 0.02, not garbage
    assert 0.01 < whole["model.layers.0.mlp.up_proj.weight"].std() < 0.03
