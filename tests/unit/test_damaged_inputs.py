"""A corpus of damaged inputs, made from real shards (written by launcher.data.writer, or by tarfile
for pax and GNU headers) and then damaged byte by byte: each one is either read with what it lost
counted (samples read, samples lost, the reason) or refused in one line before anything trains
(ConfigError, DataError). Never a hang, never a raw exception.

Run: PYTHONPATH=. python -m pytest tests/unit/test_damaged_inputs.py -q
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from launcher.config import ConfigError, DataError
from launcher.data.layout import derive_seed
from launcher.data.loader import SplitLoader
from launcher.data.spec import Shards
from launcher.data.tar_reader import tar_files
from launcher.data.writer import write_shards
from launcher.train.guards import DataHealth
from launcher.train.state import RunState

SAMPLES = 8  # per shard: keys s0000..s0007, one PNG and one cls each
SHARD = "shard-000000.tar"


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2, 2), value).save(buffer, format="PNG")
    return buffer.getvalue()


def to_vector(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def samples(labels: list[int] | None = None) -> list[dict]:
    labels = labels or [i % 3 for i in range(SAMPLES)]
    return [{"__key__": f"s{i:04d}", "png": png(i), "cls": labels[i]} for i in range(SAMPLES)]


def written_shard(directory: Path, labels: list[int] | None = None) -> Path:
    """A real shard by the project's writer (ustar members s0000.cls, s0000.png, ... one 512-byte
    block of data each) and its index.json."""
    write_shards(samples(labels), str(directory), max_count=SAMPLES, classes=["a", "b", "c"])
    return directory / SHARD


def tarfile_shard(directory: Path, fmt: int, long_key: int = -1, pax: dict | None = None) -> Path:
    """The same samples written by tarfile in `fmt`, with an index.json: a float mtime gives every
    member a pax header in PAX_FORMAT; sample `long_key` gets a 130-character name (a GNU long name
    in GNU_FORMAT); `pax` adds records to sample 2's cls member."""
    path = directory / SHARD
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, sample in enumerate(samples()):
            key = ("d" * 124 + "/" if i == long_key else "") + sample["__key__"]
            for extension, data in (("cls", str(sample["cls"]).encode()), ("png", sample["png"])):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 1700000000.5
                if pax and i == 2 and extension == "cls":
                    info.pax_headers = dict(pax)
                tar.addfile(info, io.BytesIO(data))
    (directory / "index.json").write_text(json.dumps({"shards": {SHARD: SAMPLES}}))
    return path


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def patch_header(path: Path, member: int, **fields: bytes) -> None:
    """Overwrite fields of a member's ustar header (name, size, type) and give it a valid checksum
    again, so that only the field itself is damaged."""
    where = {"name": (0, 100), "size": (124, 12), "type": (156, 1)}
    data = bytearray(path.read_bytes())
    start = members(path)[member].offset
    for name, value in fields.items():
        offset, length = where[name]
        data[start + offset : start + offset + length] = value.ljust(length, b"\0")
    header = data[start : start + 512]
    header[148:156] = b" " * 8
    data[start + 148 : start + 156] = b"%06o\0 " % sum(header)
    path.write_bytes(bytes(data))


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


# ---- the corpus ---------------------------------------------------------------------------------


@dataclass
class Counted:
    """Read with its losses counted: `read` samples come through, `lost` are counted in error records
    (unreadable samples and rests of shards), the first reason matches `reason`."""

    read: int
    lost: int
    reason: str


@dataclass
class Refused:
    """Refused before training, in one line matching `message`."""

    error: type
    message: str


def base_damage(damage: Callable[[Path], None]) -> Callable[[Path], str]:
    def make(directory: Path) -> str:
        damage(written_shard(directory))
        return str(directory)

    return make


def no_index(damage: Callable[[Path], None]) -> Callable[[Path], str]:
    """A damaged shard listed by path, with no index.json to count it."""

    def make(directory: Path) -> str:
        path = written_shard(directory)
        (directory / "index.json").unlink()
        damage(path)
        return str(path)

    return make


def bad_index(text: str) -> Callable[[Path], str]:
    def make(directory: Path) -> str:
        written_shard(directory)
        (directory / "index.json").write_text(text)
        return str(directory)

    return make


def pax_length(directory: Path) -> str:
    path = tarfile_shard(directory, tarfile.PAX_FORMAT)
    data = bytearray(path.read_bytes())
    records = members(path)[4].offset + 512  # sample 2's first pax header's records
    assert data[records : records + 3] == b"22 "  # "22 mtime=1700000000.5\n"
    data[records : records + 2] = b"99"  # longer than its header
    path.write_bytes(bytes(data))
    return str(directory)


