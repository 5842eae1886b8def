"""Checkpoints in OUTPUT_DIR/checkpoints/step-NNNNNNNN, written atomically.

Each is written by all ranks into a hidden temporary directory (state_files.py, without pickle: model,
optimizer, LR scheduler, grad scaler, every rank's RNG states; each rank's data position in
rank-N.json) plus trainer_state.json (step, epoch, best metric, tracker run id, resolved config,
world size), and is renamed into place by the main process only once every rank has finished.
Under FSDP the model, optimizer and EMA are in `sharded/` instead, a torch.distributed.checkpoint
directory that loads on any number of processes; with --async_checkpoint it is written in the
background, and the rename waits until every rank's write is done. A PEFT model's checkpoint
holds what trains (the adapters) and its optimizer state, not the frozen base, which the recipe
rebuilds; trainer_state.json names the base (launcher/train/adapters.py) so that a resume onto
another is refused.
A crash mid-save leaves the previous checkpoints as they were; a directory without
trainer_state.json is never picked for resuming. Only after a new checkpoint is in place are old
ones pruned: the newest `keep_checkpoints` stay, and the best one (best.json names it).
The main process writes manifest.json last, before the rename: each file's size and xxh3-64 hash.
`--resume=auto` takes the newest checkpoint that matches it, with a warning naming any newer one
that does not (a truncated or flipped block on shared storage); `--resume=PATH` to one that does
not is a one-line error.
A resume takes the checkpoint's config for every field not given (`resume_config`) and refuses a
given one that changes the result unless --resume_changes=allow; weights that do not fit the model
are one line naming the first differing tensors and flags (`check_model_fits`), as for evaluate.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import shutil
import signal
import zlib
from collections.abc import Callable

import xxhash
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from launcher import durable
from launcher.config import ConfigError
from launcher.runtime import state_files
from launcher.runtime.failures import disk_full, first_cause, inject_disk_full


def dcp_error() -> type[BaseException]:
    """DCP's CheckpointException: every rank's failure wrapped in a BaseException that `except
    Exception` misses. Imported when an error is matched against it, not with this module: importing
    torch.distributed.checkpoint pulls in the compiler on torch 2.7 (1.5 s)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # a torch built without distributed support
        return Exception
    return CheckpointException


STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # every file's size and xxh3-64 hash, written last, inside the atomic rename
SHARDED_DIR = "sharded"  # an FSDP checkpoint's DCP files (model, optimizer, EMA), reshardable
BEST_FILE = "best.json"
ABANDONED_DIR = "abandoned"  # checkpoints after the step a run resumed from: another branch of its history
# fault injection for the tests: SIGKILL mid-save at this step
KILL_DURING_SAVE = "LAUNCHER_TEST_KILL_DURING_SAVE"
# Fault injection for the tests: "STEP:POINT", SIGKILL at that point of step STEP's save protocol:
# `unsynced` (every file written, none fsynced, no manifest), `renamed` (in place, nothing pruned),
# `pruning` (after the first older checkpoint is deleted).
KILL_AT = "LAUNCHER_TEST_KILL_AT"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    found = [
        os.path.dirname(p) for p in glob.glob(os.path.join(output_dir, "checkpoints", "step-*", STATE_FILE))
    ]
    return sorted(found)


