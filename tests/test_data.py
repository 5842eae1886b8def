"""Shard streaming on real tar shards: splitting by rank and worker, shuffling, validation counts."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from launcher.config import ConfigError
from launcher.data import SplitLoader, Shards, read_index, shuffle_buffer
from launcher.shards import write_shards


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
        samples += [{"__key__": f"s{i:04d}", "png": png(i % 256), "cls": i % 3} for i in range(start, start + size)]
        start += size
    # write_shards cuts by count, so write each shard by its own call into one directory
    index = {"shards": {}, "classes": ["a", "b", "c"]}
    offset = 0
    for n, size in enumerate(sizes):
        part = write_shards(samples[offset:offset + size], str(directory), max_count=size, prefix=f"part{n}",
                            classes=["a", "b", "c"])
        index["shards"].update(part["shards"])
        offset += size
    (directory / "index.json").write_text(json.dumps(index))
    return str(directory)


def keys_of(loader) -> list[str]:
    return [key for _, _, batch_keys in loader for key in batch_keys]


def split(source, *, rank=0, world=1, seed=0, workers=0, training=True, batch=4):
    return SplitLoader(Shards(source, to_tensor, shuffle_buffer=8), rank=rank, world=world, seed=seed,
                       batch_size=batch, num_workers=workers, training=training)


def take(split_loader, epoch, batches):
    keys = []
    for _, _, batch_keys in split_loader.loader(epoch):
        keys += batch_keys
        if len(keys) >= batches * split_loader.batch_size:
            break
    return keys


def test_index_gives_sizes_and_classes(tmp_path):
    source = make_shards(tmp_path, [5, 7, 3])
    index = read_index(source)
    assert sorted(index.counts) == [3, 5, 7] and index.total == 15 and index.classes == ["a", "b", "c"]


def test_brace_patterns_expand_and_missing_shards_are_named(tmp_path):
    make_shards(tmp_path, [4, 4])
    assert read_index(str(tmp_path / "part{0..1}-000000.tar")).total == 8
    with pytest.raises(ConfigError, match=r"1 of 3 shard files missing, first .*part2-000000.tar"):
        read_index(str(tmp_path / "part{0..2}-000000.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_shards_that_cover_the_epoch(tmp_path, workers):
    # Shard sizes a multiple of the batch: per-worker batches never straddle a repeat. (Uneven
    # splits are balanced and counted by the exact-epoch streaming, not here.)
    source = make_shards(tmp_path, [8, 8, 8, 8])
    per_rank = [take(split(source, rank=r, world=2, workers=workers), epoch=0, batches=4) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == 32
    assert all(len(set(keys)) == 16 for keys in per_rank)  # no sample twice within an epoch


def test_each_epoch_has_a_new_order_and_a_rerun_the_same(tmp_path):
    source = make_shards(tmp_path, [8, 8, 8])
    first, second = take(split(source), 0, 6), take(split(source), 1, 6)
    assert sorted(first) == sorted(second) and first != second
    assert take(split(source), 0, 6) == first
    assert take(split(source, seed=1), 0, 6) != first


def test_training_stream_cycles_so_a_short_rank_never_runs_dry(tmp_path):
    source = make_shards(tmp_path, [2, 10])  # rank 0 or 1 gets only 2 samples
    for rank in range(2):
        assert len(take(split(source, rank=rank, world=2), 0, 3)) == 12


def test_validation_reads_every_sample_exactly_once_across_ranks_and_workers(tmp_path):
    source = make_shards(tmp_path, [5, 9, 4])  # 3 uneven shards for 2 ranks x 2 workers
    seen = Counter()
    for rank in range(2):
        seen.update(keys_of(split(source, rank=rank, world=2, workers=2, training=False).loader(0)))
    assert len(seen) == 18 and set(seen.values()) == {1}


def test_fewer_training_shards_than_processes_is_an_error(tmp_path):
    source = make_shards(tmp_path, [4])
    with pytest.raises(ConfigError, match="1 training shards for 2 processes"):
        split(source, world=2)


def test_shuffle_buffer_is_a_permutation():
    import random
    out = list(shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_labels_and_pixels_survive_the_round_trip(tmp_path):
    source = make_shards(tmp_path, [6])
    for inputs, labels, keys in split(source, training=False).loader(0):
        for x, y, key in zip(inputs, labels, keys):
            i = int(key[1:])
            assert int(y) == i % 3 and torch.all(x == i % 256)


def test_pipe_sources_stream_through_a_command_with_an_explicit_index(tmp_path):
    source = make_shards(tmp_path, [4, 6])
    index = read_index(source)
    urls = [f"pipe:cat {url}" for url in index.urls]
    with pytest.raises(ConfigError, match="pipe: sources need an index"):
        read_index(urls)
    loader = SplitLoader(Shards(urls, to_tensor, index=str(tmp_path / "index.json")), rank=0, world=1, seed=0,
                         batch_size=4, num_workers=0, training=False)
    assert loader.total == 10
    assert sorted(keys_of(loader.loader(0))) == [f"s{i:04d}" for i in range(10)]
