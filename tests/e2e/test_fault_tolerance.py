"""Fault tolerance end to end: a crash mid-save, SIGKILL at an arbitrary step, SIGUSR1/SIGTERM
preemption, non-finite losses, pruning, resuming on a different number of processes, restarts
under torchrun after a rank or a DataLoader worker dies, the hang watchdog, and a full disk."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    MLP_RECIPE,
    ROOT,
    child_env,
    children,
    launcher,
    launcher_children,
    launcher_command,
    metrics,
    planted_pickle,
    start_launcher,
    wait_for_step,
)
from launcher.runtime import checkpoints

NAN_RECIPE = str(ROOT / "tests" / "recipes" / "nan_digits.py")
STEPS_PER_EPOCH = {1: 89, 2: 44}  # digits train split (1438) // (batch 16 x processes)


def same_weights(a, b) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def steps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


class ReferenceRuns(dict):
    """processes -> the reference run, uninterrupted: 2 epochs with 2 DataLoader workers; each
    trained when first asked for (`make test-lowest` asks only for the 2-process one)."""

    def __init__(self, digits, tmp_path_factory):
        super().__init__()
        self.digits, self.tmp_path_factory = digits, tmp_path_factory

    def __missing__(self, processes: int):
        out = self.tmp_path_factory.mktemp("reference") / f"p{processes}"
        launcher(
            MLP_RECIPE,
            f"--data_dir={self.digits}",
            f"--output_dir={out}",
            "--num_workers=2",
            "--checkpoint_every=10",
            processes=processes,
        )
        self[processes] = out
        return out


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    return ReferenceRuns(digits, tmp_path_factory)


def test_checkpoints_are_pruned_to_the_newest_k_plus_the_best(uninterrupted):
    out = uninterrupted[1]
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    top1 = {m["step"]: m["val/top1"] for m in metrics(out) if "val/top1" in m}
    assert best["step"] == max(top1, key=lambda s: (top1[s], -s)) and best["value"] == top1[best["step"]]
    newest = [f"step-{s:08d}" for s in (160, 170, 178)]  # every 10 steps and each epoch end (89, 178)
    assert steps(out) == sorted({*newest, f"step-{best['step']:08d}", "best.json"})


def test_a_crash_mid_save_keeps_the_previous_checkpoint_and_resume_matches(digits, tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    args = [
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--checkpoint_every=10",
    ]
    env = dict(child_env(), LAUNCHER_TEST_KILL_DURING_SAVE="30")
    crashed = launcher(*args, env=env, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert steps(out) == [".tmp-step-00000030", "step-00000010", "step-00000020"]
    # torn: no trainer_state
    assert (out / "checkpoints" / ".tmp-step-00000030" / "model.safetensors").exists()
    resumed = launcher(*args, "--resume=auto")
    assert "resumed from" in resumed.stdout and "step-00000020 at step 20" in resumed.stdout
    assert ".tmp-step-00000030" not in steps(out)  # swept once a new checkpoint was complete
    assert same_weights(out, uninterrupted[1])
    logged = [m["step"] for m in metrics(out) if "lr/all" in m]
    assert logged == list(range(1, 179))  # steps 21-30, logged before the crash, logged once


# lowest: Accelerate 1.1's prepared objects and step counter, numpy 1.26's RNG state (state_files)
@pytest.mark.parametrize("processes, kill_after", [(1, 37), pytest.param(2, 23, marks=pytest.mark.lowest)])
def test_sigkill_at_any_step_then_resume_auto_is_bitwise_identical(
    digits, tmp_path, uninterrupted, processes, kill_after
):
    out = tmp_path / "killed"
    args = [
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--checkpoint_every=10",
    ]
    run = start_launcher(*args, processes=processes, log=tmp_path / "killed.log")
    wait_for_step(out, kill_after, run)
    holder = json.loads((out / "run.lock").read_text())
    if processes == 1:  # a second run into the same output_dir, while the first trains, is refused
        second = launcher(*args, "--resume=auto", check=False)
        assert second.returncode == 2 and f"is in use by another run (pid {holder['pid']} on" in second.stderr
    for rank in launcher_children(run.pid):  # torchrun starts its ranks in sessions of their own
        os.kill(rank, signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    # and the newest checkpoint torn on disk (a lost block): resume=auto falls back to the one before
    complete = [p for p in steps(out) if p.startswith("step-")]
    torn = out / "checkpoints" / complete[-1] / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[:-64])
    resumed = launcher(*args, "--resume=auto", processes=processes)
    assert f"skips checkpoint {torn.parent}: model.safetensors has" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / complete[-2]}" in resumed.stdout
    # the killed run's
    assert f"note: taking over {out / 'run.lock'} from pid {holder['pid']}" in resumed.stdout
    assert not (out / "run.lock").exists()  # released at the end
    assert same_weights(out, uninterrupted[processes])


# lowest: gloo shutdown (docs/known-problems.md#the-gil-at-shutdown: torch up to 2.7)
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGUSR1, marks=pytest.mark.lowest), signal.SIGTERM])
def test_a_signal_to_one_rank_checkpoints_every_rank_at_the_same_step_and_exits_75(
    digits, tmp_path, uninterrupted, signum
):
    out = tmp_path / "preempted"
    args = [
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--checkpoint_every=10",
    ]
    run = start_launcher(*args, processes=2, log=tmp_path / "preempted.log")
    wait_for_step(out, 15, run)
    rank_pids = launcher_children(run.pid)
    assert len(rank_pids) == 2
    os.kill(rank_pids[1], signum)  # only one rank hears it
    run.wait(timeout=120)
    log = (tmp_path / "preempted.log").read_text()
    assert "exitcode  : 75" in log and f"launcher: stopped: {signum.name} at step" in log
    stopped_at = int(log.split(f"{signum.name} at step ")[1].split(":")[0])
    assert 15 <= stopped_at < 2 * STEPS_PER_EPOCH[2] and f"step-{stopped_at:08d}" in steps(out)
    for rank in range(2):  # both ranks saved their data position at that step
        position = json.loads(
            (out / "checkpoints" / f"step-{stopped_at:08d}" / f"rank-{rank}.json").read_text()
        )
        assert (
            position["batches"] == stopped_at % STEPS_PER_EPOCH[2]
            or position["batches"] == STEPS_PER_EPOCH[2]
        )
    launcher(*args, "--resume=auto", processes=2)
    assert same_weights(out, uninterrupted[2])


def test_sigusr1_outside_slurm_exits_75_with_a_line_saying_how_to_continue(digits, tmp_path):
    out = tmp_path / "single"
    run = start_launcher(
        MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", log=tmp_path / "single.log"
    )
    wait_for_step(out, 5, run)
    run.send_signal(signal.SIGUSR1)
    assert run.wait(timeout=60) == 75
    last = (tmp_path / "single.log").read_text().strip().splitlines()[-1]
    assert last.startswith("launcher: stopped: SIGUSR1 at step") and last.endswith(
        "rerun with --resume=auto to continue"
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_a_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(digits, tmp_path, processes):
    out = tmp_path / "nan"
    result = launcher(
        NAN_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--nan_step=7",
        "--checkpoint_every=3",
        processes=processes,
        check=False,
    )
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if line.startswith("launcher: stopped:"))
    assert message.startswith("launcher: stopped: step 7: loss nan") and "step-00000006" in message
    # noted on the device, it stops at the next checkpoint (step 9) or log line, before either
    stopped_at = int(message.split("stopped at step ")[1].split()[0])
    assert 7 <= stopped_at <= 9
    assert steps(out) == ["step-00000003", "step-00000006"] and not (out / "model.safetensors").exists()
    losses = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_a_nonfinite_loss_can_be_skipped_and_counted(digits, tmp_path):
    out = tmp_path / "skip"
    launcher(
        NAN_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--nan_step=7",
        "--nonfinite=skip",
        "--epochs=1",
    )
    logged = metrics(out)
    assert [m["train/skipped_steps"] for m in logged if "train/skipped_steps" in m][-1] == 1
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [m["val/top1"] for m in logged if "val/top1" in m][0] > 0.8


def test_resuming_on_fewer_processes_keeps_the_global_batch(digits, tmp_path):
    out = tmp_path / "shrink"
    args = [MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", "--batch_size=8"]
    launcher(*args, "--epochs=1", processes=2)
    note = "resuming on 1 process(es) instead of 2: grad_accum_steps 1 -> 2 keeps the global batch of 16"
    args += ["--resume_changes=allow"]  # --epochs=2: one more epoch
    plan = launcher("plan", *args, "--epochs=2", "--resume=auto", "--world_size=1")
    assert note in plan.stdout and "8 per device x 1 processes x 2 accumulation = 16 global" in plan.stdout
    odd = launcher(*args, "--epochs=2", "--resume=auto", "--batch_size=5", check=False)
    assert odd.returncode == 2 and len(odd.stderr.strip().splitlines()) == 1
    assert "global batch of 16" in odd.stderr and "choose a --batch_size that divides 16" in odd.stderr
    resumed = launcher(*args, "--epochs=2", "--resume=auto")
    assert note in resumed.stdout
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [89, 178]  # the same steps per epoch


def test_an_incompatible_checkpoint_is_a_one_line_error(digits, tmp_path, uninterrupted):
    checkpoint = sorted((uninterrupted[1] / "checkpoints").glob("step-*"))[-1]
    result = launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={tmp_path / 'other'}",
        "--hidden=32",
        f"--resume={checkpoint}",
        "--resume_changes=allow",
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and f"checkpoint {checkpoint} does not fit the model (1.weight is (64, 192)" in lines[0]
    )
    assert "it was trained with --hidden=64 (here 32)" in lines[0]


def test_a_pickle_planted_in_the_newest_checkpoint_runs_nothing_and_is_refused_in_one_line(
    digits, tmp_path, uninterrupted
):
    """Accelerate's custom_checkpoint_0.pkl (loaded with weights_only=False), put into the newest
    checkpoint with its manifest rewritten to match: --resume=auto refuses the checkpoint as an older
    launcher's, and nothing in it runs."""
    import shutil

    out, marker = tmp_path / "planted", tmp_path / "ran"
    shutil.copytree(uninterrupted[1], out)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    (newest / "custom_checkpoint_0.pkl").write_bytes(planted_pickle(marker))
    checkpoints.write_manifest(str(newest))
    result = launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--epochs=3",
        "--resume=auto",
        check=False,
    )
    assert result.returncode == 2 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and f"checkpoint {newest} was written by an older launcher: its states are pickled" in lines[0]
    )
    assert f"start a new --output_dir with --weights={newest}/model.safetensors" in lines[0]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


