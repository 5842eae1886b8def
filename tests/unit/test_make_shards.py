"""Writing shards from an ImageFolder tree: original bytes, index, unreadable files, workers."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from PIL import Image

from launcher.config import ConfigError
from launcher.data.spec import Shards
from launcher.data.loader import SplitLoader
from launcher.data.writer import SHARD_MTIME, dataset_samples, shard_image_folder, write_shards


def members(shard_dir) -> dict[str, bytes]:
    found = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                found[member.name] = tar.extractfile(member).read()
    return found


def quiet(_):
    pass


def test_folder_shards_keep_bytes_labels_and_metadata(folder, tmp_path):
    out = tmp_path / "shards"
    result = shard_image_folder(str(folder), str(out), max_count=5, max_bytes=1 << 30, workers=2, log=quiet)
    stored = members(out)
    assert stored["cat/cat_0.jpg"] == (folder / "cat" / "cat.0.jpg").read_bytes()  # no re-encode
    assert stored["dog/sub/dog_0.png"] == (folder / "dog" / "sub" / "dog_0.png").read_bytes()
    assert stored["dog/dog_3.cls"] == b"1" and stored["cat/cat_3.cls"] == b"0"
    assert json.loads(stored["cat/cat_1.json"]) == {"path": "cat/cat.1.jpg", "class": "cat"}
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and sum(index["shards"].values()) == 12
    assert max(index["shards"].values()) <= 5 and len(index["shards"]) == 3
    assert len(result["skipped"]) == 1 and "broken.png" in result["skipped"][0]


def test_keys_are_unique_even_when_sanitised_names_collide(tmp_path):
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    Image.new("L", (4, 4)).save(root / "x.1.png")
    Image.new("L", (4, 4)).save(root / "x_1.png")
    shard_image_folder(str(tmp_path / "images"), str(tmp_path / "out"), max_count=10, max_bytes=1 << 30,
                       workers=1, log=quiet)
    keys = {name.rsplit(".", 1)[0] for name in members(tmp_path / "out")}
    assert len(keys) == 2


def test_output_is_byte_identical_with_one_or_several_workers_and_has_no_pax_headers(folder, tmp_path):
    for workers in (1, 2):
        shard_image_folder(str(folder), str(tmp_path / f"w{workers}"), max_count=4, max_bytes=1 << 30,
                           workers=workers, log=quiet)
    assert members(tmp_path / "w1") == members(tmp_path / "w2")
    shards = sorted(p.name for p in (tmp_path / "w1").glob("*.tar"))
    assert len(shards) == 3
    assert all((tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes() for name in shards)
    with tarfile.open(tmp_path / "w1" / shards[0]) as tar:
        assert all(member.pax_headers == {} and member.mtime == SHARD_MTIME for member in tar.getmembers())


def test_the_loader_reads_what_was_written_using_the_index(folder, tmp_path):
    out = tmp_path / "shards"
    shard_image_folder(str(folder), str(out), max_count=4, max_bytes=1 << 30, workers=1, log=quiet)
    to_tensor = lambda image: torch.tensor(image.convert("RGB").getpixel((0, 0)))  # noqa: E731
    split = SplitLoader(Shards(str(out), to_tensor), rank=0, world=1, seed=0, batch_size=4,
                        num_workers=0, training=False)
    assert split.total == 12 and split.classes == ["cat", "dog"]
    for batch in split.loader(0):
        for pixel, label in zip(batch.data[0], batch.data[1]):
            assert (pixel[0] > 100) == (label == 0)  # red cats, green dogs


def test_reencode_converts_the_format(folder, tmp_path):
    shard_image_folder(str(folder), str(tmp_path / "out"), max_count=100, max_bytes=1 << 30, workers=1,
                       reencode="png", log=quiet)
    assert all(not name.endswith(".jpg") for name in members(tmp_path / "out"))


def test_an_empty_source_is_an_error_and_leaves_no_shard(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images found"):
        shard_image_folder(str(tmp_path / "images"), str(tmp_path / "out"), max_count=10, max_bytes=1 << 30,
                           workers=1)
    with pytest.raises(ConfigError, match="no samples to write"):
        write_shards(iter([]), str(tmp_path / "out2"), max_count=10)
    assert not list((tmp_path / "out2").glob("*.tar"))


def test_torchvision_style_datasets_are_png_encoded_with_index_keys():
    class Toy:
        classes = ["zero", "one"]

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return Image.new("L", (3, 3), i), i % 2

    samples = list(dataset_samples(Toy()))
    assert [s["__key__"] for s in samples[:3]] == ["00", "01", "02"] and samples[5]["cls"] == 1
    assert samples[0]["png"].startswith(b"\x89PNG")
