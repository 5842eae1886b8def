"""Every fenced block of README.md and docs/**/*.md is checked, so that a docs block that stops
working fails here. The pages' blocks run in document order, in one sandbox directory (the cwd)
that holds what the docs' relative paths name: recipes/, scripts/, the demo digits as
data/digits, text shards as data/text, a small image folder as data/flowers; what a block makes
(a planned run's config.json, a downloaded model) stays there for the blocks after it. Nothing
trains.

By the fence's info string:
- ```python: a recipe (its top level defines or imports Config, build_model and build_data) is
  written to a file and planned (`python -m launcher plan FILE`, in process). Any other block is a
  snippet, exec'd with SNIPPET_PRELUDE's names; a build_model(cfg) or compute_loss(model, batch) it
  defines is then called on real objects (SNIPPET_CALLS). Classes it defines are only defined.
- ```sh / ```bash / ```shell: each command (shlex: `\\` continuations and comments handled)
  goes through tests/docs_commands.py's COMMANDS, keyed by its program; one the test does not
  know fails, asking for a checkable command or ```text.
- ```yaml, and ```json naming a recipe: a --config file, planned (check_config).
- ```text, ```console, unlabelled blocks and other JSON are output, not run; where one is a
  transcript (a `$ COMMAND` line, then its output), the launcher command is run and every shown
  output line must appear in what it prints.
- any other language fails, naming the ones the test knows.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.docs_commands import COMMANDS, LLAMA_STAND_IN, BlockFailure, launcher

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
SHELLS = ("sh", "bash", "shell")
OUTPUT = ("", "text", "txt", "output", "console", "jsonl")  # console: `$ ` transcripts
# What a snippet may use without importing it: torch's usual names and launcher's public API.
SNIPPET_PRELUDE = (
    "import torch\nfrom torch import nn\nimport torch.nn.functional as F\nfrom launcher import *\n"
)


@dataclass(frozen=True)
class Block:
    page: str  # the page's path from the repository root
    line: int  # 1-based line of the opening fence
    info: str  # the fence's language, lower case
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.page}:{self.line + 1 + offset} (```{self.info} block at line {self.line})"


def fenced_blocks(page: Path, name: str = "") -> list[Block]:
    """The page's fenced code blocks as markdown-it (CommonMark, as GitHub renders) finds them."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(page.read_text())
    return [
        Block(
            name or str(page.relative_to(ROOT)),
            token.map[0] + 1,
            token.info.strip().split(" ")[0].lower(),
            token.content,
        )
        for token in tokens
        if token.type == "fence"
    ]


def logical_lines(text: str) -> list[tuple[int, list[str]]]:
    """(offset of its first line in the block, argv) per command: `\\`-continued lines joined,
    `# comments` and blank lines dropped, `a && b`, `a; b` and `a | b` taken as two commands, and
    leading VAR=value assignments dropped."""
    commands, pending, start = [], "", 0
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, pending = True, ""
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token not in (";", "&&", "||", "|"):
                argv.append(token)
                continue
            while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
                argv.pop(0)
            if argv:
                commands.append((start, argv))
            argv = []
    return commands


def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def check_python(block: Block, sandbox: Path) -> None:
    try:
        tree = ast.parse(block.text)
    except SyntaxError as error:
        raise BlockFailure(f"line {error.lineno}: {error.msg}") from None
    if {"Config", "build_model", "build_data"} <= top_level_names(tree):
        recipe = sandbox / "doc_recipes" / f"{Path(block.page).stem}_{block.line}.py"
        recipe.parent.mkdir(exist_ok=True)
        recipe.write_text(block.text)
        launcher(["plan", str(recipe)])
        return
    namespace: dict = {"__name__": "docs_snippet"}
    exec(SNIPPET_PRELUDE, namespace)
    try:
        exec(compile(tree, block.where(), "exec"), namespace)
        for name, call in SNIPPET_CALLS.items():
            if callable(namespace.get(name)) and inspect.isfunction(namespace[name]):
                call(namespace[name])
    except BlockFailure:
        raise
    except Exception as error:
        raise BlockFailure(f"{type(error).__name__}: {error}") from None


