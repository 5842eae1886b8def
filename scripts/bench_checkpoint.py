"""What checking a checkpoint against its manifest costs, next to loading it.

    python scripts/bench_checkpoint.py [--width=4096 --layers=3 --repeats=5]

An MLP of `layers` width x width linear layers (3 x 4096: 50M parameters) and its AdamW state after
one step are saved as the trainer saves them (Accelerate's save_state, then manifest.json), in a
temporary directory. Then, `repeats` times in turn: `checkpoints.verify` (every file's size and
CRC-32 against the manifest, what `--resume` does first) and `checkpoints.load` (Accelerate's
load_state into the model and optimizer). The files were just written, so both read them from the
page cache: the ratio is the CPU cost of the check against the cost of loading. Reported: the
checkpoint's size, the median seconds of each, and verify / load.
"""

from __future__ import annotations

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
from launcher.runtime import checkpoints  # noqa: E402


def main(width: int = 4096, layers: int = 3, repeats: int = 5) -> None:
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # AdamW's two moments exist
    with tempfile.TemporaryDirectory() as output_dir:
        checkpoints.save(accelerator, output_dir, {"step": 1}).finish()
        path = checkpoints.checkpoint_dirs(output_dir)[-1]
        size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
        verify, load = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            assert checkpoints.verify(path) is None
            verify.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoints.load(accelerator, path)
            load.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: MLP {layers} x {width}x{width} ({params / 1e6:.1f}M parameters) and AdamW state, "
          f"{size / 2**20:.0f} MiB, {repeats} repeats, page cache warm, {torch.get_num_threads()} threads")
    print(f"verify (size and CRC-32 of every file)  {statistics.median(verify):.3f} s")
    print(f"load (Accelerate's load_state)           {statistics.median(load):.3f} s")
    print(f"verify / load                            {statistics.median(verify) / statistics.median(load):.3f}")


if __name__ == "__main__":
    fire.Fire(main)