def agreed_resume(accelerator: Accelerator, cfg, log=print) -> str | None:
    """`find_resume` on the main process alone (checking a checkpoint reads all of its files; the
    ranks of a node would each read them again), its answer or its error given to every rank."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("path", find_resume(cfg, log))
        except ConfigError as error:
            outcome[0] = ("error", str(error))
        except Exception as error:  # noqa: BLE001 - the other ranks wait for an answer: give them one
            outcome[0] = (
                "error",
                f"cannot choose a checkpoint in {cfg.output_dir}/checkpoints to resume from "
                f"({type(error).__name__}: {error}); pass --resume=PATH to one",
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def find_resume(cfg, log=print, problem: Callable[[str], str | None] | None = None) -> str | None:
    """What --resume resolves to (the one place that decides it): the checkpoint to resume from, or
    None; refuses to overwrite an earlier run by accident. `auto` takes the newest checkpoint in which
    `problem` finds nothing (default `verify`: every file matches its manifest), warning about any newer
    one; a given path with a problem is an error."""
    problem = problem or verify
    existing = checkpoint_dirs(cfg.output_dir)
    if cfg.resume == "":
        if existing or any(
            os.path.exists(os.path.join(cfg.output_dir, name))
            for name in ("model.safetensors", "model.safetensors.index.json")
        ):
            raise ConfigError(
                f"{cfg.output_dir} already holds a run; pass --resume=auto to continue it "
                "or choose another --output_dir"
            )
        return None
    if cfg.resume == "auto":
        for path in reversed(existing):
            found = problem(path)
            if found is None:
                return path
            log(f"WARNING: --resume=auto skips checkpoint {path}: {found}")
        intact = "intact " if existing else ""
        log(f"--resume=auto: no {intact}checkpoint in {cfg.output_dir}/checkpoints, starting fresh")
        return None
    if not os.path.isfile(os.path.join(cfg.resume, STATE_FILE)):
        raise ConfigError(
            f"--resume={cfg.resume} is not a complete checkpoint (no {STATE_FILE}); "
            "pass a checkpoints/step-* directory or --resume=auto"
        )
    found = problem(cfg.resume)
    if found is not None:
        raise ConfigError(
            f"checkpoint {cfg.resume} is damaged ({found}); resume from another checkpoint "
            "or with --resume=auto, which takes the newest intact one"
        )
    return cfg.resume


def _injected_kill(step: int, point: str) -> None:
    if os.environ.get(KILL_AT) == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _digest(path: str, kind: str) -> str | int:
    """A file's hash as a manifest holds it: xxh3-64 in hex (about 20 GB/s on one core, 7 x zlib's
    CRC-32: checking a checkpoint costs little next to loading it), or the integer CRC-32 that
    manifests before it hold."""
    digest = xxhash.xxh3_64() if kind == "xxh3_64" else None
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            if digest is not None:
                digest.update(chunk)
            else:
                crc = zlib.crc32(chunk, crc)
    return digest.hexdigest() if digest is not None else crc


def _files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, name), root)
        for d, _, names in os.walk(root)
        for name in names
        if name != MANIFEST_FILE
    )


def _digests(path: str, names: list[str], kinds: list[str]) -> list[str | int]:
    """The files' hashes, several files at a time (the hashing releases the GIL over each chunk)."""
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(len(names), os.cpu_count() or 1, 8))
    ) as pool:
        return list(pool.map(lambda name, kind: _digest(os.path.join(path, name), kind), names, kinds))


def write_manifest(path: str) -> None:
    """path/manifest.json: each file's size and xxh3-64 hash (the checkpoint's last file)."""
    names = _files(path)
    files = {
        name: {"bytes": os.path.getsize(os.path.join(path, name)), "xxh3_64": digest}
        for name, digest in zip(names, _digests(path, names, ["xxh3_64"] * len(names)))
    }
    durable.write_json(os.path.join(path, MANIFEST_FILE), {"files": files}, indent=1)


def verify(path: str) -> str | None:
    """None if every file of the checkpoint is as its manifest says, else what is wrong. A checkpoint
    written before manifests existed passes unchecked, if its trainer_state.json reads."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        return state_problem(path)
    try:
        with open(manifest_path, "rb") as f:
            files = _manifest_files(json.load(f))
    except (OSError, ValueError) as error:
        return f"{MANIFEST_FILE} unreadable ({error})"
    for name, expected in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        size = os.path.getsize(full)
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
    kinds = ["xxh3_64" if "xxh3_64" in expected else "crc32" for expected in files.values()]
    for (name, expected), kind, digest in zip(files.items(), kinds, _digests(path, list(files), kinds)):
        if digest != expected[kind]:
            return f"{name} does not match its checksum"
    return state_problem(path)


def _manifest_files(manifest) -> dict:
    """The manifest's {name: {"bytes", "xxh3_64" or "crc32"}}, or ValueError naming what is malformed
    (a flipped bit in a key, a name outside the checkpoint)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise ValueError(f"no file list naming {STATE_FILE}")
    for name, entry in files.items():
        if os.path.isabs(name) or ".." in name.split("/") or not isinstance(entry, dict):
            raise ValueError(f"malformed entry {name!r}")
        size, xxh3, crc = entry.get("bytes"), entry.get("xxh3_64"), entry.get("crc32")
        if not (isinstance(size, int) and size >= 0 and (isinstance(xxh3, str) or isinstance(crc, int))):
            raise ValueError(f"malformed entry {name!r}")
    return files


