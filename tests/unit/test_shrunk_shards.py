"""Shards that store what training reads: `launcher shards --max_side` shrinks large images (aspect
ratio, format, keys and labels kept; images that fit keep their bytes), index.json records the
image sides, and the plan warns when the images are much larger than what the transforms output."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_make_shards import members

from launcher.commands.shards import shards_command
from launcher.config import ConfigError
from launcher.data.index import read_index
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.writer import write_shards
from launcher.presets import train_transform
from launcher.train.plan import data_report

# (class, file, width, height): landscape, portrait, a narrow strip, small ones (kept byte for byte)
IMAGES = [
    ("cat", "wide.jpg", 640, 427),
    ("cat", "tall.jpg", 427, 640),
    ("cat", "strip.png", 301, 97),
    ("cat", "small.jpg", 90, 60),
    ("dog", "wide.png", 500, 375),
    ("dog", "edge.jpg", 128, 100),
    ("dog", "photo.jpg", 600, 450),
    ("dog", "tiny.png", 40, 30),
]
MAX_SIDE = 128


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """An ImageFolder of IMAGES: colour gradients with noise."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label, name, width, height in IMAGES:
        os.makedirs(root / label, exist_ok=True)
        rows, columns = np.mgrid[0:height, 0:width]
        gradient = np.stack([255 * columns / width, 255 * rows / height, 128 + 0 * rows], -1)
        pixels = gradient + rng.normal(0, 8, (height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / label / name, quality=95)
    return str(root)


@pytest.fixture(scope="module")
def shrunk(photos, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shrunk"))
    assert (
        shards_command(
            [photos, out, f"--max_side={MAX_SIDE}", "--quality=80", "--workers=1", "--num_shards=2"]
        )
        == 0
    )
    return out


def test_max_side_shrinks_large_images_keeping_keys_labels_formats_and_aspect(photos, shrunk):
    from pathlib import Path

    stored = members(Path(shrunk))
    for label, name, width, height in IMAGES:
        stem, extension = name.split(".")
        key = f"{label}/{stem}"
        assert stored[f"{key}.cls"] == str(["cat", "dog"].index(label)).encode()
        assert json.loads(stored[f"{key}.json"]) == {"path": f"{label}/{name}", "class": label}
        data = stored[f"{key}.{extension}"]  # the format kept
        if max(width, height) <= MAX_SIDE:
            assert data == open(os.path.join(photos, label, name), "rb").read()  # byte for byte
            continue
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
        scale = MAX_SIDE / max(width, height)
        assert max(w, h) == MAX_SIDE and abs(w - width * scale) <= 1 and abs(h - height * scale) <= 1
    assert len([m for m in stored if m.endswith(".cls")]) == len(IMAGES)


def test_the_index_records_each_shards_image_sides(shrunk):
    from pathlib import Path

    index = read_index(shrunk)
    assert len(index.image_sides) == 2
    sides = []
    for url in index.urls:
        found = members_of(Path(url))
        sides.append(sorted(Image.open(io.BytesIO(data)).size for data in found))
    for summary, sizes in zip(index.image_sides, sides):
        assert summary["max"] == max(max(s) for s in sizes)
        assert summary["short"] == round(float(np.median([min(s) for s in sizes])))
        assert summary["long"] == round(float(np.median([max(s) for s in sizes])))


def members_of(shard) -> list[bytes]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [
            tar.extractfile(m).read() for m in tar.getmembers() if m.name.rsplit(".", 1)[1] in ("jpg", "png")
        ]


def test_the_plan_warns_when_images_are_much_larger_than_the_crops_and_names_max_side(
    photos, shrunk, tmp_path
):
    original = str(tmp_path / "original")
    shards_command([photos, original, "--workers=1", "--num_shards=2"])

    def report(source: str) -> str:
        split = SplitLoader(
            Shards(source, train_transform(64)),
            rank=0,
            world=1,
            seed=0,
            batch_size=2,
            num_workers=0,
            training=True,
        )
        return "\n".join(data_report(split, "training"))

    warned = report(original)
    assert (
        "WARNING: the training images (median" in warned
        and "over 2x the 64 px the transforms output" in warned
    )
    assert "`launcher shards SOURCE OUT --max_side=128`" in warned
    assert "--max_side" not in report(shrunk)  # median shorter side under 2 x 64 px


def test_the_writer_api_shrinks_samples_and_bad_flags_are_one_line(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (400, 100), (10, 200, 30)).save(buffer, format="JPEG")
    samples = [{"__key__": f"k{i}", "jpg": buffer.getvalue(), "cls": i} for i in range(3)]
    index = write_shards(samples, str(tmp_path / "api"), max_count=10, max_side=50, quality=70)
    assert index["image_sides"] == {"shard-000000.tar": {"short": 12, "long": 50, "max": 50}}
    assert [k for k in members(tmp_path / "api") if k.endswith(".cls")] == ["k0.cls", "k1.cls", "k2.cls"]
    written = json.loads((tmp_path / "api" / "index.json").read_text())
    hand_made = {**written, "image_sides": {"shard-000000.tar": {"short": "x"}}}
    (tmp_path / "api" / "index.json").write_text(json.dumps(hand_made))
    # a hand-made entry is left out, not an error
    assert read_index(str(tmp_path / "api")).image_sides is None
    for flag, problem in (
        ("--quality=0", "--quality must be >= 1"),
        ("--quality=101", "--quality must be 1 to 100"),
        ("--max_side=-5", "--max_side must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=problem):
            shards_command([str(tmp_path), str(tmp_path / "out"), flag])
