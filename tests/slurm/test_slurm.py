"""scripts/slurm/train.sbatch on a real two-node Slurm cluster (tests/slurm_cluster.py): a job
trains to the end; the same job signalled with USR1 mid-run checkpoints, requeues itself, resumes
and ends with the same final weights, in the same wandb run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import MLP_RECIPE, ROOT, child_env
from slurm_cluster import SlurmCluster, cannot_install

# Above wait_for_job's own limits, so a job that does not end fails with its diagnostics.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cannot_install()
    if reason and os.environ.get("LAUNCHER_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason}; LAUNCHER_REQUIRE_SLURM=1 (as in CI) requires the Slurm tests to run")
    if reason:
        pytest.skip(f"{reason} (LAUNCHER_REQUIRE_SLURM=1 turns this skip into a failure)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(cluster: SlurmCluster, digits, out, *args) -> str:
    env = dict(child_env(), SLURM_CONF=str(cluster.conf), LAUNCHER_PYTHON=sys.executable)
    result = cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        f"--chdir={ROOT}",
        f"--output={out}.log",
        str(ROOT / "scripts" / "slurm" / "train.sbatch"),
        MLP_RECIPE,
        f"--data_dir={digits}",
        f"--output_dir={out}",
        "--epochs=6",
        "--num_workers=1",
        "--wandb_mode=offline",
        *args,
        env=env,
    )
    return result.stdout.strip().split(";")[0]


def wandb_run_ids(out) -> set[str]:
    return {path.name.rsplit("-", 1)[-1] for path in (out / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def uninterrupted(cluster, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs") / "whole"
    job = submit(cluster, digits, out)
    return out, job, cluster.wait_for_job(job, job_log=out.parent / "whole.log")


def test_a_two_node_job_trains_to_the_end(uninterrupted):
    out, job, info = uninterrupted
    log = (out.parent / "whole.log").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "world size            2 process(es)" in log and "done: 264 optimizer steps" in log
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas["parameter_checksums"]) == 2 and replicas["identical"] is True
    environment = json.loads((out / "environment.json").read_text())
    assert environment["world_size"] == 2


def test_usr1_checkpoints_requeues_resumes_and_matches_the_uninterrupted_job(
    cluster, digits, uninterrupted, tmp_path
):
    out = tmp_path / "preempted"
    job = submit(cluster, digits, out)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    job_log = tmp_path / "preempted.log"
    while not (
        metrics.exists()
        and any(
            json.loads(line).get("step", 0) >= 30
            for line in metrics.read_text().splitlines()
            if line.endswith("}")
        )
    ):
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            cluster.diagnostics(job, job_log)
        )
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 does before the limit
    while (info := cluster.job(job)).get("Restarts", "0") == "0" or info["JobState"] != "PENDING":
        assert time.monotonic() < deadline, cluster.diagnostics(job, job_log)
        time.sleep(0.2)
    cluster.start_requeued(job)
    info = cluster.wait_for_job(job, job_log=job_log)
    log = job_log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", cluster.diagnostics(job, job_log)
    assert "train.sbatch: SIGUSR1, passing it to the training processes" in log
    assert "launcher: stopped: SIGUSR1 at step " in log, log[-6000:]
    stopped = log.split("launcher: stopped: SIGUSR1 at step ")[1].split("\n")[0]
    assert f"requeueing Slurm job {job}: it resumes from this checkpoint" in stopped, stopped
    stopped_at = int(stopped.split(":")[0])
    assert f"at step {stopped_at}, epoch" in log.split("resumed from")[1], log[-3000:]
    whole = load_file(str(uninterrupted[0] / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2 and len(wandb_run_ids(out)) == 1


REQUEUE_JOB = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then echo restarted; exit 0; fi
srun --ntasks=1 "$LAUNCHER_PYTHON" -c '
import signal
from launcher.runtime.preemption import StopSignals, requeue_slurm_job, slurm_job_to_requeue
signals = StopSignals(world_size=1)
said = requeue_slurm_job(slurm_job_to_requeue(signal.SIGUSR1)) or "requeued"
print("said:", said, "| recorded:", signal.Signals(signals.received).name, flush=True)
'
"""


def test_the_requeue_is_reported_even_when_its_sigterm_reaches_scontrol_first(cluster, tmp_path):
    # A requeue sends SIGTERM to every process of the job, the scontrol that asked for it included.
    # This scontrol stays alive 3 s after the real one returns, so that SIGTERM always lands first
    # (on a busy CI node it did now and then, and the log said the requeue had failed).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\n{shutil.which("scontrol")} "$@"\nstatus=$?\nsleep 3\nexit $status\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    script, log = tmp_path / "requeue.sh", tmp_path / "requeue.log"
    script.write_text(REQUEUE_JOB)
    env = dict(
        child_env(),
        SLURM_CONF=str(cluster.conf),
        LAUNCHER_PYTHON=sys.executable,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
    )
    job = (
        cluster.run("sbatch", "--parsable", "--nodes=1", f"--output={log}", str(script), env=env)
        .stdout.strip()
        .split(";")[0]
    )
    deadline = time.monotonic() + 120
    while (info := cluster.job(job)).get("Restarts", "0") == "0" or info["JobState"] != "PENDING":
        assert time.monotonic() < deadline, cluster.diagnostics(job, log)
        time.sleep(0.2)
    cluster.run("scancel", job, check=False)
    said = log.read_text(errors="replace").split("said: ")[1].split("\n")[0]
    assert said == "requeued | recorded: SIGTERM"
