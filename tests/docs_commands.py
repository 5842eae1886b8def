"""How tests/unit/test_docs_blocks.py checks each shell command of the docs, by its program, in
process and without training: launcher commands as `plan` (same recipe, same flags), others
against the file that defines them (Makefile targets, pyproject.toml extras, a script's main(),
the hf and accelerate CLIs' own parsers). Each check raises BlockFailure with a one-line reason."""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from pathlib import Path

from tests.conftest import ROOT


class BlockFailure(Exception):
    """A docs command or block that does not work, and why (one line)."""


class LLAMA_STAND_IN:  # noqa: N801  (a holder, set once by the sandbox fixture)
    """The tiny Llama (scripts/make_tiny_llama.py) standing in for a downloaded model."""

    path: Path


# The docs' clusters (4 nodes x 8 GPUs) have data for every process; the sandbox's data has 8 shards
# a split, so a command is planned for at most this many processes.
MOST_PROCESSES = 8
# Model-size flags a doc may set for a GPU cluster that a CPU test cannot build in seconds: the
# plan runs with these values instead (the flag names are still checked against the recipe).
CPU_SIZES = {"n_layer": 2, "n_embd": 64}


def launcher(argv: list[str], expect_failure: bool = False) -> tuple[int, str]:
    """`python -m launcher ARGV` in process: (exit code, stdout + stderr). A non-zero exit is a
    BlockFailure with the launcher's last line, unless `expect_failure`."""
    from launcher.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(list(argv)) or 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception as error:  # the recipe's own code raised (the launcher shows its traceback)
            raise BlockFailure(f"raised {type(error).__name__}: {error}") from None
    printed = out.getvalue()
    if code and not expect_failure:
        last = [line for line in printed.splitlines() if line.strip()][-1:] or [f"exit {code}"]
        raise BlockFailure(f"exit {code}: {last[0]}")
    return code, printed


def plan(argv: list[str], sandbox: Path, world_size: int = 0) -> None:
    """A launcher command line (after `-m launcher`): training is planned, not run; `plan`,
    `shards` and any --help run as written; evaluate, predict and report (which need a trained
    run) have their flags checked by the launcher's own parsers."""
    from launcher.cli import COMMANDS as LAUNCHER_COMMANDS

    command = argv[0] if argv and argv[0] in LAUNCHER_COMMANDS else "train"
    args = argv[1:] if command != "train" else list(argv)
    if command == "shards" and args and not Path(args[0]).is_dir() and not args[0].startswith("-"):
        _check_dataset_source(args)
        return
    if command in ("shards", "plan") or any(arg in ("-h", "--help") for arg in args):
        launcher(argv)
        return
    if command in ("evaluate", "predict", "report"):
        _check_flags(command, args)
        return
    args = [_cpu_sized(arg) for arg in args]
    if world_size and not any(arg.startswith("--world_size") for arg in args):
        args.append(f"--world_size={min(world_size, MOST_PROCESSES)}")
    launcher(["plan", *args])
    _leave_outputs(args, sandbox)


def _check_dataset_source(args: list[str]) -> None:
    """`shards DATASET OUT --kwarg=...`: the dataset is not downloaded here; its class is imported
    and the flags that are not shards' own bound to its signature."""
    import importlib

    from launcher.cli import parse_flags
    from launcher.commands.shards import OPTIONS

    module_name, _, name = args[0].rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise BlockFailure(
            f"shard source {args[0]} is neither a directory here nor an importable dataset"
        ) from None
    kwargs = {
        key: value
        for key, value in parse_flags([a for a in args if a.startswith("--")]).items()
        if key not in OPTIONS
    }
    try:
        inspect.signature(factory).bind_partial(**kwargs)
    except TypeError as error:
        raise BlockFailure(f"{args[0]}: {error}") from None


def _cpu_sized(arg: str) -> str:
    name, _, _ = arg.lstrip("-").partition("=")
    return f"--{name}={CPU_SIZES[name]}" if arg.startswith("--") and name in CPU_SIZES else arg


