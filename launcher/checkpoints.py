"""Checkpoints in OUTPUT_DIR/checkpoints/step-NNNNNNNN, written atomically.

Each is written by all ranks into a hidden temporary directory (Accelerate's save_state: model,
optimizer, LR scheduler, grad scaler, every rank's RNG states; each rank's data position in
rank-N.json) plus trainer_state.json, and is
renamed into place by the main process only once every rank has finished. A crash mid-save
leaves the previous checkpoints as they were; a directory without trainer_state.json is never
picked for resuming.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from accelerate import Accelerator

from launcher.config import ConfigError

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    found = [os.path.dirname(p) for p in glob.glob(os.path.join(output_dir, "checkpoints", "step-*", STATE_FILE))]
    return sorted(found)


def find_resume(cfg) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite an earlier run by accident."""
    existing = checkpoint_dirs(cfg.output_dir)
    if cfg.resume == "":
        if existing or os.path.exists(os.path.join(cfg.output_dir, "model.safetensors")):
            raise ConfigError(f"{cfg.output_dir} already holds a run; pass --resume=auto to continue it "
                              "or choose another --output_dir")
        return None
    if cfg.resume == "auto":
        if not existing:
            print(f"--resume=auto: no checkpoint in {cfg.output_dir}/checkpoints, starting fresh", flush=True)
            return None
        return existing[-1]
    if not os.path.isfile(os.path.join(cfg.resume, STATE_FILE)):
        raise ConfigError(f"--resume={cfg.resume} is not a complete checkpoint (no {STATE_FILE}); "
                          "pass a checkpoints/step-* directory or --resume=auto")
    return cfg.resume


def save(accelerator: Accelerator, output_dir: str, state: dict, rank_state: dict | None = None) -> str:
    root = os.path.join(output_dir, "checkpoints")
    name = f"step-{state['step']:08d}"
    final, temporary = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    if rank_state is not None:
        with open(os.path.join(temporary, f"rank-{accelerator.process_index}.json"), "w") as f:
            json.dump(rank_state, f)
    if accelerator.is_main_process:
        with open(os.path.join(temporary, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    accelerator.wait_for_everyone()  # every rank's files are complete
    if accelerator.is_main_process:
        if os.path.exists(final):  # the same step saved again (after a resume): swap, then drop
            stale = os.path.join(root, f".old-{name}")
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: str) -> tuple[dict, dict | None]:
    """(trainer state, this rank's state or None if the checkpoint has none for it)."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        rank_file = os.path.join(path, f"rank-{accelerator.process_index}.json")
        rank_state = None
        if os.path.isfile(rank_file):
            with open(rank_file) as f:
                rank_state = json.load(f)
        accelerator.load_state(path)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"checkpoint {path} cannot be loaded ({reason}); "
                          "resume from another checkpoint or start a new --output_dir") from error
    return state, rank_state
