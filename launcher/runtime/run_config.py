"""A run's own config, read back: what `--resume`, `evaluate` and `predict` take from the config a
run saved (a checkpoint's trainer_state.json, a run directory's config.json), what a resume may
not change (launcher/overrides.py's RESULT_NEUTRAL says what it may), the global batch kept on another
number of processes, and the one line for weights that do not fit, naming the flags that differ.
"""

from __future__ import annotations

import dataclasses
import json
import os

from launcher.config import ConfigError, TrainConfig
from launcher.global_batch import GlobalBatch
from launcher.overrides import inherit, result_changes, shown
from launcher.runtime.checkpoints import STATE_FILE, find_resume, read_state, state_problem


def keep_global_batch(cfg, path: str, world_size: int) -> tuple[object, str]:
    """Resuming on a different number of processes: recompute grad_accum_steps so the global batch
    (per-device batch x processes x accumulation) stays the checkpoint's. Returns (cfg, note)."""
    state = read_state(path)
    then_world = state.get("world_size", world_size)
    if then_world == world_size:
        return cfg, ""
    then = GlobalBatch.of(state["config"], then_world)
    now = then.on(world_size, cfg.batch_size)
    if now is None:
        fix = (
            f"choose a --batch_size that divides {then.samples // world_size}"
            if then.samples % world_size == 0
            else f"resume on a number of processes that divides {then.samples}"
        )
        raise ConfigError(
            f"checkpoint {path} trained with a global batch of {then.samples} "
            f"({then.batch_size} per device x "
            f"{then_world} processes x {then.grad_accum_steps} accumulation), which {world_size} processes x "
            f"--batch_size={cfg.batch_size} do not divide; {fix}"
        )
    note = (
        f"resuming on {world_size} process(es) instead of {then_world}: grad_accum_steps "
        f"{cfg.grad_accum_steps} -> {now.grad_accum_steps} keeps the global batch of {then.samples}"
    )
    return dataclasses.replace(cfg, grad_accum_steps=now.grad_accum_steps), note


def resume_config(cfg: TrainConfig, given: set[str] | frozenset[str], log=print) -> TrainConfig:
    """--resume: the fields not `given` (on the command line or in a --config file) taken from the
    config of the checkpoint it resumes from (for `auto`, the newest one whose state reads; the
    trainer checks the one it picks against it). A given one that changes the result and differs
    from the checkpoint's is refused, unless --resume_changes=allow (then a note names it)."""
    path = _resume_candidate(cfg)
    saved = read_state(path).get("config") if path else None
    if not saved:
        return cfg
    cfg, note = inherit(cfg, saved, given, f"checkpoint {path}")
    if note:
        log(note)
    # grad_accum_steps: the trainer's check, which knows the world size (on another,
    # keep_global_batch sets it)
    changed = refuse_changes(cfg, saved, path, set(given) - {"grad_accum_steps"})
    if changed:
        log(f"note: --resume_changes=allow: {changed}")
    return cfg


def refuse_changes(cfg: TrainConfig, saved: dict, path: str, names=None) -> str:
    """One line naming each of `names` (default: every field) that changes the result and differs
    from `saved`, a checkpoint's config: a ConfigError under --resume_changes=refuse, else returned."""
    changed = result_changes(cfg, saved, names)
    if not changed:
        return ""
    listed = "; ".join(
        f"--{name}={shown(now)} differs from the checkpoint's {shown(then)}" for name, now, then in changed
    )
    if cfg.resume_changes == "allow":
        return listed
    them = "it" if len(changed) == 1 else "them"
    raise ConfigError(
        f"checkpoint {path} was trained otherwise: {listed}; drop {them} to resume as trained, "
        f"or pass --resume_changes=allow to resume with {them} anyway"
    )


