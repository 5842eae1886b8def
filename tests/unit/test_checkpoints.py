"""Choosing and loading checkpoints: bad paths and corrupt files are one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator

from launcher.config import ConfigError, TrainConfig
from launcher.runtime import checkpoints


def config(tmp_path, resume: str) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), output_dir=str(tmp_path / "run"), resume=resume)


def complete_checkpoint(tmp_path, step: int, body: str | None = None):
    path = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / checkpoints.STATE_FILE).write_text(body or json.dumps({"step": step, "epoch": 0}))
    return path


def test_auto_takes_the_newest_complete_checkpoint_and_ignores_partial_ones(tmp_path):
    complete_checkpoint(tmp_path, 5)
    newest = complete_checkpoint(tmp_path, 12)
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000020").mkdir()  # a save that crashed
    (tmp_path / "run" / "checkpoints" / "step-00000030").mkdir()  # no trainer_state.json
    assert checkpoints.find_resume(config(tmp_path, "auto")) == str(newest)


def test_auto_without_checkpoints_starts_fresh_and_says_so(tmp_path, capsys):
    assert checkpoints.find_resume(config(tmp_path, "auto")) is None
    assert "no checkpoint" in capsys.readouterr().out


def test_a_path_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        checkpoints.find_resume(config(tmp_path, str(tmp_path / "nowhere")))


def prepared_accelerator() -> Accelerator:
    """As in training: a model and optimizer prepared, so a checkpoint has their files to read."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    # no model or optimizer files
    path = complete_checkpoint(tmp_path, 3, json.dumps({"step": 3, "epoch": 0}))
    with pytest.raises(ConfigError, match=r"checkpoint .*step-00000003 cannot be loaded") as error:
        checkpoints.load(prepared_accelerator(), str(path))
    assert "\n" not in str(error.value)
    (path / checkpoints.STATE_FILE).write_text("{truncated")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        checkpoints.load(prepared_accelerator(), str(path))


def test_a_saved_checkpoint_loads_back(tmp_path):
    accelerator = prepared_accelerator()
    path = checkpoints.save(accelerator, str(tmp_path / "run"), {"step": 7, "epoch": 1}).finish()
    assert path.endswith("step-00000007") and not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert checkpoints.load(prepared_accelerator(), path)[0]["step"] == 7


def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path):
    accelerator = prepared_accelerator()
    out = str(tmp_path / "run")
    older = checkpoints.save(accelerator, out, {"step": 5, "epoch": 0}).finish()
    newest = checkpoints.save(accelerator, out, {"step": 9, "epoch": 0}).finish()
    manifest = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-00000009" / checkpoints.MANIFEST_FILE).read_text()
    )
    assert "model.safetensors" in manifest["files"] and checkpoints.STATE_FILE in manifest["files"]
    assert checkpoints.verify(newest) is None and checkpoints.find_resume(config(tmp_path, "auto")) == newest

    weights = tmp_path / "run" / "checkpoints" / "step-00000009" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte, the size unchanged
    weights.write_bytes(bytes(data))
    warnings = []
    assert checkpoints.find_resume(config(tmp_path, "auto"), log=warnings.append) == older
    assert warnings == [
        f"WARNING: --resume=auto skips checkpoint {newest}: model.safetensors does not match its checksum"
    ]
    weights.write_bytes(bytes(data[:-100]))  # a lost block
    assert (
        checkpoints.verify(newest)
        == f"model.safetensors has {len(data) - 100} bytes, the manifest says {len(data)}"
    )
    with pytest.raises(
        ConfigError, match=r"checkpoint .*step-00000009 is damaged \(model.safetensors has"
    ) as error:
        checkpoints.find_resume(config(tmp_path, newest))
    assert "\n" not in str(error.value)
    assert checkpoints.load(prepared_accelerator(), older)[0]["step"] == 5  # the previous one loads


def test_a_manifest_of_crc32s_from_before_xxh3_still_checks_its_files(tmp_path):
    import zlib

    path = complete_checkpoint(tmp_path, 3, body='{"step": 3}')
    (path / "model.bin").write_bytes(bytes(range(256)) * 64)
    files = {
        name: {"bytes": (path / name).stat().st_size, "crc32": zlib.crc32((path / name).read_bytes())}
        for name in (checkpoints.STATE_FILE, "model.bin")
    }
    (path / checkpoints.MANIFEST_FILE).write_text(json.dumps({"files": files}))
    assert checkpoints.verify(str(path)) is None
    data = bytearray((path / "model.bin").read_bytes())
    data[7] ^= 0x01  # one flipped bit, the size unchanged
    (path / "model.bin").write_bytes(bytes(data))
    assert checkpoints.verify(str(path)) == "model.bin does not match its checksum"


def test_best_resolves_to_the_checkpoint_best_json_names_and_refuses_a_damaged_or_missing_one(tmp_path):
    run = tmp_path / "run"
    best = complete_checkpoint(tmp_path, 7)
    checkpoints.write_best(str(run), {"metric": "val/loss", "value": 0.5, "step": 7})
    best_json = run / "checkpoints" / checkpoints.BEST_FILE
    for source, output_dir in [("best", str(run)), (f"{run}/best", ""), (str(best_json), "")]:
        assert checkpoints.resolve_best(source, output_dir) == str(best)
    assert checkpoints.resolve_best(str(run), str(run)) == str(run)  # anything else is left as it is
    with pytest.raises(ConfigError, match="has no best checkpoint"):
        checkpoints.resolve_best(f"{tmp_path}/elsewhere/best")
    best_json.write_text('{"step": 7, "checkp')
    with pytest.raises(ConfigError, match=r"best.json is damaged \("):
        checkpoints.resolve_best("best", str(run))
    checkpoints.write_best(str(run), {"metric": "val/loss", "value": 0.5, "step": 9})
    with pytest.raises(ConfigError, match=r"names step 9, whose checkpoint .*step-00000009 is gone"):
        checkpoints.resolve_best(f"{run}/best")
    (best / checkpoints.STATE_FILE).write_text("{not json")
    checkpoints.write_best(str(run), {"metric": "val/loss", "value": 0.5, "step": 7})
    with pytest.raises(ConfigError, match=r"the best checkpoint .*step-00000007 is damaged"):
        checkpoints.resolve_best(f"{run}/best")
