"""Nothing lost, on real files: pruning by lineage, setting abandoned checkpoints aside, damaged
manifests and trainer states, durable writes that find the disk full (/dev/full), a torn metrics
line, DCP's wrapped errors, a NaN evaluation, and the watchdog that cannot write its stack file."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys

import pytest
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from launcher import durable
from launcher.config import ConfigError, TrainConfig
from launcher.runtime import checkpoints
from launcher.runtime.failures import DISK_FULL_EXIT_CODE, DiskFull, disk_full
from launcher.track.trackers import MetricsLog, write_json
from launcher.train.guards import BestMetric
from launcher.train.state import RunState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkpoint(out, step: int, manifest: bool = True) -> str:
    path = out / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / checkpoints.STATE_FILE).write_text(json.dumps({"step": step, "epoch": 0}))
    (path / "model.safetensors").write_bytes(os.urandom(64))
    if manifest:
        checkpoints.write_manifest(str(path))
    return str(path)


def present(out) -> list[int]:
    return [int(os.path.basename(p)[5:]) for p in checkpoints.checkpoint_dirs(str(out))]


def test_pruning_counts_only_trusted_checkpoints_and_keeps_the_resumed_from_the_newest_and_the_best(tmp_path):
    paths = {step: checkpoint(tmp_path, step) for step in (2, 4, 6, 8, 10)}
    # resumed from 4 (verified); wrote 6 and 8; 2 and 10 are neither (10: say, damaged, not set aside)
    checkpoints.prune(
        str(tmp_path), keep=1, protected={paths[8], paths[4]}, trusted={paths[4], paths[6], paths[8]}
    )
    # 10 was not counted: 8 stays; 6 and 2 are older than the kept ones
    assert present(tmp_path) == [4, 8, 10]
    checkpoints.prune(str(tmp_path), keep=0, protected=set(), trusted=set())
    assert present(tmp_path) == [4, 8, 10]  # keep=0 keeps all
    paths[12] = checkpoint(tmp_path, 12)
    checkpoints.prune(str(tmp_path), keep=2, protected={paths[12]}, trusted={paths[8], paths[12]})
    assert present(tmp_path) == [8, 10, 12]  # 4 no longer protected: older than the two newest trusted


def test_resuming_sets_later_checkpoints_aside_and_best_json_follows(tmp_path):
    out = tmp_path
    for step in (3, 6, 9):
        checkpoint(out, step)
    (out / "checkpoints" / "abandoned").mkdir()
    (out / "checkpoints" / "abandoned" / "step-00000009").mkdir()  # an earlier rollback's
    checkpoints.write_best(str(out), {"metric": "val/loss", "value": 0.5, "step": 9})
    said = []
    checkpoints.set_aside_after(
        str(out),
        str(out / "checkpoints" / "step-00000003"),
        3,
        {"metric": "val/loss", "value": 0.9, "step": 3},
        said.append,
    )
    assert present(out) == [3]
    assert sorted(os.listdir(out / "checkpoints" / "abandoned")) == [
        "step-00000006",
        "step-00000009",
        "step-00000009.1",
    ]
    assert len(said) == 1 and "(step-00000006, step-00000009) moved to" in said[0]
    best = checkpoints.read_best(str(out / "checkpoints" / "best.json"))
    assert best["step"] == 3 and best["checkpoint"].endswith("step-00000003")
    assert checkpoints.find_resume(TrainConfig(output_dir=str(out), resume="auto")).endswith("step-00000003")
    # a best whose checkpoint is gone: no best.json rather than one naming nothing
    checkpoints.set_aside_after(
        str(out), str(out / "checkpoints" / "step-00000003"), 3, {"step": 1}, said.append
    )
    assert not (out / "checkpoints" / "best.json").exists()


@pytest.mark.parametrize(
    "manifest",
    [
        '{"filez": {}}',
        '{"files": []}',
        "[]",
        '{"files": {"trainer_state.json": {"bytez": 1, "xxh3_64": "0"}}}',
        '{"files": {"../../etc/passwd": {"bytes": 1, "xxh3_64": "0"}, '
        '"trainer_state.json": {"bytes": 1, "xxh3_64": "0"}}}',
    ],
)
def test_a_malformed_manifest_is_a_skipped_checkpoint_not_a_traceback(tmp_path, manifest):
    older, newest = checkpoint(tmp_path, 1), checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step-00000002" / checkpoints.MANIFEST_FILE).write_text(manifest)
    said = []
    assert checkpoints.find_resume(TrainConfig(output_dir=str(tmp_path), resume="auto"), said.append) == older
    assert said[0].startswith(f"WARNING: --resume=auto skips checkpoint {newest}: manifest.json unreadable (")
    with pytest.raises(ConfigError, match="is damaged"):
        checkpoints.find_resume(TrainConfig(output_dir=str(tmp_path), resume=newest))


@pytest.mark.parametrize("state", ['{"step": "7"}', "[]", '{"step": -1}', "{trunc"])
def test_a_damaged_trainer_state_is_skipped_even_without_a_manifest(tmp_path, state):
    older, newest = checkpoint(tmp_path, 1, manifest=False), checkpoint(tmp_path, 2, manifest=False)
    (tmp_path / "checkpoints" / "step-00000002" / checkpoints.STATE_FILE).write_text(state)
    assert (
        checkpoints.find_resume(TrainConfig(output_dir=str(tmp_path), resume="auto"), lambda _: None) == older
    )
    with pytest.raises(ConfigError, match=r"trainer_state.json: .*; resume from another checkpoint"):
        checkpoints.read_state(newest)


@pytest.mark.parametrize(
    "body", ["{}", '{"step": 3}', "nope", '{"step": 3, "checkpoint": 1, "metric": "m", "value": 1}']
)
def test_a_damaged_best_json_is_one_line(tmp_path, body):
    (tmp_path / "best.json").write_text(body)
    with pytest.raises(
        ConfigError, match=r"best.json is damaged .*; pass a checkpoints/step-\* directory instead"
    ):
        checkpoints.read_best(str(tmp_path / "best.json"))


def full_disk_file(path) -> None:
    """`path` becomes /dev/full: every write to it fails with ENOSPC, as on a full disk."""
    os.symlink("/dev/full", path)


def test_a_full_disk_while_flushing_metrics_is_one_line_and_never_writes_a_record_twice(tmp_path):
    log = MetricsLog(str(tmp_path), enabled=True)
    full_disk_file(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "train/loss": 2.0}, flush=False)
    with pytest.raises(DiskFull) as stopped:
        log.write({"step": 2, "train/loss": 1.5})
    assert str(stopped.value).startswith(f"no space left writing {tmp_path / 'metrics.jsonl'} (")
    assert stopped.value.exit_code == DISK_FULL_EXIT_CODE
    os.remove(tmp_path / "metrics.jsonl")
    log.write({"step": 3, "train/loss": 1.0})  # the space is back: the failed records are not replayed
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')  # SIGKILL mid-write
    MetricsLog(str(tmp_path), enabled=True).drop_after(2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    assert "dropped 1 damaged line(s)" in capsys.readouterr().out


def test_durable_writes_that_find_the_disk_full_name_the_file_and_leave_the_old_one(tmp_path):
    write_json(str(tmp_path), "summary.json", {"steps": 1})
    original = os.path.join(str(tmp_path), f"summary.json.tmp-{os.getpid()}")
    full_disk_file(original)  # the temporary file the next write goes through
    with pytest.raises(DiskFull, match=r"no space left writing .*summary.json \("):
        write_json(str(tmp_path), "summary.json", {"steps": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 1}
    assert not os.path.lexists(original)  # the temporary removed
    durable.write_json(str(tmp_path / "x.json"), [1])
    assert json.loads((tmp_path / "x.json").read_text()) == [1]


def test_dcp_errors_are_unwrapped_a_full_disk_and_a_failed_load():
    full = CheckpointException(
        "save failed", {1: _wrap_exception(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))}
    )
    found = disk_full(full, "/tmp/run/checkpoints/step-00000004")
    assert found is not None and found.exit_code == DISK_FULL_EXIT_CODE
    other = CheckpointException("load failed", {0: _wrap_exception(ValueError("size mismatch for weight"))})
    assert disk_full(other, "/tmp") is None
    assert checkpoints.first_cause(other).args == ("size mismatch for weight",)


def test_a_nan_evaluation_never_becomes_the_best():
    state = RunState()
    best = BestMetric("val/loss", "min", patience=0, state=state)
    assert not best.update({"val/loss": math.nan}, epoch_end=True) and state.best == {}
    state.step = 1
    assert best.update({"val/loss": 2.0}, epoch_end=True) and state.best["step"] == 1
    state.step = 2
    assert not best.update({"val/loss": math.nan}, epoch_end=True) and state.best["value"] == 2.0
    state.best["value"] = math.nan  # a best written by an earlier version
    state.step = 3
    assert best.update({"val/loss": 3.0}, epoch_end=True) and state.best == {
        "metric": "val/loss",
        "value": 3.0,
        "step": 3,
    }


def test_the_watchdog_exits_124_with_its_line_even_when_it_cannot_write_the_stack_file(tmp_path):
    blocked = tmp_path / "output_is_a_file"
    blocked.write_text("")  # OUTPUT_DIR/hangs cannot be made under a file
    code = (
        f"import time; from launcher.runtime.watchdog import Watchdog\n"
        f"Watchdog(0.4, {str(blocked)!r}, 0, lambda: 7).start()\n"
        "time.sleep(30)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 124
    assert result.stderr.startswith(
        "launcher: hung: rank 0: no optimizer step, evaluation or save progressed for"
    )
    assert "at step 7 (--hang_timeout_s=0.4)" in result.stderr
