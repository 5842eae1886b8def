"""`--data_on_gpu`: workers pass encoded bytes, the main process decodes (torchvision decode_jpeg) and
augments on the device. CI has no GPU, so the device here is the CPU: the checks are that the
batches match decoding in the workers, that bad images are skipped and counted, and that it
composes with workers, persistence and resume."""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import json

import numpy
import pytest
import torch
from PIL import Image

from conftest import ROOT
from launcher.config import ConfigError
from launcher.data.batch_crops import batch_crops
from launcher.data.device_decode import transform_images
from launcher.data.layout import Position
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.stream import seed_augmentation
from launcher.data.writer import write_shards
from launcher.presets import eval_transform, train_transform


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> str:
    """48 JPEGs of 40 px in 3 shards (cut from scikit-learn's sample photos)."""
    return bench_gpu().make_shards(str(tmp_path_factory.mktemp("jpegs")), images=48, size=40, classes=4)


def loader(
    source, *, on_device: bool, training=True, workers=0, persistent=False, transform=None
) -> SplitLoader:
    transform = transform or (train_transform(24, scale=(0.3, 1.0)) if training else eval_transform(24))
    return SplitLoader(
        Shards(source, transform, shuffle_buffer=16),
        rank=0,
        world=1,
        seed=3,
        batch_size=8,
        num_workers=workers,
        training=training,
        batches_per_epoch=6,
        persistent_workers=persistent,
        data_on_gpu=on_device,
    )


def batches(split: SplitLoader, epoch: int = 0, start=None) -> list[dict]:
    return list(split.loader(epoch, start))


@pytest.mark.parametrize("training", [True, False])
def test_decoding_on_the_device_gives_the_batches_workers_give(jpegs, training):
    host, device = (
        batches(loader(jpegs, on_device=False, training=training)),
        batches(loader(jpegs, on_device=True, training=training)),
    )
    assert [b.keys for b in device] == [b.keys for b in host]
    for h, d in zip(host, device):
        assert d.data[0].dtype == torch.uint8 and d.data[0].shape == h.data[0].shape
        assert torch.equal(d.data[1], h.data[1])
        # Same crops and flips (seeded per sample alike); pixels differ only by the JPEG decoders' rounding.
        assert (d.data[0].float() - h.data[0].float()).abs().mean() < 2.0


def test_device_decoding_with_persistent_workers_and_a_mid_epoch_resume(jpegs):
    def epochs(**options) -> list[list]:
        split = loader(jpegs, workers=2, **options)
        return [batches(split, e) for e in range(2)]

    full = epochs(on_device=True, persistent=True)
    keys = [[b.keys for b in epoch] for epoch in full]
    assert keys == [[b.keys for b in epoch] for epoch in epochs(on_device=False)] and keys[0] != keys[1]
    split = loader(jpegs, on_device=True, workers=2, persistent=True)
    position = Position(1)
    for b in itertools.islice(split.loader(1), 2):
        position.advance(b)
    position = Position.from_dict(json.loads(json.dumps(position.to_dict())))
    resumed = batches(split, 1, position)
    assert keys[1][:2] + [b.keys for b in resumed] == keys[1]
    # the same crops, bitwise
    assert all(torch.equal(r.data[0], f.data[0]) for r, f in zip(resumed, full[1][2:]))
    split.close()


