"""Writes that survive a power loss: data on disk before the rename that publishes it.

A rename is atomic, but not ordered with the data it names: after a crash, ext4 and XFS can show
the new name over an empty or partial file unless the file was fsynced first, and the rename
itself is only durable once its directory is. So every file the launcher publishes (a checkpoint's
files and manifest, best.json, summary.json, the final weights) goes temporary file -> fsync ->
rename -> fsync of the directory, and pruning older checkpoints comes only after that.
A write that finds no space left is one line naming the file (`DiskFull`, exit 74).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

from launcher.config import RunStopped

DISK_FULL_EXIT_CODE = 74  # sysexits' EX_IOERR


class DiskFull(RunStopped):
    exit_code = DISK_FULL_EXIT_CODE
    hard_exit = True  # another rank may wait for this one's files in a collective


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str) -> None:
    """fsync every file and directory under `root` (root included), deepest first. A file already on
    disk costs one system call: every rank can call this on a checkpoint it wrote parts of."""
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            try:
                fsync_path(os.path.join(directory, name))
            except FileNotFoundError:
                pass  # another rank's temporary file, renamed meanwhile: that rank syncs what it became
        fsync_path(directory)


def replace(temporary: str, final: str) -> None:
    """Publish `temporary` (a file or a directory, already synced) as `final`, durably."""
    os.replace(temporary, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def no_space_left(path: str):
    """A write under `path` that finds the disk full becomes `DiskFull` (one line naming it, exit 74)."""
    try:
        yield
    except OSError as error:
        full = disk_full_writing(error, path)
        if full is None:
            raise
        raise full from error


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path beside `path` to write to; on leaving, the file is fsynced and renamed to
    `path`. A reader sees the old file or the whole new one, also after a power loss."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with no_space_left(path):
            yield temporary
            fsync_path(temporary)
            replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """`atomic_path`, opened."""
    with atomic_path(path) as temporary, open(temporary, mode) as f:
        yield f


def publish_files(staging: str, out: str) -> None:
    """Move every file of directory `staging` (written in full) into `out`, each synced first, then
    remove `staging`: readers of `out` see whole files only. A full disk is `DiskFull`."""
    with no_space_left(out):
        for name in sorted(os.listdir(staging)):
            fsync_path(os.path.join(staging, name))
            os.replace(os.path.join(staging, name), os.path.join(out, name))
        os.rmdir(staging)
        fsync_path(out)


def write_json(path: str, value, indent: int | None = None) -> None:
    """`value` as JSON at `path`, atomically and durably."""
    with atomic_file(path) as f:
        json.dump(value, f, indent=indent)


def no_space(error: BaseException, path: str) -> float | None:
    """The MiB left under `path` if `error` is a write that found no space (or quota) left, else
    None. torch.save's zip writer says only "file write failed" or "unexpected pos", and
    safetensors wraps the OS error in its own: any error counts when the filesystem has under 1 MiB
    left. DCP wraps every rank's error in a `CheckpointException` (a BaseException): its causes count."""
    causes = [error, *_wrapped(error)]
    where = next((p for p in (path, os.path.dirname(path)) if p and os.path.exists(p)), ".")
    free = shutil.disk_usage(where).free / 2**20
    said = any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(
            marker in str(e) for marker in ("No space left on device", "Disk quota exceeded", "StorageFull")
        )
        for e in causes
    )
    return free if said or free < 1 else None


def _wrapped(error: BaseException) -> list[BaseException]:
    """The errors inside a torch.distributed.checkpoint `CheckpointException` (rank -> (error, traceback))."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    return [
        value[0] if isinstance(value, tuple) else value
        for value in failures.values()
        if isinstance(value, BaseException)
        or (isinstance(value, tuple) and value and isinstance(value[0], BaseException))
    ]


def first_cause(error: BaseException) -> BaseException:
    """The error itself, or the first one a `CheckpointException` wraps."""
    return next(iter(_wrapped(error)), error)


def disk_full_writing(error: BaseException, path: str) -> DiskFull | None:
    """The one-line error for any other write (metrics, best.json, the final weights) that found no
    space left, or None."""
    free = no_space(error, path)
    if free is None:
        return None
    return DiskFull(
        f"no space left writing {path} ({free:.1f} MiB free there); free some space or move "
        "--output_dir, then rerun with --resume=auto, which continues from the newest checkpoint"
    )