def check_config(block: Block, sandbox: Path) -> None:
    """A YAML block, or a JSON one naming a recipe, is a --config file: planned where it names its
    recipe (`recipe: PATH`), else its fields checked against TrainConfig. Other JSON is output."""
    from launcher.config import ConfigError, TrainConfig
    from launcher.overrides import apply_overrides, read_config_file

    suffix = ".json" if block.info == "json" else ".yaml"
    path = sandbox / "doc_configs" / f"{Path(block.page).stem}_{block.line}{suffix}"
    path.parent.mkdir(exist_ok=True)
    path.write_text(block.text)
    try:
        values = read_config_file(str(path))
        if "recipe" in values:
            launcher(["plan", f"--config={path}"])
        elif block.info != "json":
            apply_overrides(TrainConfig(), values, source=str(path))
    except ConfigError as error:
        raise BlockFailure(f"launcher: error: {error}") from None


def call_build_model(build_model) -> None:
    """A snippet's build_model, given the tiny Llama recipe's config with its weights as --weights."""
    import torch

    from launcher.recipe import load_recipe

    cfg = load_recipe("recipes/llm_finetune_tiny").default_config()
    cfg.model_dir = cfg.weights = str(LLAMA_STAND_IN.path)
    model = build_model(cfg)
    if not isinstance(model, torch.nn.Module):
        raise BlockFailure(f"build_model returned {type(model).__name__}, not an nn.Module")