def check_resumed_config(cfg: TrainConfig, path: str, world_size: int) -> None:
    """The config (every field) against the checkpoint the run resumes from: the CLI took the fields
    of the newest, which --resume=auto may have skipped as damaged; and grad_accum_steps, which
    only here meets the world size: on the checkpoint's it must be the same (the global batch), on
    another keep_global_batch sets it."""
    state = read_state(path)
    rescaled = state.get("world_size", world_size) != world_size
    names = [f.name for f in dataclasses.fields(cfg) if not (rescaled and f.name == "grad_accum_steps")]
    refuse_changes(cfg, state.get("config") or {}, path, names)


def _resume_candidate(cfg) -> str | None:
    """The checkpoint whose config a --resume takes: `find_resume`'s, checking only that its state
    reads (the trainer verifies every file of the one it picks), or None where it would refuse."""
    try:
        return find_resume(cfg, log=lambda _: None, problem=state_problem)
    except ConfigError:
        return None


RUN_CONFIG = "config.json"  # a run's resolved config, with its recipe's name (launcher/track/trackers.py)


def saved_config(path: str) -> tuple[dict, str]:
    """(the config saved with `path`, the file it is in): a checkpoints/step-N directory's
    trainer_state.json, a run directory's config.json; for a file, those of the directory holding
    it. ({}, "") where there is none (a weights file of its own)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(folder, STATE_FILE)):
        return read_state(folder).get("config") or {}, os.path.join(folder, STATE_FILE)
    source = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(source):
        return {}, ""
    try:
        with open(source, "rb") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a mapping of fields")
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{source} is damaged ({error}); pass the recipe's fields on the command line "
            "and a weights file as --checkpoint"
        ) from None
    return config, source


def run_dir_of(path: str) -> str | None:
    """The run directory `path` belongs to (itself, the one holding it, or a checkpoint's run), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    parent = os.path.dirname(os.path.abspath(folder))
    for candidate in (folder, os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None):
        if candidate is not None and os.path.isfile(os.path.join(candidate, RUN_CONFIG)):
            return candidate
    return None


def check_model_fits(path: str, model, cfg: TrainConfig, frozen_base: frozenset[str] = frozenset()) -> None:
    """Before loading checkpoint `path` into `model` (a whole one: DDP's, not FSDP's sharded):
    a model.safetensors of other tensor names or shapes is one line naming the first differences
    and the flags that differ from the checkpoint's config, not Accelerate's cut-off error. A PEFT
    model's checkpoint holds all but its `frozen_base`."""
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        return
    from launcher.runtime.weights import fit_problem, open_weights

    with open_weights(weights) as files:
        problem = fit_problem(model, files, skip=frozen_base)
    if problem:
        saved = read_state(path).get("config") or {}
        raise ConfigError(f"checkpoint {path} does not fit the model ({problem}){flags_hint(cfg, saved)}")


def flags_hint(cfg: TrainConfig, saved: dict) -> str:
    """'; it was trained with --hidden=32 (here 64), ...' from a run's saved config, or the general advice."""
    changed = result_changes(cfg, saved)[:4]
    if not changed:
        return "; pass the recipe and the fields it was trained with"
    return (
        "; it was trained with "
        + ", ".join(f"--{name}={shown(then)} (here {shown(now)})" for name, now, then in changed)
        + ": drop the flags that change the model"
    )


def check_resumable_position(
    path: str, saved: dict, world_size: int, num_workers: int, batches_per_epoch: int
) -> None:
    """A checkpoint taken mid-epoch (`saved`: its trainer state) resumes only with the same ranks x
    workers and epoch size: its data position means nothing otherwise."""
    then = (saved.get("world_size"), saved.get("num_workers"), saved.get("batches_per_epoch"))
    now = (world_size, num_workers, batches_per_epoch)
    if then != now:
        raise ConfigError(
            f"checkpoint {path} was taken mid-epoch with {then[0]} processes x {then[1]} workers and "
            f"{then[2]} batches per epoch, this run has {now[0]} x {now[1]} and {now[2]}; resume with "
            "the same --num_processes, --num_workers and --batch_size, or from an epoch-end checkpoint"
        )
