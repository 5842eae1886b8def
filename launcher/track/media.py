"""What a callback's `log(dict)` may hold besides numbers, and how each tracker receives it.

- a number: a scalar, to metrics.jsonl and every tracker, as the run's own metrics;
- a `str`: text (wandb: a string in the run's history; TensorBoard: a text summary);
- `Table(columns, rows)`: a table of text and numbers (wandb: a `wandb.Table`; TensorBoard: a
  Markdown table as text; metrics.jsonl: {"columns": [...], "rows": [[...], ...]});
- `Images(images, captions)`: HWC uint8 arrays or CHW tensors (float in [0, 1] or uint8), each
  written as OUTPUT_DIR/media/<key>/step-<step>-<i>.png (metrics.jsonl names those files; wandb:
  `wandb.Image`s with their captions; TensorBoard: an image each).

Only the main process writes (callbacks run there unless they ask for every rank; the other
ranks' `log` writes nothing).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[Any]]  # each as long as `columns`: str, int, float or bool

    def markdown(self) -> str:
        cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(map(cell, self.columns)) + " |", "|" + " --- |" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows])


@dataclass(frozen=True)
class Images:
    images: list  # HWC uint8 numpy arrays, or CHW/HWC tensors (uint8, or float in [0, 1])
    captions: list[str] = field(default_factory=list)  # one per image, or none

    def arrays(self) -> list[np.ndarray]:
        """Each image as an HWC uint8 array (1 or 3 channels)."""
        return [as_hwc_uint8(image) for image in self.images]


def as_hwc_uint8(image) -> np.ndarray:
    array = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image must be HW, HWC or CHW, got shape {tuple(array.shape)}")
    if array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.permute(1, 2, 0)  # CHW -> HWC
    if array.dtype != torch.uint8:
        array = (array.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.contiguous().numpy()


def split_values(values: dict) -> tuple[dict, dict]:
    """(numbers and text, the rest): what Accelerate's tracker API takes, and what goes per tracker."""
    plain = {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return plain, {k: v for k, v in values.items() if k not in plain}


def normalized(values: dict) -> dict:
    """`values` with numbers as Python numbers (numpy and one-element tensors too); TypeError for
    anything a tracker cannot show."""
    result = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"log() keys are names (str), got {key!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
            value = float(value)  # numpy's scalars
        if not isinstance(value, (int, float, str, Table, Images)) or isinstance(value, bool):
            raise TypeError(
                f"log() takes numbers, str, launcher.Table or launcher.Images; {key!r} is a "
                f"{type(value).__name__}"
            )
        result[key] = value
    return result


def to_json(output_dir: str, key: str, value, step: int):
    """The metrics.jsonl form of a Table or Images (the images written as PNG files)."""
    if isinstance(value, Table):
        return {"columns": list(value.columns), "rows": [list(row) for row in value.rows]}
    from PIL import Image

    folder = os.path.join(output_dir, "media", key.replace("/", "_"))
    os.makedirs(folder, exist_ok=True)
    files = []
    for index, array in enumerate(value.arrays()):
        path = os.path.join(folder, f"step-{step:08d}-{index}.png")
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
        files.append(os.path.relpath(path, output_dir))
    return {"images": files, "captions": list(value.captions)}


def to_wandb(values: dict) -> dict:
    import wandb

    logged = {}
    for key, value in values.items():
        if isinstance(value, Table):
            logged[key] = wandb.Table(columns=list(value.columns), data=[list(row) for row in value.rows])
        else:
            captions = list(value.captions) or [None] * len(value.images)
            logged[key] = [
                wandb.Image(array, caption=caption) for array, caption in zip(value.arrays(), captions)
            ]
    return logged


def to_tensorboard(writer, values: dict, step: int) -> None:
    for key, value in values.items():
        if isinstance(value, Table):
            writer.add_text(key, value.markdown(), global_step=step)
        else:
            for index, array in enumerate(value.arrays()):
                writer.add_image(f"{key}/{index}", array, global_step=step, dataformats="HWC")
