"""Shard streaming on real tar shards: splitting by rank and worker, shuffling, validation counts."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import tarfile
from collections import Counter

import numpy
import pytest
import torch
from PIL import Image

from launcher.config import ConfigError, DataError
from launcher.data.batch import Batch
from launcher.data.index import read_index
from launcher.data.layout import Position
from launcher.data.loader import KeyedDataset, SplitLoader
from launcher.data.spec import Shards
from launcher.data.stream import shuffle_buffer
from launcher.data.writer import write_shards


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2, 2), value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(directory, sizes: list[int]) -> str:
    """Shards of the given sizes; sample i has key s{i:04d}, label i % 3 and pixel value i % 256."""
    samples, start = [], 0
    for size in sizes:
        samples += [
            {"__key__": f"s{i:04d}", "png": png(i % 256), "cls": i % 3} for i in range(start, start + size)
        ]
        start += size
    # write_shards cuts by count, so write each shard by its own call into one directory
    index = {"shards": {}, "classes": ["a", "b", "c"]}
    offset = 0
    for n, size in enumerate(sizes):
        part = write_shards(
            samples[offset : offset + size],
            str(directory),
            max_count=size,
            prefix=f"part{n}",
            classes=["a", "b", "c"],
        )
        index["shards"].update(part["shards"])
        offset += size
    (directory / "index.json").write_text(json.dumps(index))
    return str(directory)


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch.keys]


def split(source, *, rank=0, world=1, seed=0, workers=0, training=True, batch=4, batches=None):
    return SplitLoader(
        Shards(source, to_tensor, shuffle_buffer=8),
        rank=rank,
        world=world,
        seed=seed,
        batch_size=batch,
        num_workers=workers,
        training=training,
        batches_per_epoch=batches,
    )


def test_index_gives_sizes_and_classes(tmp_path):
    source = make_shards(tmp_path, [5, 7, 3])
    index = read_index(source)
    assert sorted(index.counts) == [3, 5, 7] and index.total == 15 and index.classes == ["a", "b", "c"]


def test_brace_patterns_expand_and_missing_shards_are_named(tmp_path):
    make_shards(tmp_path, [4, 4])
    assert read_index(str(tmp_path / "part{0..1}-000000.tar")).total == 8
    with pytest.raises(ConfigError, match=r"1 of 3 shard files missing, first .*part2-000000.tar"):
        read_index(str(tmp_path / "part{0..2}-000000.tar"))


def test_unreadable_shard_files_are_named_before_training(tmp_path):
    source = make_shards(tmp_path, [4, 4])
    (tmp_path / "part1-000000.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ConfigError, match=r"1 of 2 shard files unreadable, first .*part1-000000.tar"):
        read_index(source)


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_with_nothing_readable_are_a_data_error_that_gives_the_first_reasons(tmp_path, workers):
    make_shards(tmp_path, [4])

    def refuse(image):
        raise ValueError(f"no pixels wanted, got {image.size}")

    loader = SplitLoader(
        Shards(str(tmp_path), refuse),
        rank=0,
        world=1,
        seed=0,
        batch_size=2,
        num_workers=workers,
        training=True,
        batches_per_epoch=2,
    )
    with pytest.raises(
        DataError, match=r"no readable sample in .*part0-000000.tar.*first reasons: .*no pixels wanted"
    ):
        loader.example_samples(2) if workers == 0 else next(iter(loader.loader(0)))
    assert DataError.exit_code == 65 and not issubclass(DataError, ConfigError)  # not "bad input" (2)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_shards_that_cover_the_epoch(tmp_path, workers):
    source = make_shards(tmp_path, [8, 8, 8, 8])
    per_rank = [
        keys_of(split(source, rank=r, world=2, workers=workers, batches=4).loader(0)) for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == 32
    assert all(len(keys) == len(set(keys)) == 16 for keys in per_rank)  # no sample twice within an epoch


@pytest.mark.parametrize("sizes", [[5, 9, 4], [1, 13, 2, 7, 3], [20, 1, 1]])
def test_uneven_shards_give_every_rank_the_same_batches_and_count_what_evens_them(tmp_path, sizes):
    source = make_shards(tmp_path, sizes)  # e.g. 3 shards for 2 ranks x 2 workers
    total, world, batch = sum(sizes), 2, 2
    batches = total // (world * batch)
    consumed = []
    for rank in range(world):
        position = Position(0)
        for b in split(source, rank=rank, world=world, workers=2, batch=batch, batches=batches).loader(0):
            assert len(b.keys) == batch
            position.advance(b)
            consumed += b.keys
        assert position.batches == batches
    layout = split(source, world=world, workers=2, batch=batch, batches=batches).layout(0)
    duplicates = len(consumed) - len(set(consumed))
    assert duplicates == layout.repeated
    assert len(set(consumed)) == total - layout.dropped
    assert len(consumed) == total - layout.dropped + layout.repeated == world * batches * batch


def test_layout_balances_samples_not_shard_counts():
    from launcher.data.layout import ShardIndex, layout_epoch

    index = ShardIndex([f"s{i}" for i in range(6)], [30, 10, 10, 10, 1, 1])
    layout = layout_epoch(index, epoch=0, seed=0, world=2, workers=1, batch_size=1, batches_per_rank=31)
    assert sorted(layout.rank_samples()) == [31, 31]
    assert layout.dropped == layout.repeated == 0


def test_each_epoch_has_a_new_order_and_a_rerun_the_same(tmp_path):
    source = make_shards(tmp_path, [8, 8, 8])

    def epoch(e, seed=0):
        return keys_of(split(source, seed=seed, batches=6).loader(e))

    first, second = epoch(0), epoch(1)
    assert sorted(first) == sorted(second) and first != second
    assert epoch(0) == first
    assert epoch(0, seed=1) != first


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (2, 3)])
def test_a_position_taken_after_any_batch_resumes_the_exact_sequence(tmp_path, world, workers):
    source = make_shards(tmp_path, [5, 9, 4, 6])  # uneven: quotas differ, some workers repeat
    batches = 24 // (world * 2)

    def loader(rank, start=None):
        return split(source, rank=rank, world=world, workers=workers, batch=2, batches=batches).loader(
            1, start
        )

    for rank in range(world):
        full = [b.keys for b in loader(rank)]
        assert len(full) == batches
        for cut in range(batches + 1):
            position = Position(1)
            for b in itertools.islice(loader(rank), cut):
                position.advance(b)
            position = Position.from_dict(json.loads(json.dumps(position.to_dict())))  # as checkpointed
            rest = [b.keys for b in loader(rank, position)]
            assert full[:cut] + rest == full, f"rank {rank}, cut after {cut} batches"


def test_random_augmentation_is_seeded_per_sample_and_leaves_the_models_generator_alone(tmp_path):
    source = make_shards(tmp_path, [6, 6])

    def noisy(image):  # torch's, Python's and numpy's global RNGs, as hand-written transforms use them
        return to_tensor(image) + torch.rand(1) + random.random() + float(numpy.random.rand())

    def values(workers):
        loader = SplitLoader(
            Shards(source, noisy, shuffle_buffer=8),
            rank=0,
            world=1,
            seed=0,
            batch_size=3,
            num_workers=workers,
            training=True,
            batches_per_epoch=4,
        )
        return {k: float(x[0]) for b in loader.loader(0) for x, k in zip(b.data[0], b.keys)}

    torch.manual_seed(123)
    in_process = values(0)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.rand(1) == after  # the model's generator untouched (random and numpy: re-seeded per batch)
    assert values(2) == in_process  # same noise per sample whichever process decoded it
    assert len(set(in_process.values())) == len(in_process)  # and different across samples


def corrupt_sample(directory, shard: str, key: str) -> None:
    """Replace one sample's PNG bytes inside a shard by garbage (same length keeps the tar valid)."""
    path = directory / shard
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{key}.png")
        data[member.offset_data : member.offset_data + member.size] = b"x" * member.size
    path.write_bytes(bytes(data))


