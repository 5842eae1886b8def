"""A run's own config: --config files, the fields a resume or evaluate takes from a saved config,
the result-changing flags a resume refuses, and the one line for weights that do not fit."""

from __future__ import annotations

import dataclasses
import json

import pytest
from safetensors.torch import save_file
from torch import nn

from conftest import MLP_RECIPE
from launcher.cli import configure, main
from launcher.commands.inference import load_model
from launcher.config import ConfigError, TrainConfig
from launcher.overrides import RESULT_NEUTRAL, inherit
from launcher.recipe import load_recipe
from launcher.runtime import checkpoints, run_config
from launcher.runtime.weights import fit_problem, open_weights


@pytest.fixture(scope="module")
def mlp():
    return load_recipe(MLP_RECIPE)


def saved_checkpoint(root, config: TrainConfig, model: nn.Module | None = None, step: int = 4):
    """A checkpoint directory as a run leaves it: its trainer state with the config, and the weights."""
    path = root / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    state = {"step": step, "epoch": 0, "config": dataclasses.asdict(config), "world_size": 1}
    (path / checkpoints.STATE_FILE).write_text(json.dumps(state))
    if model is not None:
        save_file(model.state_dict(), str(path / "model.safetensors"))
    return path


def test_a_yaml_file_names_the_recipe_and_sets_fields_and_flags_override_it(tmp_path):
    file = tmp_path / "small.yaml"
    file.write_text(f"recipe: {MLP_RECIPE}\nhidden: 16\nlr: 1e-3\nbatch-size: 8\ntrackers: [tensorboard]\n")
    recipe, cfg = configure("train", "", f"--config={file}", {"config": str(file)}, "")
    assert recipe.name == "mlp_digits" and (cfg.hidden, cfg.lr, cfg.batch_size, cfg.trackers) == (
        16,
        0.001,
        8,
        ("tensorboard",),
    )
    _, cfg = configure("train", "", f"--config={file}", {"config": str(file), "lr": 0.01, "hidden": 24}, "")
    assert (cfg.hidden, cfg.lr, cfg.batch_size) == (24, 0.01, 8)


