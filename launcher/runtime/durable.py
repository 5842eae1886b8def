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
import json
import os

from launcher.runtime.failures import disk_full_writing


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
            fsync_path(os.path.join(directory, name))
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
        raise disk_full_writing(error, path) or error


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