def test_a_killed_rank_then_a_killed_worker_restart_under_max_restarts_to_bitwise_the_same_weights(
    digits, tmp_path, uninterrupted
):
    out, log = tmp_path / "restarted", tmp_path / "restarted.log"
    args = [
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--checkpoint_every=10",
        "--resume=auto",
    ]
    run = start_launcher(*args, processes=2, restarts=2, log=log)
    wait_for_step(out, 13, run)
    first = launcher_children(run.pid)
    os.kill(first[1], signal.SIGKILL)  # a rank
    # torchrun restarts both ranks; they resume from step 10 and train on
    wait_for(
        lambda: (
            (ranks := launcher_children(run.pid))
            and not set(ranks) & set(first)
            and log.read_text().count("resumed from") == 1
        ),
        run,
        "restart",
    )
    wait_for_step(out, 30, run)
    rank = launcher_children(run.pid)[0]
    workers = children(rank)
    os.kill(workers[-1], signal.SIGKILL)  # a DataLoader worker, as the OOM killer would
    assert run.wait(timeout=240) == 0
    text = log.read_text()
    # Each time the rank that was left says why in one line: its peer is gone, or torchrun's SIGTERM
    # to its process group ended its workers first; then the killed worker's rank names it.
    stopped = [
        line.split("launcher: stopped: ", 1)[1] for line in text.splitlines() if "launcher: stopped: " in line
    ]
    assert len(stopped) == 3 and all(line.startswith("rank ") for line in stopped)
    assert (
        "lost contact with the other processes at step 1" in stopped[0] or "DataLoader worker" in stopped[0]
    )  # ended by torchrun's SIGTERM to the survivor's processes
    assert any(
        (
            f"(pid {workers[-1]}) of the training data ended at step" in line
            or "a DataLoader worker ended" in line
        )
        and "the kernel's out-of-memory killer" in line
        for line in stopped
    ), stopped
    assert not any(marker in text for marker in ("gloo/transport", "ProcessGroupGloo", "connectFullMesh"))
    assert text.count("resumed from") == 2
    assert same_weights(out, uninterrupted[2])


