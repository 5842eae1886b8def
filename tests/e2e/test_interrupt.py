"""Ctrl-C end to end, as a terminal sends it (SIGINT to the foreground process group: the run and
its DataLoader workers, or `accelerate launch` alone, whose torchrun agent passes it on to the
ranks): a checkpoint at the interrupted step, one line, exit 130, no traceback, and a resume that
ends bitwise where an uninterrupted run does. The logs are files here, not terminals: plain
progress lines, no tqdm frames; --quiet keeps only the resume and final lines."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import MLP_RECIPE, child_env, launcher, launcher_children, start_launcher

STOP_AT = 3  # the step after which the main process stops itself (SIGSTOP) until the test has sent the Ctrl-C


def same_weights(a, b) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def stopped(pids: list[int]) -> int:
    """The pid of the one of `pids` that is stopped (SIGSTOP), or 0."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return pid
        except OSError:
            pass
    return 0


def interrupt(run, processes: int) -> None:
    """Wait until the main process has stopped itself after step STOP_AT (the run can then neither end
    nor run ahead before the Ctrl-C), send the Ctrl-C to the run's process group, and let it go on."""
    deadline = time.monotonic() + 120
    while not (pid := stopped([run.pid] if processes == 1 else launcher_children(run.pid))):
        assert run.poll() is None and time.monotonic() < deadline, f"no rank stopped after step {STOP_AT}"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)  # pending in the stopped process until it continues
    os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_checkpoints_says_one_line_exits_130_and_resumes_bitwise(digits, tmp_path, processes):
    args = [MLP_RECIPE, f"--data_dir={digits}", "--num_workers=2", "--max_steps=12", "--log_every=1"]
    out, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    env = dict(child_env(), LAUNCHER_TEST_HANG_AT=f"0:{STOP_AT}")
    run = start_launcher(*args, f"--output_dir={out}", processes=processes, log=log, env=env)
    interrupt(run, processes)
    assert run.wait(timeout=120) == 130
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("launcher: ")]
    assert len(said) == 1, text[-3000:]
    step = int(
        re.fullmatch(
            r"launcher: interrupted at step (\d+) \(checkpoint (.+)\); continue with --resume=auto", said[0]
        ).group(1)
    )
    assert step == STOP_AT if processes == 1 else STOP_AT <= step <= STOP_AT + 1  # 2: agreed one step later
    assert f"(checkpoint {out / 'checkpoints' / f'step-{step:08d}'})" in said[0] and os.listdir(
        out / "checkpoints"
    ) == [f"step-{step:08d}"]
    assert "Traceback" not in text and "\r" not in text  # not a terminal: lines, no tqdm frames
    assert f"step {STOP_AT}/12 (25%) loss " in text and " samples/s eta " in text
    assert not (out / "run.lock").exists()

    resumed = launcher(*args, f"--output_dir={out}", "--resume=auto", "--quiet", processes=processes)
    quiet = resumed.stdout.splitlines()  # no plan, progress or evaluation: where it resumed, and the end
    assert quiet[0].startswith(
        f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} at step {step}, epoch 0"
    )
    assert quiet[1] == "done: 12 optimizer steps" and quiet[-1].startswith("  weights "), quiet
    reference = launcher(
        *args, f"--output_dir={tmp_path / 'reference'}", "--progress=lines", processes=processes
    )
    assert "step 12/12 (100%) loss " in reference.stdout and "\r" not in reference.stdout + reference.stderr
    assert same_weights(out, tmp_path / "reference")
