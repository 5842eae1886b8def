"""Initial weights from each kind of source, and the errors for bad ones."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from launcher.config import ConfigError
from launcher.runtime.weights import load_weights


def resnet(classes: int):
    return torchvision.models.resnet18(weights=None, num_classes=classes)


def same(a, b) -> bool:
    return torch.equal(a, b)


@pytest.fixture
def source():
    torch.manual_seed(1)
    return resnet(5)


def check_loaded(model, source) -> None:
    assert same(model.conv1.weight, source.conv1.weight)
    assert same(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (10, 512)  # head replaced, not loaded


def test_from_a_run_directory(tmp_path, source):
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    model = resnet(10)
    report = load_weights(model, str(tmp_path), arch="resnet18", log=lambda _: None)
    check_loaded(model, source)
    assert sorted(report["replaced"]) == ["fc.bias", "fc.weight"] and report["missing"] == []


@pytest.mark.parametrize("wrap", ["plain", "module", "checkpoint"])
def test_from_a_pth_state_dict_or_checkpoint_with_prefixes(tmp_path, source, wrap):
    state = source.state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap == "checkpoint":
        state = {"model": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "w.pth")
    model = resnet(10)
    report = load_weights(model, str(tmp_path / "w.pth"), log=lambda _: None)
    check_loaded(model, source)
    # the model's names
    assert report == {"missing": [], "unexpected": [], "replaced": ["fc.bias", "fc.weight"]}


def test_shape_mismatch_outside_the_head_names_key_and_shapes(tmp_path, source):
    state = source.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(
        ConfigError, match=r"conv1.weight has shape \(64, 3, 3, 3\), the model expects \(64, 3, 7, 7\)"
    ):
        load_weights(resnet(10), str(tmp_path / "w.pt"), log=lambda _: None)


def test_uncached_torchvision_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError) as error:
        load_weights(resnet(10), "IMAGENET1K_V1", arch="resnet18")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "checkpoints") in message


def test_cached_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch, source):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = resnet(10)
    load_weights(model, "IMAGENET1K_V1", arch="resnet18", log=lambda _: None)
    check_loaded(model, source)


def test_missing_or_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="weights file nope.pth not found"):
        load_weights(resnet(10), "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_weights(resnet(10), str(tmp_path / "bad.pth"))


def test_missing_and_unexpected_keys_are_reported(tmp_path, source):
    state = source.state_dict()
    del state["layer1.0.bn1.running_mean"]
    state["aux.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    lines = []
    report = load_weights(resnet(10), str(tmp_path / "w.pth"), log=lines.append)
    assert report["missing"] == ["layer1.0.bn1.running_mean"] and report["unexpected"] == ["aux.weight"]
    assert "missing: layer1.0.bn1.running_mean; unexpected: aux.weight" in lines[0]


def test_from_a_runs_best_checkpoint(tmp_path, source):
    from launcher.runtime.checkpoints import STATE_FILE, write_best

    best = tmp_path / "run" / "checkpoints" / "step-00000004"
    best.mkdir(parents=True)
    (best / STATE_FILE).write_text('{"step": 4, "epoch": 1}')
    save_file({f"module.{k}": v for k, v in source.state_dict().items()}, str(best / "model.safetensors"))
    write_best(str(tmp_path / "run"), {"metric": "val/top1", "value": 0.9, "step": 4})
    model = resnet(10)
    load_weights(model, str(tmp_path / "run" / "best"), log=lambda _: None)
    check_loaded(model, source)
