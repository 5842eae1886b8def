"""A real two-node Slurm cluster on this machine, for the Slurm tests.

Both nodes run on loopback (slurmd -N node1 / node2 on their own ports, one CPU each), with
munged and slurmctld; configuration, state and logs live in a temporary directory (SLURM_CONF
points there, /etc/slurm is left alone). Missing Debian packages are installed first (root and
apt-get needed). Every daemon is started in the foreground as a child process and stopped by
its pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("node1", "node2")
CTLD_PORT, FIRST_NODE_PORT = 16817, 16821
PY_SPY = str(Path(sys.executable).with_name("py-spy"))  # a dev dependency


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get)."""


def installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def cannot_install() -> str:
    """Why Slurm can be neither found nor installed here ("" if it can)."""
    if installed() or (os.geteuid() == 0 and shutil.which("apt-get")):
        return ""
    return "Slurm is not installed, and installing it needs root and apt-get"


def install() -> None:
    if installed():
        return
    reason = cannot_install()
    if reason:
        raise ClusterUnavailable(reason)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # An install killed midway (a test's timeout) leaves dpkg "interrupted", refusing every
        # later install until it is finished.
        subprocess.run(["dpkg", "--configure", "-a"], env=env, capture_output=True)
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={FIRST_NODE_PORT + i} "
        "CPUs=1 State=UNKNOWN"
        for i, name in enumerate(NODES)
    )
    return f"""\
ClusterName=launchertest
SlurmctldHost={host}
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> SlurmCluster:
        install()
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root))
        self._start_munge()
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for name in NODES:
            self._daemon(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}.out")
        self._wait_for_idle_nodes()
        self._check_launch()
        return self

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving the default socket
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        self._daemon(
            [
                "munged",
                "-F",
                "--force",
                f"--log-file={self.root}/munged.log",
                f"--pid-file={self.root}/munged.pid",
                f"--seed-file={self.root}/munged.seed",
            ],
            "munged.out",
        )
        deadline = time.monotonic() + 20
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not start: {self._tail('munged.out')}")
            time.sleep(0.2)

    def _daemon(self, command: list[str], log: str) -> None:
        with open(self.root / log, "w") as out:
            self.daemons.append(subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def _wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if all(states.get(name) == "idle" for name in NODES):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(
            f"nodes not idle after {timeout} s: {result.stdout} {result.stderr} {self._tail('slurmctld.log')}"
        )

    def _check_launch(self, attempts: int = 3) -> None:
        """Idle nodes are not yet proof that a job step starts on both: run one before the tests do
        (a batch job whose launch fails is requeued and held, and would wait forever)."""
        for _ in range(attempts):
            try:
                result = self.run(
                    "srun",
                    "--nodes=2",
                    "--ntasks-per-node=1",
                    "--time=2",
                    "hostname",
                    check=False,
                    timeout=120,
                )
            except subprocess.TimeoutExpired as error:
                result = error
            if getattr(result, "returncode", None) == 0 and len(result.stdout.split()) == 2:
                return
            time.sleep(5)
        raise ClusterUnavailable(
            f"a two-node srun did not run in {attempts} attempts: {result}\n{self.diagnostics()}"
        )

    def _tail(self, name: str, chars: int = 1500) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def diagnostics(self, job_id: str | None = None, job_log: Path | None = None) -> str:
        """What to read when a job does not end: its record, the nodes and queue, the daemons' logs,
        and given the job's --output file `job_log` (the tests write OUT.log beside output
        directory OUT), its tail and the Python stacks of the job's processes."""
        parts = []
        if job_id is not None:
            parts.append(self.run("scontrol", "show", "job", job_id, check=False).stdout)
        parts.append(self.run("sinfo", "-N", "-l", check=False).stdout)
        parts.append(self.run("squeue", "-l", check=False).stdout)
        if job_log is not None and job_log.exists():
            parts.append(f"--- {job_log.name} ---\n{job_log.read_text(errors='replace')[-4000:]}")
            parts.append(stacks(str(job_log.with_suffix(""))))  # the output directory beside it
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES)):
            parts.append(f"--- {name} ---\n{self._tail(name, 2500)}")
        return "\n".join(parts)

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, env=kwargs.pop("env", self.env), capture_output=True, text=True, check=check, **kwargs
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for_job(
        self,
        job_id: str,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
        timeout: float = 400,
        job_log: Path | None = None,
    ) -> dict[str, str]:
        """The job's record once it reaches one of `states`. A job held by Slurm (its launch failed)
        or still unfinished after `timeout` s (below pytest's own limit, so this message is the one
        printed) fails with the diagnostics."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            held = "held" in info.get("Reason", "").lower() or info.get("Priority") == "0"
            if held or time.monotonic() > deadline:
                what = (
                    f"held ({info.get('Reason')})"
                    if held
                    else f"still {info.get('JobState')} after {timeout} s"
                )
                raise AssertionError(f"job {job_id} {what}\n{self.diagnostics(job_id, job_log)}")
            time.sleep(1)

    def start_requeued(self, job_id: str) -> None:
        """Start a requeued, PENDING job now rather than after Slurm's hold (Reason=BeginTime), but
        not within the second of its requeue. slurmd compares whole seconds and refuses a job
        credential issued in the same second as the one the requeue revoked: the job then fails
        without running a line ("Killing non-startable batch JobId=N: Job credential revoked")."""
        time.sleep(1)  # the revocation came before the caller saw the job PENDING
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)

    def stop(self) -> None:
        """Cancel what is still queued or running (a failed test's job would go on using the CPUs
        after the daemons are gone), then stop the daemons."""
        self.run("scancel", "--partition=test", check=False)
        deadline = time.monotonic() + 45  # KillWait=30: SIGTERM, then SIGKILL
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(1)
        for daemon in reversed(self.daemons):
            daemon.terminate()
        for daemon in reversed(self.daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons.clear()


def stacks(word: str) -> str:
    """py-spy's dump of the Python stacks of every process whose command line has `word` (a job's
    output directory names all of its processes, DataLoader workers included)."""
    dumps = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            python = "python" in os.readlink(proc / "exe")
        except OSError:
            continue
        if proc.name.isdigit() and python and word in command and "pytest" not in command:
            dump = subprocess.run(
                [PY_SPY, "dump", "--pid", proc.name], capture_output=True, text=True, timeout=60
            )
            dumps.append(f"--- pid {proc.name}: {command[:200]}\n{dump.stdout[-3000:]}{dump.stderr[-500:]}")
    return "\n".join(dumps) or f"(no process has {word!r} in its command line)"