def test_corrupt_sample_and_truncated_tar_are_skipped_counted_and_named(tmp_path):
    source = make_shards(tmp_path, [6, 6, 6])
    corrupt_sample(tmp_path, "part0-000000.tar", "s0002")
    truncated = tmp_path / "part2-000000.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("s0014.png").offset_data + 10  # inside sample s0014's image
    truncated.write_bytes(truncated.read_bytes()[:cut])
    for workers in (0, 2):
        position = Position(0)
        keys = []
        for b in split(source, workers=workers, batch=3, batches=6).loader(0):
            assert len(b.keys) == 3  # quotas still filled, from repeats
            position.advance(b)
            keys += b.keys
        assert "s0002" not in keys and not {f"s{i:04d}" for i in range(14, 18)} & set(keys)
        assert position.corrupt[str(tmp_path / "part0-000000.tar")] == 1
        # s0014 is cut inside its image (one bad sample), s0015..s0017 are lost with the tail
        assert position.corrupt[str(truncated)] == 4
        assert position.repeated == 5
    val = split(source, workers=2, training=False)
    errors = [e for b in val.loader(0) for e in b.errors]
    assert sum(e["samples"] for e in errors) == 5
    assert {"shard": str(tmp_path / "part0-000000.tar"), "key": "s0002"}.items() <= next(
        e for e in errors if e["key"] == "s0002"
    ).items()
    assert len(keys_of(val.loader(0))) == 13


