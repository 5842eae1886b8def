"""`python -m launcher [plan] RECIPE [--field=value ...]`: the whole command-line surface.

Flags are parsed by fire; each must name a field of the recipe's Config, as must each key of a
--config file (flags override it). A resume, evaluate and predict take the fields set by neither
from the run's saved config (`configure`). Bad input (unknown
recipe, unknown field, wrong type, impossible batch arithmetic, missing shards) is one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys

import fire

from launcher.config import ConfigError, DataError, RunStopped, TrainConfig, field_ranges, sections, type_name
from launcher.overrides import apply_overrides, field_help, inherit, read_config_file

USAGE = """\
usage: python -m launcher RECIPE [--field=value ...]          train
       python -m launcher [RECIPE] --config=FILE [--field=value ...]   train from a YAML or JSON file
       python -m launcher RUN_DIR --resume=auto [--field=value ...]   continue a run with its own config
       accelerate launch [ACCELERATE ARGS] -m launcher RECIPE [...]   train on several processes
       python -m launcher plan RECIPE [--world_size=N] [...]   print the resolved config and plan
       python -m launcher RECIPE --help                        list the recipe's fields
       python -m launcher shards SOURCE OUT [--max_count=N ...] write WebDataset shards (see --help)
       python -m launcher report RUN_DIR [RUN_DIR ...] [--out=FILE]  one HTML page: curves, config differences
       python -m launcher evaluate [RECIPE] --checkpoint=PATH [--out=DIR] [...]   validation metrics
       python -m launcher predict [RECIPE] --checkpoint=PATH [--top_k=5] [--out=FILE.jsonl]
                                  [INPUT ...] [-- INPUT ...]
       python -m launcher COMMAND --help                       a command's own options

RECIPE is a recipe file (recipes/resnet_finetune or recipes/resnet_finetune.py) or a dotted
module name (recipes.resnet_finetune). Every field of the recipe's Config can be set with
--field=value; RECIPE --help lists them with their types, ranges and meaning. Common to all
recipes, by section:
{sections}

--config=FILE sets fields from a YAML or JSON file (`field: value` lines; `recipe: PATH` names the
recipe); flags override it. A run's OUTPUT_DIR/config.json re-runs that run (its recipe.py with it):
python -m launcher --config=runs/x/config.json --output_dir=runs/x2.

A run's own config: --resume (auto or a path), evaluate and predict take every field not set by a
flag or --config from the config the run saved (output_dir, resume, resume_changes and max_steps
excepted). A run's directory may stand in place of RECIPE (its saved recipe.py is used; for
training it is the output_dir too: python -m launcher runs/x --resume=auto). On
--resume, a flag that changes the result (model, data, batch, schedule, precision: all but where the
run writes and stops, logging, tracking, checkpoints, workers, parallelism and kernel choices;
RESULT_NEUTRAL in launcher/overrides.py) set otherwise than in the checkpoint is refused, naming each
with its old value, unless --resume_changes=allow.

evaluate and predict take a run's output_dir, RUN_DIR/best (its best checkpoint; `best` alone:
--output_dir's), a checkpoints/step-N directory or a weights file as --checkpoint (a run's
directory may stand in place of RECIPE: evaluate RUN_DIR); predict prints a classifier's top-k
classes or a regression's values per input: image files or directories, or any text for a recipe
with predict_sample(cfg, text); --inputs=FILE or - (stdin) give one per line.

Before training (and in plan) one real batch of each split goes through collate, the model, the
loss and the metrics: a recipe that would crash is one line naming the function that raised.

Ctrl-C checkpoints at the end of the step and stops (continue with --resume=auto); a second
Ctrl-C stops at once. Exit codes: 0 done, 2 bad input (one line on stderr); every other code,
and what the launcher does on each failure: docs/checkpoints.md#exit-codes."""


def usage() -> str:
    import textwrap

    listed = "\n".join(
        textwrap.fill(f"{title}: {', '.join(names)}", 96, initial_indent="  ", subsequent_indent="    ")
        for title, names in sections(TrainConfig).items()
    )
    return USAGE.format(sections=listed)


CHECKPOINT_HELP = """\
  --checkpoint=PATH  the weights: a run's output_dir (its final model.safetensors, or its shards
                     and index) or its hf/; RUN_DIR/best, the run's best checkpoint
                     (checkpoints/best.json names it; `best` alone: the best of --output_dir's run)
                     or a best.json; a checkpoints/step-N directory; or a .safetensors/.pth file
                     (model_ema.safetensors: the EMA weights)"""
