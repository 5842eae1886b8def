"""Restarts under torchrun, many times over: each run is killed twice and must end as if it was not.

    python scripts/soak_restarts.py [--runs=5 --kills=2 --busy=True --out=runs/soak]

Each run is 2 CPU processes (`accelerate launch --multi_gpu --num_processes 2 --max_restarts
KILLS`) of tests/recipes/mlp_digits on the demo's digits shards, one epoch with 2 DataLoader
workers per rank and a checkpoint every 10 steps, `--resume=auto`. At random steps the script
SIGKILLs a rank or one of a rank's DataLoader workers (by pid); torchrun restarts both ranks, which
resume from the newest checkpoint. A run passes when it exits 0 with bitwise the final weights of
an uninterrupted run. `--busy` keeps one more process spinning on a core meanwhile, as a loaded
node would. A run that has not ended after 400 s counts as hung and is killed. Prints one line per
run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.processes import children, launch_command, launcher_children  # noqa: E402

RECIPE = ROOT / "tests" / "recipes" / "mlp_digits.py"


def command(out: Path, data_dir: Path, restarts: int) -> list[str]:
    return launch_command(
        RECIPE,
        f"--data_dir={data_dir}",
        f"--output_dir={out}",
        "--num_workers=2",
        "--checkpoint_every=10",
        "--resume=auto",
        "--epochs=1",
        processes=2,
        restarts=restarts,
    )


def newest_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return -1
    return max(
        (json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")),
        default=-1,
    )


def kill_one(launcher_pid: int, rng: random.Random) -> str:
    """SIGKILL a rank or one of its DataLoader workers: which kind was killed ("" if none could be)."""
    kind = "rank" if rng.random() < 0.5 else "worker"
    for _ in range(100):  # a worker may end as it is picked (an epoch's end): pick again
        running = launcher_children(launcher_pid)
        targets = running if kind == "rank" else [w for rank in running for w in children(rank)]
        if targets:
            try:
                os.kill(rng.choice(targets), signal.SIGKILL)
                return kind
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return ""


def one_run(out: Path, data_dir: Path, kills: int, rng: random.Random, reference: dict) -> dict:
    started = time.monotonic()
    at = sorted(rng.sample(range(5, 40), kills))  # steps of the 44 of an epoch
    with open(out.with_suffix(".log"), "w") as log:
        run = subprocess.Popen(
            command(out, data_dir, kills),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    killed = []
    for step in at:
        while newest_step(out) < step and run.poll() is None and time.monotonic() - started < 400:
            time.sleep(0.05)
        if run.poll() is not None or not launcher_children(run.pid):
            break
        killed.append(kill_one(run.pid, rng) or "none")
        time.sleep(2)  # the restart begins: metrics.jsonl loses the steps after the checkpoint
    try:
        code = run.wait(timeout=max(1.0, 400 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        code = "hung"
        for pid in launcher_children(run.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    weights = out / "model.safetensors"
    same = weights.exists() and all(torch.equal(load_file(str(weights))[k], v) for k, v in reference.items())
    return {
        "killed": killed,
        "exit": code,
        "bitwise_equal": same,
        "seconds": round(time.monotonic() - started),
    }


def main(
    runs: int = 5,
    kills: int = 2,
    busy: bool = True,
    out: str = "runs/soak",
    data_dir: str = "",
    seed: int = 0,
) -> None:
    """Run `runs` training runs, each killed `kills` times; see the module's docstring."""
    base = Path(out).resolve()
    base.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else base / "digits"
    if not (data / "train").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(data)],
            check=True,
            capture_output=True,
        )
    reference_dir = base / "uninterrupted"
    if not (reference_dir / "model.safetensors").exists():
        subprocess.run(command(reference_dir, data, 0), cwd=ROOT, check=True, capture_output=True)
    reference = load_file(str(reference_dir / "model.safetensors"))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    rng, results = random.Random(seed), []
    try:
        for i in range(runs):
            run_dir = base / f"run{i}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            results.append(one_run(run_dir, data, kills, rng, reference))
            print(f"run {i}: {json.dumps(results[-1])}", flush=True)
    finally:
        if spinner is not None:
            spinner.kill()
    passed = sum(r["exit"] == 0 and r["bitwise_equal"] for r in results)
    restarts = sum(len(r["killed"]) for r in results)
    print(
        f"{passed} of {runs} runs ended with bitwise the uninterrupted weights, after {restarts} restarts "
        f"({sum(r['killed'].count('rank') for r in results)} ranks and "
        f"{sum(r['killed'].count('worker') for r in results)} DataLoader workers killed)"
    )
    sys.exit(0 if passed == runs else 1)


if __name__ == "__main__":
    fire.Fire(main)
