"""A Hugging Face streaming dataset resumed through its own state_dict (launcher/data/iterable.py):
each DataLoader worker continues after the last batch the run consumed from it, without reading the
consumed samples again; one shuffled through a buffer is read again, exactly; a checkpoint with and
one without dataset states are each read by the other kind of dataset, by reading the slice again;
a state from another pipeline is refused in one line.
Real datasets from local JSON files, read through real SplitLoaders with 2 DataLoader worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from launcher.config import DataError
from launcher.data.iterable import resume_note
from launcher.data.layout import Position
from launcher.data.loader import SplitLoader

WORKERS = 2
CONSUMED = 4  # batches before the checkpoint: as many from each worker


def note_read(example: dict, log: str) -> dict:
    """A map() that appends each example it is called on to `log` (one line per call, from any worker)."""
    with open(log, "a") as f:
        f.write(f"{example['x'][0]}\n")
    return example


def reads(log: Path) -> list[float]:
    return [float(line) for line in log.read_text().split()] if log.exists() else []


class JsonLines(IterableDataset):
    """The same records as `load_dataset("json", ...)` streams at epoch 0, in the same order, with no
    state_dict."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __iter__(self):
        return (json.loads(line) for path in self.paths for line in Path(path).read_text().splitlines())


@pytest.fixture(scope="module")
def json_files(tmp_path_factory) -> list[str]:
    """Two JSON-lines files of 24 and 20 records: x is the record's number."""
    root = tmp_path_factory.mktemp("hf_state")
    paths = []
    for part, count in ((0, 24), (1, 20)):
        path = root / f"part{part}.jsonl"
        path.write_text(
            "".join(json.dumps({"x": [float(100 * part + i)], "y": i % 3}) + "\n" for i in range(count))
        )
        paths.append(str(path))
    return paths


def stream(json_files, log: Path | None = None):
    import datasets  # a dev dependency

    dataset = datasets.load_dataset("json", data_files=json_files, streaming=True, split="train")
    return dataset.map(note_read, fn_kwargs={"log": str(log)}) if log else dataset


def loader(source, world: int, samples: int, rank: int = 0) -> SplitLoader:
    return SplitLoader(
        source,
        rank=rank,
        world=world,
        seed=0,
        batch_size=2,
        num_workers=WORKERS,
        training=True,
        train_samples=samples,
    )


def values(batches) -> list[list[float]]:
    return [batch.data["x"][0].tolist() for batch in batches]


def checkpoint(batches) -> Position:
    """The position after the first CONSUMED batches, through the JSON a checkpoint writes."""
    position = Position(0)
    for batch in batches[:CONSUMED]:
        position.advance(batch)
    return Position.from_dict(json.loads(json.dumps(position.to_dict())))


def test_a_resume_continues_each_worker_from_its_state_without_reading_the_consumed_samples(
    json_files, tmp_path
):
    log = tmp_path / "reads.txt"
    split = loader(stream(json_files, log), world=2, samples=44)  # rank 0 of 2 streams part0: 24 records
    batches = list(split.loader(0))
    assert len(batches) == 11 and reads(log)  # 44 // (2 x 2) batches; the map ran
    position = checkpoint(batches)
    assert sorted(position.states) == [0, 1]  # one state per worker, as of its last consumed batch
    consumed = {v for batch in values(batches[:CONSUMED]) for v in batch}
    assert "through its state_dict" in resume_note(split.source, position)

    log.unlink()
    assert values(split.loader(0, position)) == values(batches[CONSUMED:])
    # A worker resumes after its own last item: it passes over at most the other worker's last one.
    assert len(consumed & set(reads(log))) <= WORKERS - 1

    other_pipeline = loader(stream(json_files), world=2, samples=44)  # the same files, no map()
    with pytest.raises(
        DataError, match=r"MappedExamplesIterable.*does not fit this dataset's.*resume with the"
    ):
        other_pipeline.loader(0, position)

    log.unlink()  # the same checkpoint without states (a re-reading one) reads every consumed sample again
    position.states.clear()
    assert "reads its slice again" in resume_note(split.source, position)
    assert values(split.loader(0, position)) == values(batches[CONSUMED:])
    assert consumed <= set(reads(log))


def test_a_resume_from_any_batch_is_exact_across_repeated_passes(json_files):
    """Rank 1 of 2 streams part1 (20 records) for an epoch of 30 each: its workers' slices are read
    again (a second pass) within the epoch. From every checkpoint the rest is the same batches, keys
    and repeat counts."""
    split = loader(stream(json_files), world=2, samples=60, rank=1)
    batches = list(split.loader(0))
    assert sum(batch.repeated for batch in batches) == 10
    for consumed in range(1, len(batches)):
        position = Position(0)
        for batch in batches[:consumed]:
            position.advance(batch)
        position = Position.from_dict(json.loads(json.dumps(position.to_dict())))
        assert position.states
        rest = list(split.loader(0, position))
        assert [(b.keys, b.repeated, b.data["x"][0].tolist()) for b in rest] == [
            (b.keys, b.repeated, b.data["x"][0].tolist()) for b in batches[consumed:]
        ]


def test_a_stream_shuffled_through_a_buffer_resumes_by_reading_again_exactly(json_files):
    """Its state does not hold the buffer: workers refilling theirs at their own places would overlap."""
    split = loader(stream(json_files).shuffle(seed=1, buffer_size=4), world=1, samples=40)
    batches = list(split.loader(0))
    position = checkpoint(batches)
    assert not position.states and "it shuffles through a buffer" in resume_note(split.source, position)
    rest = values(split.loader(0, position))
    assert rest == values(batches[CONSUMED:])
    seen = [v for batch in values(batches[:CONSUMED]) + rest for v in batch]
    assert len(seen) == len(set(seen)) == 40  # each item once in the epoch


def test_checkpoints_with_and_without_dataset_states_are_each_read_by_the_other_kind(json_files):
    """One process (world 1): the torch IterableDataset and the HF one give each worker the same items."""
    hugging_face, plain = (
        loader(stream(json_files), world=1, samples=40),
        loader(JsonLines(json_files), world=1, samples=40),
    )
    hf_batches, plain_batches = list(hugging_face.loader(0)), list(plain.loader(0))
    assert values(hf_batches) == values(plain_batches)
    with_states, without = checkpoint(hf_batches), checkpoint(plain_batches)
    assert with_states.states and not without.states
    assert values(plain.loader(0, with_states)) == values(plain_batches[CONSUMED:])  # states unused: re-read
    assert values(hugging_face.loader(0, without)) == values(hf_batches[CONSUMED:])  # no states: re-read
    assert isinstance(plain_batches[0].data["x"][0], torch.Tensor)
