"""Shards that are not local files: `s3://`, `gs://` and `http(s)://` URLs and `pipe:` commands,
read as a byte stream that survives a network blip.

A URL is streamed by the command-line tools its storage is used with, as WebDataset's `gopen`
handlers do: `curl -f -sS -L URL` for http(s); for s3, curl on the URL that `aws s3 presign URL`
signs (the endpoint, region and credentials from the usual AWS_* variables and files;
AWS_ENDPOINT_URL for an S3-compatible server); `gsutil cat URL`; a `pipe:COMMAND` runs COMMAND.
The tools are what a cluster has and configures already; no Python client library is needed.
Not `aws s3 cp URL -`: when a download breaks off, aws-cli 1.45 retries it by itself and writes
the whole object again after the part already written, and exits 0 (a tar whose samples come
twice, silently); as a `pipe:` command it is fine on a network that does not drop connections.

A read that fails (the tool exits with an error, or the connection breaks) is retried: the
stream is opened again and the bytes read before are skipped, so the tar reader sees one
unbroken stream. Waits double from LAUNCHER_READ_BACKOFF_S (default 1 s) for LAUNCHER_READ_TRIES
tries in all (default 4: at most 1 + 2 + 4 = 7 s of waiting per failure). Only then is the shard
`Unreachable`: the loader counts the samples it loses as unreachable, apart from unreadable
(corrupt) ones. Bad bytes (a truncated or damaged tar) are never retried.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlparse


REMOTE_SCHEMES = ("s3", "gs", "http", "https")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class Unreachable(OSError):
    """A shard (or index) could not be fetched after every retry."""


def is_remote(url: str) -> bool:
    """A URL read through a command (s3://, gs://, http(s)://, pipe:), not a local path."""
    return url.startswith("pipe:") or urlparse(url).scheme in REMOTE_SCHEMES


def location(url: str) -> str:
    """Where a shard lives: the URL itself, or for `pipe:COMMAND` the argument of COMMAND that names
    a shard file (`pipe:aws s3 cp s3://b/x.tar -` -> `s3://b/x.tar`); "" when none does."""
    if not url.startswith("pipe:"):
        return url
    words = shlex.split(url[len("pipe:"):])
    named = [w for w in words if urlparse(w).path.endswith(SHARD_SUFFIXES) or w.endswith(SHARD_SUFFIXES)]
    return named[0] if named else ""


def shard_name(url: str) -> str:
    """The shard's own file name, as index.json lists it, for every URL form: a path, an
    s3/gs/http(s) URL (without its query), or the shard a `pipe:` command reads."""
    where = location(url)
    return os.path.basename(urlparse(where).path if urlparse(where).scheme else where)


def beside(url: str, name: str) -> str:
    """The file `name` in the same directory (or bucket prefix) as the shard `url` names; "" if none."""
    where = location(url)
    if not where:
        return ""
    parsed = urlparse(where)
    if parsed.scheme in REMOTE_SCHEMES:
        directory = parsed.path.rsplit("/", 1)[0]
        return parsed._replace(path=f"{directory}/{name}", query="", fragment="").geturl()
    return os.path.join(os.path.dirname(where), name)


def command(url: str) -> list[str]:
    """The command that writes the shard's bytes to its stdout."""
    if url.startswith("pipe:"):
        return ["/bin/sh", "-c", url[len("pipe:"):]]
    scheme = urlparse(url).scheme
    if scheme == "s3":  # signed by the aws CLI, fetched by curl: see the module docstring
        return ["/bin/sh", "-c", 'signed=$(aws s3 presign "$1") && exec curl -f -sS -L "$signed"', "sh", url]
    if scheme == "gs":
        return ["gsutil", "-q", "cat", url]
    return ["curl", "-f", "-sS", "-L", url]


TOOLS = {"s3": ("aws", "curl"), "gs": ("gsutil",), "http": ("curl",), "https": ("curl",)}


def missing_tools(urls: list[str]) -> list[str]:
    """The command-line tools that reading `urls` needs and this machine lacks (on PATH)."""
    needed = {tool for url in urls for tool in TOOLS.get(urlparse(url).scheme, ())}
    return sorted(tool for tool in needed if shutil.which(tool) is None)


@dataclass(frozen=True)
class Backoff:
    """How often and how long a failed read is retried."""

    tries: int = 4  # reads in all, the first included
    first_s: float = 1.0  # the first wait; each next one doubles

    @classmethod
    def from_environment(cls) -> "Backoff":
        return cls(int(os.environ.get("LAUNCHER_READ_TRIES", cls.tries)),
                   float(os.environ.get("LAUNCHER_READ_BACKOFF_S", cls.first_s)))

    def wait(self, failures: int) -> None:
        """Sleep before the read after `failures` failed ones."""
        if self.first_s > 0:
            time.sleep(self.first_s * 2 ** (failures - 1))


class RemoteStream(io.RawIOBase):
    """The bytes of `url` (see `command`), opened again after a failure and fast-forwarded to
    where the last read stopped; raises `Unreachable` once `backoff.tries` reads have failed."""

    def __init__(self, url: str, backoff: Backoff | None = None):
        self.url, self.backoff = url, backoff or Backoff.from_environment()
        self.offset = 0  # bytes handed out so far
        self.failures = 0
        self.process: subprocess.Popen | None = None
        self.ended = False  # the command finished successfully: nothing more to read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.ended:
            try:
                if self.process is None:
                    self._open()
                count = self.process.stdout.readinto(buffer)
                if count == 0:
                    self._finish()
                    self.ended = True
                self.offset += count
                return count
            except OSError as error:
                self._kill()
                self.failures += 1
                if self.failures >= self.backoff.tries:
                    raise Unreachable(f"{self.url}: {self.failures} reads failed, the last: {error}") from error
                self.backoff.wait(self.failures)
        return 0

    def _open(self) -> None:
        # stderr to a file: a pipe that nobody reads while stdout is read could fill and stall the command
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command(self.url), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=self.errors)
        left = self.offset  # read before the failure: skip it
        while left:
            skipped = self.process.stdout.read(min(left, 1 << 20))
            if not skipped:
                self._finish()
                raise OSError(f"the stream ended at byte {self.offset - left}, before byte {self.offset} "
                              "where the failed read stopped")
            left -= len(skipped)

    def _finish(self) -> None:
        """At the end of the stream: an error unless the command succeeded."""
        process, self.process = self.process, None
        code = process.wait()
        process.stdout.close()
        self.errors.seek(0)
        message = " ".join(self.errors.read().decode("utf-8", "replace").split())
        self.errors.close()
        if code != 0:
            raise OSError(f"{shlex.join(process.args)} exited {code}: {message[-300:]}")

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.errors.close()
        self.process = None

    def close(self) -> None:
        self._kill()
        super().close()


def open_remote(url: str, backoff: Backoff | None = None) -> io.BufferedReader:
    """A buffered reader of the shard (or any file) at `url`, retried as the module says."""
    return io.BufferedReader(RemoteStream(url, backoff), buffer_size=1 << 20)


def read_remote(url: str) -> bytes:
    """All of a small remote file (an index.json)."""
    with open_remote(url) as stream:
        return stream.read()
