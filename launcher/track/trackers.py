"""What a run leaves in its output_dir to be reproduced and reviewed, and what goes to wandb.

config.json (the resolved config), recipe.py (the recipe's source), environment.json (versions,
the launcher's git commit, command, world size), metrics.jsonl (one JSON object per optimizer step
or evaluation), confusion.json (the latest evaluation's confusion matrix), summary.json (at the end). Only the
main process writes. The trackers (--trackers: wandb, tensorboard) go through Accelerate's tracker
API, main process only: every logged scalar goes to each; TensorBoard's event files land in
OUTPUT_DIR/tensorboard/<wandb_project>/ (`tensorboard --logdir OUTPUT_DIR/tensorboard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata

from accelerate.utils import ProjectConfiguration

from launcher import durable
from launcher.config import ConfigError
from launcher.durable import atomic_file

TRACKERS = ("wandb", "tensorboard")


def configured_trackers(cfg) -> tuple[str, ...]:
    return tuple(getattr(cfg, "trackers", ("wandb",)))


def check_trackers(cfg) -> None:
    unknown = [name for name in configured_trackers(cfg) if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"--trackers names {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")


def tracker_names(cfg) -> list[str]:
    """Accelerate's `log_with`: the --trackers, less wandb under --wandb_mode=disabled."""
    names = dict.fromkeys(configured_trackers(cfg))  # in order, each once
    return [name for name in names if name != "wandb" or cfg.wandb_mode != "disabled"]


def tracker_project(cfg) -> ProjectConfiguration:
    """Accelerate's directories: the run's output_dir, and OUTPUT_DIR/tensorboard as the logging
    directory, under which its TensorBoard tracker writes to a folder named after the project."""
    return ProjectConfiguration(
        project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard")
    )


def tensorboard_dir(cfg) -> str:
    """Where the TensorBoard event files go: OUTPUT_DIR/tensorboard/<wandb_project>."""
    return os.path.join(tracker_project(cfg).logging_dir, cfg.wandb_project)


def hyperparameters(config: dict) -> dict:
    """The config as TensorBoard's hparams takes it: numbers, strings and booleans as they are,
    anything else (tuples, lists, dicts, None) as JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


def save_run_files(cfg, recipe, world_size: int) -> None:
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump({"recipe": recipe.name, **dataclasses.asdict(cfg)}, f, indent=1)
    copy = os.path.join(cfg.output_dir, "recipe.py")
    # the run's own copy
    if recipe.source_path and not (os.path.exists(copy) and os.path.samefile(recipe.source_path, copy)):
        shutil.copyfile(recipe.source_path, copy)
    versions = {}
    for package in ("torch", "torchvision", "accelerate", "webdataset", "wandb", "tensorboard", "launcher"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env = {
        "command": sys.argv,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "world_size": world_size,
        "versions": versions,
        "launcher_commit": launcher_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(os.path.join(cfg.output_dir, "environment.json"), "w") as f:
        json.dump(env, f, indent=1)


def launcher_commit(
    root: str = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
) -> str:
    """The git commit of the checkout at `root` (by default the one holding this launcher/ package),
    with `+changes` when launcher/'s files differ from it; "unknown" when `root` is not the top of a
    git checkout (an installed wheel, a copy, a folder inside some other repository)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return "unknown"  # launcher/ lies inside some other repository
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "launcher")
        return git("rev-parse", "HEAD") + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(output_dir: str, name: str, value) -> None:
    """OUTPUT_DIR/NAME, replaced atomically and durably (a reader never sees half a file, also after
    a power loss); a full disk is one line (exit 74)."""
    durable.write_json(os.path.join(output_dir, name), value)


