"""Writing shards from an ImageFolder tree: original bytes, index, unreadable files, workers; the
shuffled order, shard counts, train/val/test roots, class counts and what the plan makes of them,
`shards --help`, and a model whose outputs do not match the shards' classes refused before step 1."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from conftest import MLP_RECIPE
from launcher.cli import main
from launcher.commands.shards import OPTIONS, make_shards
from launcher.config import ConfigError
from launcher.data.index import ShardIndex, read_index
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.writer import (
    SHARD_MTIME,
    dataset_samples,
    default_num_shards,
    shard_image_folder,
    shard_sizes,
    write_shards,
)
from launcher.overrides import apply_overrides
from launcher.recipe import load_recipe
from launcher.train.build import build_parts
from launcher.train.plan import data_report, single_class_warning

CLASSES = ["a", "b", "c", "d"]


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
    # --max_count needs 3: a power of two
    assert max(index["shards"].values()) <= 5 and len(index["shards"]) == 4
    assert len(result["skipped"]) == 1 and "broken.png" in result["skipped"][0]


def test_keys_are_unique_even_when_sanitised_names_collide(tmp_path):
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    Image.new("L", (4, 4)).save(root / "x.1.png")
    Image.new("L", (4, 4)).save(root / "x_1.png")
    shard_image_folder(
        str(tmp_path / "images"), str(tmp_path / "out"), max_count=10, max_bytes=1 << 30, workers=1, log=quiet
    )
    keys = {name.rsplit(".", 1)[0] for name in members(tmp_path / "out")}
    assert len(keys) == 2


def test_output_is_byte_identical_with_one_or_several_workers_and_has_no_pax_headers(folder, tmp_path):
    for workers in (1, 2):
        shard_image_folder(
            str(folder),
            str(tmp_path / f"w{workers}"),
            max_count=4,
            max_bytes=1 << 30,
            workers=workers,
            log=quiet,
        )
    assert members(tmp_path / "w1") == members(tmp_path / "w2")
    shards = sorted(p.name for p in (tmp_path / "w1").glob("*.tar"))
    assert len(shards) == 4
    assert all(
        (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes() for name in shards
    )
    with tarfile.open(tmp_path / "w1" / shards[0]) as tar:
        assert all(member.pax_headers == {} and member.mtime == SHARD_MTIME for member in tar.getmembers())


def test_the_loader_reads_what_was_written_using_the_index(folder, tmp_path):
    out = tmp_path / "shards"
    shard_image_folder(str(folder), str(out), max_count=4, max_bytes=1 << 30, workers=1, log=quiet)
    to_tensor = lambda image: torch.tensor(image.convert("RGB").getpixel((0, 0)))  # noqa: E731
    split = SplitLoader(
        Shards(str(out), to_tensor), rank=0, world=1, seed=0, batch_size=4, num_workers=0, training=False
    )
    assert split.total == 12 and split.classes == ["cat", "dog"]
    for batch in split.loader(0):
        for pixel, label in zip(batch.data[0], batch.data[1]):
            assert (pixel[0] > 100) == (label == 0)  # red cats, green dogs


def test_reencode_converts_the_format(folder, tmp_path):
    shard_image_folder(
        str(folder),
        str(tmp_path / "out"),
        max_count=100,
        max_bytes=1 << 30,
        workers=1,
        reencode="png",
        log=quiet,
    )
    assert all(not name.endswith(".jpg") for name in members(tmp_path / "out"))


def test_an_empty_source_is_an_error_and_leaves_no_shard(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images found"):
        shard_image_folder(
            str(tmp_path / "images"), str(tmp_path / "out"), max_count=10, max_bytes=1 << 30, workers=1
        )
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


def sorted_folder(root, per_class: int, classes=CLASSES):
    """An ImageFolder as every real one is listed: class by class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (60 * label % 256, (200 - 40 * label) % 256, 9 * i)
            Image.new("RGB", (8, 8), colour).save(root / name / f"{name}{i:02d}.png")
    return root


def classes_per_batch(shard_dir) -> list[int]:
    """Distinct labels in each batch of 8, the shards read in order through the launcher's loader."""
    split = SplitLoader(
        Shards(str(shard_dir), lambda image: 0),
        rank=0,
        world=1,
        seed=0,
        batch_size=8,
        num_workers=0,
        training=False,
    )
    return [len(set(batch.data[1].tolist())) for batch in split.loader(0)]


def labels_in_shards(shard_dir) -> dict[str, list[int]]:
    found = {}
    for path in sorted(shard_dir.glob("*.tar")):
        labels = [int(value) for name, value in members_of(path).items() if name.endswith(".cls")]
        found[path.name] = [labels.count(label) for label in range(len(CLASSES))]
    return found