def state_problem(path: str) -> str | None:
    try:
        _read_state_json(path)
    except ConfigError as error:
        return str(error).split("; ")[0]
    return None


class PendingSave:
    """A checkpoint written into its temporary directory; `finish()` (a collective) waits for every
    rank's files, the asynchronous ones included, and renames it into place."""

    def __init__(self, accelerator: Accelerator, root: str, name: str, writing):
        self.accelerator, self.root, self.name, self.writing = accelerator, root, name, writing
        self.step = int(name.split("-")[1])

    @property
    def written(self) -> bool:
        """This rank's files are all on disk (no asynchronous write left)."""
        return self.writing is None or self.writing.done()

    def finish(self) -> str:
        """Every rank's files on disk (fsynced), then the manifest, then the rename: after a power
        loss the checkpoint is whole or absent, and pruning (after this) never runs ahead of it."""
        acc, root, name = self.accelerator, self.root, self.name
        final, temporary = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
        with space_checked(temporary, final):
            if self.writing is not None:
                self.writing.result()  # raises what the background write raised
            _injected_kill(self.step, "unsynced")
            durable.sync_tree(temporary)  # what this rank wrote (the rest costs a system call each)
        acc.wait_for_everyone()  # every rank's files are complete and on disk
        if acc.is_main_process:
            with space_checked(temporary, final):
                write_manifest(temporary)
                durable.fsync_path(temporary)
            if os.path.exists(final):  # the same step saved again (after a resume): swap, then drop
                stale = os.path.join(root, f".old-{name}")
                os.replace(final, stale)
                durable.replace(temporary, final)
                shutil.rmtree(stale)
            else:
                durable.replace(temporary, final)
            _injected_kill(self.step, "renamed")
        acc.wait_for_everyone()
        return final


