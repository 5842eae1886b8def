"""What a run leaves in its output_dir to be reproduced and reviewed.

config.json (the resolved config), recipe.py (the recipe's source), environment.json (versions,
command, world size), metrics.jsonl (one JSON object per logged step or evaluation). Only the
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