def call_compute_loss(compute_loss) -> None:
    """A snippet's compute_loss on a token model (ids -> logits over 16 classes) and a batch of
    input_ids and labels (the first position -100, as a prompt's)."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 5))
    labels = ids.clone()
    labels[:, 0] = -100
    result = compute_loss(torch.nn.Embedding(16, 16), {"input_ids": ids, "labels": labels})
    loss = getattr(result, "loss", result[0] if isinstance(result, tuple) else result)
    if not torch.isfinite(loss).all():
        raise BlockFailure(f"compute_loss returned a non-finite loss {loss}")


SNIPPET_CALLS = {"build_model": call_build_model, "compute_loss": call_compute_loss}


def check_shell(block: Block, sandbox: Path) -> list[str]:
    failures = []
    for offset, argv in logical_lines(block.text):
        check = COMMANDS.get(argv[0])
        try:
            if check is None:
                raise BlockFailure(
                    f"the test cannot check `{argv[0]}` commands; make it one it knows "
                    f"({', '.join(COMMANDS)}) or mark the block ```text"
                )
            check(argv, sandbox)
        except BlockFailure as failure:
            failures.append(f"{block.where(offset)}: {shlex.join(argv)}: {failure}")
    return failures


def check_transcript(block: Block) -> list[str]:
    """A `$ python -m launcher ...` line, then output lines that must appear in what it prints. A
    training command is planned, not run: its errors are the same, a run's own output is not
    (show that in a block without the `$ ` line)."""
    from launcher.cli import COMMANDS as LAUNCHER_COMMANDS

    lines = block.text.splitlines()
    if not lines or not lines[0].startswith("$ "):
        return []
    argv = shlex.split(lines[0][2:])
    if argv[:3] != ["python", "-m", "launcher"]:
        return [f"{block.where()}: transcript of `{argv[0]}`: only launcher transcripts can be checked"]
    args = argv[3:]
    if not (args and args[0] in LAUNCHER_COMMANDS) and not {"-h", "--help"} & set(args):
        args = ["plan", *args]
    _, printed = launcher(args, expect_failure=True)
    missing = [line for line in lines[1:] if line.strip() and line.strip() not in printed]
    return [
        f"{block.where(lines.index(line))}: not in the output of `{lines[0][2:]}`: {line.strip()}"
        for line in missing
    ]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, digits) -> Path:
    """A directory laid out as the docs expect a checkout to be after `make demo`. The text shards
    and the tiny Llama are written in process (a script's own process would import torch again:
    seconds)."""
    from scripts.make_text_shards import main as make_text_shards
    from scripts.make_tiny_llama import main as make_tiny_llama

    root = tmp_path_factory.mktemp("docs_sandbox")
    for name in ("recipes", "scripts", "tests", "Makefile", "pyproject.toml"):
        (root / name).symlink_to(ROOT / name)
    (root / "data").mkdir()
    (root / "data" / "digits").symlink_to(digits)
    for label in ("0", "1"):  # data/flowers: an ImageFolder of 4 images a class
        (root / "data" / "flowers" / label).mkdir(parents=True)
        for image in sorted((digits / "folder" / "train" / label).iterdir())[:4]:
            (root / "data" / "flowers" / label / image.name).write_bytes(image.read_bytes())
    LLAMA_STAND_IN.path = tmp_path_factory.mktemp("tiny_llama")
    with contextlib.redirect_stdout(io.StringIO()):
        make_text_shards(out=str(root / "data" / "text"))
        make_tiny_llama(out=str(LLAMA_STAND_IN.path))
    return root


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_blocks_run(page: Path, sandbox: Path, monkeypatch) -> None:
    """Every block of the page, in order: one line per failing block or command."""
    monkeypatch.chdir(sandbox)
    failures = []
    for block in fenced_blocks(page):
        if block.info in SHELLS:
            failures += check_shell(block, sandbox)
        elif block.info in OUTPUT:
            failures += check_transcript(block)
        elif block.info in ("python", "py", "yaml", "yml", "json"):
            try:
                (check_python if block.info in ("python", "py") else check_config)(block, sandbox)
            except BlockFailure as failure:
                failures.append(f"{block.where()}: {failure}")
        else:
            failures.append(
                f"{block.where()}: the test does not know ```{block.info} blocks; use python, sh, "
                "yaml (a --config file) or text"
            )
    assert not failures, "\n".join(failures)


def test_later_blocks_read_what_a_planned_run_leaves(sandbox: Path, monkeypatch, tmp_path) -> None:
    """A planned run leaves its config.json and recipe.py: a resume of its directory, a --config
    of its config.json and an evaluate of it are planned or resolved from them."""
    monkeypatch.chdir(sandbox)
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\npython -m launcher tests/recipes/mlp_digits --output_dir=runs/tiny --lr=0.5\n"
        "python -m launcher runs/tiny --resume=auto\n"
        "python -m launcher --config=runs/tiny/config.json --output_dir=runs/tiny2\n"
        "python -m launcher evaluate runs/tiny --eval_batch_size=4\n"
        "python -m launcher evaluate runs/tiny --eval_bach_size=4\n```\n"
    )
    failures = check_shell(fenced_blocks(page, "page.md")[0], sandbox)
    assert len(failures) == 1 and "unknown field --eval_bach_size" in failures[0]
    assert '"lr": 0.5' in (sandbox / "runs" / "tiny2" / "config.json").read_text()  # taken from runs/tiny's


def test_unknown_flags_and_commands_fail(sandbox: Path, monkeypatch, tmp_path) -> None:
    """The checks refuse what a reader could not run: a misspelt field (also under accelerate
    launch), a missing recipe, an unknown Makefile target, an extra launcher does not declare, a
    misspelt hf option, a command the test does not know, a recipe whose build_data raises, a
    transcript whose output is not what the launcher prints, a misspelt field in a --config file."""
    monkeypatch.chdir(sandbox)
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\npython -m launcher plan recipes/resnet_finetune_tiny --bach_size=4\n"
        "accelerate launch --num_processes 2 -m launcher recipes/resnet_finetune_tiny \\\n"
        "    --lr=fast\npython -m launcher recipes/no_such_recipe\nmake no-such-target\n"
        "pip install 'launcher[nosuchextra]'\nhf download x --lokal-dir=y\ncurl https://example.com\n```\n"
        "```python\nfrom recipes.resnet_finetune_tiny import Config, build_model\n"
        "def build_data(cfg):\n    return cfg.no_such_field\n```\n"
        "```\n$ python -m launcher recipes/resnet_finetune_tiny --lr=fast\n"
        "launcher: error: no such thing\n```\n"
        "```yaml\nrecipe: recipes/resnet_finetune_tiny\nbach_size: 4\n```\n"
    )
    shell, recipe, transcript, config = fenced_blocks(page, "page.md")
    failures = check_shell(shell, sandbox)
    assert [f.split(": ", 1)[0] for f in failures] == [
        f"page.md:{n} (```sh block at line 1)" for n in (2, 3, 5, 6, 7, 8, 9)
    ]
    assert "did you mean --batch_size" in failures[0] and "--lr expects float" in failures[1]
    assert "no-such-target" in failures[3] and "nosuchextra" in failures[4] and "--lokal-dir" in failures[5]
    assert "```text" in failures[6]
    with pytest.raises(BlockFailure, match="no_such_field"):
        check_python(recipe, sandbox)
    assert check_transcript(transcript) == [
        f"page.md:{transcript.line + 2} (``` block at line {transcript.line}): "
        "not in the output of `python -m launcher recipes/resnet_finetune_tiny "
        "--lr=fast`: launcher: error: no such thing"
    ]
    with pytest.raises(BlockFailure, match="unknown field bach_size .*did you mean batch_size"):
        check_config(config, sandbox)