def test_a_frozen_rank_is_ended_by_the_watchdog_of_the_rank_waiting_for_it(digits, tmp_path):
    out, log = tmp_path / "hung", tmp_path / "hung.log"
    env = dict(child_env(), LAUNCHER_TEST_HANG_AT="1:4")  # rank 1 stops itself (SIGSTOP) after step 4
    run = start_launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--hang_timeout_s=2",
        processes=2,
        log=log,
        env=env,
    )
    stacks = out / "hangs" / "rank0-step4.txt"
    wait_for(stacks.exists, run, stacks.name)
    wait_for(lambda: len(launcher_children(run.pid)) == 1, run, "rank 0's exit")
    os.kill(launcher_children(run.pid)[0], signal.SIGCONT)  # rank 1 goes on, and finds rank 0 gone
    run.wait(timeout=120)
    text = log.read_text()
    hung = [
        "launcher: hung:" + line.split("launcher: hung:", 1)[1]
        for line in text.splitlines()
        if "launcher: hung:" in line
    ]
    assert len(hung) == 1  # rank 1, stopped and then resumed, is not taken for hung
    line = hung[0]
    assert line.startswith("launcher: hung: rank 0: no optimizer step, evaluation or save progressed for")
    assert line.endswith(f"at step 4 (--hang_timeout_s=2); every thread's stack is in {stacks}")
    dump = stacks.read_text()
    assert "Current thread" in dump and "launcher/train/trainer.py" in dump and "train_step" in dump
    assert "exitcode  : 124" in text
    assert "launcher: stopped: rank 1: lost contact with the other processes at step 4" in text


