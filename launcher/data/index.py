"""Shard indexes: which tar files a source names, how many samples each holds, and whether the
local ones are there and readable, all before anything trains.

`index.json` beside the shards (written by the shard writer) gives the counts without scanning;
remote shards (s3://, gs://, http(s)://, `pipe:` commands) need one, beside the shard a URL or
command names or named by `Shards(index=...)`, path or URL. Every URL form is looked up by the
shard's own file name (launcher/data/remote.py, `shard_name`). Local shards without an entry are
scanned once.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Sequence

from webdataset.shardlists import expand_urls

from launcher.config import ConfigError, DataError
from launcher.data.remote import Unreachable, beside, is_remote, missing_tools, read_remote, shard_name
from launcher.data.tar_reader import TarReadError, count_samples


INDEX_NAME = "index.json"


@dataclass
class ShardIndex:
    urls: list[str]
    counts: list[int]
    classes: list[str] = field(default_factory=list)
    # per shard, samples of each label (index.json's "class_counts")
    class_counts: list[list[int]] | None = None
    # per shard, {"short", "long", "max"} pixels ("image_sides")
    image_sides: list[dict[str, int]] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts)


def read_index(urls: str | Sequence[str], index_file: str = "") -> ShardIndex:
    """Resolve a shard source to its shard URLs and sample counts (from index.json, else a scan).

    Local shard files are checked before anything trains: missing or unreadable ones are an error.
    """
    if isinstance(urls, str) and os.path.isdir(urls):
        path = os.path.join(urls, INDEX_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"shard directory {urls} has no {INDEX_NAME}; write shards with "
                              "scripts/make_shards.py or list the .tar files instead")
        index = _load_index_file(path)
        names = list(index["shards"])
        found = ShardIndex([os.path.join(urls, n) for n in names], [index["shards"][n] for n in names],
                           list(index.get("classes", [])), shard_class_counts(index, names),
                           shard_image_sides(index, names))
        check_shard_files(found.urls)
        return found
    expanded = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        expanded.extend(expand_urls(url))
    if not expanded:
        raise ConfigError(f"no shards in {urls!r}")
    check_shard_files([u for u in expanded if not is_remote(u)])
    missing = missing_tools([*expanded, index_file])
    if missing:
        raise ConfigError(f"reading {expanded[0]} needs {' and '.join(missing)}, not found on PATH; install "
                          f"{'them' if len(missing) > 1 else 'it'} (the aws CLI: `pip install awscli`), or copy the "
                          "shards to a local directory")
    index = _find_index(index_file, expanded[0])
    counts = []
    for url in expanded:
        name = shard_name(url)
        if name in index["shards"]:
            counts.append(index["shards"][name])
        elif is_remote(url):
            raise ConfigError(f"no sample count for {name} ({url}) in an {INDEX_NAME}: remote shards need one, beside "
                              f"them or named by Shards(..., index=PATH_OR_URL); write it with `launcher shards`")
        else:
            counts.append(_count_samples(url))
    names = [shard_name(url) for url in expanded]
    return ShardIndex(expanded, counts, list(index.get("classes", [])), shard_class_counts(index, names),
                      shard_image_sides(index, names))


def _find_index(index_file: str, first_url: str) -> dict:
    """The index named, or the one beside the first shard (a path, or a URL read remotely); an
    empty one when there is none beside a local shard."""
    where = index_file or beside(first_url, INDEX_NAME)
    if not where:
        return {"shards": {}}
    if not is_remote(where):
        return _load_index_file(where) if index_file or os.path.isfile(where) else {"shards": {}}
    try:
        text = read_remote(where)
    except Unreachable as error:
        if not index_file:  # none beside the shards: each gets the error naming what is missing
            return {"shards": {}}
        raise ConfigError(f"unreadable shard index {where} ({one_line(error)}); {_INDEX_FIX}") from None
    return _parse_index(text, where)


def shard_class_counts(index: dict, names: Sequence[str]) -> list[list[int]] | None:
    """Each named shard's samples per label from an index's "class_counts", or None when the index
    has none for some shard (an older or hand-written index: they are only reported, never needed)."""
    table = index.get("class_counts")
    if not isinstance(table, dict):
        return None
    counts = [table.get(name) for name in names]
    if not all(isinstance(c, list) and all(isinstance(n, int) and n >= 0 for n in c) for c in counts):
        return None
    return counts


def shard_image_sides(index: dict, names: Sequence[str]) -> list[dict[str, int]] | None:
    """Each named shard's image sides from an index's "image_sides" ({"short": median shorter side,
    "long": median longer side, "max": longest side}, pixels), or None when some shard has none
    (an older index, or samples without images): they are only reported, never needed."""
    table = index.get("image_sides")
    if not isinstance(table, dict):
        return None
    sides = [table.get(name) for name in names]
    if not all(isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] > 0 for k in ("short", "long", "max"))
               for s in sides):
        return None
    return sides


def check_shard_files(paths: Sequence[str]) -> None:
    """Every local shard exists and starts with a tar header (one 512-byte read each, no scan)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(paths)} shard files missing, first {missing[0]}; "
                          "build them (e.g. `make demo` writes data/digits) or fix the path")
    unreadable = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
        except (OSError, ValueError, tarfile.TarError) as error:
            unreadable.append((path, error))
    if unreadable:
        path, error = unreadable[0]
        raise ConfigError(f"{len(unreadable)} of {len(paths)} shard files unreadable, first {path} ({error}); "
                          "rewrite them with scripts/make_shards.py or remove them from the index")


def _load_index_file(path: str) -> dict:
    """index.json, checked: {"shards": {NAME: COUNT >= 0, ...}, "classes": [NAME, ...] (optional)}.
    Anything else is refused in one line, before a count reaches the layout's arithmetic."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"unreadable shard index {path} ({one_line(error)}); {_INDEX_FIX}") from None
    return _parse_index(text, path)


def _parse_index(text: bytes, path: str) -> dict:
    try:
        index = json.loads(text.decode("utf-8"))
    except ValueError as error:  # invalid JSON or not UTF-8
        raise ConfigError(f"unreadable shard index {path} ({one_line(error)}); {_INDEX_FIX}") from None
    problem = _index_problem(index)
    if problem:
        raise ConfigError(f"shard index {path} {problem}; {_INDEX_FIX}")
    return index


_INDEX_FIX = ("rewrite it with `launcher shards` (or scripts/make_shards.py), or delete it and list the .tar "
              "files, which are then counted by a scan")


def _index_problem(index) -> str:
    """What is wrong with a parsed index.json, or ""."""
    if not isinstance(index, dict):
        return f"holds a JSON {type(index).__name__}, not an object with \"shards\""
    shards = index.get("shards")
    if not isinstance(shards, dict):
        return "has no \"shards\" object (shard file name -> sample count)"
    for name, count in shards.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return f"gives shard {name!r} the count {json.dumps(count)[:40]}, not an integer >= 0"
    classes = index.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, (str, int, float)) for c in classes):
        return "has \"classes\" that are not a list of names"
    return ""


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def _count_samples(path: str) -> int:
    """A local shard with no index entry, counted from its headers; a damaged one is refused here,
    since without a count its samples cannot be laid out (nor its losses counted)."""
    try:
        return count_samples(path)
    except (OSError, TarReadError) as error:
        raise DataError(f"shard {path} is damaged ({one_line(error)}) and has no count in an {INDEX_NAME}; "
                        "rewrite it (`launcher shards`), or remove it from the list") from None