@pytest.mark.parametrize(
    "text, message",
    [
        ("hiden: 16\n", "bad.yaml: unknown field hiden for mlp_digits; did you mean hidden?"),
        ("epochs: three\n", "bad.yaml: --epochs expects int, got 'three'"),
        ("- 1\n- 2\n", "--config={file} holds a list, not a mapping of field names to values"),
        (
            "hidden: [16\n",
            "--config={file} does not parse (expected ',' or ']', but got '<stream end>' at line 2",
        ),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(text, message, tmp_path, capsys):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        main([MLP_RECIPE, f"--config={file}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(error) == 1 and message.format(file=file) in error[0], error


def test_a_saved_config_gives_what_was_not_given_and_names_the_fields_it_ignores():
    saved = {
        "recipe": "old",
        **dataclasses.asdict(
            TrainConfig(
                lr=0.1, epochs=3, output_dir="runs/old", max_steps=5, log_every=7, trackers=("tensorboard",)
            )
        ),
        "gone": 1,
    }
    cfg, note = inherit(
        TrainConfig(epochs=2, resume="auto"),
        json.loads(json.dumps(saved)),
        {"epochs", "resume"},
        "runs/old/config.json",
    )
    assert (cfg.lr, cfg.log_every, cfg.trackers, cfg.epochs) == (0.1, 7, ("tensorboard",), 2)
    # what this command does
    assert (cfg.output_dir, cfg.max_steps, cfg.resume) == ("runs/default", 0, "auto")
    assert (
        note == "note: runs/old/config.json has fields that launcher.config.TrainConfig lacks, ignored: gone"
    )
    assert RESULT_NEUTRAL <= set(TrainConfig.__dataclass_fields__)


def test_a_resume_refuses_each_changed_result_flag_and_applies_the_neutral_ones(mlp, tmp_path):
    run = tmp_path / "run"
    checkpoint = saved_checkpoint(
        run, dataclasses.replace(mlp.default_config(), hidden=32, data_dir="data/x")
    )
    asked = dataclasses.replace(
        mlp.default_config(),
        output_dir=str(run),
        resume="auto",
        hidden=64,
        lr=0.01,
        log_every=1,
        num_workers=3,
    )
    given = {"output_dir", "resume", "hidden", "lr", "log_every", "num_workers"}
    with pytest.raises(ConfigError) as refused:
        run_config.resume_config(asked, given)
    assert str(refused.value) == (
        f"checkpoint {checkpoint} was trained otherwise: --hidden=64 differs from the checkpoint's 32; "
        "--lr=0.01 differs from the checkpoint's 0.003; drop them to resume as trained, "
        "or pass --resume_changes=allow to resume with them anyway"
    )
    said = []
    allowed = run_config.resume_config(dataclasses.replace(asked, resume_changes="allow"), given, said.append)
    assert (allowed.hidden, allowed.lr, allowed.data_dir) == (64, 0.01, "data/x")
    assert said == [
        "note: --resume_changes=allow: --hidden=64 differs from the checkpoint's 32; --lr=0.01 differs "
        "from the checkpoint's 0.003"
    ]
    neutral = run_config.resume_config(
        dataclasses.replace(asked, hidden=10, lr=1.0), given - {"hidden", "lr"}
    )
    assert (neutral.hidden, neutral.lr, neutral.data_dir, neutral.log_every, neutral.num_workers) == (
        32,
        0.003,
        "data/x",
        1,
        3,
    )


def test_weights_that_do_not_fit_name_the_first_differences_and_the_flags_that_differ(mlp, tmp_path):
    trained = mlp.build_model(dataclasses.replace(mlp.default_config(), hidden=32))
    run = tmp_path / "run"
    checkpoint = saved_checkpoint(run, dataclasses.replace(mlp.default_config(), hidden=32), trained)
    asked = dataclasses.replace(mlp.default_config(), hidden=64)
    with pytest.raises(ConfigError) as resumed:
        run_config.check_model_fits(str(checkpoint), mlp.build_model(asked), asked)
    expected = (
        "1.weight is (32, 192) in the checkpoint, (64, 192) in the model; 1.bias (32,) vs (64,); "
        "3.weight (10, 32) vs (10, 64)); it was trained with --hidden=32 (here 64): drop the flags that "
        "change the model"
    )
    assert str(resumed.value) == f"checkpoint {checkpoint} does not fit the model ({expected}"
    save_file(trained.state_dict(), str(run / "model.safetensors"))
    (run / "config.json").write_text(
        json.dumps({"recipe": "mlp_digits", **dataclasses.asdict(asked), "hidden": 32})
    )
    with pytest.raises(ConfigError) as evaluated:
        load_model(asked, mlp, str(run))
    assert str(evaluated.value) == f"checkpoint {run} does not fit mlp_digits's model ({expected}"
    # a DDP-wrapped checkpoint's names fit; other layers are named as missing or unexpected
    deeper = nn.Sequential(*trained, nn.ReLU(), nn.Linear(10, 10))
    for name, model in (("wrapped", trained), ("deeper", deeper)):
        save_file(
            {f"module.{key}": value for key, value in model.state_dict().items()},
            str(tmp_path / f"{name}.safetensors"),
        )
    with (
        open_weights(str(tmp_path / "wrapped.safetensors")) as wrapped,
        open_weights(str(tmp_path / "deeper.safetensors")) as saved_deeper,
    ):
        assert fit_problem(trained, wrapped) == ""
        assert fit_problem(deeper, wrapped) == "missing from the checkpoint: 5.weight, 5.bias"
        assert fit_problem(trained, saved_deeper) == "not in the model: module.5.bias, module.5.weight"


def test_grad_accum_steps_is_refused_on_the_checkpoints_world_size_and_rescaled_on_another(tmp_path):
    checkpoint = saved_checkpoint(tmp_path, TrainConfig(grad_accum_steps=4))  # written by 1 process
    asked = TrainConfig(grad_accum_steps=2)
    run_config.check_resumed_config(asked, str(checkpoint), world_size=2)  # keep_global_batch sets it
    with pytest.raises(ConfigError, match="--grad_accum_steps=2 differs from the checkpoint's 4; drop it"):
        run_config.check_resumed_config(asked, str(checkpoint), world_size=1)
    # 32 x 1 x 4 = 32 x 2 x 2
    assert run_config.keep_global_batch(asked, str(checkpoint), 2)[0].grad_accum_steps == 2


def test_every_recipes_saved_config_reads_back_as_it_was():
    from pathlib import Path

    from conftest import ROOT

    for path in sorted((ROOT / "recipes").glob("*.py")) + [Path(MLP_RECIPE)]:
        if "build_model" not in path.read_text():  # a shared module (recipes/digits.py), not a recipe
            continue
        cfg = load_recipe(str(path)).default_config()
        saved = json.loads(json.dumps({"recipe": path.stem, **dataclasses.asdict(cfg)}))
        assert inherit(cfg, saved, set(), "config.json") == (cfg, ""), path.name
        assert run_config.refuse_changes(cfg, saved, "step") == "", path.name
