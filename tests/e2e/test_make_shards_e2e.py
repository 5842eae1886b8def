"""scripts/make_shards.py and `launcher shards` as commands: what they report, and a missing source
refused."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_cli_reports_skips_and_refuses_a_missing_source(folder, tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_shards.py"),
            str(folder),
            str(tmp_path / "out"),
            "--max_count=5",
            "--workers=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    # --max_count=5 needs 3: a power of two and "1 unreadable image(s) left out" in ok.stdout
    assert "wrote 12 samples in 4 shards" in ok.stdout
    assert "skipped unreadable image" in ok.stdout and "broken.png" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "launcher", "shards", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "neither a directory nor an importable dataset" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
