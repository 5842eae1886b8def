"""Progress where the output is not a terminal: a plain line per logged step, the passing lines,
and --quiet, which keeps only warnings."""

from __future__ import annotations

import re

from launcher.track.progress import Progress, duration, progress_style


def test_progress_lines_where_the_output_is_not_a_terminal(capsys, tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert progress_style("auto", quiet=False, stream=log) == "lines"
        assert progress_style("bar", quiet=True, stream=log) == "off"
    progress = Progress("lines", quiet=False, total=1000, shown=True)
    progress.start(100)  # resumed at step 100
    for _ in range(20):
        progress.advance()
    progress.logged(2.3147, 3e-4, 412.4)
    progress.say("epoch 0 step 120: val/loss 2.2")
    line, said = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 120/1000 \(12%\) loss 2\.315 lr 0\.0003 412 samples/s eta \d+s", line), line
    assert said == "epoch 0 step 120: val/loss 2.2"
    quiet = Progress("off", quiet=True, total=1000, shown=True)
    quiet.start(0)
    quiet.advance()
    quiet.logged(2.0, 1e-3, 100.0)
    quiet.say("dropped")
    quiet.warn("early stop at step 1")
    assert capsys.readouterr().out == "early stop at step 1\n"
    assert [duration(s) for s in (40, 312, 3720)] == ["40s", "5m12s", "1h02m"]