class MetricsLog:
    """Appends one JSON line per record to OUTPUT_DIR/metrics.jsonl (main process only). Records
    written with `flush=False` (every step's learning rates) wait in memory for the next flushed
    one, so a step does not open the file; the loop flushes before every checkpoint, so a resume
    finds every record up to its step."""

    def __init__(self, output_dir: str, enabled: bool):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.pending: list[dict] = []

    def drop_after(self, step: int) -> None:
        """On resume: forget records of steps after the checkpoint (they are logged again). A line
        that does not parse (the last one torn by a SIGKILL or a full disk mid-write) is dropped
        with a warning."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, torn = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                record = _record(line)
                if record is None:
                    torn += bool(line.strip())
                elif not isinstance(record.get("step", 0), int) or record.get("step", 0) <= step:
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
        if torn:
            print(f"WARNING: {self.path}: dropped {torn} damaged line(s) (a write cut short)", flush=True)
        with atomic_file(self.path, "wb") as f:
            f.writelines(kept)

    def write(self, record: dict, flush: bool = True) -> None:
        if not self.enabled:
            return
        self.pending.append(record)  # serialised when flushed: a step only appends
        if flush:
            self.flush()

    def flush(self) -> None:
        """Append the pending records in one write. A write that fails (a full disk) is cut back to
        where it began, so a retry never writes a record twice; then `DiskFull` (exit 74) names the file."""
        if not self.pending:
            return
        text = "".join(json.dumps(record) + "\n" for record in self.pending).encode()
        self.pending = []
        start = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        with durable.no_space_left(self.path):
            try:
                with open(self.path, "ab") as f:
                    f.write(text)
            except OSError:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, start)
                raise


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class Tracker:
    """The run's trackers through Accelerate: only the main process has them. With none (no
    --trackers, or only wandb under --wandb_mode=disabled) every method does nothing, so the loop
    has no `if wandb:` branches. Scalars go to every tracker; evaluation tables to wandb only."""

    def __init__(self, accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg
        self.names = tracker_names(cfg)
        self.enabled = bool(self.names)
        self.run = None  # the wandb Run on the main process

    def start(self, run_id: str | None, resume_step: int = 0) -> str | None:
        """Start, or with a stored `run_id` continue, the run; returns the wandb run's id (with no
        wandb, `run_id` unchanged). `resume_step`: the checkpoint's step when resuming, so that
        TensorBoard drops the events of later steps, which are logged again."""
        cfg, accelerator = self.cfg, self.accelerator
        if not self.enabled:
            return run_id
        init_kwargs = {}
        if "wandb" in self.names:
            init_kwargs["wandb"] = self._wandb_init(run_id)
        if "tensorboard" in self.names:
            init_kwargs["tensorboard"] = {"purge_step": resume_step + 1} if resume_step else {}
        # The config is stored per tracker below: TensorBoard's hparams refuse tuples and lists.
        accelerator.init_trackers(cfg.wandb_project, init_kwargs=init_kwargs)
        if not accelerator.is_main_process:
            return run_id
        config = dataclasses.asdict(cfg)
        for tracker in accelerator.trackers:
            tracker.store_init_configuration(config if tracker.name == "wandb" else hyperparameters(config))
        if "wandb" in self.names:
            self.run = accelerator.get_tracker("wandb", unwrap=True)
            return self.run.id
        return run_id

    def _wandb_init(self, run_id: str | None) -> dict:
        """wandb.init's arguments, passed through Accelerate."""
        cfg = self.cfg
        init = {
            "mode": cfg.wandb_mode,
            "dir": os.path.abspath(cfg.output_dir),
            "resume": "allow",
            "name": cfg.wandb_name or os.path.basename(os.path.normpath(cfg.output_dir)),
        }
        for key, value in (
            ("entity", cfg.wandb_entity),
            ("group", cfg.wandb_group),
            ("tags", list(cfg.wandb_tags)),
            ("notes", cfg.wandb_notes),
            ("id", run_id),
        ):
            if value:
                init[key] = value
        if cfg.wandb_mode == "offline" and self.accelerator.is_main_process:
            import wandb

            # wandb.init(mode="offline") alone still starts wandb's usage telemetry (OpenTelemetry
            # exporters bound for its servers), which reads the process-wide settings: an offline
            # run, e.g. on a cluster with no route out, must open no connection.
            wandb.setup(settings=wandb.Settings(mode="offline"))
        return init

    def log(self, values: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log(values, step=step)

    def log_evaluation(
        self,
        step: int,
        confusion: list[list[int]] | None,
        class_names: list[str],
        examples: list[tuple] | None,
    ) -> None:
        """To wandb only: a confusion matrix and a table of validation images (image, prediction,
        label). Either may be None (a task without classes or images): then it is left out."""
        if self.run is None or not (confusion or examples):
            return
        import wandb

        values = {}
        names = list(class_names or [str(i) for i in range(len(confusion or []))])
        if confusion:
            truth = [t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
            predicted = [p for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
            values["val/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=truth, preds=predicted, class_names=names, title=f"confusion at step {step}"
            )
        if examples:
            table = wandb.Table(columns=["image", "prediction", "label", "correct"])  # images: HWC uint8
            for image, prediction, label in examples:
                table.add_data(
                    wandb.Image(image),
                    _class_name(names, prediction),
                    _class_name(names, label),
                    prediction == label,
                )
            values["val/examples"] = table
        self.run.log(values, step=step)

    def log_media(self, values: dict, step: int) -> None:
        """Tables and images (launcher/track/media.py) to wandb and TensorBoard, as each shows them."""
        if not values or not self.accelerator.is_main_process:
            return
        from launcher.track import media

        if self.run is not None:
            self.run.log(media.to_wandb(values), step=step)
        if "tensorboard" in self.names:
            media.to_tensorboard(self.accelerator.get_tracker("tensorboard", unwrap=True), values, step)

    def finish(self, summary: dict) -> None:
        """Write the summary (wandb), close the trackers, and (Accelerate's end_training) leave the
        process group."""
        if self.run is not None:
            self.run.summary.update(summary)
        self.accelerator.end_training()
        self.run = None

    @property
    def run_dir(self) -> str | None:
        """The wandb run's directory (None without wandb, and on other processes)."""
        return os.path.dirname(self.run.dir) if self.run is not None else None

    @property
    def tensorboard_dir(self) -> str | None:
        """The TensorBoard event files' directory (None without TensorBoard, and on other processes)."""
        if "tensorboard" not in self.names or not self.accelerator.is_main_process:
            return None
        return tensorboard_dir(self.cfg)


def _class_name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)
