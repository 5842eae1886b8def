"""The pre-flight check names the recipe piece at fault: a transform passed uncalled, a transform
that returns a PIL image, a batch transform that returns a transform (in-process, real transforms)."""

from __future__ import annotations

import re
import types

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from launcher import DataSpec, Shards, TrainConfig, fields
from launcher.config import ConfigError
from launcher.data import image_folder
from launcher.data.writer import shard_image_folder
from launcher.presets import EvalCrop, TrainCrop, eval_transform, normalize, train_transform
from launcher.recipe import Recipe
from launcher.train.build import build_parts


def build(data: DataSpec, tmp_path) -> None:
    """build_parts (the pre-flight included) for a linear classifier of the folder fixture's 6x6 images."""
    module = types.ModuleType("preflight_recipe")
    module.Config = TrainConfig
    module.build_model = lambda cfg: nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    module.build_data = lambda cfg: data
    cfg = TrainConfig(batch_size=2, num_workers=0, output_dir=str(tmp_path / "run"), wandb_mode="disabled")
    build_parts(cfg, Recipe("preflight_recipe", module), rank=0, world=1)


def normalize_like(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> v2.Compose:
    """A recipe's own batch-transform factory (as recipes/digits.py writes them)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: DataSpec(train=Shards("shards", train_transform)),
            "the training split's transform is train_transform, which makes a transform rather than "
            "being one: call it (train_transform(224) not train_transform)",
        ),
        (
            lambda: DataSpec(
                train=Shards("shards", train_transform(8)),
                val=Shards("shards", eval_transform(8), batch_transform=normalize),
            ),
            "the validation split's batch_transform is normalize, which makes a transform rather than "
            "being one: call it (normalize() not normalize)",
        ),
        (lambda: DataSpec(train=[], batch_transform=v2.ToDtype), "DataSpec's batch_transform is ToDtype"),
        (
            lambda: DataSpec(train=Shards("shards", decode=fields)),
            "the training split's decode is fields, which makes a decoder rather than being one: "
            'call it (fields("x.npy") not fields)',
        ),
    ],
)
def test_a_preset_or_transform_class_passed_uncalled_is_refused_when_the_data_spec_is_made(make, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        make()


def test_the_called_presets_make_a_data_spec():
    spec = DataSpec(
        train=Shards("shards", train_transform(8), batch_transform=normalize()),
        val=Shards("shards", eval_transform(8), decode=fields("png", "cls"), batch_transform=normalize()),
    )
    assert isinstance(spec.train.transform, TrainCrop) and isinstance(spec.val.transform, EvalCrop)


def test_pre_flight_names_a_batch_transform_passed_uncalled(folder, tmp_path):
    data = DataSpec(train=image_folder(str(folder), eval_transform(6)), batch_transform=normalize_like)
    with pytest.raises(ConfigError) as error:
        build(data, tmp_path)
    assert str(error.value) == (
        "pre-flight: the training split's batch_transform (normalize_like) returned a "
        "Compose, not a tensor: was it passed uncalled? call it (normalize_like() not "
        "normalize_like)"
    )
    build(
        DataSpec(train=image_folder(str(folder), eval_transform(6)), batch_transform=normalize_like()),
        tmp_path,
    )


def test_pre_flight_names_a_transform_that_returns_a_pil_image(folder, tmp_path):
    shards = tmp_path / "shards"
    shard_image_folder(
        str(folder), str(shards), max_count=100, max_bytes=10**9, workers=1, log=lambda _: None
    )
    no_to_tensor = v2.Compose([v2.Resize(6), v2.CenterCrop(6)])  # the images stay PIL images
    with pytest.raises(
        ConfigError,
        match=r"^pre-flight: the training split's transform \(Compose\) returned a PIL "
        r"image \(\w+\), not a tensor: end it with a ToTensor/PILToTensor or use "
        r"launcher.presets",
    ):
        build(DataSpec(train=Shards(str(shards), no_to_tensor)), tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^pre-flight: the training split's dataset \(ImageFolder\) returned a PIL "
        r"image \(\w+\), not a tensor: give it a transform",
    ):
        build(DataSpec(train=image_folder(str(folder))), tmp_path)


def test_pre_flight_names_a_dataset_whose_samples_default_collate_cannot_take(tmp_path):
    samples = [(torch.zeros(3, 6, 6), None)] * 4  # a label left out
    with pytest.raises(
        ConfigError,
        match=r"^pre-flight: the training split's dataset \(list\) returned None, not a "
        r"tensor: return tensors, numbers or strings \(in tuples, lists or dicts\)$",
    ):
        build(DataSpec(train=samples), tmp_path)
