"""`evaluate` and `predict`: a trained model, loaded from a run, a checkpoint or a weights file.

    python -m launcher evaluate RECIPE --checkpoint=RUN_DIR [--out=DIR] [--field=value ...]
    python -m launcher predict RECIPE --checkpoint=RUN_DIR IMAGE_OR_DIR ... [--top_k=5] [--out=FILE]

The checkpoint is a run's output_dir (its final model.safetensors), one of its
checkpoints/step-N directories, or a .safetensors/.pth file (model_ema.safetensors for the EMA
weights). It must fit the recipe's model exactly. `evaluate` runs on every process of an
`accelerate launch` (each sample counted once); `predict` on one device (a GPU if present).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image

from launcher.config import ConfigError, TrainConfig
from launcher.data import Shards, SplitLoader
from launcher.evaluation import EvalTotals
from launcher.recipe import Recipe
from launcher.weights import read_state_dict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_model(cfg: TrainConfig, recipe: Recipe, checkpoint: str) -> torch.nn.Module:
    if not checkpoint:
        raise ConfigError("--checkpoint is required: a run's output_dir, a checkpoints/step-N directory or a weights file")
    if hasattr(cfg, "weights"):
        cfg = dataclasses.replace(cfg, weights="")  # the checkpoint replaces any initial weights
    model = recipe.build_model(cfg)
    state = read_state_dict(checkpoint)
    result = model.load_state_dict(state, strict=False)
    problems = [f"missing {', '.join(result.missing_keys[:3])}" if result.missing_keys else "",
                f"unexpected {', '.join(result.unexpected_keys[:3])}" if result.unexpected_keys else ""]
    if any(problems):
        raise ConfigError(f"checkpoint {checkpoint} does not fit {recipe.name}'s model ("
                          + "; ".join(p for p in problems if p) + "); pass the recipe and fields it was trained with")
    return model.eval()


def evaluate(cfg: TrainConfig, recipe: Recipe, checkpoint: str, out: str = "") -> dict:
    """Validation loss, top-1/top-5, per-class accuracy and the confusion matrix: printed, and
    saved as OUT/evaluation.json and OUT/confusion.png (OUT defaults to CHECKPOINT/evaluation)."""
    from accelerate import Accelerator

    from launcher.distributed import has_accelerator

    accelerator = Accelerator(cpu=not has_accelerator(), mixed_precision=cfg.mixed_precision)
    data = recipe.build_data(cfg)
    if data.val is None:
        raise ConfigError(f"recipe {recipe.name} has no validation split to evaluate on")
    split = SplitLoader(data.val, rank=accelerator.process_index, world=accelerator.num_processes, seed=cfg.seed,
                        batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, training=False,
                        batch_transform=data.batch_transform)
    model = load_model(cfg, recipe, checkpoint).to(accelerator.device)
    totals = EvalTotals(accelerator.device, recipe.build_loss(cfg))
    unreadable = 0
    with torch.no_grad():
        for batch in split.loader(0):
            unreadable += sum(e["samples"] for e in batch["errors"])
            if batch["inputs"] is None:
                continue
            inputs = batch["inputs"].to(accelerator.device)
            inputs = split.batch_transform(inputs) if split.batch_transform else inputs
            with accelerator.autocast():
                outputs = model(inputs)
            totals.add(outputs, batch["targets"].to(accelerator.device))
    metrics, confusion = totals.reduce(accelerator)
    metrics["val/unreadable"] = int(accelerator.reduce(torch.tensor(float(unreadable), device=accelerator.device),
                                                       "sum").item())
    classes = list(data.classes or split.classes)
    result = {"checkpoint": checkpoint, "recipe": recipe.name, **metrics}
    if confusion is not None:
        names = classes if len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
        result.update(classes=names, per_class_accuracy=EvalTotals.per_class_accuracy(confusion), confusion=confusion)
    if accelerator.is_main_process:
        out = out or os.path.join(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or ".",
                                  "evaluation")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=1)
        if confusion is not None:
            from launcher.report import confusion_figure

            confusion_figure(confusion, result["classes"]).savefig(os.path.join(out, "confusion.png"), dpi=100,
                                                                   bbox_inches="tight")
        print(format_evaluation(result, out))
    accelerator.wait_for_everyone()
    return result


def format_evaluation(result: dict, out: str) -> str:
    lines = [f"evaluated {result['checkpoint']} on {result['val/samples']} validation samples"
             + (f" ({result['val/unreadable']} unreadable, skipped)" if result["val/unreadable"] else ""),
             f"  loss   {result['val/loss']:.4f}"]
    if "val/top1" in result:
        lines += [f"  top-1  {100 * result['val/top1']:.2f} %", f"  top-5  {100 * result['val/top5']:.2f} %"]
    if "confusion" in result:
        names, matrix = result["classes"], result["confusion"]
        width = max(len(n) for n in names)
        lines.append("  per-class accuracy (and confusion row: true class -> predicted counts)")
        for name, accuracy, row in zip(names, result["per_class_accuracy"], matrix):
            shown = f"{100 * accuracy:6.2f} %" if accuracy is not None else "     - "
            lines.append(f"    {name:<{width}}  {shown}  {' '.join(f'{c:4d}' for c in row)}")
    files = ["evaluation.json"] + (["confusion.png"] if "confusion" in result else [])
    lines.append(f"  saved  {', '.join(os.path.join(out, f) for f in files)}")
    return "\n".join(lines)


# ---- predict ----------------------------------------------------------------------------------


def image_paths(inputs: list[str]) -> list[str]:
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise ConfigError(f"{item} does not exist; pass image files or directories of images")
    if not paths:
        raise ConfigError(f"no images in {', '.join(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def predict(cfg: TrainConfig, recipe: Recipe, checkpoint: str, inputs: list[str], top_k: int = 5,
            out: str = "") -> list[dict]:
    """Top-k classes with probabilities per image, in batches of eval_batch_size; unreadable
    images are reported on stderr and skipped. Prints one line per image; --out writes JSON lines."""
    import sys

    if top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {top_k}")
    paths = image_paths(inputs)
    data = recipe.build_data(cfg)
    transform, batch_transform = _eval_transforms(data, recipe)
    classes = list(data.classes or SplitLoader(data.train, rank=0, world=1, seed=0, batch_size=1, num_workers=0,
                                               training=False).classes)
    device = PartialState(cpu=False).device
    model = load_model(cfg, recipe, checkpoint).to(device)
    results, skipped = [], 0
    for start in range(0, len(paths), cfg.eval_batch_size):
        batch, kept = [], []
        for path in paths[start:start + cfg.eval_batch_size]:
            try:
                with Image.open(path) as image:
                    image.load()
                    batch.append(transform(image))
                kept.append(path)
            except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
                skipped += 1
                print(f"skipped unreadable image {path}: {type(error).__name__}: {error}", file=sys.stderr)
        if not batch:
            continue
        inputs_ = torch.stack(batch).to(device)
        with torch.no_grad():
            logits = model(batch_transform(inputs_) if batch_transform else inputs_).float()
        probabilities = logits.softmax(dim=1)
        top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        for path, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
            names = [classes[i] if i < len(classes) else str(i) for i in indices]
            results.append({"image": path, "top": [{"class": n, "index": i, "probability": round(p, 6)}
                                                   for n, i, p in zip(names, indices, values)]})
            print(f"{path}: " + ", ".join(f"{n} {100 * p:.1f} %" for n, p in zip(names, values)), flush=True)
    if not results:
        raise ConfigError(f"none of the {len(paths)} images could be read")
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(f"predicted {len(results)} images" + (f", skipped {skipped} unreadable" if skipped else "")
          + (f"; written to {out}" if out else ""), file=sys.stderr)
    return results


def _eval_transforms(data, recipe: Recipe):
    """The validation split's per-image transform and per-batch transform."""
    if isinstance(data.val, Shards):
        return data.val.transform, data.val.batch_transform
    transform = getattr(data.val, "transform", None)
    if transform is None:
        raise ConfigError(f"recipe {recipe.name}'s validation data has no per-image transform to apply to images "
                          "(use Shards or a dataset with a .transform, e.g. ImageFolder)")
    return transform, data.batch_transform
