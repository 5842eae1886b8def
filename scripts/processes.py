"""Processes, for the scripts and the tests that start launches: the command of a launch, a free
port for its rendezvous, and the processes a launch started (its ranks, their DataLoader workers)."""

from __future__ import annotations

import socket
import subprocess
import sys


def launch_command(*args, processes: int = 1, restarts: int = 0) -> list[str]:
    """`python -m launcher ARGS`, or for several processes on this machine the same under
    `accelerate launch` (a free port; no mixed precision or dynamo defaults of its own)."""
    if processes == 1:
        return [sys.executable, "-m", "launcher", *map(str, args)]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *(["--max_restarts", str(restarts)] if restarts else []),
        "-m",
        "launcher",
        *map(str, args),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def launcher_children(pid: int) -> list[int]:
    """The training processes `accelerate launch` (torchrun) started: its children running
    `-m launcher`. One that ends while it is looked at is left out."""
    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"\0-m\0launcher\0" in f.read():
                    found.append(child)
        except OSError:
            pass
    return found
