"""What checking a checkpoint against its manifest costs, next to loading it.

    python scripts/bench_checkpoint.py [--width=4096 --layers=3 --repeats=5 --out=DIR]

An MLP of `layers` width x width linear layers (3 x 4096: 50M parameters) and its AdamW state after
one step are saved as the trainer saves them (state_files.write, then manifest.json), under
`--out` (default: a temporary directory; it must not be a tmpfs). Then, `repeats` times:
- from the page cache: `checkpoints.verify` (every file's size and xxh3-64 hash against the manifest,
  what `--resume` does first) against `checkpoints.load` (state_files.read into the model and
  optimizer): the CPU cost of the check against that of loading;
- from the disk (each file's pages dropped from the cache first, posix_fadvise DONTNEED): a load
  alone against a verify followed by a load, as a resume does it: the check reads the files from
  the disk and the load then finds them in the cache, so the check adds its CPU time only.
Then, `repeats` times each, a whole save (written, put in place, older ones pruned) as the trainer
makes it, durable (every file fsynced before the rename, the directories after) against the same
save with the fsyncs left out: what durability costs on this disk.
Medians are reported.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time

import fire
import torch
from accelerate import Accelerator
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launcher import durable  # noqa: E402
from launcher.runtime import checkpoints  # noqa: E402


def evict(path: str) -> None:
    """Drop the checkpoint's files from the page cache (written back first)."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(width: int = 4096, layers: int = 3, repeats: int = 5, out: str = "") -> None:
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # AdamW's two moments exist
    with tempfile.TemporaryDirectory(dir=out or None) as output_dir:
        checkpoints.save(accelerator, output_dir, {"step": 1}).finish()
        path = checkpoints.checkpoint_dirs(output_dir)[-1]
        size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))

        def verify():
            assert checkpoints.verify(path) is None

        def load():
            checkpoints.load(accelerator, path)

        warm_verify, warm_load, cold_load, cold_both = [], [], [], []
        for _ in range(repeats):
            warm_verify.append(timed(verify))
            warm_load.append(timed(load))
            evict(path)
            cold_load.append(timed(load))
            evict(path)
            cold_both.append(timed(lambda: (verify(), load())))
        synced, unsynced = [], []
        for step in range(2, 2 + 2 * repeats, 2):
            synced.append(timed(functools.partial(saved, accelerator, output_dir, step)))
            with fsyncs_skipped():
                unsynced.append(timed(functools.partial(saved, accelerator, output_dir, step + 1)))
    median = statistics.median
    params = sum(p.numel() for p in model.parameters())
    print(
        f"checkpoint: MLP {layers} x {width}x{width} ({params / 1e6:.1f}M parameters) and AdamW state, "
        f"{size / 2**20:.0f} MiB, {repeats} repeats, {torch.get_num_threads()} threads"
    )
    print(
        f"page cache: verify {median(warm_verify):.3f} s, load {median(warm_load):.3f} s, "
        f"verify / load {median(warm_verify) / median(warm_load):.3f}"
    )
    print(
        f"disk: load {median(cold_load):.3f} s, verify then load {median(cold_both):.3f} s, "
        f"(verify then load) / load {median(cold_both) / median(cold_load):.3f}"
    )
    print(
        f"save: durable {median(synced):.3f} s, without fsync {median(unsynced):.3f} s, "
        f"durable / without {median(synced) / median(unsynced):.3f}"
    )


def saved(accelerator, output_dir: str, step: int) -> None:
    """A save as the trainer's: written, put in place, then the older ones pruned (one kept)."""
    final = checkpoints.save(accelerator, output_dir, {"step": step}).finish()
    checkpoints.prune(output_dir, 1, {os.path.abspath(final)}, {os.path.abspath(final)})


class fsyncs_skipped:
    """The launcher's fsyncs turned into nothing, for the comparison."""

    def __enter__(self):
        self.kept = durable.fsync_path
        durable.fsync_path = lambda path: None

    def __exit__(self, *exc):
        durable.fsync_path = self.kept


if __name__ == "__main__":
    fire.Fire(main)