def pax_size(directory: Path) -> str:
    path = tarfile_shard(directory, tarfile.PAX_FORMAT, pax={"size": "1"})
    replace_bytes(path, b" size=1\n", b" size=a\n")
    return str(directory)


def gnu_long_name_cut(directory: Path) -> str:
    path = tarfile_shard(directory, tarfile.GNU_FORMAT, long_key=2)
    long_name = members(path)[4].offset  # the ././@LongLink header of s0002.cls
    assert path.read_bytes()[long_name : long_name + 13] == b"././@LongLink"
    cut(path, long_name + 512 + 60)
    return str(directory)


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def gzipped(path: Path) -> None:
    path.write_bytes(gzip.compress(path.read_bytes()))


# base-256 -512: a reader seeking by it rereads its header
NEGATIVE_512 = b"\xff" + (256**11 - 512).to_bytes(11, "big")
CASES: dict[str, tuple[Callable[[Path], str], Counted | Refused]] = {
    # tar headers (member 4 is s0002.cls: s0000 and s0001 come through, the other 6 are counted)
    "negative base-256 size, directory": (
        base_damage(lambda p: patch_header(p, 4, type=b"5", size=NEGATIVE_512)),
        Counted(2, 6, "negative size -512"),
    ),
    "size 2^40 (base-256)": (
        base_damage(lambda p: patch_header(p, 4, size=b"\x80" + (2**40).to_bytes(11, "big"))),
        Counted(2, 6, "claims 1099511627776 bytes"),
    ),
    "size beyond the file": (
        base_damage(lambda p: patch_header(p, 4, size=b"%011o" % 30000)),
        Counted(2, 6, "claims 30000 bytes, 15872 are left"),
    ),
    "bad checksum": (
        base_damage(lambda p: replace_bytes(p, b"s0002.cls", b"s0002.clz")),
        Counted(2, 6, "header at byte 4096 fails its checksum"),
    ),
    "pax size not a number": (pax_size, Counted(2, 6, "non-numeric size 'a'")),
    "pax record length past its header": (pax_length, Counted(2, 6, "malformed pax header at byte 8192")),
    "name not UTF-8": (
        base_damage(
            lambda p: (patch_header(p, 4, name=b"s\xff002.cls"), patch_header(p, 5, name=b"s\xff002.png"))
        ),
        Counted(8, 0, ""),
    ),
    "GNU long name cut": (gnu_long_name_cut, Counted(2, 6, r"cut inside member '././@LongLink'")),
    # truncations (s0000 ends at byte 2048, s0001's png header starts at 3072 and its data at 3584)
    "cut inside the first header": (
        base_damage(lambda p: cut(p, 300)),
        Refused(ConfigError, "shard files unreadable"),
    ),
    "cut after the first sample": (
        base_damage(lambda p: cut(p, 2048)),
        Counted(1, 7, "no end-of-archive block"),
    ),
    "cut inside a header": (base_damage(lambda p: cut(p, 3072 + 200)), Counted(1, 7, r"no image \(png")),
    "cut inside a file": (base_damage(lambda p: cut(p, 3584 + 30)), Counted(1, 7, r"no image \(png")),
    "cut before the end-of-archive block": (
        base_damage(lambda p: cut(p, 16384)),
        Counted(8, 0, "no end-of-archive block at byte 16384"),
    ),
    # not tar files at all
    "random bytes": (base_damage(random_bytes), Refused(ConfigError, "shard files unreadable")),
    "empty file": (base_damage(lambda p: p.write_bytes(b"")), Refused(ConfigError, "shard files unreadable")),
    "gzip-compressed tar": (base_damage(gzipped), Refused(ConfigError, "shard files unreadable")),
    # shards without an index: counted by a scan, so a damaged one is refused
    "cut shard without an index": (
        no_index(lambda p: cut(p, 3584 + 30)),
        Refused(DataError, f"{SHARD} is damaged .* has no count in an index.json"),
    ),
    "2^40 size without an index": (
        no_index(lambda p: patch_header(p, 4, size=b"\x80" + (2**40).to_bytes(11, "big"))),
        Refused(DataError, "claims 1099511627776 bytes"),
    ),
    # index.json
    "index.json holds []": (bad_index("[]"), Refused(ConfigError, "holds a JSON list")),
    "index.json counts are strings": (
        bad_index(json.dumps({"shards": {SHARD: "8"}})),
        Refused(ConfigError, 'the count "8", not an integer >= 0'),
    ),
    "index.json count negative": (
        bad_index(json.dumps({"shards": {SHARD: -8}})),
        Refused(ConfigError, "the count -8, not an integer >= 0"),
    ),
    "index.json count true": (
        bad_index(json.dumps({"shards": {SHARD: True}})),
        Refused(ConfigError, "the count true, not an integer >= 0"),
    ),
    "index.json without shards": (
        bad_index(json.dumps({"classes": ["a"]})),
        Refused(ConfigError, 'no "shards" object'),
    ),
    "index.json classes not a list": (
        bad_index(json.dumps({"shards": {SHARD: 8}, "classes": "abc"})),
        Refused(ConfigError, '"classes" that are not a list'),
    ),
    "index.json not JSON": (bad_index('{"shards": {'), Refused(ConfigError, "unreadable shard index")),
    # labels outside the task's 3 classes (s0003 and s0004: labels 3 and 7)
    "labels out of range": (
        lambda d: str(written_shard(d, [0, 1, 2, 3, 7, 0, 1, 2]).parent),
        Counted(6, 2, "class label 3 is outside the task's 3 classes"),
    ),
}
EXPECTED_CASES = 26  # docs/checkpoints.md (Failures, damaged data) cites this number


