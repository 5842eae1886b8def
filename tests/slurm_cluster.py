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
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("node1", "node2")
CTLD_PORT, FIRST_NODE_PORT = 16817, 16821


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get)."""


def install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and apt-get as root is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={FIRST_NODE_PORT + i} CPUs=1 State=UNKNOWN"
        for i, name in enumerate(NODES))
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

    def start(self) -> "SlurmCluster":
        install()
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root))
        self._start_munge()
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for name in NODES:
            self._daemon(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}.out")
        self._wait_for_idle_nodes()
        return self

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving the default socket
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        self._daemon(["munged", "-F", "--force", f"--log-file={self.root}/munged.log",
                      f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed"], "munged.out")
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
        raise ClusterUnavailable(f"nodes not idle after {timeout} s: {result.stdout} {result.stderr} "
                                 f"{self._tail('slurmctld.log')}")

    def _tail(self, name: str) -> str:
        path = self.root / name
        return path.read_text()[-1500:] if path.exists() else ""

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                     timeout: float = 600) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s")

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.terminate()
        for daemon in reversed(self.daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons.clear()
