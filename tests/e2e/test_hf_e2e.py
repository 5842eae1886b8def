"""A transformers Llama fine-tuned from a save_pretrained directory (sharded, tied embeddings) under
FSDP on 2 processes (built on the meta device, each rank loading its shards); the final weights
come out in shards with an index and as OUTPUT_DIR/hf/, which transformers loads with the run's
final weights (those of its last DCP checkpoint, gathered by DCP) and equal logits. (evaluate and
predict read a sharded export in tests/e2e/test_tasks_e2e.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, launcher
from launcher.runtime import state_files
from launcher.runtime.checkpoints import SHARDED_DIR
from launcher.runtime.weights import open_weights

RECIPE = str(ROOT / "tests" / "recipes" / "hf_llama.py")
STEPS = 3


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("hf_fsdp")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(root / "pretrained"), max_shard_size="20KB")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
        unk_token="[UNK]",
    ).save_pretrained(str(root / "pretrained"))
    launcher(
        RECIPE,
        f"--model_dir={root / 'pretrained'}",
        f"--loaded_dir={root / 'loaded'}",
        f"--output_dir={root / 'run'}",
        "--data_parallel=fsdp",
        "--max_shard_size=20KB",
        f"--max_steps={STEPS}",
        f"--checkpoint_every={STEPS}",
        processes=2,
    )
    return root


def final_checkpoint_weights(run, model) -> dict[str, torch.Tensor]:
    """The run's last checkpoint's model weights, as DCP gathers them (not the export's code)."""
    state = {"model": {name: torch.empty_like(tensor) for name, tensor in model.state_dict().items()}}
    state_files.load_sharded(state, str(run / "checkpoints" / f"step-{STEPS:08d}" / SHARDED_DIR))
    return state["model"]


# the test reads the DCP checkpoint in one process
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_fsdp_run_loads_the_pretrained_llama_whole_and_exports_what_transformers_loads(fsdp_run):
    import transformers

    pretrained, run = fsdp_run / "pretrained", fsdp_run / "run"
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(pretrained))
    # Under FSDP each rank builds the model on the meta device and loads only its shards once sharded:
    # nothing is loaded in build_model (tests/unit/test_meta_build.py checks the sliced loads bitwise).
    assert not (fsdp_run / "loaded").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"))
    final = final_checkpoint_weights(run, exported)
    mine = exported.state_dict()
    assert [name for name in mine if not torch.equal(mine[name], final[name])] == []
    assert not torch.equal(mine["model.norm.weight"], reference.state_dict()["model.norm.weight"])  # trained
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # tied, saved once
    checkpointed = transformers.AutoModelForCausalLM.from_config(exported.config)
    checkpointed.load_state_dict(final)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(exported(tokens).logits, checkpointed(tokens).logits)
    hf_files = {path.name for path in (run / "hf").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= hf_files and len([n for n in hf_files if n.startswith("model-")]) > 2
    # the launcher's own export: shards with an index, the same tensors
    assert len(list(run.glob("model-*-of-*.safetensors"))) > 2 and not (run / "model.safetensors").exists()
    with open_weights(str(run)) as files:
        assert all(torch.equal(files.read(name), final[name]) for name in files.names)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_file"] == str(run / "model.safetensors.index.json") and summary["hf_dir"] == str(
        run / "hf"
    )
