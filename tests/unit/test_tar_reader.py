"""The fast local tar reader against Python's tarfile: formats, truncation at every point, corruption."""

from __future__ import annotations

import io
import tarfile

import pytest

from launcher.data.tar_reader import TarReadError, shard_samples, tar_files


def write_tar(path, files: list[tuple[str, bytes]], fmt: int, directories: bool = True) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        if directories:
            info = tarfile.TarInfo("a_directory")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            info = tarfile.TarInfo("old_style_directory/")
            info.type = tarfile.AREGTYPE  # a regular-file type with a trailing slash: a directory
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5  # a float mtime: pax format adds headers
            tar.addfile(info, io.BytesIO(data))


FILES = [
    ("s0.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("s0.cls", b"3"),
    ("__meta__", b"not a sample"),
    ("deep/" + "d" * 120 + "/s1.png", b"x" * 512),
    ("deep/" + "d" * 120 + "/s1.cls", b"7"),
    ("caf\u00e9/s2.jpg", b"\x00" * 1000),
    ("caf\u00e9/s2.cls", b""),
    ("s3.jpg", b"y" * 10000),
    ("s3.cls", b"1"),
]


def regular_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads_in_each_format(tmp_path, fmt):
    # ustar: ASCII names
    files = FILES if fmt != tarfile.USTAR_FORMAT else [f for f in FILES if "caf" not in f[0]]
    path = tmp_path / "shard.tar"
    write_tar(path, files, fmt)
    assert list(tar_files(str(path))) == regular_members(path) == files


def test_every_truncation_is_an_error_after_the_members_that_fit(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, FILES, tarfile.PAX_FORMAT)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
        end = max(m.offset_data + m.size for m in tar.getmembers())
    end_marker = end + (-end % 512)
    cut_file = tmp_path / "cut.tar"
    for cut in sorted(
        {*range(0, end_marker + 1, 256), end_marker + 100, *(m.offset_data + m.size for m in members)}
    ):
        cut_file.write_bytes(data[:cut])
        read = []
        with pytest.raises(TarReadError, match="truncated"):
            for item in tar_files(str(cut_file)):
                read.append(item)
        assert read == [
            (m.name, FILES[i][1]) for i, m in enumerate(members) if m.offset_data + m.size <= cut
        ], cut
    cut_file.write_bytes(data[: end_marker + 512])  # the first end-of-archive block is enough
    assert len(list(tar_files(str(cut_file)))) == len(members)


def test_a_corrupt_header_is_an_error_where_tarfile_stops_silently(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, FILES, tarfile.USTAR_FORMAT, directories=False)
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2].offset  # header of the third member
    data = bytearray(path.read_bytes())
    data[third + 10] ^= 0x20  # one flipped bit in its name
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 2  # tarfile: two members, no error
    read = []
    with pytest.raises(TarReadError, match=f"header at byte {third} fails its checksum"):
        for item in tar_files(str(path)):
            read.append(item)
    assert read == FILES[:2]


def test_shard_samples_groups_by_key_and_hands_errors_over(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, FILES, tarfile.PAX_FORMAT)
    errors = []
    samples = list(shard_samples(str(path), handler=errors.append))
    assert [s["__key__"] for s in samples] == ["s0", "deep/" + "d" * 120 + "/s1", "caf\u00e9/s2", "s3"]
    assert samples[0] == {"__key__": "s0", "__url__": str(path), "jpg": FILES[0][1], "cls": b"3"}
    assert errors == []
    # `pipe:` goes through WebDataset's reader and gives the same samples
    assert list(shard_samples(f"pipe:cat {path}", handler=errors.append)) == [
        {**s, "__url__": f"pipe:cat {path}"} for s in samples
    ]
    cut = tmp_path / "cut.tar"
    with tarfile.open(path) as tar:
        s3 = tar.getmember("s3.jpg")
    cut.write_bytes(path.read_bytes()[: s3.offset_data + 100])
    assert [s["__key__"] for s in shard_samples(str(cut), handler=errors.append)] == [
        "s0",
        "deep/" + "d" * 120 + "/s1",
        "caf\u00e9/s2",
    ]
    assert len(errors) == 1 and "cut inside member 's3.jpg'" in str(errors[0])
    assert list(shard_samples(str(tmp_path / "missing.tar"), handler=errors.append)) == []
    assert isinstance(errors[-1], FileNotFoundError)


def test_a_malformed_pax_header_is_an_error(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, FILES[:2], tarfile.PAX_FORMAT, directories=False)  # a pax header before each member
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    pax_header = second.offset  # tarfile's offset is where the member's first (pax) header starts
    assert data[pax_header + 156 : pax_header + 157] == b"x"
    data[pax_header + 512 : pax_header + 515] = b"0 x"  # a record claiming length 0 (must not loop forever)
    path.write_bytes(bytes(data))
    read = []
    with pytest.raises(TarReadError, match=f"malformed pax header at byte {pax_header}"):
        for item in tar_files(str(path)):
            read.append(item)
    assert read == FILES[:1]
