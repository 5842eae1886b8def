"""LoRA end to end on 2 CPU processes (gloo): tests/recipes/lora_llama.py (a tiny Llama wrapped by
peft) under DDP and FSDP. The base stays bitwise as built, checkpoints hold the adapters alone, an
FSDP run killed mid-save and resumed ends with bitwise the uninterrupted DDP run's weights, the
adapter reloads in peft, the merged export is base + scaling x B @ A, a resume onto another base is
refused, and evaluate reads the run.

DDP and FSDP agree to the bit here: with 2 processes each gradient element is the sum of two
numbers (the same in an all-reduce and a reduce-scatter) divided by 2 (exact), and every other
operation is the same on the same values. So one uninterrupted run serves as the reference for both."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import ROOT, child_env, launcher, metrics
from launcher.runtime import state_files

RECIPE = str(ROOT / "tests" / "recipes" / "lora_llama.py")
ARGS = ["--max_steps=8", "--checkpoint_every=3", "--layer_decay=0.5"]  # checkpoints at steps 3, 6 and 8
SCALING = 2.0  # lora_alpha / r in the recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP uninterrupted; FSDP killed in step 6's save, then resumed; both export the merged model."""
    root = tmp_path_factory.mktemp("lora")
    out = {mode: root / mode for mode in ("ddp", "fsdp")}
    launcher(RECIPE, f"--output_dir={out['ddp']}", *ARGS, "--export_merged", processes=2)
    fsdp = [RECIPE, f"--output_dir={out['fsdp']}", *ARGS, "--data_parallel=fsdp", "--export_merged"]
    killed = launcher(
        *fsdp, processes=2, check=False, env=dict(child_env(), LAUNCHER_TEST_KILL_AT="6:unsynced")
    )
    assert killed.returncode != 0 and not (out["fsdp"] / "checkpoints" / "step-00000006").exists()
    out["resumed"] = launcher(*fsdp, "--resume=auto", processes=2).stdout
    return out


def rebuilt(base_only: bool = False):
    """The recipe's model as the launcher builds it (seeded first), or its base before peft wraps it."""
    from launcher.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    cfg = recipe.default_config()
    set_seed(cfg.seed)
    return recipe.module.base_model(cfg) if base_only else recipe.build_model(cfg)


def losses(run_dir, key: str) -> list[float]:
    return [m[key] for m in metrics(run_dir) if key in m]


def test_the_base_stays_bitwise_frozen_and_a_killed_fsdp_run_resumes_to_the_ddp_runs_weights(runs):
    assert "resumed from" in runs["resumed"] and "step-00000003 at step 3" in runs["resumed"]
    initial = rebuilt().state_dict()
    # the whole PeftModel
    ddp, fsdp = (load_file(str(runs[mode] / "model.safetensors")) for mode in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() == initial.keys()
    changed = {name for name in ddp if not torch.equal(ddp[name], initial[name])}
    assert changed and all(".lora_A." in name or ".lora_B." in name for name in changed)
    assert all(torch.equal(ddp[name], fsdp[name]) for name in ddp)
    for key in ("train/loss", "val/loss"):
        a, b = losses(runs["ddp"], key), losses(runs["fsdp"], key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, key
    assert [m["step"] for m in metrics(runs["fsdp"]) if "train/loss" in m] == list(range(1, 9))
    # layer decay reached the adapters: layer 1's LR is twice layer 0's
    first = metrics(runs["fsdp"])[0]
    assert first["lr/layer1"] == pytest.approx(2 * first["lr/layer0"])


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_alone(runs):
    ddp = runs["ddp"] / "checkpoints" / "step-00000008"
    assert all(".lora_" in name for name in load_file(str(ddp / "model.safetensors")))
    metadata = state_files.read_metadata(str(runs["fsdp"] / "checkpoints" / "step-00000008" / "sharded"))
    model_keys = [key for key in metadata.state_dict_metadata if key.startswith("model.")]
    assert len(model_keys) == 8 and all(".lora_" in key for key in model_keys)
    assert all(".lora_" in key for key in metadata.state_dict_metadata if key.startswith("optimizer.state."))
    state = json.loads((ddp / "trainer_state.json").read_text())
    assert (
        state["frozen_base"].startswith("xxh3_64:")
        and state["frozen_base"]
        == json.loads((runs["fsdp"] / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())[
            "frozen_base"
        ]
    )


def test_the_adapter_reloads_in_peft_and_the_merged_export_is_base_plus_scaled_b_a(runs):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    for mode in ("ddp", "fsdp"):
        final = load_file(str(runs[mode] / "model.safetensors"))
        reloaded = PeftModel.from_pretrained(rebuilt(base_only=True), str(runs[mode] / "adapter"))
        assert all(torch.equal(tensor, final[name]) for name, tensor in reloaded.state_dict().items()), mode
    final = load_file(str(runs["ddp"] / "model.safetensors"))
    merged = LlamaForCausalLM.from_pretrained(str(runs["ddp"] / "hf")).state_dict()
    assert len(merged) == 21
    gathered = load_file(str(runs["fsdp"] / "hf" / "model.safetensors"))  # merged from FSDP's shards
    assert gathered.keys() == merged.keys() and all(torch.equal(gathered[k], merged[k]) for k in merged)
    for layer in range(2):
        for projection in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            a, b = final[f"{prefix}.lora_A.default.weight"], final[f"{prefix}.lora_B.default.weight"]
            expected = final[f"{prefix}.base_layer.weight"] + (b @ a) * SCALING
            assert torch.equal(merged[f"model.layers.{layer}.self_attn.{projection}.weight"], expected)
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"],
        final["base_model.model.model.layers.0.mlp.up_proj.weight"],
    )


def test_a_resume_onto_another_base_is_refused_and_evaluate_reads_the_run(runs, tmp_path):
    import shutil

    copy = tmp_path / "other_base"
    shutil.copytree(runs["fsdp"], copy)
    refused = launcher(
        RECIPE,
        f"--output_dir={copy}",
        "--resume=auto",
        "--max_steps=9",
        "--base_seed=1",
        # 1 process: DCP reshards
        "--resume_changes=allow",
        "--data_parallel=fsdp",
        check=False,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "trained adapters on another base model" in refused.stderr.strip().splitlines()[-1]
    # the best checkpoint (step 8) holds the adapters alone: evaluate puts them on the recipe's base
    evaluated = launcher("evaluate", f"--checkpoint={runs['ddp']}/best", f"--out={tmp_path / 'evaluation'}")
    result = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert result["val/loss"] == pytest.approx(losses(runs["ddp"], "val/loss")[-1], abs=1e-6), (
        evaluated.stdout
    )