def test_fewer_training_shards_than_processes_is_an_error(tmp_path):
    source = make_shards(tmp_path, [4])
    with pytest.raises(ConfigError, match="1 training shards for 2 processes"):
        split(source, world=2)


def test_validation_reads_every_sample_exactly_once_across_ranks_and_workers(tmp_path):
    source = make_shards(tmp_path, [5, 9, 4])  # 3 uneven shards for 2 ranks x 2 workers
    seen = Counter()
    for rank in range(2):
        seen.update(keys_of(split(source, rank=rank, world=2, workers=2, training=False).loader(0)))
    assert len(seen) == 18 and set(seen.values()) == {1}


def test_shuffle_buffer_is_a_permutation():
    import random

    out = list(shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_labels_and_pixels_survive_the_round_trip(tmp_path):
    source = make_shards(tmp_path, [6])
    for batch in split(source, training=False).loader(0):
        for x, y, key in zip(batch.data[0], batch.data[1], batch.keys):
            i = int(key[1:])
            assert int(y) == i % 3 and torch.all(x == i % 256)


def test_pipe_sources_stream_through_a_command_with_the_index_beside_its_shard_or_named(tmp_path):
    source = make_shards(tmp_path, [4, 6])
    index = read_index(source)
    urls = [f"pipe:cat {url}" for url in index.urls]
    assert read_index(urls).counts == [4, 6]  # beside the shard each command names
    named = tmp_path / "elsewhere.json"
    (tmp_path / "index.json").rename(named)
    with pytest.raises(ConfigError, match="remote shards need one"):
        read_index(urls)
    loader = SplitLoader(
        Shards(urls, to_tensor, index=str(named)),
        rank=0,
        world=1,
        seed=0,
        batch_size=4,
        num_workers=0,
        training=False,
    )
    assert loader.total == 10
    assert sorted(keys_of(loader.loader(0))) == [f"s{i:04d}" for i in range(10)]


def test_map_style_augmentation_is_seeded_per_sample_and_leaves_the_models_generator_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return torch.rand(1) + random.random() + float(numpy.random.rand()), i % 3

    def values(workers):
        loader = SplitLoader(
            Noisy(), rank=0, world=1, seed=0, batch_size=4, num_workers=workers, training=True
        )
        return {k: float(x[0]) for b in loader.loader(0) for x, k in zip(b.data[0], b.keys)}

    torch.manual_seed(123)
    in_process = values(0)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.rand(1) == after  # reading data did not consume the model's generator
    assert values(2) == in_process and len(in_process) == 24  # same noise whichever process fetched it
    assert len(set(in_process.values())) == 24


def test_a_map_style_sample_draws_the_same_noise_in_any_batch_and_unseeded_batches_need_no_seeds():
    class SometimesNoisy(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return float(torch.rand(1)) if i % 5 == 3 else float(i)

    def read(batches):
        dataset = KeyedDataset(SometimesNoisy(), seed=0, epoch=0, training=True)
        items = [dataset.__getitems__(batch) for batch in batches]
        return {
            str(i): value for batch in items for i, value in zip(batch.indices, batch)
        }, dataset.draws_random

    alone, _ = read([[i] for i in range(12)])
    grouped, drew = read([[0, 1, 2], [4, 5, 6, 7, 8], [3, 9, 10, 11]])  # 8 draws, but 4's seed comes first
    assert grouped == alone and drew
    assert len({alone["3"], alone["8"]}) == 2
    clean, clean_drew = read([[0, 1, 2], [4, 5, 6, 7]])
    assert not clean_drew and clean == {str(i): float(i) for i in (0, 1, 2, 4, 5, 6, 7)}


# ---- persistent workers -----------------------------------------------------------------------


class PidDataset(torch.utils.data.Dataset):
    """Items are (the decoding process's pid, 0): shows which processes served a batch."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([float(os.getpid()), float(i)]), i % 3


def persistent_split(source, persistent: bool, training: bool = True) -> SplitLoader:
    dataset = source if isinstance(source, PidDataset) else Shards(source, to_tensor, shuffle_buffer=8)
    return SplitLoader(
        dataset,
        rank=0,
        world=1,
        seed=0,
        batch_size=2,
        num_workers=2,
        training=training,
        batches_per_epoch=5,
        persistent_workers=persistent,
    )


@pytest.mark.parametrize("kind", ["shards", "dataset"])
def test_persistent_workers_serve_each_epoch_as_fresh_ones_would(tmp_path, kind):
    source = make_shards(tmp_path, [5, 9, 4, 6]) if kind == "shards" else PidDataset()
    fresh, kept = persistent_split(source, False), persistent_split(source, True)
    epochs = {
        name: [keys_of(s.loader(e)) for e in range(3)] for name, s in (("fresh", fresh), ("kept", kept))
    }
    assert epochs["kept"] == epochs["fresh"]
    assert epochs["kept"][0] != epochs["kept"][1]  # the workers followed the epoch, not their first one
    val_fresh, val_kept = (
        persistent_split(source, False, training=False),
        persistent_split(source, True, training=False),
    )
    assert [keys_of(val_kept.loader(e)) for e in range(2)] == [keys_of(val_fresh.loader(e)) for e in range(2)]


def test_persistent_workers_stay_alive_across_epochs():
    def worker_pids(split) -> list[set[int]]:
        return [{int(pid) for b in split.loader(e) for pid in b.data[0][:, 0]} for e in range(2)]

    kept, fresh = (
        worker_pids(persistent_split(PidDataset(), True)),
        worker_pids(persistent_split(PidDataset(), False)),
    )
    assert kept[0] == kept[1] and len(kept[0]) == 2 and os.getpid() not in kept[0]
    assert not fresh[0] & fresh[1]  # without: new processes each epoch


@pytest.mark.parametrize("kind", ["shards", "dataset"])
def test_persistent_workers_resume_mid_epoch_exactly(tmp_path, kind):
    source = make_shards(tmp_path, [5, 9, 4, 6]) if kind == "shards" else PidDataset()
    full = [keys_of(persistent_split(source, True).loader(e)) for e in range(3)]
    resumed = persistent_split(source, True)
    position = Position(1)
    for b in itertools.islice(resumed.loader(1), 3):
        position.advance(b)
    position = Position.from_dict(json.loads(json.dumps(position.to_dict())))
    rest = keys_of(resumed.loader(1, position))
    assert full[1][:6] + rest == full[1]
    assert keys_of(resumed.loader(2)) == full[2]
    resumed.close()


def pixels_match_keys(batch) -> bool:
    """make_shards' sample s{i} has pixel value i % 256: the inputs still hold the keys' images."""
    return [int(x[0]) for x in batch.data[0]] == [int(k[1:]) % 256 for k in batch.keys]


def shared_segment(tensor: torch.Tensor) -> int:
    """The shared-memory file behind a tensor a worker sent (its inode)."""
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_reuse_their_batch_buffers(tmp_path, persistent):
    source = make_shards(tmp_path, [40, 40])
    loader = SplitLoader(
        Shards(source, to_tensor, shuffle_buffer=8),
        rank=0,
        world=1,
        seed=0,
        batch_size=4,
        num_workers=2,
        training=True,
        batches_per_epoch=20,
        persistent_workers=persistent,
    )
    segments, batches = set(), 0
    for epoch in range(2):
        for batch in loader.loader(epoch):
            assert pixels_match_keys(batch)
            segments.add(shared_segment(batch.data[0]))
            batches += 1
    ring = loader.prefetch_factor + 2  # per worker
    assert batches == 40 and len(segments) <= 2 * ring * (1 if persistent else 2)  # not one per batch
    loader.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_a_consumer_keeps_are_never_overwritten(tmp_path, workers):
    source = make_shards(tmp_path, [30, 30])
    kept = list(split(source, workers=workers, batch=3, batches=20).loader(0))  # every batch held
    assert len(kept) == 20 and all(pixels_match_keys(b) for b in kept)
    views = [
        (b.data[0][:1], b.keys[:1]) for b in split(source, workers=workers, batch=3, batches=20).loader(0)
    ]
    # a view holds its buffer too
    assert all(pixels_match_keys(Batch(data=(x, None), keys=k)) for x, k in views)
