"""Config fields, CLI overrides and their error messages (in-process: fast)."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Literal

import pytest

from launcher.cli import parse_flags, recipe_help, usage
from launcher.config import ConfigError, TrainConfig, ranged, sections
from launcher.overrides import apply_overrides, coerce, field_help, variant
from launcher.recipe import load_recipe
from launcher.train.plan import fork_hang_warning


def test_overrides_are_typed_by_field():
    cfg = apply_overrides(
        TrainConfig(),
        parse_flags(
            ["--lr=0.1", "--epochs", "3", "--output_dir=runs/x", "--trace_samples", "--mixed_precision=bf16"]
        ),
    )
    assert (cfg.lr, cfg.epochs, cfg.output_dir, cfg.trace_samples, cfg.mixed_precision) == (
        0.1,
        3,
        "runs/x",
        True,
        "bf16",
    )
    assert isinstance(cfg.lr, float)


def test_dashes_in_flag_names_mean_underscores():
    assert apply_overrides(TrainConfig(), parse_flags(["--max-steps=7"])).max_steps == 7


def test_unknown_field_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown field --bach_size .*did you mean --batch_size"):
        apply_overrides(TrainConfig(), {"bach_size": 4})


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"--epochs expects int, got 'three'"):
        apply_overrides(TrainConfig(), {"epochs": "three"})
    with pytest.raises(ConfigError, match=r"--lr expects float, got True"):
        apply_overrides(TrainConfig(), {"lr": True})


def test_choice_fields_list_their_choices():
    with pytest.raises(ConfigError, match=r"--mixed_precision expects one of no, fp16, bf16, got 'bf17'"):
        apply_overrides(TrainConfig(), {"mixed_precision": "bf17"})


def test_validation_names_the_flag():
    with pytest.raises(ConfigError, match=r"--warmup_steps must be >= 0, got -3"):
        apply_overrides(TrainConfig(), {"warmup_steps": -3})
    with pytest.raises(ConfigError, match=r"--grad_accum_steps must be >= 1, got 0"):
        apply_overrides(TrainConfig(), {"grad_accum_steps": 0})


def test_choices_hold_even_when_a_recipe_redeclares_the_field_as_str():
    @dataclasses.dataclass
    class Loose(TrainConfig):
        wandb_mode: str = "disabled"

    with pytest.raises(ConfigError, match="--wandb_mode must be one of"):
        apply_overrides(Loose(), {"wandb_mode": "sometimes"})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"ema_decay": 1.0}, "--ema_decay must be in [0, 1), got 1.0"),
        ({"min_lr_ratio": 1.5}, "--min_lr_ratio must be in [0, 1], got 1.5"),
        ({"prefetch_factor": 0}, "--prefetch_factor must be >= 1, got 0"),
        ({"label_smoothing": -0.1}, "--label_smoothing must be in [0, 1), got -0.1"),
    ],
)
def test_declared_ranges_hold_for_a_variant_a_redeclared_field_and_the_recipes_own(override, message):
    @dataclasses.dataclass
    class Recipe(TrainConfig):
        ema_decay: float = 0.5  # redeclared without its range
        width: int = ranged(8, at_least=2)  # the recipe's own

    for config in (Recipe(), variant(Recipe, min_lr_ratio=0.5, prefetch_factor=3)()):
        with pytest.raises(ConfigError, match=re.escape(message)):
            apply_overrides(config, override)
        with pytest.raises(ConfigError, match=re.escape("--width must be >= 2, got 1")):
            apply_overrides(config, {"width": 1})
    assert apply_overrides(Recipe(), {"ema_decay": 0.0, "min_lr_ratio": 1.0, "width": 2}).width == 2


def test_every_shared_field_has_one_section_and_the_usage_and_help_list_them_by_section():
    grouped = sections(TrainConfig)
    assert list(grouped) == ["run", "data", "optimisation", "checkpoints", "tracking", "parallelism", "speed"]
    names = [name for section in grouped.values() for name in section]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    listed = " ".join(usage().split("by section:\n", 1)[1].split("\n\n")[0].split())
    assert listed == " ".join(f"{title}: {', '.join(section)}" for title, section in grouped.items())
    help_text = recipe_help(load_recipe("recipes/resnet_finetune"))
    order = [help_text.index(f"\n{title}:\n") for title in ["recipe", *grouped]]
    assert order == sorted(order)
    assert "--batch_size=64" in help_text.split("\ndata:\n")[1].split("\noptimisation:\n")[0]
    assert "[float, in [0, 1)]" in help_text.split("--ema_decay=")[1].split("\n")[0]


@pytest.mark.parametrize(
    "value, tp, expected",
    [
        ("true", bool, True),
        ("off", bool, False),
        (3.0, int, 3),
        (2, float, 2.0),
        (2024, str, "2024"),
        (("a", "b"), tuple[str, ...], ("a", "b")),
        ("a", tuple[str, ...], ("a",)),
        (None, int | None, None),
        ("auto", Literal["auto", "x"], "auto"),
    ],
)
def test_coerce_accepts(value, tp, expected):
    assert coerce("f", value, tp) == expected


@pytest.mark.parametrize("value, tp", [(2.5, int), ("yes please", bool), (True, str), ("x", float)])
def test_coerce_refuses(value, tp):
    with pytest.raises(ConfigError, match="--f expects"):
        coerce("f", value, tp)


def test_wandb_mode_auto_resolves_from_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert TrainConfig().resolved().wandb_mode == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert TrainConfig().resolved().wandb_mode == "online"
    assert TrainConfig(wandb_mode="disabled").resolved().wandb_mode == "disabled"


def test_every_common_field_has_help():
    helps = field_help(TrainConfig)
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(helps)
    assert "per device" in helps["batch_size"]
    # a help too long for its field's line is on `#:` lines above the field, read as one line
    assert helps["resume"].endswith(
        "or a checkpoint path; fields not given come from the checkpoint's config"
    )


@dataclasses.dataclass
class _Commented(TrainConfig):
    # why the default is 3 (a comment for readers, not the help)
    steps: int = 3
    #: the help of a field whose declaration
    #: runs over several lines
    names: tuple[str, ...] = (
        "a",
        "b",
    )


def test_help_above_a_field_needs_the_help_marker_and_may_span_lines():
    helps = field_help(_Commented)
    assert "steps" not in helps  # a plain comment above a field is not its help
    assert helps["names"] == "the help of a field whose declaration runs over several lines"


def test_variant_changes_defaults_and_keeps_fields():
    Tiny = variant(TrainConfig, epochs=2, batch_size=4)
    assert (Tiny().epochs, Tiny().batch_size, Tiny().lr) == (2, 4, TrainConfig().lr)
    assert issubclass(Tiny, TrainConfig)
    with pytest.raises(ConfigError, match="unknown fields bogus"):
        variant(TrainConfig, bogus=1)


def test_recipe_by_path_without_suffix_and_by_module():
    by_path = load_recipe("recipes/resnet_finetune_tiny")
    by_file = load_recipe("recipes/resnet_finetune_tiny.py")
    by_module = load_recipe("recipes.resnet_finetune_tiny")
    assert by_path.module is by_file.module is by_module.module
    assert by_path.default_config().image_size == 16  # the variant's default, not the base's 32


def test_unknown_recipe_says_what_was_tried():
    with pytest.raises(ConfigError) as error:
        load_recipe("recipes/nope")
    assert "unknown recipe 'recipes/nope': tried recipes/nope.py" in str(error.value)
    with pytest.raises(ConfigError, match=r"tried nope.py, recipes/nope.py, module nope"):
        load_recipe("nope")


RECIPES = sorted(path.stem for path in pathlib.Path("recipes").glob("*.py") if "Config" in path.read_text())


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_field_of_every_recipe_has_help(recipe):
    # a help that ruff format moved off its field's line (one too long for it, not on `#:` lines) is lost
    config = load_recipe(f"recipes/{recipe}").config_cls
    assert {f.name for f in dataclasses.fields(config)} <= set(field_help(config))


def test_recipe_help_lists_fields_with_their_comments():
    text = recipe_help(load_recipe("recipes/resnet_finetune"))
    assert "--head_lr_scale=10.0" in text and "the head's LR = lr x this" in text
    assert "--batch_size=64" in text and "samples per device per micro-batch" in text


@pytest.mark.parametrize(
    "version, world, workers, warned",
    [
        ((3, 11, 7), 2, 1, True),
        ((3, 10, 14), 8, 4, True),
        ((3, 11, 10), 2, 1, False),
        ((3, 10, 15), 2, 1, False),
        ((3, 12, 1), 2, 1, False),
        ((3, 13, 0), 8, 4, False),
        ((3, 11, 7), 1, 4, False),
        ((3, 11, 7), 2, 0, False),
    ],
)
def test_a_python_that_can_hang_forked_workers_is_named_for_multi_process_runs_with_workers(
    version, world, workers, warned
):
    text = fork_hang_warning(version, world, workers)
    assert bool(text) == warned
    if warned:
        assert text.startswith(f"WARNING: Python {'.'.join(map(str, version))} can hang a DataLoader worker")
        assert "gh-112275" in text and "--num_workers=0" in text


@pytest.mark.parametrize(
    "argv, own",
    [
        (["evaluate", "--help"], "usage: python -m launcher evaluate RECIPE --checkpoint=PATH"),
        (["predict", "-h"], "-- INPUT ...       everything after -- is an input"),
        (
            ["predict", "recipes/regression_tiny", "--help"],
            "--inputs=FILE      a file of inputs, one per line",
        ),
        (["--help"], "python -m launcher COMMAND --help"),
    ],
)
def test_each_command_prints_its_own_help_and_exits_0(argv, own, capsys):
    from launcher.cli import main

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert own in text and ("--checkpoint=PATH  the weights" in text) == (argv[0] != "--help")
    assert ("fields of recipes.regression_tiny.Config" in text) == ("recipes/regression_tiny" in argv)


def test_predict_inputs_are_the_arguments_that_are_not_flags_and_all_after_double_dash():
    from launcher.cli import split_inputs

    argv = ["recipes/r", "--checkpoint=best", "1,2", "-", "--top_k=2", "--", "-0.5,1", "--out=x"]
    assert split_inputs(argv) == (
        ["recipes/r", "--checkpoint=best", "--top_k=2"],
        ["1,2", "-", "-0.5,1", "--out=x"],
    )
    assert split_inputs(["--help"]) == (["--help"], [])


def test_final_weights_best_under_fsdp_is_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"--final_weights=best needs --data_parallel=ddp .*--checkpoint=RUN_DIR/best"
    ):
        apply_overrides(TrainConfig(), {"final_weights": "best", "data_parallel": "fsdp"})
    assert apply_overrides(TrainConfig(), {"final_weights": "best"}).final_weights == "best"