def outcome(source: str, num_classes: int | None = 3) -> tuple[Counted | Refused, list[str]]:
    """What the loader makes of `source` (validation: every sample read once): refused, or counted."""
    try:
        split = SplitLoader(
            Shards(source, to_vector), rank=0, world=1, seed=0, batch_size=3, num_workers=0, training=False
        )
    except (ConfigError, DataError) as error:
        return Refused(type(error), str(error)), []
    split.num_classes = num_classes
    batches = list(split.loader(0))
    keys = [key for batch in batches for key in batch.keys]
    errors = [error for batch in batches for error in batch.errors]
    return Counted(len(keys), sum(e["samples"] for e in errors), errors[0]["reason"] if errors else ""), keys


def test_the_corpus_has_the_cases_the_readme_cites():
    print(f"\n{len(CASES)} damaged inputs in the corpus")
    assert len(CASES) == EXPECTED_CASES


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", list(CASES))
def test_each_damaged_input_is_counted_or_refused_in_one_line(tmp_path, case):
    make, expected = CASES[case]
    got, keys = outcome(make(tmp_path))
    assert type(got) is type(expected), got
    if isinstance(expected, Refused):
        assert got.error is expected.error and "\n" not in got.message, got
        assert re.search(expected.message, got.message), got.message
        return
    assert (got.read, got.lost) == (expected.read, expected.lost), got
    assert re.search(expected.reason, got.reason) if expected.reason else not got.reason, got.reason
    assert len(set(keys)) == len(keys)


@pytest.mark.timeout(20)
def test_a_name_that_is_not_utf8_is_read_seeded_and_printed(tmp_path, capsys):
    path = written_shard(tmp_path)
    patch_header(path, 4, name=b"s\xff002.cls")
    patch_header(path, 5, name=b"s\xff002.png")
    assert [name for name, _ in tar_files(str(path))][4:6] == ["s\udcff002.cls", "s\udcff002.png"]
    assert derive_seed(0, "augment", 0, "s\udcff002", 0) != derive_seed(0, "augment", 0, "s\udcfe002", 0)
    # valid UTF-8: unchanged
    assert derive_seed(1, "caf\u00e9") == derive_seed(1, "caf\u00e9".encode().decode())
    split = SplitLoader(
        Shards(str(tmp_path), to_vector, shuffle_buffer=4),
        rank=0,
        world=1,
        seed=0,
        batch_size=4,
        num_workers=0,
        training=True,
    )
    batches = list(split.loader(0))  # training: every sample's augmentation is seeded from its key
    assert sorted(key for batch in batches for key in batch.keys) == sorted(
        f"s{i:04d}" if i != 2 else "s\udcff002" for i in range(SAMPLES)
    )
    assert not [error for batch in batches for error in batch.errors]
    health = DataHealth(str(tmp_path / "run"), 0, 0.5, lambda counts: counts, RunState())
    error = {"shard": str(path), "key": "s\udcff002", "reason": "ValueError: s\udcff002", "samples": 1}
    health.note([error], "train")
    # escaped: stdout is strict UTF-8
    assert "skipped unreadable sample s\\udcff002 in" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "data_errors" / "rank0.jsonl").read_text())["key"] == "s\udcff002"