def save(
    accelerator: Accelerator,
    output_dir: str,
    state: dict,
    rank_state: dict | None = None,
    write_shards=None,
    frozen_base: frozenset[str] = frozenset(),
) -> PendingSave:
    """Write a checkpoint into its temporary directory: the training state (state_files, without a
    PEFT model's `frozen_base`), then `write_shards(path)` (FSDP's DCP files; it may return a future
    of a background write), each rank's data position, trainer_state.json. Call `finish()` on the
    result to put it in place."""
    root = os.path.join(output_dir, "checkpoints")
    name = f"step-{state['step']:08d}"
    temporary = os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    with space_checked(temporary, os.path.join(root, name)):
        state_files.write(accelerator, temporary, frozen_base)
        writing = write_shards(temporary) if write_shards is not None else None
        if os.environ.get(KILL_DURING_SAVE) == str(state["step"]):
            # model and optimizer written (or being written), the rest not: a torn save
            os.kill(os.getpid(), signal.SIGKILL)
        inject_disk_full(state["step"])
        if rank_state is not None:
            with open(os.path.join(temporary, f"rank-{accelerator.process_index}.json"), "w") as f:
                json.dump(rank_state, f)
        if accelerator.is_main_process:
            with open(os.path.join(temporary, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
    return PendingSave(accelerator, root, name, writing)


@contextlib.contextmanager
def space_checked(temporary: str, final: str):
    """A write that finds the disk full: the temporary directory removed, one line naming the
    checkpoint and the space left (`DiskFull`, exit 74); the checkpoints before it untouched."""
    try:
        yield
    except (Exception, dcp_error()) as error:  # noqa: BLE001 - torch.save, safetensors, DCP raise their own kinds
        full = disk_full(error, final)
        if full is None:
            raise
        shutil.rmtree(temporary, ignore_errors=True)
        raise full from None


def prune(output_dir: str, keep: int, protected: set[str], trusted: set[str], step: int = -1) -> None:
    """Main process, after a save is in place: drop what crashed saves left behind, and every
    checkpoint older than the newest `keep` (0: all) trusted ones, except the `protected` (the one
    just written, the one the run resumed from, the best). Trusted: verified at the resume, or
    written by this run; a checkpoint that is neither is never counted towards `keep`, so a damaged
    one cannot push the last intact ones out. `step`: the save this follows."""
    root = os.path.join(output_dir, "checkpoints")
    for leftover in glob.glob(os.path.join(root, ".tmp-*")) + glob.glob(os.path.join(root, ".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep == 0:
        return
    counted = 0
    for path in reversed(checkpoint_dirs(output_dir)):  # newest first
        path = os.path.abspath(path)
        if counted >= keep and path not in protected:
            shutil.rmtree(path)
            _injected_kill(step, "pruning")
        elif path in trusted:
            counted += 1
    durable.fsync_path(root)


def set_aside_after(output_dir: str, resumed: str, step: int, best: dict, log=print) -> None:
    """Main process, resuming from step `step`: the checkpoints after it (and the torn ones a crash
    left) belong to an abandoned branch of the run's history. They move to checkpoints/abandoned/,
    so that `--resume=auto` never returns to them and pruning never counts them; best.json is
    rewritten from the resumed state (or removed) so that it names a checkpoint of this branch."""
    root = os.path.join(output_dir, "checkpoints")
    later = [
        path
        for path in glob.glob(os.path.join(root, "step-*"))
        if _step_of(path) is not None
        and _step_of(path) > step
        and os.path.abspath(path) != os.path.abspath(resumed)
    ]
    if later:
        aside = os.path.join(root, ABANDONED_DIR)
        os.makedirs(aside, exist_ok=True)
        for path in sorted(later, key=_step_of):
            target = os.path.join(aside, os.path.basename(path))
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(aside, f"{os.path.basename(path)}.{suffix}"), suffix + 1
            os.replace(path, target)
        durable.fsync_path(root)
        log(
            f"note: resuming from step {step}: {len(later)} later checkpoint(s) ("
            + ", ".join(os.path.basename(p) for p in sorted(later, key=_step_of))
            + f") moved to {os.path.join(root, ABANDONED_DIR)}; --resume=auto continues this run's new branch"
        )
    best_file = os.path.join(root, BEST_FILE)
    if os.path.exists(best_file):
        best_step = best.get("step") if isinstance(best, dict) else None
        if isinstance(best_step, int) and os.path.isdir(os.path.join(root, f"step-{best_step:08d}")):
            write_best(output_dir, best)
        else:
            os.remove(best_file)


def _step_of(path: str) -> int | None:
    digits = os.path.basename(path).removeprefix("step-")
    return int(digits) if digits.isdigit() else None


def write_best(output_dir: str, best: dict) -> None:
    """checkpoints/best.json: the best evaluation so far and its checkpoint directory (durable)."""
    root = os.path.join(output_dir, "checkpoints")
    record = {**best, "checkpoint": os.path.join(root, f"step-{best['step']:08d}")}
    durable.write_json(os.path.join(root, BEST_FILE), record, indent=1)


def read_best(path: str) -> dict:
    """A best.json, validated: {"metric", "value", "step", "checkpoint"}; ConfigError if damaged."""
    try:
        with open(path, "rb") as f:
            best = json.load(f)
        if not (
            isinstance(best, dict)
            and isinstance(best.get("step"), int)
            and isinstance(best.get("checkpoint"), str)
            and isinstance(best.get("metric"), str)
            and isinstance(best.get("value"), (int, float))
        ):
            raise ValueError("not a best.json record")
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path} is damaged ({error}); pass a checkpoints/step-* directory instead"
        ) from None
    return best


def resolve_best(source: str, output_dir: str = "") -> str:
    """The checkpoint directory a best.json names, for `best` (output_dir's run), `RUN_DIR/best` or a
    path to a best.json; any other source unchanged. The directory is the step-N beside the
    best.json (a run moved elsewhere still resolves), checked against its manifest."""
    if source == "best":
        if not output_dir:
            raise ConfigError("'best' names the best checkpoint of a run: pass RUN_DIR/best")
        path, run = os.path.join(output_dir, "checkpoints", BEST_FILE), output_dir
    elif os.path.basename(source.rstrip("/")) == "best" and not os.path.exists(source):
        run = os.path.dirname(source.rstrip("/")) or "."
        path = os.path.join(run, "checkpoints", BEST_FILE)
    elif os.path.basename(source) == BEST_FILE:
        path, run = source, os.path.dirname(os.path.dirname(os.path.abspath(source)))
    else:
        return source
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path} not found: {run} has no best checkpoint (no launcher run there, or it never "
            "evaluated); pass the run's directory or one of its checkpoints/step-* directories"
        )
    best = read_best(path)
    checkpoint = os.path.join(os.path.dirname(path), f"step-{best['step']:08d}")
    if not os.path.isdir(checkpoint):
        raise ConfigError(
            f"{path} names step {best['step']}, whose checkpoint {checkpoint} is gone; pass the run's "
            "directory or another checkpoints/step-* directory"
        )
    problem = verify(checkpoint)
    if problem is not None:
        raise ConfigError(
            f"the best checkpoint {checkpoint} is damaged ({problem}); pass the run's directory or "
            "another checkpoints/step-* directory"
        )
    return checkpoint


def read_state(path: str) -> dict:
    """A checkpoint's trainer_state.json, validated (a dict with an integer step and epoch). A
    checkpoint of an older launcher (pickled states) is refused here, before the run builds anything."""
    state_files.refuse_pickled(path)
    return _read_state_json(path)


def _read_state_json(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_FILE), "rb") as f:
            state = json.load(f)
        if not (
            isinstance(state, dict)
            and isinstance(state.get("step"), int)
            and state["step"] >= 0
            and isinstance(state.get("epoch", 0), int)
            and isinstance(state.get("config", {}), dict)
        ):
            raise ValueError("not a launcher trainer state")
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"checkpoint {path} cannot be loaded ({STATE_FILE}: {error}); "
            "resume from another checkpoint or start a new --output_dir"
        ) from None
    return state


