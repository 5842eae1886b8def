"""Processes, for the scripts and the tests that start launches: a free port for a rendezvous, and
the processes a launch started (its ranks, their DataLoader workers)."""

from __future__ import annotations

import socket
import subprocess


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
