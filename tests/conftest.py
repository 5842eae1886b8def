"""Shared fixtures: the digits shards (built once per session), and running the CLI for real (in
processes of its own: forked from a zygote that has imported everything, or started afresh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One intra-op thread for torch in the tests and every run they start (set before anything imports
# torch): several runs share the cores at once (pytest workers, ranks), and with torch's default of
# one OpenMP thread per core their threads spin-wait for each other. Three AlexNet runs at once on
# 2 cores took 3.4x as long as with one thread each (115 s against 33 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts/processes.py, shared with the scripts that start launches
from scripts.processes import children, free_port, launcher_children  # noqa: E402,F401
from scripts.processes import launch_command as launcher_command  # noqa: E402

MLP_RECIPE = str(ROOT / "tests" / "recipes" / "mlp_digits.py")
# The wandb CLI that reads runs back (`wandb leet inspect`): the one beside this Python, or
# $LAUNCHER_TEST_WANDB. `make test-lowest` runs with wandb 0.19.5, which has no `leet`, so it
# points this at .venv's newer CLI; it reads the older runs' files the same way.
WANDB = os.environ.get("LAUNCHER_TEST_WANDB") or str(Path(sys.executable).with_name("wandb"))


TIERS = {"unit": (), "e2e": ("e2e",), "slurm": ("e2e", "slurm")}  # tests/<tier>/: the marks its tests get


def pytest_collection_modifyitems(items) -> None:
    """A test's tier is its directory: tests/e2e and tests/slurm are marked `e2e` (and `slurm`), so
    `-m "not e2e or lowest"` (make test-lowest) selects by tier."""
    for item in items:
        tier = item.path.parent.name
        for mark in TIERS.get(tier, ()):
            item.add_marker(mark)


def built_data(tmp_path_factory, script: str, name: str) -> Path:
    """The data a script of scripts/ writes (`--out DIR`), in a fresh temporary directory."""
    out = tmp_path_factory.mktemp(name)
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The demo's digits shards (built once per session)."""
    return built_data(tmp_path_factory, "make_demo_data.py", "digits")


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> Path:
    """Byte-level text shards of standard-library source, for recipes/char_lm (built once per session)."""
    return built_data(tmp_path_factory, "make_text_shards.py", "text")


def metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged record."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Planted:
    """Unpickled, it creates the file `marker`: a planted pickle runs anything so."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def planted_pickle(marker) -> bytes:
    import pickle

    return pickle.dumps(Planted(marker))


def spawn_or_fail(
    fn, args: tuple, nprocs: int = 2, timeout: float = 120, start_method: str = "spawn"
) -> None:
    """torch.multiprocessing.spawn, killing every rank and failing if they are not done in `timeout`
    seconds (a hang in a collective or in destroy_process_group would otherwise hold the suite).
    start_method="fork": ranks that start in milliseconds, having imported nothing again."""
    import torch.multiprocessing as mp

    ranks = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"a rank of {fn.__name__} still runs after {timeout} s")


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return env


def launcher(*args, processes: int = 1, timeout: float = 300, check: bool = True, env=None, extra_env=None):
    """Run `python -m launcher ARGS` (or under `accelerate launch` for processes > 1). A
    single-process run with the default environment (plus `extra_env`, read by the run, not at
    import: fault injection) is forked from this worker's zygote (tests/zygote.py), which has
    imported everything once: the same CLI in a process of its own, seconds sooner.
    LAUNCHER_TEST_ZYGOTE=0 starts every run as `python -m launcher`."""
    command = launcher_command(*args, processes=processes)
    zygote = _zygote() if processes == 1 and env is None else None
    if extra_env:
        env = dict(env or child_env(), **extra_env)
    if zygote is not None:
        result = zygote.run(command, [str(a) for a in args], timeout, env)
    else:
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or child_env()
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


class Zygote:
    """This worker's tests/zygote.py: one forked child per run, its output through files."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "zygote.py")],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pending = b""
        self.ready = self._line(timeout=300) == "ready"

    def _line(self, timeout: float) -> str | None:
        """The zygote's next line, or None if none came within `timeout` seconds."""
        import select

        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                return None  # the zygote ended
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(
        self, command: list[str], argv: list[str], timeout: float, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        import signal
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            out, err = Path(directory) / "stdout", Path(directory) / "stderr"
            request = {
                "argv": argv,
                "cwd": str(ROOT),
                "env": env or child_env(),
                "stdout": str(out),
                "stderr": str(err),
            }
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            pid = json.loads(self._line(timeout=60))["pid"]
            reply = self._line(timeout)
            if reply is None:
                os.killpg(pid, signal.SIGKILL)
                self._line(timeout=60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(
                command, json.loads(reply)["code"], out.read_text(), err.read_text()
            )

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


_ZYGOTE: list = []


def _zygote() -> Zygote | None:
    if os.environ.get("LAUNCHER_TEST_ZYGOTE") == "0":
        return None
    if not _ZYGOTE:
        _ZYGOTE.append(Zygote())
    return _ZYGOTE[0] if _ZYGOTE[0].ready else None


def pytest_sessionfinish(session) -> None:
    for zygote in _ZYGOTE:
        zygote.close()


def start_launcher(*args, log: Path, processes: int = 1, env=None, restarts: int = 0) -> subprocess.Popen:
    """The CLI in the background, in a session of its own (so a test can signal or kill all of it);
    stdout and stderr go to `log` (a pipe would fill up and block it). `restarts`: torchrun's
    --max_restarts, through accelerate launch."""
    with open(log, "w") as out:
        return subprocess.Popen(
            launcher_command(*args, processes=processes, restarts=restarts),
            cwd=ROOT,
            env=env or child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl has a record at or past `step` (every optimizer step logs its LR)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step
            for line in path.read_text().splitlines()
            if line.endswith("}")
        ):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder: cat (jpg) and dog (png), 6 images each with one in a subfolder, one unreadable
    dog and a text file that is not an image."""
    from PIL import Image

    root = tmp_path / "images"
    for name, colour, suffix in [("cat", (200, 0, 0), "jpg"), ("dog", (0, 200, 0), "png")]:
        (root / name / "sub").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 6), colour).save(root / name / f"{name}.{i}.{suffix}")
        Image.new("RGB", (6, 6), colour).save(root / name / "sub" / f"{name}_0.{suffix}")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root
