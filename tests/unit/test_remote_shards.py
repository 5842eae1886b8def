"""Shards in object storage (launcher/data/remote.py): read from a real server on loopback, an
HTTP server and moto's S3 server (run from .venv-moto), each dropping one connection mid-shard
once: the read is retried, no sample is lost and nothing counts as unreadable. A shard that keeps failing is
counted as unreachable, apart from unreadable ones. The index is found by the shard's own name
for every URL form, docs/data.md's `pipe:aws s3 cp s3://bucket/x.tar -` included."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_data import make_shards, to_tensor

from conftest import ROOT
from launcher.config import ConfigError
from launcher.data.index import read_index
from launcher.data.layout import Position
from launcher.data.loader import SplitLoader
from launcher.data.remote import shard_name
from launcher.data.spec import Shards
from scripts.processes import free_port

SIZES = [5, 7, 4]  # samples per shard: part0, part1, part2
FLAKY = "part1-000000.tar"  # the shard whose first download breaks off halfway


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves `fetch(path, headers, method) -> (status, headers, body)`; the first GET of a path ending in
    `flaky` sends half its body and drops the connection; `always` fails every GET of that path."""

    def __init__(self, fetch, flaky: str = FLAKY, always: str = ""):
        self.fetch, self.flaky, self.always = fetch, flaky, always
        self.gets: list[str] = []
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - the handler's API
        self._reply(*self.server.fetch(self.path, dict(self.headers), "HEAD"), cut=False, body=False)

    def do_GET(self):  # noqa: N802
        server = self.server
        path = self.path.split("?")[0]  # without a presigned URL's signature
        server.gets.append(path)
        cut = path.endswith(server.always or "\0") or (
            path.endswith(server.flaky) and server.gets.count(path) == 1
        )
        self._reply(*server.fetch(self.path, dict(self.headers), "GET"), cut=cut)

    def _reply(self, status: int, headers: dict, content: bytes, cut: bool, body: bool = True) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content[: len(content) // 2] if cut else content)
        if cut:  # a network blip: the connection ends mid-body
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote"), SIZES)


@pytest.fixture
def serve(shard_dir):
    """Start a FlakyServer of the shard directory's files (stopped after the test)."""
    servers = []

    def files(path, headers, method):
        with open(f"{shard_dir}/{path.lstrip('/')}", "rb") as f:
            return 200, {}, f.read()

    def start(**options) -> FlakyServer:
        servers.append(FlakyServer(files, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setenv("LAUNCHER_READ_BACKOFF_S", "0")  # retried at once: no sleep in a test


def samples_read(source: Shards, workers: int = 0) -> tuple[list[str], Position]:
    loader = SplitLoader(source, rank=0, world=1, seed=0, batch_size=4, num_workers=workers, training=False)
    position, keys = Position(0), []
    for batch in loader.loader(0):
        position.advance(batch)
        keys += batch.keys
    return keys, position


def all_keys() -> list[str]:
    return [f"s{i:04d}" for i in range(sum(SIZES))]


def test_shards_over_http_survive_a_dropped_connection(serve, quick_retries):
    server = serve()
    keys, position = samples_read(
        Shards(f"{server.url}/part{{0..2}}-000000.tar", to_tensor, shuffle_buffer=0)
    )
    assert sorted(keys) == all_keys()
    assert position.corrupt == {} and position.unreachable == {}
    assert server.gets.count(f"/{FLAKY}") == 2  # the broken download, then the retry
    assert "/index.json" in server.gets  # found beside the shards


def test_a_shard_that_keeps_failing_is_unreachable_not_unreadable(serve, quick_retries):
    server = serve(always=FLAKY)
    keys, position = samples_read(
        Shards(
            f"{server.url}/part{{0..2}}-000000.tar",
            to_tensor,
            shuffle_buffer=0,
            index=f"{server.url}/index.json",
        )
    )
    part1 = all_keys()[SIZES[0] : SIZES[0] + SIZES[1]]
    read_of_part1 = [key for key in keys if key in part1]  # those before the break: the stream ends there
    assert sorted(set(keys) - set(part1)) == [key for key in all_keys() if key not in part1]
    assert position.corrupt == {}
    assert position.unreachable == {f"{server.url}/{FLAKY}": SIZES[1] - len(read_of_part1)}
    assert server.gets.count(f"/{FLAKY}") == 4  # LAUNCHER_READ_TRIES' default


MOTO_SERVER = ROOT / ".venv-moto" / "bin" / "moto_server"  # `make test` builds it: boto3 stays out of .venv


@pytest.fixture(scope="module")
def s3(shard_dir):
    """moto's S3 server on loopback holding the shards and index.json in bucket `bucket`, behind a
    server that drops one download of part1 halfway; the aws CLI pointed at it. moto runs from a
    venv of its own: with boto3 beside it, every `import accelerate` imports boto3 too (its
    SageMaker config), about a second in each of the suite's hundreds of processes."""
    server = shutil.which("moto_server") or str(MOTO_SERVER)
    if not os.access(server, os.X_OK):
        pytest.fail(f"{MOTO_SERVER} is missing: `make test` installs moto[server] there")
    port = free_port()
    moto = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        put(endpoint, "/bucket", b"", wait_for=moto)  # moto checks no signature: plain PUTs fill the bucket
        for name in [*(f"part{i}-000000.tar" for i in range(3)), "index.json"]:
            put(endpoint, f"/bucket/shards/{name}", Path(shard_dir, name).read_bytes())

        def forward(path, headers, method):
            request = urllib.request.Request(
                endpoint + path,
                method=method,
                headers={k: v for k, v in headers.items() if k.lower() != "host"},
            )
            try:
                with urllib.request.urlopen(request) as reply:
                    return reply.status, dict(reply.headers), reply.read()
            except urllib.error.HTTPError as error:  # a 404 for a missing key: passed on as it is
                return error.code, dict(error.headers), error.read()

        proxy = FlakyServer(forward)
        tools = os.path.dirname(sys.executable)  # the aws CLI of the dev extra, beside this Python
        yield (
            proxy,
            {**environment, "AWS_ENDPOINT_URL": proxy.url, "PATH": tools + os.pathsep + os.environ["PATH"]},
        )
        proxy.shutdown()
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait()


def put(endpoint: str, path: str, body: bytes, wait_for: subprocess.Popen | None = None) -> None:
    """PUT `body` at `path`; with `wait_for`, retried for up to a minute while that server starts."""
    deadline = time.monotonic() + 60
    while True:
        try:
            # not urllib's form type
            request = urllib.request.Request(
                endpoint + path, data=body, method="PUT", headers={"Content-Type": "application/octet-stream"}
            )
            urllib.request.urlopen(request, timeout=60).close()
            return
        except urllib.error.URLError as error:  # refused: not listening yet
            if (
                wait_for is None
                or isinstance(error, urllib.error.HTTPError)
                or wait_for.poll() is not None
                or time.monotonic() > deadline
            ):
                raise
        try:
            wait_for.wait(timeout=0.1)  # returns at once only if the server has exited
        except subprocess.TimeoutExpired:
            pass


def test_shards_from_s3_survive_a_dropped_connection(s3, quick_retries, monkeypatch):
    proxy, environment = s3
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    keys, position = samples_read(
        Shards("s3://bucket/shards/part{1..2}-000000.tar", to_tensor, shuffle_buffer=0)
    )
    assert sorted(keys) == all_keys()[SIZES[0] :]  # each aws CLI call takes seconds: two shards
    assert position.corrupt == {} and position.unreachable == {}
    assert proxy.gets.count(f"/bucket/shards/{FLAKY}") == 2  # the broken download, then the retry

    # docs/data.md's form: a pipe: command, its count from the index beside the shard it names
    pipe = "pipe:aws s3 cp s3://bucket/shards/part2-000000.tar -"
    keys, position = samples_read(Shards(pipe, to_tensor, shuffle_buffer=0))
    assert sorted(keys) == all_keys()[-SIZES[2] :] and position.corrupt == {}


def test_a_url_whose_tools_are_missing_is_refused_before_anything_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no aws, no curl
    with pytest.raises(ConfigError, match="^reading s3://bucket/x.tar needs aws and curl, not found on PATH"):
        read_index("s3://bucket/x.tar")


@pytest.mark.parametrize(
    "url, name",
    [
        ("pipe:aws s3 cp s3://bucket/x.tar -", "x.tar"),
        ("pipe:curl -s 'https://host/d/y.tar?sig=1'", "y.tar"),
        ("https://host/d/z.tar?X-Amz-Signature=abc", "z.tar"),
        ("gs://bucket/p/w.tar", "w.tar"),
        ("/data/shards/v.tar", "v.tar"),
    ],
)
def test_the_index_is_looked_up_by_the_shard_s_own_name(url, name):
    assert shard_name(url) == name