@pytest.mark.timeout(20)
def test_a_label_out_of_range_is_an_unreadable_sample_in_training_and_in_map_style_data(tmp_path):
    written_shard(tmp_path, [0, 1, 2, 3, 7, 0, 1, 2])
    split = SplitLoader(
        Shards(str(tmp_path), to_vector, shuffle_buffer=0),
        rank=0,
        world=1,
        seed=0,
        batch_size=3,
        num_workers=0,
        training=True,
    )
    split.num_classes = 3
    batches = list(split.loader(0))
    keys = [key for batch in batches for key in batch.keys]
    errors = [error for batch in batches for error in batch.errors]
    # 2 whole batches, filled from readable samples
    assert {"s0003", "s0004"}.isdisjoint(keys) and len(keys) == 6
    assert [(e["key"], e["samples"]) for e in errors] == [("s0003", 1), ("s0004", 1)]
    assert "label 7 is outside the task's 3 classes (0..2)" in errors[1]["reason"]

    dataset = [(torch.zeros(2), label) for label in (0, 1, 5, 2, -1, 1)]
    split = SplitLoader(dataset, rank=0, world=1, seed=0, batch_size=3, num_workers=0, training=False)
    split.num_classes = 3
    batches = list(split.loader(0))
    assert [batch.keys for batch in batches] == [["0", "1"], ["3", "5"]]
    assert [batch.data[1].tolist() for batch in batches] == [[0, 1], [2, 1]]
    assert [(e["shard"], e["key"]) for batch in batches for e in batch.errors] == [
        ("list", "2"),
        ("list", "4"),
    ]


@pytest.mark.timeout(20)
def test_shuffle_buffer_zero_reads_in_order_and_a_negative_one_is_refused(tmp_path):
    written_shard(tmp_path)
    split = SplitLoader(
        Shards(str(tmp_path), to_vector, shuffle_buffer=0),
        rank=0,
        world=1,
        seed=0,
        batch_size=4,
        num_workers=0,
        training=True,
    )
    assert [key for batch in split.loader(0) for key in batch.keys] == [f"s{i:04d}" for i in range(SAMPLES)]
    with pytest.raises(
        ConfigError, match=r"shuffle_buffer=...\) must be an integer >= 0 \(0: no shuffle\), got -1"
    ):
        Shards(str(tmp_path), shuffle_buffer=-1)


RECIPE = """
from dataclasses import dataclass
import torch
from torch import nn
from launcher import DataSpec, Shards, TrainConfig


@dataclass
class Config(TrainConfig):
    data: str = ""  # shard directory or file
    outputs: int = 3  # the model's classes
    batch_size: int = 2
    num_workers: int = 0
    wandb_mode: str = "disabled"


def vector(image):
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def build_model(cfg):
    return nn.Linear(4, cfg.outputs)


def build_data(cfg):
    return DataSpec(train=Shards(cfg.data, vector))
"""


@pytest.mark.timeout(60)
def test_the_cli_refuses_damaged_data_in_one_line_with_its_exit_code(tmp_path, capsys):
    from launcher.cli import main

    recipe = tmp_path / "tiny_recipe.py"
    recipe.write_text(RECIPE)

    def plan(data: str, *flags: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as stopped:
            main(["plan", str(recipe), f"--data={data}", f"--output_dir={tmp_path / 'run'}", *flags])
        return stopped.value.code, capsys.readouterr().err

    (tmp_path / "index").mkdir()
    code, err = plan(bad_index("[]")(tmp_path / "index"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("launcher: error: shard index ")
    (tmp_path / "cut").mkdir()
    code, err = plan(no_index(lambda p: cut(p, 3584 + 30))(tmp_path / "cut"))
    assert code == 65 and err.count("\n") == 1 and err.startswith(f"launcher: data error: shard {tmp_path}")
    (tmp_path / "labels").mkdir()
    written_shard(tmp_path / "labels", [5, 1, 2, 0, 1, 2, 0, 1])
    code, err = plan(str(tmp_path / "labels"))
    assert code == 65 and err.count("\n") == 1
    assert "the first 2 training samples include class labels [5] outside the model's 3 outputs (0..2)" in err
    main(
        [
            "plan",
            str(recipe),
            f"--data={tmp_path / 'labels'}",
            "--outputs=6",
            f"--output_dir={tmp_path / 'run'}",
        ]
    )
    assert "launcher" not in capsys.readouterr().err  # with 6 outputs the same shards plan as usual