def members_of(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_shards_of_a_class_sorted_folder_mix_the_classes_in_every_batch(tmp_path):
    root = sorted_folder(tmp_path / "images", 12)
    mixed, ordered = tmp_path / "mixed", tmp_path / "ordered"
    shard_image_folder(
        str(root), str(mixed), max_count=10_000, max_bytes=1 << 30, workers=1, num_shards=4, log=quiet
    )
    assert (
        main(["shards", str(root), str(ordered), "--shuffle=false", "--num_shards", "4", "--workers=1"]) == 0
    )
    assert min(classes_per_batch(mixed)) >= 3 and len(classes_per_batch(mixed)) == 6
    assert max(classes_per_batch(ordered)) <= 2  # class order: a batch holds one class, or two at a border
    index = json.loads((mixed / "index.json").read_text())
    assert list(index["shards"].values()) == [12, 12, 12, 12]  # --num_shards, even sizes
    assert index["class_counts"] == labels_in_shards(mixed)  # what the tars hold
    assert all(max(counts) < 12 for counts in index["class_counts"].values())
    assert json.loads((ordered / "index.json").read_text())["class_counts"] == labels_in_shards(ordered)
    # the plan warns about the class-ordered shards, from index.json's class counts
    warning = single_class_warning(read_index(str(ordered)), "training")
    assert len(warning) == 1 and "4 of 4 training shards hold mostly one class or a few" in warning[0]
    assert single_class_warning(read_index(str(mixed)), "training") == []


def test_the_plan_warns_about_shards_of_a_few_classes_from_their_class_counts():
    def warned(class_counts: list[list[int]]) -> bool:
        urls = [f"s{i}.tar" for i in range(len(class_counts))]
        return bool(
            single_class_warning(ShardIndex(urls, list(map(sum, class_counts)), [], class_counts), "training")
        )

    assert warned([[16, 0, 0, 0], [0, 16, 0, 0], [0, 0, 16, 16]])  # 4 classes in 3 shards, class order
    assert warned(
        [
            [40, 40, 40, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 40, 40, 40, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 40, 40, 40, 40],
        ]
    )  # no shard over 90 % one class, each a few classes
    assert not warned([[5, 3, 4, 4], [3, 5, 4, 4], [4, 4, 3, 5]])  # shuffled
    assert not warned([[95, 5], [96, 4], [94, 6]])  # one class is 95 % of the data: every shard is so
    assert not warned([[8], [8]])  # one class in all


def test_too_few_or_uneven_shards_for_the_processes_name_the_flag_that_fixes_them(tmp_path):
    root = sorted_folder(tmp_path / "images", 12)
    shard_image_folder(
        str(root),
        str(tmp_path / "three"),
        max_count=100,
        max_bytes=1 << 30,
        workers=1,
        num_shards=3,
        log=quiet,
    )

    def training(world: int) -> SplitLoader:
        return SplitLoader(
            Shards(str(tmp_path / "three")),
            rank=0,
            world=world,
            seed=0,
            batch_size=8,
            num_workers=2,
            training=True,
        )

    report = "\n".join(data_report(training(2), "training"))  # 32 and 16 samples: 8 dropped, 8 repeated
    assert "8 dropped, 8 repeated" in report and "(`launcher shards --num_shards=4`)" in report
    with pytest.raises(
        ConfigError, match=r"3 training shards for 4 processes.*--num_shards=8` or use fewer "
    ):
        training(4)


def test_the_default_shard_count_feeds_8_processes_x_4_workers_when_the_data_allow():
    assert [default_num_shards(n, 10_000) for n in (10, 48, 160, 1797, 100_000)] == [1, 2, 8, 32, 32]
    assert default_num_shards(1_281_167, 10_000) == 160  # --max_count needs 129: a multiple of 32
    assert default_num_shards(13, 4) == 4
    assert shard_sizes(50, 4, 100) == [13, 13, 12, 12] and shard_sizes(3, 8, 100) == [1, 1, 1]
    with pytest.raises(ConfigError, match="raise --num_shards or --max_count"):
        shard_sizes(50, 2, 10)


def test_a_root_of_train_val_test_writes_each_split_with_one_class_list(tmp_path, capsys):
    root = tmp_path / "images"
    sorted_folder(root / "train", 6)
    sorted_folder(root / "val", 2, CLASSES[:3])  # no "d"
    sorted_folder(root / "test", 1)
    make_shards(str(root), str(tmp_path / "out"), workers=1, num_shards=2)
    out = capsys.readouterr().out
    assert "WARNING: val/ has no folder for 1 of the 4 classes (d)" in out
    for split, total in (("train", 24), ("val", 6), ("test", 4)):
        index = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert (
            index["classes"] == CLASSES
            and sum(index["shards"].values()) == total
            and len(index["shards"]) == 2
        )
    val = {}
    for path in (tmp_path / "out" / "val").glob("*.tar"):
        val.update(members_of(path))
    assert val["c/c01.cls"] == b"2" and json.loads(val["c/c01.json"])["class"] == "c"
    (root / "cats").mkdir()
    with pytest.raises(
        ConfigError, match=r"holds split folders \(train, val, test\) and other folders \(cats\)"
    ):
        make_shards(str(root), str(tmp_path / "again"), workers=1)


def test_a_torchvision_dataset_is_shuffled_into_num_shards_with_its_own_flags(tmp_path, capsys):
    out = tmp_path / "fake"
    assert (
        main(
            [
                "shards",
                "torchvision.datasets.FakeData",
                str(out),
                "--size=40",
                "--image_size=(3, 8, 8)",
                "--num_classes",
                "4",
                "--num_shards=4",
                "--seed=3",
            ]
        )
        == 0
    )
    assert "wrote 40 samples in 4 shards" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert list(index["shards"].values()) == [10, 10, 10, 10]
    assert (
        index["class_counts"] == labels_in_shards(out) and sum(map(sum, index["class_counts"].values())) == 40
    )
    keys = [name.split(".")[0] for name in members_of(out / "shard-000000.tar") if name.endswith(".png")]
    assert keys != sorted(keys)  # a shuffled order; keys still name the dataset's indices


def test_sub_folders_inside_class_folders_are_warned_about(folder, tmp_path):
    lines = []
    shard_image_folder(
        str(folder), str(tmp_path / "out"), max_count=100, max_bytes=1 << 30, workers=1, log=lines.append
    )
    assert lines[0].startswith("WARNING: 2 class folder(s) of ") and "(cat/sub, dog/sub)" in lines[0]


def test_shards_help_lists_every_flag_on_stdout_and_a_wrong_flag_is_one_line(folder, tmp_path, capsys):
    assert main(["shards", "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: python -m launcher shards SOURCE OUT")
    assert (
        all(f"--{name}=" in out for name in OPTIONS) and "--shuffle=true" in out and "--num_shards=0" in out
    )
    for argv, message in (
        ([str(folder), str(tmp_path / "o"), "--num_shard=3"], "unknown flag --num_shard"),
        ([str(folder), str(tmp_path / "o"), "--shuffle=maybe"], "--shuffle expects true or false"),
        ([str(folder)], "shards takes SOURCE and OUT"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["shards", *argv])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_model_with_fewer_outputs_than_the_shards_classes_is_refused_before_step_1(tmp_path):
    def shards(name: str, classes: list[str]) -> str:
        root = tmp_path / name
        sorted_folder(root / "train", 48 // len(classes), classes)
        sorted_folder(root / "val", 1, classes)
        make_shards(str(root), str(tmp_path / f"{name}-shards"), workers=1, num_shards=2)
        return str(tmp_path / f"{name}-shards")

    def parts(recipe_name: str, data: str, **overrides):
        recipe = load_recipe(recipe_name)
        cfg = apply_overrides(recipe.default_config(), {"data_dir": data, "batch_size": 8, **overrides})
        return build_parts(cfg.resolved(), recipe, rank=0, world=1)

    four = shards("four", CLASSES)
    # what recipes/resnet_pretrain reads
    os.symlink(os.path.join(four, "train"), os.path.join(four, "pretrain"))
    os.symlink(os.path.join(four, "val"), os.path.join(four, "pretrain_val"))
    with pytest.raises(
        ConfigError,
        match=r"^the shards have 4 classes \(index.json\), the model outputs 2: "
        r"set --num_classes=4$",
    ):
        parts("recipes/resnet_pretrain", four, num_classes=2)  # without the check: IndexError at the loss
    twelve = shards("twelve", [f"k{i:02d}" for i in range(12)])
    with pytest.raises(
        ConfigError,
        match=r"the shards have 12 classes \(index.json\), the model outputs 10: "
        r"make build_model output 12 classes$",
    ):
        parts(MLP_RECIPE, twelve)  # no num_classes field to name
    notes = parts(MLP_RECIPE, four).plan.notes  # more outputs than classes train, with a warning
    assert (
        "WARNING: the model outputs 10 classes, the shards have 4 (index.json): "
        "6 outputs are never a target; make build_model output 4 classes"
    ) in notes
