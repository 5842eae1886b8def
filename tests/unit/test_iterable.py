"""Iterable splits (launcher/data/iterable.py): a torch IterableDataset and Hugging Face datasets,
map-style and streaming from local JSON files, split by rank and worker with equal batches per
rank, and resumed mid-epoch exactly; read through real SplitLoaders in this process."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import IterableDataset

from launcher.config import ConfigError, DataError
from launcher.data.layout import Position
from launcher.data.loader import SplitLoader


class Numbers(IterableDataset):
    """0..n-1 as one-element float tensors; no __len__."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return (torch.tensor([float(i)]) for i in range(self.n))


def loader(source, rank=0, world=2, workers=0, training=True, **kwargs) -> SplitLoader:
    return SplitLoader(
        source, rank=rank, world=world, seed=0, batch_size=2, num_workers=workers, training=training, **kwargs
    )


def values(batches) -> list[list[float]]:
    return [
        batch.data.flatten().tolist() if isinstance(batch.data, torch.Tensor) else batch.data["x"][0].tolist()
        for batch in batches
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_takes_every_world_th_item_and_each_worker_every_num_workers_th_of_those(workers):
    seen = []
    for rank in range(2):
        split = loader(Numbers(23), rank=rank, workers=workers, train_samples=23)
        batches = list(split.loader(0))
        assert split.batches_per_epoch == len(batches) == 5  # 23 // (2 x 2) whole batches per rank
        seen += [int(v) for batch in values(batches) for v in batch]
        mine = range(rank, 23, 2)
        assert all(v in mine for batch in values(batches) for v in batch)
        if workers:  # worker 0 holds items 0, 2, ... of the rank's, worker 1 items 1, 3, ...
            assert values(batches)[0] == [mine[0], mine[2]] and values(batches)[1] == [mine[1], mine[3]]
    assert len(set(seen)) == len(seen) == 20


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_mid_epoch_gives_the_rest_of_the_epoch_exactly(workers):
    split = loader(Numbers(40), rank=1, workers=workers, train_samples=40)
    batches = list(split.loader(0))
    position = Position(0)
    for batch in batches[:3]:
        position.advance(batch)
    assert values(split.loader(0, Position.from_dict(position.to_dict()))) == values(batches[3:])


def test_a_short_rank_repeats_its_slice_so_every_rank_takes_the_same_batches():
    """The stream holds 7 items but claims 16: each rank's slice (4 and 3 items) is read again to fill
    4 batches."""
    counts = []
    for rank in range(2):
        batches = list(loader(Numbers(7), rank=rank, train_samples=16).loader(0))
        counts.append(len(batches))
        assert sum(batch.repeated for batch in batches) == 8 - len(range(rank, 7, 2))
    assert counts == [4, 4]


def test_validation_reads_each_item_once_across_ranks():
    got = [
        v
        for rank in range(2)
        for batch in values(loader(Numbers(7), rank=rank, training=False).loader(0))
        for v in batch
    ]
    assert sorted(got) == list(range(7))


def test_a_stream_without_a_length_needs_train_samples_or_max_steps():
    with pytest.raises(ConfigError, match=r"train_samples=N.*--max_steps"):
        loader(Numbers(7))
    split = loader(Numbers(100), max_steps=3)
    assert split.batches_per_epoch == 3 and len(list(split.loader(0))) == 3


def test_an_empty_slice_is_a_data_error_not_a_hang():
    with pytest.raises(DataError, match="slice of the training Numbers is empty"):
        list(loader(Numbers(1), rank=1, train_samples=8).loader(0))


@pytest.fixture(scope="module")
def json_files(tmp_path_factory):
    """Two JSON-lines files of uneven lengths (11 and 6 records): x is the record's number."""
    root = tmp_path_factory.mktemp("hf")
    paths = []
    for part, count in ((0, 11), (1, 6)):
        path = root / f"part{part}.jsonl"
        path.write_text(
            "".join(json.dumps({"x": [float(100 * part + i)], "y": i % 3}) + "\n" for i in range(count))
        )
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_a_hugging_face_streaming_dataset_is_split_by_node_with_equal_batches(json_files, workers):
    import datasets  # a dev dependency

    stream = datasets.load_dataset("json", data_files=json_files, streaming=True, split="train")
    per_rank = []
    for rank in range(2):  # 2 shards for 2 ranks: rank 0 reads part0 (11 records), rank 1 part1 (6)
        split = loader(stream, rank=rank, workers=workers, train_samples=17)
        batches = list(split.loader(0))
        per_rank.append(values(batches))
        assert len(batches) == 4
        assert {v // 100 for batch in values(batches) for v in batch} == {rank}
        position = Position(0)
        position.advance(batches[0])
        assert values(split.loader(0, position)) == values(batches[1:])
    assert sum(b.repeated for b in loader(stream, rank=1, train_samples=17).loader(0)) == 2  # 8 of its 6


def test_a_hugging_face_map_style_dataset_is_split_like_any_map_style_dataset():
    import datasets  # a dev dependency

    table = datasets.Dataset.from_dict(
        {"x": [[float(i)] for i in range(13)], "y": [i % 3 for i in range(13)]}
    )
    seen = []
    for rank in range(2):
        split = loader(table, rank=rank)
        assert split.example_samples(1) == [{"x": [0.0], "y": 0}]
        batches = list(split.loader(0))
        assert len(batches) == 3  # 13 // (2 x 2) per rank
        seen += [v for batch in values(batches) for v in batch]
    assert len(set(seen)) == len(seen) == 12
