"""recipes/llm_finetune_tiny from a save_pretrained Llama (scripts/make_tiny_llama.py), as a user
runs it: a full fine-tune on 1 process and LoRA under FSDP on 2; each learns, and what each
exports loads in transformers and peft as the run's weights, and `evaluate` reads the run back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import launcher, metrics
from scripts.make_tiny_llama import main as make_tiny_llama

RECIPE = "recipes/llm_finetune_tiny"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_finetune")
    base = make_tiny_llama(out=str(root / "tiny_llama"))
    common = [f"--model_dir={base}", f"--data_dir={root / 'docstrings'}"]
    full, lora = root / "full", root / "lora"
    launcher(RECIPE, *common, f"--output_dir={full}")
    launcher(
        RECIPE,
        *common,
        f"--output_dir={lora}",
        "--data_parallel=fsdp",
        "--lora_rank=4",
        "--lr=2e-2",
        "--export_merged",
        processes=2,
    )
    return {"base": base, "full": full, "lora": lora}


def losses(run_dir, key: str) -> list[float]:
    return [m[key] for m in metrics(run_dir) if key in m]


def batch_of_tokens() -> torch.Tensor:
    return torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run", ["full", "lora"])
def test_the_fine_tune_lowers_the_completion_loss(runs, run):
    train, val = losses(runs[run], "train/loss"), losses(runs[run], "val/loss")
    assert len(val) == 2 and val[-1] < val[0] and train[-1] < train[0]


def test_the_full_fine_tune_exports_a_model_and_tokenizer_transformers_loads(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(runs["full"] / "hf")
    base = AutoModelForCausalLM.from_pretrained(runs["base"])
    final = load_file(runs["full"] / "model.safetensors")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, final[name]), name  # the run's final weights, bitwise
    assert not torch.equal(
        exported.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    )
    assert AutoTokenizer.from_pretrained(runs["full"] / "hf")("def f():").input_ids == (
        AutoTokenizer.from_pretrained(runs["base"])("def f():").input_ids
    )


def test_the_lora_adapter_loads_in_peft_on_the_base_and_matches_the_merged_export(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(runs["base"])
    tokens = batch_of_tokens()
    with torch.no_grad():
        before = base(input_ids=tokens).logits
        adapted = PeftModel.from_pretrained(base, runs["lora"] / "adapter").eval()(input_ids=tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(runs["lora"] / "hf")(input_ids=tokens).logits
    assert not torch.allclose(adapted, before, atol=1e-4)  # the adapters learned something
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_evaluate_builds_the_model_from_its_directory_and_reads_the_run(runs, tmp_path):
    launcher("evaluate", str(runs["full"]), f"--out={tmp_path}")
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["val/loss"] == pytest.approx(losses(runs["full"], "val/loss")[-1], rel=1e-6)
