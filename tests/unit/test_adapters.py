"""PEFT models in one process (launcher/train/adapters.py): peft's frozen base joins no parameter
group while layer decay reaches the adapters, a DDP checkpoint holds the adapters and their
optimizer state alone and resumes them bitwise onto a rebuilt base, and a resume onto another
base is refused in one line."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import ROOT
from launcher.config import ConfigError
from launcher.optim.groups import apply_freezing, assign_groups, build_optimizer
from launcher.recipe import load_recipe
from launcher.runtime import checkpoints, run_config
from launcher.train import adapters

RECIPE = load_recipe(str(ROOT / "tests" / "recipes" / "lora_llama.py"))


def build(**fields):
    cfg = RECIPE.default_config()
    for name, value in fields.items():
        setattr(cfg, name, value)
    set_seed(cfg.seed)
    return cfg, RECIPE.build_model(cfg)


def test_the_base_joins_no_group_and_layer_decay_reaches_the_adapters():
    cfg, model = build(layer_decay=0.5)
    frozen = adapters.frozen_base(model)
    assert frozen and all("lora_" not in name for name in frozen)
    # not a PeftModel: the recipe's groups decide
    assert adapters.frozen_base(model.get_base_model()) == frozenset()
    schedule = RECIPE.build_schedule(cfg, model)
    groups = assign_groups(model, schedule, lr=0.1, weight_decay=0.0, frozen_base=frozen)
    apply_freezing(groups, step=0)
    # layer 1 (the last) at lr x 0.5, layer 0 at lr x 0.25; each holds its own q_proj and v_proj A and B
    assert [(pg.name, pg.lr, len(pg.names)) for pg in groups] == [("layer1", 0.05, 4), ("layer0", 0.025, 4)]
    assert all(".layers.1." in name and "lora_" in name for name in groups[0].names)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight" in groups[0].names
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in frozen)
    optimizer = build_optimizer(schedule.resolved(cfg), groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 8  # the adapters alone


def test_a_ddp_checkpoint_holds_the_adapters_and_resumes_them_bitwise_onto_the_rebuilt_base(tmp_path):
    def prepared(**fields):
        cfg, model = build(**fields)
        frozen = adapters.frozen_base(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        return accelerator, model, optimizer, frozen

    acc, model, optimizer, frozen = prepared()
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = checkpoints.save(acc, str(tmp_path / "run"), {"step": 2, "epoch": 0}, frozen_base=frozen).finish()
    saved = load_file(os.path.join(path, "model.safetensors"))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trained and len(trained) == 8  # the adapters, not the base
    whole = sum(t.numel() for t in model.state_dict().values())
    assert sum(t.numel() for t in saved.values()) / whole < 0.03

    acc2, model2, optimizer2, frozen2 = prepared()  # the recipe rebuilds the same base, fresh adapters
    cfg = RECIPE.default_config()
    run_config.check_model_fits(path, model2, cfg, frozen2)  # the adapters fit
    with pytest.raises(
        ConfigError, match=r"does not fit the model \(missing from the checkpoint: base_model"
    ):
        run_config.check_model_fits(path, model2, cfg)  # as a whole model, the base is missing
    checkpoints.load(acc2, path, frozen_base=frozen2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(
        torch.equal(s["exp_avg"], optimizer2.state_dict()["state"][i]["exp_avg"])
        for i, s in optimizer.state_dict()["state"].items()
    )


def test_a_resume_onto_another_base_is_refused_in_one_line():
    _, model = build()
    frozen = adapters.frozen_base(model)
    here = adapters.base_fingerprint(model, frozen)
    assert here == adapters.base_fingerprint(build()[1], frozen)  # the same base, rebuilt
    other = adapters.base_fingerprint(build(base_seed=1)[1], frozen)
    assert other != here
    adapters.check_same_base("ckpt", {"frozen_base": here}, here)
    with pytest.raises(ConfigError, match="checkpoint ckpt trained adapters on another base model") as error:
        adapters.check_same_base("ckpt", {"frozen_base": other}, here)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="holds a whole model, this run's model is a PEFT model"):
        adapters.check_same_base("ckpt", {}, here)


def test_export_merged_is_refused_in_one_line_for_a_model_peft_did_not_wrap():
    _, model = build()
    adapters.check_mergeable(model)
    with pytest.raises(
        ConfigError, match=r"--export_merged .* \(LlamaForCausalLM\) is not a peft PeftModel; drop"
    ):
        adapters.check_mergeable(model.get_base_model())