def _leave_outputs(args: list[str], sandbox: Path) -> None:
    """What later blocks read of a run that was only planned, where its output_dir is in the
    sandbox: the files a run starts with (config.json, recipe.py: `RUN_DIR --resume=auto` and
    `--config=RUN_DIR/config.json` plan from them), and for a Hugging Face recipe OUTPUT_DIR/hf
    (the tiny Llama stands in for the fine-tuned model)."""
    from launcher.cli import configure, parse_flags
    from launcher.track.trackers import save_run_files

    named = args[0] if args and not args[0].startswith("-") else ""
    overrides = parse_flags(args[1:] if named else args)
    world_size = overrides.pop("world_size", 1)
    recipe, cfg = configure("train", named, args[0], overrides, "")
    cfg = cfg.resolved()
    if (
        Path(cfg.output_dir).is_absolute() or Path(cfg.output_dir, "config.json").exists()
    ):  # elsewhere, or resumed
        return
    save_run_files(cfg, recipe, world_size)
    if getattr(cfg, "model_dir", ""):
        _link(sandbox / cfg.output_dir / "hf", LLAMA_STAND_IN.path)


def _check_flags(command: str, args: list[str]) -> None:
    """evaluate/predict: the recipe and flags resolved as the launcher does before it reads the
    weights (the run's saved config where the sandbox has the run, else the recipe's Config, else
    TrainConfig for a run elsewhere); report: --out and --x only."""
    from launcher.cli import EXTRA_FLAGS, configure, parse_flags, split_inputs
    from launcher.config import ConfigError, TrainConfig
    from launcher.overrides import apply_overrides

    if command == "predict":
        args, _inputs = split_inputs(args)
    named = args[0] if args and not args[0].startswith("-") else ""
    flags = parse_flags(args[1:] if named else args)
    if command == "report":
        unknown = sorted(set(flags) - {"out", "x"})
        if unknown:
            raise BlockFailure(f"report has no option --{unknown[0]}")
        return
    extra = {name: flags.pop(name) for name in EXTRA_FLAGS[command] if name in flags}
    if named and Path(named).is_dir():  # `evaluate RUN_DIR`
        extra.setdefault("checkpoint", named)
        named = ""
    checkpoint = str(extra.get("checkpoint", ""))
    try:
        if named or Path(checkpoint, "config.json").is_file():
            configure(
                command,
                named,
                args[0] if args else "",
                flags,
                checkpoint if Path(checkpoint).exists() else "",
            )
        else:
            apply_overrides(TrainConfig(), {name: value for name, value in flags.items() if name != "config"})
    except ConfigError as error:
        raise BlockFailure(f"launcher: error: {error}") from None


def python(argv: list[str], sandbox: Path) -> None:
    if argv[1:3] == ["-m", "launcher"]:
        plan(argv[3:], sandbox)
    elif len(argv) > 1 and argv[1].startswith("scripts/"):
        script(argv[1], argv[2:], sandbox)
    else:
        raise BlockFailure("only `python -m launcher ...` and `python scripts/NAME.py ...` can be checked")


def script(path: str, args: list[str], sandbox: Path) -> None:
    """scripts/make_shards.py is `launcher shards`; any other script's flags must bind to the
    main() it hands to fire. A script that makes the tiny Llama leaves the stand-in at --out."""
    import importlib.util

    import fire

    if not (ROOT / path).is_file():
        raise BlockFailure(f"{path} does not exist")
    if path == "scripts/make_shards.py":
        plan(["shards", *args], sandbox)
        return
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured: dict = {}
    try:  # fire splits the arguments as the script's own fire.Fire(main) does
        fire.Fire(
            lambda *positional, **flags: captured.update(positional=positional, flags=flags), command=args
        )
        flags = captured["flags"]
        inspect.signature(module.main).bind(*captured["positional"], **flags)
    except (TypeError, fire.core.FireExit) as error:
        raise BlockFailure(f"{path}: {error}") from None
    if path == "scripts/make_tiny_llama.py":
        _link(sandbox / str(flags.get("out", "data/tiny_llama")), LLAMA_STAND_IN.path)


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.symlink_to(target)


def accelerate(argv: list[str], sandbox: Path) -> None:
    """`accelerate launch [ARGS] -m launcher ...`: accelerate's own parser, then the launcher
    command planned for --num_processes x --num_machines processes."""
    from accelerate.commands.launch import launch_command_parser

    if argv[1:2] != ["launch"]:
        raise BlockFailure("only `accelerate launch` can be checked")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = launch_command_parser().parse_args(argv[2:])
    except SystemExit:
        raise BlockFailure("accelerate launch refuses these arguments") from None
    if not (args.module and args.training_script == "launcher"):
        raise BlockFailure("accelerate launch runs something other than -m launcher")
    plan(args.training_script_args, sandbox, (args.num_processes or 1) * (args.num_machines or 1))


