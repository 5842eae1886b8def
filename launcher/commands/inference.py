"""`evaluate` and `predict`: a trained model, loaded from a run, a checkpoint or a weights file.

    python -m launcher evaluate RECIPE --checkpoint=RUN_DIR [--out=DIR] [--field=value ...]
    python -m launcher predict RECIPE --checkpoint=RUN_DIR INPUT ... [--top_k=5] [--out=FILE]

The checkpoint is a run's output_dir (its final model.safetensors), one of its
checkpoints/step-N directories (RUN_DIR/best: the one checkpoints/best.json names, resolved by the
CLI), or a .safetensors/.pth file (model_ema.safetensors for the EMA weights). The model and data
are built from the config the run saved (the CLI takes every field not given on the command line
from it); the weights must fit the model exactly, except that a PEFT run's checkpoint holds its
adapters alone, which go onto the base the recipe builds (with the run's --weights). `evaluate`
runs on every process of an `accelerate launch` (each sample counted once) and reports the task's
metrics and which step's weights it evaluated; `predict` runs on one device (a GPU if present).
Its inputs are images or image directories, or, for a recipe with
`predict_sample(cfg, text)`, any text that function turns into a sample (a line of code, a row of
features), a file that exists giving one input per line; `-` and --inputs=FILE are read one input
per line. It prints the top-k classes of a classifier, or the predicted values of a regression, or
writes them as JSON lines to --out.
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
from launcher.data.batch import collate
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.tar_reader import printable
from launcher.recipe import Recipe
from launcher.runtime import run_config
from launcher.runtime.weights import load_exactly, tensor_names
from launcher.train import adapters
from launcher.train.evaluation import evaluate_split
from launcher.train.metrics import TaskMetrics, is_accuracy, per_class_accuracy
from launcher.train.preflight import blame, preflight

LABELS = {"top1": "top-1", "top5": "top-5", "token_accuracy": "token accuracy"}  # evaluate's printed names
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_model(cfg: TrainConfig, recipe: Recipe, checkpoint: str) -> torch.nn.Module:
    if not checkpoint:
        raise ConfigError(
            "--checkpoint is required: a run's output_dir, a checkpoints/step-N directory or a weights file"
        )
    given = cfg
    if hasattr(cfg, "weights"):
        cfg = dataclasses.replace(cfg, weights="")  # the checkpoint replaces any initial weights
    model = recipe.build_model(cfg)
    # a PEFT run's checkpoint: the adapters, onto the recipe's base
    base = adapters.missing_base(model, tensor_names(checkpoint))
    if base and given is not cfg:
        model = recipe.build_model(given)  # the base from the run's --weights
    problem = load_exactly(model, checkpoint, skip=base)
    if problem:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit {recipe.name}'s model ({problem})"
            + run_config.flags_hint(cfg, run_config.saved_config(checkpoint)[0])
        )
    return model.eval()


def evaluate(cfg: TrainConfig, recipe: Recipe, checkpoint: str, out: str = "") -> dict:
    """The task's validation metrics (classifiers: also per-class accuracy and the confusion
    matrix): printed, and saved as OUT/evaluation.json and OUT/confusion.png (OUT defaults to
    CHECKPOINT/evaluation)."""
    from accelerate import Accelerator

    from launcher.runtime.distributed import has_accelerator

    accelerator = Accelerator(cpu=not has_accelerator(), mixed_precision=cfg.mixed_precision)
    data = recipe.build_data(cfg)
    if data.val is None:
        raise ConfigError(f"recipe {recipe.name} has no validation split to evaluate on")
    split = SplitLoader(
        data.val,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        seed=cfg.seed,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        training=False,
        batch_transform=data.batch_transform,
        collate_fn=data.collate,
    )
    model = load_model(cfg, recipe, checkpoint).to(accelerator.device)
    checked = preflight(
        cfg, recipe, None, split, model, accelerator.device, recipe.build_loss(cfg), recipe.build_metrics(cfg)
    )
    split.num_classes = checked.label_classes  # labels out of range: unreadable samples, counted
    metrics = TaskMetrics(checked.task, checked.num_classes, accelerator.device, recipe.build_metrics(cfg))
    passed = evaluate_split(
        model, split.loader(0), checked.step, metrics, accelerator, "val", cfg.channels_last
    )
    unreadable = float(sum(passed.unreadable.values()))
    weights, step = describe_weights(checkpoint)
    result = {
        "checkpoint": checkpoint,
        "weights": weights,
        "step": step,
        "recipe": recipe.name,
        "task": checked.task,
        **passed.metrics,
        "val/unreadable": int(
            accelerator.reduce(torch.tensor(unreadable, device=accelerator.device), "sum").item()
        ),
    }
    confusion = passed.confusion
    if confusion is not None:
        classes = list(data.classes or split.classes)
        names = classes if len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
        result.update(classes=names, per_class_accuracy=per_class_accuracy(confusion), confusion=confusion)
    if accelerator.is_main_process:
        out = out or os.path.join(
            checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or ".", "evaluation"
        )
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=1)
        if confusion is not None:
            from launcher.track.report import confusion_figure

            confusion_figure(confusion, result["classes"]).savefig(
                os.path.join(out, "confusion.png"), dpi=100, bbox_inches="tight"
            )
        print(format_evaluation(result, out))
    accelerator.wait_for_everyone()
    return result


def format_evaluation(result: dict, out: str) -> str:
    lines = [
        f"evaluated {result['weights']} on {result['val/samples']} validation samples ({result['task']})"
        + (f" ({result['val/unreadable']} unreadable, skipped)" if result["val/unreadable"] else "")
    ]
    shown = {
        key: LABELS.get(key[4:], key[4:])
        for key, value in result.items()
        if key.startswith("val/")
        and key not in ("val/samples", "val/unreadable")
        and isinstance(value, float)
    }
    width = max(map(len, shown.values()))
    for key, label in shown.items():
        value = result[key]
        lines.append(
            f"  {label:<{width}}  {100 * value:.2f} %"
            if is_accuracy(key)
            else f"  {label:<{width}}  {value:.4f}"
        )
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


def describe_weights(checkpoint: str) -> tuple[str, int | None]:
    """(which weights `checkpoint` holds, their optimizer step or None): a checkpoint's step from its
    trainer_state.json, a run's final weights' from its summary.json."""
    from launcher.runtime.checkpoints import STATE_FILE

    directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
    if os.path.isfile(os.path.join(directory, STATE_FILE)):
        step = _read_json(os.path.join(directory, STATE_FILE)).get("step")
        return f"checkpoint {directory} (step {step})", step if isinstance(step, int) else None
    summary = _read_json(os.path.join(directory, "summary.json"))
    name = (
        os.path.basename(checkpoint).removesuffix(".index.json")
        if os.path.isfile(checkpoint)
        else "model.safetensors"
    )
    # one file, or shards with an index; --final_weights=best: the best step's
    if name == "model.safetensors":
        what, step = "final weights", summary.get("final_weights_step", summary.get("steps"))
    else:
        what, step = "final EMA weights", summary.get("steps") if name == "model_ema.safetensors" else None
    if isinstance(step, int):
        best = ", the best" if name == "model.safetensors" and summary.get("final_weights") == "best" else ""
        return f"{what} of {directory} (step {step}{best})", step
    return f"weights file {checkpoint}", None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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


def predict(
    cfg: TrainConfig,
    recipe: Recipe,
    checkpoint: str,
    inputs: list[str],
    top_k: int = 5,
    out: str = "",
    inputs_file: str = "",
) -> list[dict]:
    """A classifier's top-k classes with probabilities, or a regression's values, per input, in
    batches of eval_batch_size; unreadable inputs are reported on stderr and skipped. Prints one
    line per input, or with `out` writes one JSON object per input there instead."""
    import sys

    if top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {top_k}")
    data = recipe.build_data(cfg)
    split = SplitLoader(
        data.val if data.val is not None else data.train,
        rank=0,
        world=1,
        seed=cfg.seed,
        batch_size=1,
        num_workers=0,
        training=False,
        batch_transform=data.batch_transform,
        collate_fn=data.collate,
    )
    make_sample, key = _sample_maker(cfg, recipe, data, split)
    given = gather_inputs(inputs, inputs_file, files_of_inputs=key == "input")
    items = given if key == "input" else image_paths(given)
    classes = list(data.classes or split.classes)
    device = PartialState(cpu=False).device
    model = load_model(cfg, recipe, checkpoint).to(device)
    checked = preflight(cfg, recipe, None, split, model, device, recipe.build_loss(cfg), None)
    if checked.task not in ("classification", "regression"):
        raise ConfigError(
            f"predict prints a classifier's classes or a regression's values; {recipe.name} is a "
            f"{checked.task} task (use evaluate for its metrics)"
        )
    results, skipped = [], 0
    for start in range(0, len(items), cfg.eval_batch_size):
        samples, kept = [], []
        for item in items[start : start + cfg.eval_batch_size]:
            try:
                samples.append(make_sample(item))
                kept.append(item)
            except Exception as error:  # noqa: BLE001 - PIL and the recipe's function raise many types
                skipped += 1
                print(f"skipped unreadable {key} {item}: {type(error).__name__}: {error}", file=sys.stderr)
        if not samples:
            continue
        with blame("DataSpec.collate" if data.collate else "default_collate"):
            batch = checked.step.prepare(collate(samples, data.collate), device, cfg.channels_last)
        with torch.no_grad():
            outputs = checked.step(model, batch).outputs.float()
        results += _predictions(kept, outputs, checked.task, classes, top_k, printed=not out)
    if not results:
        raise ConfigError(f"none of the {len(items)} inputs could be read")
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(
        f"predicted {len(results)} inputs"
        + (f", skipped {skipped} unreadable" if skipped else "")
        + (f"; written to {out}" if out else ""),
        file=sys.stderr,
    )
    return results


def gather_inputs(inputs: list[str], inputs_file: str = "", files_of_inputs: bool = False) -> list[str]:
    """The inputs in order: each given one (`-`: standard input's lines; with `files_of_inputs`, an
    existing file's lines), then the lines of `inputs_file`. Blank lines are skipped."""
    import sys

    gathered = []
    for item, listed in [(item, files_of_inputs and os.path.isfile(item)) for item in inputs] + (
        [(inputs_file, True)] if inputs_file else []
    ):
        if item == "-":
            gathered += _lines(sys.stdin.read())
        elif listed:
            try:
                with open(item, encoding="utf-8") as f:
                    gathered += _lines(f.read())
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(
                    f"cannot read the inputs in {item} ({type(error).__name__}: {error}); pass a text "
                    "file with one input per line"
                ) from None
        else:
            gathered.append(item)
    if not gathered:
        raise ConfigError(
            f"no inputs in {', '.join('stdin' if i == '-' else i for i in inputs + [inputs_file] if i)}; "
            "give one input per line"
        )
    return gathered


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _predictions(
    items: list[str], outputs: torch.Tensor, task: str, classes: list[str], top_k: int, printed: bool
) -> list[dict]:
    results = []
    if task == "regression":
        for item, value in zip(items, outputs.reshape(len(items), -1).tolist()):
            value = value[0] if len(value) == 1 else value
            results.append({"input": item, "prediction": value})
            if printed:
                print(
                    f"{printable(item)}: {value if isinstance(value, list) else f'{value:.6g}'}", flush=True
                )
        return results
    probabilities = outputs.softmax(dim=1)
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    for item, values, indices in zip(items, top.values.tolist(), top.indices.tolist()):
        names = [classes[i] if i < len(classes) else str(i) for i in indices]
        results.append(
            {
                "input": item,
                "top": [
                    {"class": n, "index": i, "probability": round(p, 6)}
                    for n, i, p in zip(names, indices, values)
                ],
            }
        )
        if printed:
            print(
                f"{printable(item)}: " + ", ".join(f"{n} {100 * p:.1f} %" for n, p in zip(names, values)),
                flush=True,
            )
    return results


def _sample_maker(cfg, recipe: Recipe, data, split: SplitLoader) -> tuple:
    """(input -> sample, what an input is): the recipe's predict_sample(cfg, text), given a
    placeholder target where it returned the inputs alone, or an image file through the split's
    per-image transform (with a placeholder label)."""
    make = getattr(recipe.module, "predict_sample", None)
    if make is not None:
        with blame(f"build_data's {'validation' if data.val is not None else 'training'} split"):
            template = split.example_samples(1)[0]
        return (lambda text: with_placeholder_target(make(cfg, text), template)), "input"
    source = data.val if data.val is not None else data.train
    transform = (
        source.transform
        if isinstance(source, Shards) and source.images
        else getattr(source, "transform", None)
    )
    if transform is None or (isinstance(source, Shards) and not source.images):
        raise ConfigError(
            f"recipe {recipe.name}'s samples are not images predict can read; define "
            "predict_sample(cfg, text) in the recipe to turn an input into a sample"
        )

    def image_sample(path: str):
        with Image.open(path) as image:
            image.load()
            return transform(image), 0

    return image_sample, "image"


def with_placeholder_target(sample, template):
    """`sample` shaped as the training sample `template`: an (inputs, target) pair for inputs alone
    (the structure of the template's inputs), a dict with `labels` for one without; the placeholder
    is zeros like the template's target (its shape, dtype or Python type). Anything else unchanged."""
    import torch.utils._pytree as pytree

    if isinstance(template, dict) and isinstance(sample, dict):
        if "labels" in template and "labels" not in sample:
            return {**sample, "labels": _zeros_like(template["labels"])}
        return sample
    if isinstance(template, (tuple, list)) and len(template) == 2:
        shape = pytree.tree_structure(sample)
        if shape != pytree.tree_structure(template) and shape == pytree.tree_structure(template[0]):
            return type(template)((sample, _zeros_like(template[1])))
    return sample


def _zeros_like(target):
    if isinstance(target, torch.Tensor):
        return torch.zeros_like(target)
    return type(target)(0) if isinstance(target, (int, float)) else target