def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_checkpoints_before(
    digits, tmp_path, uninterrupted
):
    """On a tmpfs made for the test (in a user and mount namespace of its own) with room for the
    run's files and one checkpoint, the second save fills it. Where no namespace can mount one,
    the save fails as a full disk would (LAUNCHER_TEST_DISK_FULL_AT)."""
    checkpoint = sorted((uninterrupted[1] / "checkpoints").glob("step-*"))[-1]
    # tmpfs counts pages
    size = sum(f.stat().st_blocks * 512 for f in checkpoint.iterdir()) * 3 // 2 + 64 * 1024
    mount, kept, code, err = tmp_path / "small", tmp_path / "kept", tmp_path / "code", tmp_path / "err"
    mount.mkdir()
    train = launcher_command(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={mount / 'run'}",
        "--checkpoint_every=10",
        "--max_steps=25",
    )
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 99; {' '.join(map(str, train))} 2> {err}; "
        f"echo $? > {code}; cp -a {mount / 'run'} {kept}"
    )
    mounted = (
        subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            cwd=ROOT,
            env=child_env(),
            timeout=180,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )
    if not mounted:
        result = subprocess.run(
            train,
            cwd=ROOT,
            env=dict(child_env(), LAUNCHER_TEST_DISK_FULL_AT="20"),
            capture_output=True,
            text=True,
            timeout=180,
        )
        code.write_text(str(result.returncode))
        err.write_text(result.stderr)
        kept = mount / "run"
    assert code.read_text().strip() == "74"
    error = err.read_text().strip().splitlines()
    assert (
        error[-1].startswith(
            f"launcher: stopped: no space left writing checkpoint {mount / 'run'}/checkpoints/step-00000020 ("
        )
        and "MiB free there); the checkpoints before it are intact" in error[-1]
    )
    assert steps(kept) == ["step-00000010"]  # no temporary directory left
    assert checkpoints.verify(str(kept / "checkpoints" / "step-00000010")) is None