def jpeg(color: int, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(color: int, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_images_are_skipped_and_counted_and_other_formats_decoded(tmp_path):
    good = [{"__key__": f"j{i}", "jpg": jpeg(10 * i), "cls": i % 2} for i in range(6)]
    broken = jpeg(99)
    samples = (
        good[:2]
        + [
            {"__key__": "broken", "jpg": broken[:40] + b"\x00" * 200, "cls": 0},
            {"__key__": "p0", "png": png(50), "cls": 1},
            {"__key__": "garbage", "png": b"not an image", "cls": 1},
        ]
        + good[2:]
    )
    write_shards(samples, str(tmp_path), max_count=20, classes=["a", "b"])
    split = loader(str(tmp_path), on_device=True, training=False, transform=eval_transform(16))
    got = batches(split)
    keys = [k for b in got for k in b.keys]
    assert sorted(keys) == sorted([f"j{i}" for i in range(6)] + ["p0"])
    errors = [e for b in got for e in b.errors]
    assert sorted(e["key"] for e in errors) == ["broken", "garbage"]
    assert all(e["shard"].endswith(".tar") and e["samples"] == 1 and e["reason"] for e in errors)
    assert sum(len(b.data[1]) for b in got) == 7 and all(len(b.data[1]) == len(b.keys) for b in got)
    red = next(b.data[0][b.keys.index("p0")] for b in got if "p0" in b.keys)
    assert (
        red.shape == (3, 16, 16) and red[0].float().mean() == pytest.approx(50, abs=2) and red[1].max() == 0
    )


def test_data_on_gpu_with_a_map_style_dataset_is_a_clear_error():
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match="--data_on_gpu decodes shard images on the device.*TensorDataset"):
        SplitLoader(
            dataset, rank=0, world=1, seed=0, batch_size=2, num_workers=0, training=True, data_on_gpu=True
        )


def test_a_bad_image_read_again_in_a_repeat_pass_is_counted_once(tmp_path):
    samples = [{"__key__": f"j{i}", "jpg": jpeg(30 * i), "cls": i % 2} for i in range(5)]
    samples.insert(2, {"__key__": "broken", "jpg": jpeg(1)[:40] + b"\x00" * 200, "cls": 0})
    write_shards(samples, str(tmp_path), max_count=20, classes=["a", "b"])
    split = SplitLoader(
        Shards(str(tmp_path), train_transform(8), shuffle_buffer=4),
        rank=0,
        world=1,
        seed=0,
        batch_size=2,
        num_workers=0,
        training=True,
        batches_per_epoch=6,
        data_on_gpu=True,
    )
    got = batches(split)
    assert sum(b.repeated for b in got) > 5  # the shard was read more than twice
    assert [e["key"] for b in got for e in b.errors] == ["broken"]


@functools.cache
def photo_tensors() -> list[torch.Tensor]:
    """scikit-learn's sample photos at six sizes, uint8 CHW."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    sizes = [(427, 640), (300, 200), (100, 150), (640, 427), (250, 250), (512, 384)]
    return [
        torch.from_numpy(numpy.array(Image.fromarray(photos[i % 2]).resize((w, h)))).permute(2, 0, 1)
        for i, (h, w) in enumerate(sizes)
    ]


@pytest.mark.parametrize("preset", ["train-downscale", "eval", "train-upscale"])
def test_one_roi_align_crops_the_boxes_the_seeds_dictate_close_to_the_per_sample_transform(preset):
    """Photos of six sizes (a 640 px one cut to 64 px: 10x down; 100 px ones to 224: up) through the
    per-sample transform and through one batched roi_align (as on a GPU, here on CPU tensors),
    seeded alike. A wrong box or flip differs by tens of grey levels on average; the resampling (a
    box filter of the bin's width over bilinear samples against torchvision's antialiasing
    triangle) by a few: the tolerance is a mean absolute difference under 3.5 grey levels per
    image and 99 % of pixels within 16. The same seeds give the same batch bit for bit (resume)."""
    transform = {
        "train-downscale": train_transform(64),
        "eval": eval_transform(64),
        "train-upscale": train_transform(224),
    }[preset]
    images, seeds = photo_tensors(), [100 + i for i in range(6)]
    expected = transform_images(images, seeds, transform, seed_augmentation, batched=False)
    got = transform_images(images, seeds, transform, seed_augmentation, batched=True)
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    difference = (got.float() - expected.float()).abs()
    assert difference.mean((1, 2, 3)).max() < 3.5 and torch.quantile(difference.flatten(), 0.99) < 16
    assert torch.equal(got, transform_images(images, seeds, transform, seed_augmentation, batched=True))
    crops = batch_crops(transform)
    flips = []
    for image, seed in zip(images, seeds):
        seed_augmentation(seed)
        flips.append(crops.draw(image)[1])
    assert crops.flip == 0 or len(set(flips)) == 2  # both flipped and unflipped samples were checked


def test_other_transforms_keep_the_per_sample_path():
    from torchvision.transforms import InterpolationMode, v2

    assert batch_crops(train_transform(32, color_jitter=0.4)) is None
    assert (
        batch_crops(v2.Compose([v2.RandomResizedCrop(32, interpolation=InterpolationMode.NEAREST)])) is None
    )
    # a crop larger than the image pads
    assert batch_crops(v2.Compose([v2.Resize(40), v2.CenterCrop(48)])) is None
    assert batch_crops(lambda image: image) is None


def test_a_batch_too_large_for_one_canvas_is_cropped_in_runs_with_the_same_result(monkeypatch):
    from launcher.data import batch_crops as module

    images = photo_tensors()
    crops = batch_crops(train_transform(32))
    boxes = torch.tensor([crops.draw(image)[0] for image in images])
    flips = torch.tensor([i % 2 == 0 for i in range(len(images))])
    whole = module.crop_batch(images, boxes, flips, crops.size)
    monkeypatch.setattr(module, "CANVAS_PIXELS", 500_000)  # room for one or two of these photos at a time
    assert len(list(module._chunks(images))) >= 3
    assert torch.equal(module.crop_batch(images, boxes, flips, crops.size), whole)