def torchrun(argv: list[str], sandbox: Path) -> None:
    from torch.distributed.run import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv[1:])
    except SystemExit:
        raise BlockFailure("torchrun refuses these arguments") from None
    if not (args.module and args.training_script == "launcher"):
        raise BlockFailure("torchrun runs something other than -m launcher")
    processes = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    nodes = int(str(args.nnodes).split(":")[-1])
    plan(args.training_script_args, sandbox, processes * nodes)


def sbatch(argv: list[str], sandbox: Path) -> None:
    """`sbatch [OPTIONS] SCRIPT RECIPE [FLAGS]`: the script exists; the recipe is planned for
    --nodes x --gpus-per-node processes."""
    options = {}
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        name, _, value = rest.pop(0).lstrip("-").partition("=")
        options[name] = value
    if not rest or not (ROOT / rest[0]).is_file():
        raise BlockFailure(f"no batch script {rest[0] if rest else ''} in the repository")
    world = int(options.get("nodes", 1)) * int(options.get("gpus-per-node", 1))
    plan(rest[1:], sandbox, world)


def make(argv: list[str], sandbox: Path) -> None:
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for target in (arg for arg in argv[1:] if "=" not in arg and not arg.startswith("-")):
        if target not in targets:
            raise BlockFailure(f"the Makefile has no target {target}")


def pip(argv: list[str], sandbox: Path) -> None:
    """`pip install` / `uv pip install`: every [extra] named is one the installed launcher declares
    (pyproject.toml's optional-dependencies, as pip reads them)."""
    from importlib.metadata import metadata

    extras = metadata("launcher").get_all("Provides-Extra") or []
    for arg in argv:
        for named in re.findall(r"\[([^\]]+)\]", arg):
            unknown = [extra for extra in named.split(",") if extra.strip() not in extras]
            if unknown:
                raise BlockFailure(f"launcher has no extra {unknown[0]!r} (it has {', '.join(extras)})")


def uv(argv: list[str], sandbox: Path) -> None:
    if argv[1:2] != ["pip"]:
        raise BlockFailure("only `uv pip ...` can be checked")
    pip(argv[1:], sandbox)


def hf(argv: list[str], sandbox: Path) -> None:
    """`hf download REPO --local-dir DIR`: the hf CLI's own parser; DIR gets the tiny Llama."""
    name, local_dir = argv[1] if len(argv) > 1 else "", hf_download_args(argv[1:]).get("local_dir")
    if name != "download" or not local_dir:
        raise BlockFailure("only `hf download ... --local-dir DIR` can be checked")
    _link(sandbox / local_dir, LLAMA_STAND_IN.path)


def hf_download_args(args: list[str]) -> dict:
    """`hf ARGS` parsed, not run: by click (huggingface_hub >= 1.0), or by argparse before it."""
    try:
        from huggingface_hub.cli.hf import app
    except ImportError:  # huggingface_hub 0.3x: argparse commands
        app = None
    if app is None:
        return argparse_hf_args(args)
    import click

    context = click.Context(app, info_name="hf")
    try:
        name, command, rest = app.resolve_command(context, args)
        return command.make_context(name, rest, parent=context).params
    except click.UsageError as error:
        raise BlockFailure(f"hf: {error.format_message()}") from None


def argparse_hf_args(args: list[str]) -> dict:
    """`hf ARGS` parsed by huggingface_hub 0.3x's argparse commands."""
    import argparse

    from huggingface_hub.cli.download import DownloadCommand

    parser = argparse.ArgumentParser("hf", exit_on_error=False)
    DownloadCommand.register_subcommand(parser.add_subparsers())
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed, unknown = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as error:
        why = said.getvalue().strip().splitlines()[-1:] or [str(error)]
        raise BlockFailure(f"hf refuses these arguments: {why[0]}") from None
    if unknown:
        raise BlockFailure(f"hf refuses these arguments: unrecognized arguments: {' '.join(unknown)}")
    return vars(parsed)


def console_script(argv: list[str], sandbox: Path) -> None:
    """`launcher ...`, the console script pyproject.toml installs: as `python -m launcher ...`."""
    plan(argv[1:], sandbox)


COMMANDS = {
    "python": python,
    "python3": python,
    "launcher": console_script,
    "accelerate": accelerate,
    "torchrun": torchrun,
    "sbatch": sbatch,
    "make": make,
    "pip": pip,
    "uv": uv,
    "hf": hf,
}
