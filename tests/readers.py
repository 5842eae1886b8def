"""What the tests read back from a run: its wandb records (`wandb leet inspect --json`), its
TensorBoard scalars and texts (TensorBoard's EventAccumulator) and its metrics.jsonl as series."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import WANDB


def wandb_records(run_dir: Path) -> list[dict]:
    result = subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def summary(records: list[dict]) -> dict:
    merged: dict = {}
    for r in records:
        if r.get("type") == "summary":
            merged.update(r["summary"]["update"])
    return merged


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard run directory's event files: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_texts(directory: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary in a TensorBoard run directory's event files: (step, text) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def logged_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) per key."""
    series: dict = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], value))
    return series