FIELDS_HELP = """\
  --field=value      any field of the recipe's Config, as in training (--data_dir=..., --output_dir=...,
                     --eval_batch_size=...): `python -m launcher RECIPE --help` lists them
Options are written --name=value."""
COMMAND_HELP = {
    "evaluate": f"""\
usage: python -m launcher evaluate RECIPE --checkpoint=PATH [--out=DIR] [--field=value ...]
       accelerate launch [ACCELERATE ARGS] -m launcher evaluate RECIPE --checkpoint=PATH [...]

The task's validation metrics of a trained model (classifiers: also per-class accuracy and the
confusion matrix), printed with the step whose weights they are, and saved as OUT/evaluation.json
(and OUT/confusion.png). Under accelerate launch each process evaluates its share, each sample once.

options:
{CHECKPOINT_HELP}
  --out=DIR          where evaluation.json goes (default: CHECKPOINT/evaluation)
{FIELDS_HELP}""",
    "predict": f"""\
usage: python -m launcher predict RECIPE --checkpoint=PATH [--top_k=5] [--out=FILE.jsonl] [--inputs=FILE]
                                  [INPUT ...] [-] [-- INPUT ...]

A classifier's top-k classes with probabilities, or a regression's values, one line per input on
stdout (or JSON lines in --out), on one device (a GPU if there is one). Unreadable inputs are
reported on stderr and skipped.

inputs (in this order: INPUTs, then --inputs=FILE's lines):
  INPUT              an image file or a directory of images; for a recipe with predict_sample(cfg, text),
                     any text that function reads (a file that exists: its lines, one input each)
  -- INPUT ...       everything after -- is an input, text starting with - too (-0.04,0.05,...)
  -                  standard input, one input per line
  --inputs=FILE      a file of inputs, one per line (blank lines skipped)

options:
{CHECKPOINT_HELP}
  --top_k=N          classes shown per input, most probable first (classifiers; default 5)
  --out=FILE         write one JSON object per input instead of printing: {{"input": ..., "prediction":
                     value}} (regression) or {{"input": ..., "top": [{{"class", "index", "probability"}}]}}
{FIELDS_HELP}""",
}
COMMANDS = ("train", "plan", "shards", "report", "evaluate", "predict")
EXTRA_FLAGS = {
    "plan": ("world_size",),
    "evaluate": ("checkpoint", "out"),
    "predict": ("checkpoint", "out", "top_k", "inputs"),
}
HELP = ("-h", "--help")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(argv)
    except ConfigError as error:
        # a recipe function's own traceback (launcher/train/preflight.py)
        frames = getattr(error, "frames", "")
        if frames:
            print(
                "Traceback of the recipe's code (most recent call last):\n" + frames.rstrip(), file=sys.stderr
            )
        say(f"launcher: error: {one_line(error)}")
        _leave_process_group()
        sys.exit(2)
    except OSError as error:  # a write anywhere else that found the disk full: 74 too, naming the file
        from launcher.durable import disk_full_writing

        full = (
            disk_full_writing(error, str(error.filename or "."))
            if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else None
        )
        if full is None:
            raise
        say(f"launcher: stopped: {full}")
        os._exit(full.exit_code)  # another rank may wait in a collective for this one
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (before its first step, after its last): nothing to save
        say("launcher: interrupted")
        sys.stdout.flush()
        os._exit(130)  # another rank may wait in a collective for this one
    except RunStopped as error:
        # non-finite loss (1), bad data (65), full disk (74), preempted (75), Ctrl-C (130), lost peer (76)
        if str(error):
            kind = getattr(error, "heading", "data error" if isinstance(error, DataError) else "stopped")
            say(f"launcher: {kind + ': ' if kind else ''}{one_line(error)}")
        # the peers are gone: tearing the group down would wait on them
        if getattr(error, "hard_exit", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(error.exit_code)
        _leave_process_group()
        sys.exit(error.exit_code)


def say(line: str) -> None:
    """`line` to stderr in one write: the ranks of a launch share one log, and print's separate
    writes of the text and its newline (unbuffered, as under PYTHONUNBUFFERED) let two ranks'
    lines run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(error: Exception) -> str:
    """The message itself, also when a DataLoader worker raised it (torch wraps it in a traceback)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_command(argv: list[str]) -> int:
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "shards":
        from launcher.commands.shards import shards_command

        return shards_command(argv)
    if command == "report":
        return report(argv)
    args, inputs = split_inputs(argv) if command == "predict" else (argv, [])
    if not args or args[0] in (*HELP, "help"):
        print(COMMAND_HELP.get(command) or usage())
        return 0
    named = "" if args[0].startswith("-") else args[0]
    flags = args[1:] if named else args
    overrides = parse_flags([a for a in flags if a not in HELP])
    extra = {name: overrides.pop(name) for name in EXTRA_FLAGS.get(command, ()) if name in overrides}
    for name, value in extra.items():
        if value is True:  # `--checkpoint PATH`: PATH was taken for an input
            raise ConfigError(f"--{name} needs a value: write --{name}=VALUE")
    if command in ("evaluate", "predict") and named and os.path.isdir(named):  # `evaluate RUN_DIR`
        extra.setdefault("checkpoint", named)
        named = ""
    if extra.get("checkpoint"):  # before configure reads the run's config from it
        extra["checkpoint"] = _best_resolved(str(extra["checkpoint"]), named, overrides)
    recipe, cfg = configure(command, named, args[0], overrides, str(extra.get("checkpoint", "")))
    if any(arg in HELP for arg in flags):
        print("\n\n".join(filter(None, (COMMAND_HELP.get(command), recipe_help(recipe)))))
        return 0
    cfg = cfg.resolved()
    if command == "plan":
        from launcher.train.build import print_plan

        print_plan(cfg, recipe, _world_size(extra.get("world_size")))
    elif command == "evaluate":
        from launcher.commands.inference import evaluate

        evaluate(cfg, recipe, str(extra.get("checkpoint", "")), str(extra.get("out", "")))
    elif command == "predict":
        _predict(cfg, recipe, extra, inputs)
    else:
        from launcher.train.trainer import train

        train(cfg, recipe)
    return 0


def split_inputs(argv: list[str]) -> tuple[list[str], list[str]]:
    """predict's arguments: (RECIPE and flags, inputs). Every argument after `--` is an input, and
    before it each one that is `-` (stdin) or does not start with `-`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    before, after = argv[:cut], argv[cut + 1 :]
    inputs = [a for a in before[1:] if a == "-" or not a.startswith("-")]
    return before[:1] + [a for a in before[1:] if a != "-" and a.startswith("-")], inputs + after


def _best_resolved(checkpoint: str, named: str, overrides: dict) -> str:
    """--checkpoint, with `best`, RUN_DIR/best and best.json resolved to the best checkpoint's
    directory; `best` alone is the best of --output_dir (or of the recipe's default output_dir)."""
    from launcher.runtime.checkpoints import resolve_best

    output_dir = str(overrides.get("output_dir", ""))
    if checkpoint == "best" and not output_dir and named:
        from launcher.recipe import load_recipe

        output_dir = load_recipe(named).default_config().output_dir
    return resolve_best(checkpoint, output_dir)


def _predict(cfg: TrainConfig, recipe, extra: dict, inputs: list[str]) -> None:
    from launcher.commands.inference import predict

    inputs_file = str(extra.get("inputs", ""))
    if not inputs and not inputs_file:
        raise ConfigError(
            "predict needs inputs: python -m launcher predict RECIPE --checkpoint=PATH INPUT ... "
            "(or -- INPUT ..., --inputs=FILE, - for stdin); see predict --help"
        )
    top_k = extra.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise ConfigError(f"--top_k expects int, got {top_k!r}")
    predict(
        cfg, recipe, str(extra.get("checkpoint", "")), inputs, top_k, str(extra.get("out", "")), inputs_file
    )


def configure(command: str, named: str, first: str, overrides: dict, checkpoint: str) -> tuple:
    """(recipe, config): the recipe's defaults, then a --config file, then the flags. A --resume, or
    the run that evaluate/predict read, gives every field set in neither (launcher/overrides.py's
    `inherit`). The recipe: RECIPE, else the one the --config file or the run names (a run
    directory in place of RECIPE is also the output_dir)."""
    from launcher.recipe import load_recipe, recipe_named_in
    from launcher.runtime import run_config

    source = str(overrides.pop("config", "") or "")
    from_file = read_config_file(source) if source else {}
    run = run_config.run_dir_of(checkpoint) if checkpoint and command in ("evaluate", "predict") else None
    # `launcher RUN_DIR --resume=auto`
    if named and os.path.isfile(os.path.join(named, run_config.RUN_CONFIG)):
        run, named = named, ""
        overrides.setdefault("output_dir", run)
    if named:
        recipe = load_recipe(named)
    elif source and ("recipe" in from_file or not run):
        recipe = recipe_named_in(source, from_file.get("recipe"))
    elif run:
        recipe = recipe_named_in(
            os.path.join(run, run_config.RUN_CONFIG), run_config.saved_config(run)[0].get("recipe")
        )
    else:
        raise ConfigError(
            f"expected a RECIPE before {first}, or --config=FILE naming one; "
            "usage: python -m launcher [plan] RECIPE [--field=value ...]"
        )
    from_file = {key: value for key, value in from_file.items() if key != "recipe"}
    cfg = (
        apply_overrides(recipe.default_config(), from_file, source) if from_file else recipe.default_config()
    )
    cfg = apply_overrides(cfg, overrides)
    given = {key.replace("-", "_") for key in [*from_file, *overrides]}
    if command in ("train", "plan") and cfg.resume:
        cfg = run_config.resume_config(cfg, given, _note)
    elif checkpoint and command in ("evaluate", "predict"):
        saved, origin = run_config.saved_config(checkpoint)
        if saved:
            cfg, note = inherit(cfg, saved, given, origin)
            _note(note, file=sys.stderr)  # stdout holds the results
    return recipe, cfg


def _note(text: str, file=None) -> None:
    """A note from the main process only (every rank of a launch configures), with the run's log."""
    if text and os.environ.get("RANK", "0") == "0":
        print(text, file=file or sys.stdout, flush=True)


def report(argv: list[str]) -> int:
    from launcher.track.report import make_report

    if any(arg in ("-h", "--help") for arg in argv):
        print(
            "usage: python -m launcher report RUN_DIR [RUN_DIR ...] [--out=FILE] [--x=step|samples|epoch]\n"
            "One self-contained HTML file from the runs' own files (no network, no server): loss, accuracy,\n"
            "LR per group, throughput, confusion matrices, and the config fields that differ (with the\n"
            "processes, the global batch, the launcher's version and commit).\n"
            "--out defaults to RUN_DIR/report.html for one run, ./report.html for several.\n"
            "--x: the curves' x-axis, optimizer steps (default), samples seen, or epochs."
        )
        return 0
    flags = parse_flags([a for a in argv if a.startswith("--")])
    unknown = sorted(set(flags) - {"out", "x"})
    if unknown:
        raise ConfigError(
            f"report has no option --{unknown[0]}; usage: python -m launcher report RUN_DIR ... "
            "[--out=FILE] [--x=step|samples|epoch]"
        )
    path = make_report(
        [a for a in argv if not a.startswith("--")], str(flags.get("out", "")), str(flags.get("x", "step"))
    )
    print(f"report: {path}")
    return 0


def parse_flags(args: list[str]) -> dict:
    """--field=value / --field value / --flag pairs, values parsed by fire (numbers, bools, lists)."""
    captured: dict = {}

    def capture(*positional, **flags):
        captured.update(positional=positional, flags=flags)

    fire.Fire(capture, command=list(args), name="launcher")
    if captured["positional"]:
        raise ConfigError(
            f"unexpected argument {captured['positional'][0]!r}; fields are set as --field=value"
        )
    return captured["flags"]


def _world_size(value) -> int:
    if value is None:
        value = os.environ.get("WORLD_SIZE", 1)
    try:
        size = int(value)
        assert size >= 1
    except (ValueError, AssertionError):
        raise ConfigError(f"--world_size must be an integer >= 1, got {value!r}") from None
    return size


def recipe_help(recipe) -> str:
    """Every field of the recipe's Config by section, with its default, meaning, type and range."""
    import typing

    cfg = recipe.default_config()
    hints, helps, ranges = typing.get_type_hints(type(cfg)), field_help(type(cfg)), field_ranges(type(cfg))
    grouped = sections(type(cfg))
    flags = {name: f"--{name}={getattr(cfg, name)!r}" for names in grouped.values() for name in names}
    width = max(map(len, flags.values()))
    lines = [
        f"usage: python -m launcher [plan] {recipe.name} [--config=FILE] [--field=value ...]",
        f"fields of {recipe.module.__name__}.Config by section (defaults shown):",
    ]
    for title, names in grouped.items():
        lines.append(f"{title}:")
        for name in names:
            accepted = f", {ranges[name]}" if name in ranges else ""
            lines.append(
                f"  {flags[name]:<{width}}  {helps.get(name, '')} [{type_name(hints[name])}{accepted}]"
            )
    return "\n".join(lines)
