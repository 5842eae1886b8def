"""The README's first recipe ("Writing a recipe") runs as written: the code block is cut out of
README.md, saved as a file and trained for two steps on the demo's digits shards."""

from __future__ import annotations

import math

from tests.conftest import ROOT, launcher, metrics

MARKER = "<!-- first recipe:"


def first_recipe() -> str:
    """The ```python block after the marker, which must be the first one under "## Writing a recipe"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.index("## Writing a recipe")
    marker = readme.index(MARKER)
    start = readme.index("```python\n", section)
    assert section < marker < start and readme.index("```python\n", marker) == start, (
        "the first-recipe marker must stand just before the first python block under 'Writing a recipe'"
    )
    start += len("```python\n")
    return readme[start : readme.index("```\n", start)]


def test_the_readmes_first_recipe_trains_as_written(digits, tmp_path):
    recipe = tmp_path / "first_recipe.py"
    recipe.write_text(first_recipe())
    run = tmp_path / "run"
    launcher(
        recipe,
        f"--data_dir={digits}",
        f"--output_dir={run}",
        "--image_size=16",
        "--batch_size=8",
        "--eval_batch_size=128",
        "--max_steps=2",
        "--num_workers=0",
        "--wandb_mode=disabled",
        "--log_every=1",
    )
    records = metrics(run)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2] and all(map(math.isfinite, losses))
    assert any(r["step"] == 2 and "val/top1" in r for r in records)
    assert (run / "model.safetensors").is_file() and (run / "checkpoints" / "step-00000002").is_dir()
    # its schedule
    assert {key for r in records for key in r if key.startswith("lr/")} == {"lr/head", "lr/rest"}
