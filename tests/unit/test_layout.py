"""The package's layout: the tree in docs/development.md names every module, and imports point one way."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "launcher"
# Each part may import only from parts of a lower layer (and from itself).
# presets sits on data: its transforms decode shard JPEGs at their crop's scale (data/scaled_decode.py).
LAYERS = [
    {"config", "global_batch"},
    {"overrides"},
    {"durable"},
    {"data", "optim", "track"},
    {"presets"},
    {"recipe", "runtime"},
    {"train"},
    {"commands"},
    {"cli", "__init__"},
    {"__main__"},
]


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def layer(part: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part in parts)


def test_the_documented_tree_names_every_module_and_no_other():
    development = (ROOT / "docs" / "development.md").read_text()
    tree = development.split("\n## Layout\n", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    modules = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")}
    for module in modules:
        if module.name != "__init__.py" or len(module.parts) == 1:
            assert re.search(rf"\b{module.stem}\b", tree), f"docs/development.md does not name {module}"
    for package in {m.parts[0] for m in modules if len(m.parts) > 1}:
        assert f"  {package}/ " in tree, f"docs/development.md does not name launcher/{package}/"
    for named in re.findall(r"\b(\w+)\.py\b", tree):
        assert any(m.stem == named for m in modules), (
            f"docs/development.md names {named}.py, which does not exist"
        )


def test_imports_between_parts_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        here = part_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("launcher"):
                continue
            targets = (
                [node.module.split(".")[1]]
                if node.module != "launcher"
                else [alias.name for alias in node.names]
            )
            wrong += [
                f"{path.relative_to(ROOT)} imports launcher.{t}"
                for t in targets
                if t in {p for parts in LAYERS for p in parts} and t != here and layer(t) >= layer(here)
            ]
    assert not wrong, wrong


def test_training_imports_neither_the_report_nor_the_slurm_tooling():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, launcher.train.trainer; print(' '.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "launcher.track.report" not in loaded and "matplotlib" not in loaded
    assert not [m for m in loaded if "slurm" in m]
