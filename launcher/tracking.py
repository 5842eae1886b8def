"""What a run leaves in its output_dir to be reproduced and reviewed, and what goes to wandb.

config.json (the resolved config), recipe.py (the recipe's source), environment.json (versions,
command, world size), metrics.jsonl (one JSON object per optimizer step or evaluation),
confusion.json (the latest evaluation's confusion matrix), summary.json (at the end). Only the
main process writes. wandb goes through Accelerate's tracker (main process only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import socket
import sys
import time
from importlib import metadata


def save_run_files(cfg, recipe, world_size: int) -> None:
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump({"recipe": recipe.name, **dataclasses.asdict(cfg)}, f, indent=1)
    if recipe.source_path:
        shutil.copyfile(recipe.source_path, os.path.join(cfg.output_dir, "recipe.py"))
    versions = {}
    for package in ("torch", "torchvision", "accelerate", "webdataset", "wandb", "launcher"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env = {"command": sys.argv, "python": platform.python_version(), "host": socket.gethostname(),
           "world_size": world_size, "versions": versions,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(cfg.output_dir, "environment.json"), "w") as f:
        json.dump(env, f, indent=1)


def write_json(output_dir: str, name: str, value) -> None:
    """OUTPUT_DIR/NAME, replaced atomically (a reader never sees half a file)."""
    path = os.path.join(output_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """Appends one JSON line per record to OUTPUT_DIR/metrics.jsonl (main process only)."""

    def __init__(self, output_dir: str, enabled: bool):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled

    def drop_after(self, step: int) -> None:
        """On resume: forget records of steps after the checkpoint (they are logged again)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            f.writelines(kept)
        os.replace(temporary, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Tracker:
    """wandb through Accelerate's tracker: only the main process has a run. With
    `wandb_mode=disabled` every method does nothing, so the loop has no `if wandb:` branches."""

    def __init__(self, accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg
        self.enabled = cfg.wandb_mode != "disabled"
        self.run = None  # the wandb Run on the main process

    def start(self, run_id: str | None) -> str | None:
        """Start, or with a stored `run_id` continue, the run; returns its id."""
        cfg = self.cfg
        if not self.enabled:
            return run_id
        init = {"mode": cfg.wandb_mode, "dir": os.path.abspath(cfg.output_dir), "resume": "allow",
                "name": cfg.wandb_name or os.path.basename(os.path.normpath(cfg.output_dir))}
        for key, value in (("entity", cfg.wandb_entity), ("group", cfg.wandb_group),
                           ("tags", list(cfg.wandb_tags)), ("notes", cfg.wandb_notes), ("id", run_id)):
            if value:
                init[key] = value
        if cfg.wandb_mode == "offline" and self.accelerator.is_main_process:
            import wandb

            # wandb.init(mode="offline") alone still starts wandb's usage telemetry (OpenTelemetry
            # exporters bound for its servers), which reads the process-wide settings: an offline
            # run, e.g. on a cluster with no route out, must open no connection.
            wandb.setup(settings=wandb.Settings(mode="offline"))
        self.accelerator.init_trackers(cfg.wandb_project, config=dataclasses.asdict(cfg),
                                       init_kwargs={"wandb": init})
        if self.accelerator.is_main_process:
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)
            return self.run.id
        return run_id

    def log(self, values: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log(values, step=step)

    def log_evaluation(self, step: int, confusion: list[list[int]] | None, class_names: list[str],
                       examples: list[tuple] | None) -> None:
        """A confusion matrix and a table of validation images (image, prediction, label)."""
        if self.run is None:
            return
        import wandb

        values = {}
        names = class_names or [str(i) for i in range(len(confusion or []))]
        if confusion:
            truth = [t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
            predicted = [p for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
            values["val/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=truth, preds=predicted, class_names=names, title=f"confusion at step {step}")
        if examples:
            table = wandb.Table(columns=["image", "prediction", "label", "correct"])  # images: HWC uint8
            for image, prediction, label in examples:
                table.add_data(wandb.Image(image), names[prediction], names[label], prediction == label)
            values["val/examples"] = table
        self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        """Write the summary, close the run, and (Accelerate's end_training) leave the process group."""
        if self.run is not None:
            self.run.summary.update(summary)
        self.accelerator.end_training()
        self.run = None

    @property
    def run_dir(self) -> str | None:
        return os.path.dirname(self.run.dir) if self.run is not None else None
