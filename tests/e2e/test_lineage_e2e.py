"""Nothing lost: checkpoints follow the run's lineage through crashes at each point of the save
protocol, a torn newest checkpoint and a rollback; ranks end with their launcher; FSDP's wrapped
errors keep their exit codes (a full disk 74, a failing sharded load 2)."""

from __future__ import annotations

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
    launcher,
    launcher_children,
    launcher_command,
    start_launcher,
    wait_for_step,
)
from launcher.config import TrainConfig
from launcher.runtime import checkpoints
from launcher.runtime.failures import running

ARGS = ["--max_steps=12", "--checkpoint_every=2"]


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def same_weights(a, b) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def intact(run_dir) -> list[str]:
    return [
        os.path.basename(p)
        for p in checkpoints.checkpoint_dirs(str(run_dir))
        if checkpoints.verify(p) is None
    ]


def test_killed_at_each_point_of_the_save_protocol_with_a_torn_newest_the_lineage_resumes_bitwise(
    digits, tmp_path
):
    reference, out = tmp_path / "reference", tmp_path / "run"
    launcher(MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={reference}", *ARGS)
    run = [MLP_RECIPE, f"--data_dir={digits}", f"--output_dir={out}", *ARGS]

    # Killed once step 8 is in place, before anything is pruned.
    killed = launcher(*run, "--keep_checkpoints=0", extra_env={checkpoints.KILL_AT: "8:renamed"}, check=False)
    assert killed.returncode == -signal.SIGKILL and names(out) == [f"step-{s:08d}" for s in (2, 4, 6, 8)]
    # Its newest checkpoint torn on the disk: a resume falls back to step 6 and sets step 8 aside.
    weights = out / "checkpoints" / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    # With --keep_checkpoints=1, killed while pruning after its step 10: the one it resumed from (6) and
    # its newest (10) stay; the torn one, set aside, was never counted.
    killed = launcher(
        *run,
        "--resume=auto",
        "--keep_checkpoints=1",
        extra_env={checkpoints.KILL_AT: "10:pruning"},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert "skips checkpoint" in killed.stdout and "(step-00000008) moved to" in killed.stdout
    assert os.listdir(out / "checkpoints" / checkpoints.ABANDONED_DIR) == ["step-00000008"]
    assert {"step-00000006", "step-00000010"} <= set(intact(out))
    # Killed at step 12 with every file written and none synced: no manifest, never picked.
    killed = launcher(
        *run,
        "--resume=auto",
        "--keep_checkpoints=1",
        extra_env={checkpoints.KILL_AT: "12:unsynced"},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL and "step-00000012" not in names(out)
    assert checkpoints.find_resume(TrainConfig(output_dir=str(out), resume="auto")).endswith("step-00000010")
    launcher(*run, "--resume=auto", "--keep_checkpoints=1")
    assert same_weights(out, reference)
    assert intact(out) == names(out) and names(out)[-1] == "step-00000012"

    # Rolled back to step 10 (after a divergence, say) and stopped at 11: step 12 is another branch now.
    launcher(*run, f"--resume={out / 'checkpoints' / 'step-00000010'}", "--max_steps=11")
    assert sorted(os.listdir(out / "checkpoints" / checkpoints.ABANDONED_DIR)) == [
        "step-00000008",
        "step-00000012",
    ]
    assert checkpoints.find_resume(TrainConfig(output_dir=str(out), resume="auto")).endswith("step-00000011")
    best = checkpoints.read_best(str(out / "checkpoints" / checkpoints.BEST_FILE))
    assert best["step"] == 11 and os.path.isdir(best["checkpoint"])


def test_ranks_end_when_accelerate_launch_is_killed(digits, tmp_path):
    """torchrun starts its ranks in sessions of their own: SIGKILL of `accelerate launch` reaches none."""
    out = tmp_path / "run"
    process = start_launcher(
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--max_steps=100000",
        "--epochs=1000",
        log=tmp_path / "log",
        processes=2,
    )
    ranks: list[int] = []
    try:
        wait_for_step(out, 2, process)
        ranks = launcher_children(process.pid)
        assert len(ranks) == 2
        process.kill()
        process.wait()
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(running(pid) for pid in ranks), (tmp_path / "log").read_text()[-2000:]
        assert not (out / "run.lock").exists()  # released by the main process on its way out
    finally:
        process.kill()
        for pid in ranks:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_fsdp_a_failing_sharded_load_is_2_and_a_full_disk_inside_dcp_is_74(digits, tmp_path):
    """DCP wraps every failure in CheckpointException, a BaseException: unwrapped, a sharded load that
    fails is exit 2 in one line, and a sharded save that fills the disk is exit 74 (on a tmpfs made for
    the test in a user and mount namespace of its own, with room for the run and one checkpoint)."""
    run = [MLP_RECIPE, f"--data_dir={digits}", "--data_parallel=fsdp", "--checkpoint_every=10"]
    first = tmp_path / "first"
    launcher(*run, f"--output_dir={first}", "--max_steps=10")
    saved = first / "checkpoints" / "step-00000010"
    shard = next((saved / checkpoints.SHARDED_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    os.remove(saved / checkpoints.MANIFEST_FILE)
    checkpoints.write_manifest(str(saved))  # the manifest agrees: only loading finds the damage
    failed = launcher(*run, f"--output_dir={first}", "--max_steps=12", "--resume=auto", check=False)
    assert failed.returncode == 2, failed.stderr[-2000:]
    error = failed.stderr.strip().splitlines()
    assert error[-1].startswith(f"launcher: error: checkpoint {saved} cannot be loaded (")
    assert "Traceback" not in failed.stderr

    size = sum(f.stat().st_blocks * 512 for f in saved.rglob("*") if f.is_file()) * 3 // 2 + 64 * 1024
    mount, code, err = tmp_path / "small", tmp_path / "code", tmp_path / "err"
    mount.mkdir()
    train = launcher_command(*run, f"--output_dir={mount / 'run'}", "--max_steps=25")
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 99; {' '.join(map(str, train))} 2> {err}; "
        f"echo $? > {code}; ls {mount / 'run' / 'checkpoints'} > {tmp_path / 'left'}"
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
        pytest.skip("no user and mount namespace here to make a small tmpfs in")
    assert code.read_text().strip() == "74", err.read_text()[-2000:]
    assert (
        err.read_text()
        .strip()
        .splitlines()[-1]
        .startswith(
            f"launcher: stopped: no space left writing checkpoint {mount / 'run'}/checkpoints/step-00000020 ("
        )
    )
    assert (tmp_path / "left").read_text().split() == ["step-00000010"]  # no temporary directory left