def load(
    accelerator: Accelerator,
    path: str,
    sharded: bool = False,
    read_shards=None,
    frozen_base: frozenset[str] = frozenset(),
) -> tuple[dict, dict | None]:
    """(trainer state, this rank's state or None if the checkpoint has none for it); then
    `read_shards(path)` loads an FSDP checkpoint's DCP files. `frozen_base`: what a PEFT model's
    checkpoint leaves out."""
    has_shards = os.path.isdir(os.path.join(path, SHARDED_DIR))
    if has_shards != sharded:
        written, wanted = ("fsdp", "ddp") if has_shards else ("ddp", "fsdp")
        raise ConfigError(
            f"checkpoint {path} was written with --data_parallel={written}, this run has "
            f"--data_parallel={wanted}; resume with --data_parallel={written}"
        )
    state = read_state(path)
    try:
        rank_file = os.path.join(path, f"rank-{accelerator.process_index}.json")
        rank_state = None
        if os.path.isfile(rank_file):
            with open(rank_file) as f:
                rank_state = json.load(f)
        state_files.read(accelerator, path, frozen_base)
        if read_shards is not None:
            read_shards(path)
    except ConfigError:
        raise  # one line already, naming the checkpoint
    except (Exception, dcp_error()) as error:  # noqa: BLE001 - any failure here means an unusable checkpoint
        cause = first_cause(error)  # DCP's CheckpointException wraps each rank's error
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(
            f"checkpoint {path} cannot be loaded ({reason}); "
            "resume from another checkpoint or start a new --output_dir"
        ) from error
    return state, rank_state
