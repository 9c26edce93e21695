"""End-to-end tests of the dataset download against a real HTTP server on 127.0.0.1.

The server serves a small zip built here in the layout of ``data-v0.zip`` (a ``dataset.sqlite``
and a few ``<uuid>.pickle.bz2`` files), answers ``Range`` requests, and can drop the connection
after a given number of bytes, flip a byte, ignore ``Range`` or stall. No test talks to any other
host.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import pickle
import random
import shutil
import socket
import sqlite3
import threading
import uuid
import zipfile
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from crowdplay_minari import download
from crowdplay_minari.download import (
    DATASET_DIRNAME,
    MANIFEST_NAME,
    DownloadError,
    download_dataset,
)

# ---------------------------------------------------------------- the dataset and its zip


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """File name -> bytes of a tiny dataset that looks like crowdplay_atari-v0."""
    rng = random.Random(7)
    sqlite_path = tmp_path_factory.mktemp("sqlite") / "dataset.sqlite"
    with sqlite3.connect(sqlite_path) as db:
        db.execute("CREATE TABLE episodes (uuid TEXT PRIMARY KEY, env_id TEXT, score REAL)")
        uuids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3)]
        db.executemany(
            "INSERT INTO episodes VALUES (?, ?, ?)",
            [(u, "space_invaders", rng.uniform(0, 1000)) for u in uuids],
        )
    db.close()
    files = {"dataset.sqlite": sqlite_path.read_bytes()}
    for u in uuids:
        steps = [
            {"action": rng.randrange(18), "reward": rng.random(), "obs": rng.randbytes(256)}
            for _ in range(120)
        ]
        files[f"{u}.pickle.bz2"] = bz2.compress(pickle.dumps(steps))
    return files


def make_zip(files: dict[str, bytes], prefix: str = "") -> bytes:
    """Stored (uncompressed) zip, like CrowdPlay's ``zip -0``; members under ``prefix``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zip_bytes(dataset_files: dict[str, bytes]) -> bytes:
    return make_zip(dataset_files)


# ---------------------------------------------------------------- the HTTP server


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; records what it was asked and sent."""

    data: bytes = b""
    # Byte budget of each successive response (None: send it all); used up front to back.
    drops: list[int | None] = field(default_factory=list)
    always_drop_after: int | None = None
    flip_byte_at: int | None = None
    honour_range: bool = True
    stall: bool = False
    status: int | None = None  # answer this error status instead of the file ...
    status_times: int | None = None  # ... this many times (None: always)
    range_headers: list[str | None] = field(default_factory=list)
    bytes_sent: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def range_starts(self) -> list[int | None]:
        return [
            None if h is None else int(h.split("=")[1].split("-")[0]) for h in self.range_headers
        ]


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # keep pytest output clean

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            range_header = self.headers.get("Range")
            with state.lock:
                state.range_headers.append(range_header)
                budget = state.drops.pop(0) if state.drops else state.always_drop_after
                status = state.status
                if status is not None and state.status_times is not None:
                    state.status_times -= 1
                    if state.status_times <= 0:
                        state.status = None
            if status is not None:
                self.send_error(status)
                return
            data = bytearray(state.data)
            if state.flip_byte_at is not None:
                data[state.flip_byte_at] ^= 0xFF
            start = 0
            if range_header is not None and state.honour_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = bytes(data[start:])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.stall:
                self.wfile.write(body[:100])
                self.wfile.flush()
                state.release.wait(10)
                return
            if budget is not None and budget < len(body):
                body = body[:budget]
                self.close_connection = True
            with state.lock:  # counted before sending, so the client never sees it lag behind
                state.bytes_sent += len(body)
            self.wfile.write(body)
            self.wfile.flush()
            if self.close_connection:
                # A clean FIN after the data: the client gets exactly `budget` bytes, then EOF.
                self.connection.shutdown(socket.SHUT_WR)

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, zip_bytes: bytes) -> Iterator[ServerState]:
    # urllib honours proxy variables; make sure requests to 127.0.0.1 go straight there.
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    state = ServerState(data=zip_bytes)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/data-v0.zip"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def fetch(dest: Path, state: ServerState, **kwargs: object) -> Path:
    assert state.url.startswith("http://127.0.0.1:")
    options = {"progress": False, "timeout": 5.0, "retries": 0} | kwargs
    return download_dataset(dest, state.url, **options)


def assert_unpacked(dataset_dir: Path, files: dict[str, bytes]) -> None:
    on_disk = {p.name: p.read_bytes() for p in dataset_dir.iterdir() if p.name != MANIFEST_NAME}
    assert on_disk == files


DiskUsage = namedtuple("DiskUsage", "total used free")


def nearly_full_disk(path: object) -> DiskUsage:
    """Stands in for shutil.disk_usage: a full disk cannot be made in a test."""
    return DiskUsage(total=10**9, used=10**9 - 1000, free=1000)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("prefix", ["", "crowdplay_atari-v0/", "data-v0/"])
def test_full_download_unpacks_identical_files(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes], prefix: str
) -> None:
    server.data = make_zip(dataset_files, prefix)
    dataset_dir = fetch(tmp_path, server)

    assert dataset_dir == tmp_path / DATASET_DIRNAME
    assert_unpacked(dataset_dir, dataset_files)
    assert server.range_headers == [None]
    assert server.bytes_sent == len(server.data)
    # Without keep_zip neither the zip nor the partial file stays; no staging folder is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET_DIRNAME]


def test_keep_zip_keeps_the_verified_zip_and_rerun_does_nothing(
    tmp_path: Path,
    server: ServerState,
    zip_bytes: bytes,
    dataset_files: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fetch(tmp_path, server, keep_zip=True)
    assert (tmp_path / "data-v0.zip").read_bytes() == zip_bytes
    requests_after_first = len(server.range_headers)

    dataset_dir = fetch(tmp_path, server, progress=True)

    assert "already downloaded and complete" in capsys.readouterr().err
    assert len(server.range_headers) == requests_after_first == 1
    assert_unpacked(dataset_dir, dataset_files)


def test_kept_zip_is_unpacked_again_without_network(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    fetch(tmp_path, server, keep_zip=True)
    shutil.rmtree(tmp_path / DATASET_DIRNAME)

    dataset_dir = fetch(tmp_path, server)

    assert server.range_headers == [None]
    assert_unpacked(dataset_dir, dataset_files)
    assert not (tmp_path / "data-v0.zip").exists()


def test_dropped_connection_is_resumed_within_one_call(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    server.drops = [40_000]

    dataset_dir = fetch(tmp_path, server, retries=1)

    assert server.range_headers == [None, "bytes=40000-"]
    assert server.bytes_sent == len(zip_bytes)  # one copy, not one and a bit
    assert_unpacked(dataset_dir, dataset_files)


def test_many_drops_that_make_progress_do_not_use_up_the_retries(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    server.always_drop_after = 30_000
    n_requests = -(-len(zip_bytes) // 30_000)
    assert n_requests > 3

    dataset_dir = fetch(tmp_path, server, retries=1)

    assert server.range_starts() == [None] + [30_000 * i for i in range(1, n_requests)]
    assert server.bytes_sent == len(zip_bytes)
    assert_unpacked(dataset_dir, dataset_files)


def test_resume_across_calls_after_a_failed_run(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    server.always_drop_after = 50_000
    with pytest.raises(DownloadError, match="rerun the same command to resume") as excinfo:
        fetch(tmp_path, server, retries=0)
    assert f"50000 of {len(zip_bytes)} bytes" in str(excinfo.value)
    assert (tmp_path / "data-v0.zip.part").stat().st_size == 50_000
    assert not (tmp_path / DATASET_DIRNAME).exists()

    server.always_drop_after = None
    dataset_dir = fetch(tmp_path, server, retries=0)

    assert server.range_headers == [None, "bytes=50000-"]
    assert server.bytes_sent == len(zip_bytes)
    assert_unpacked(dataset_dir, dataset_files)
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_server_that_ignores_range_restarts_from_zero(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    server.honour_range = False
    server.drops = [40_000]

    dataset_dir = fetch(tmp_path, server, retries=1)

    assert server.range_headers == [None, "bytes=40000-"]
    assert server.bytes_sent == 40_000 + len(zip_bytes)
    assert_unpacked(dataset_dir, dataset_files)


def test_complete_partial_file_answered_416_is_used(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    (tmp_path / "data-v0.zip.part").write_bytes(zip_bytes)

    dataset_dir = fetch(tmp_path, server)

    assert server.range_headers == [f"bytes={len(zip_bytes)}-"]
    assert server.bytes_sent == 0
    assert_unpacked(dataset_dir, dataset_files)


def test_corrupt_download_is_refused_and_not_reused(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    # Flip a byte inside a member's stored data, so the zip structure is fine but a CRC is not.
    victim = next(name for name in dataset_files if name.endswith(".pickle.bz2"))
    server.flip_byte_at = zip_bytes.index(dataset_files[victim]) + 1000

    with pytest.raises(DownloadError, match="CRC") as excinfo:
        fetch(tmp_path, server)

    assert victim in str(excinfo.value)
    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert not (tmp_path / "data-v0.zip").exists()
    assert not (tmp_path / "data-v0.zip.part").exists()
    assert (tmp_path / "data-v0.zip.corrupt").stat().st_size == len(zip_bytes)

    # A rerun downloads afresh from byte zero instead of trusting the bad file.
    server.flip_byte_at = None
    dataset_dir = fetch(tmp_path, server)
    assert server.range_headers == [None, None]
    assert_unpacked(dataset_dir, dataset_files)


def test_sha256_mismatch_is_refused(tmp_path: Path, server: ServerState) -> None:
    with pytest.raises(DownloadError, match="sha256 is [0-9a-f]{64}, expected 0{64}"):
        fetch(tmp_path, server, sha256="0" * 64)
    assert not (tmp_path / DATASET_DIRNAME).exists()


def test_matching_sha256_and_size_are_accepted(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, dataset_files: dict[str, bytes]
) -> None:
    digest = hashlib.sha256(zip_bytes).hexdigest()
    dataset_dir = fetch(tmp_path, server, sha256=digest.upper(), expected_size=len(zip_bytes))
    assert_unpacked(dataset_dir, dataset_files)


def test_size_mismatch_with_expected_size_is_refused_before_writing(
    tmp_path: Path, server: ServerState, zip_bytes: bytes
) -> None:
    with pytest.raises(DownloadError, match="Size mismatch") as excinfo:
        fetch(tmp_path, server, expected_size=len(zip_bytes) + 1)
    message = str(excinfo.value)
    assert f"{len(zip_bytes)} bytes" in message
    assert f"{len(zip_bytes) + 1} bytes" in message
    assert server.url in message
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_partial_file_larger_than_the_server_file_is_refused(
    tmp_path: Path, server: ServerState, zip_bytes: bytes
) -> None:
    (tmp_path / "data-v0.zip.part").write_bytes(zip_bytes + b"stale tail")

    with pytest.raises(DownloadError, match="Size mismatch") as excinfo:
        fetch(tmp_path, server)

    assert f"only {len(zip_bytes)} bytes" in str(excinfo.value)
    assert not (tmp_path / "data-v0.zip.part").exists()
    assert (tmp_path / "data-v0.zip.corrupt").stat().st_size == len(zip_bytes) + 10


def test_unreachable_host_names_the_url(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data-v0.zip"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(tmp_path, url, progress=False, retries=0, timeout=2.0)

    message = str(excinfo.value)
    assert message.startswith(f"Could not reach {url} (")
    assert "refused" in message.lower()
    assert "--url" in message
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_stalled_server_times_out(tmp_path: Path, server: ServerState) -> None:
    server.stall = True
    with pytest.raises(DownloadError, match=r"timed out") as excinfo:
        fetch(tmp_path, server, timeout=0.3)
    assert server.url in str(excinfo.value)
    assert (tmp_path / "data-v0.zip.part").stat().st_size == 100


def test_http_404_is_a_clear_error_without_retries(tmp_path: Path, server: ServerState) -> None:
    server.status = 404

    with pytest.raises(DownloadError, match="answered HTTP 404") as excinfo:
        fetch(tmp_path, server, retries=3)

    assert server.url in str(excinfo.value)
    assert len(server.range_headers) == 1  # a 404 is final, not retried


def test_http_503_is_retried(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    server.status = 503
    server.status_times = 1

    dataset_dir = fetch(tmp_path, server, retries=1)

    assert server.range_headers == [None, None]
    assert_unpacked(dataset_dir, dataset_files)


@pytest.mark.parametrize("evil_name", ["../evil.txt", "/tmp/evil.txt", "sub/../../evil.txt"])
def test_zip_slip_member_is_refused(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes], evil_name: str
) -> None:
    server.data = make_zip(dataset_files | {evil_name: b"owned"})
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError, match="Refusing to unpack") as excinfo:
        fetch(dest, server)

    assert repr(evil_name) in str(excinfo.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / DATASET_DIRNAME).exists()
    assert not (dest / f".{DATASET_DIRNAME}.extracting").exists()


def test_failure_part_way_through_unpacking_leaves_no_dataset_folder(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    # "dataset.sqlite" is written first, then a member needs it to be a folder: unpacking fails.
    server.data = make_zip(dataset_files | {"dataset.sqlite/oops": b"x"})

    with pytest.raises(DownloadError, match="Could not unpack"):
        fetch(tmp_path, server)

    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert not (tmp_path / f".{DATASET_DIRNAME}.extracting").exists()
    assert (tmp_path / "data-v0.zip").exists()  # verified, kept for the rerun


def test_leftover_staging_folder_of_a_killed_run_is_cleared(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    staging = tmp_path / f".{DATASET_DIRNAME}.extracting"
    staging.mkdir()
    (staging / "half-written.pickle.bz2").write_bytes(b"junk")

    dataset_dir = fetch(tmp_path, server)

    assert_unpacked(dataset_dir, dataset_files)
    assert not staging.exists()


def test_incomplete_existing_dataset_folder_is_reported(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    dataset_dir = fetch(tmp_path, server)
    victim = next(name for name in dataset_files if name.endswith(".pickle.bz2"))
    (dataset_dir / victim).unlink()

    with pytest.raises(DownloadError, match=f"is missing {victim}"):
        fetch(tmp_path, server)
    assert server.range_headers == [None]

    manifest = json.loads((dataset_dir / MANIFEST_NAME).read_text())
    assert manifest["files"] == {name: len(data) for name, data in dataset_files.items()}


def test_insufficient_disk_space_is_refused_before_downloading(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", nearly_full_disk)

    with pytest.raises(DownloadError, match="Not enough free disk space") as excinfo:
        fetch(tmp_path, server)

    message = str(excinfo.value)
    assert f"need {2 * len(zip_bytes) / 1024:.1f} KiB" in message
    assert f"{len(zip_bytes) / 1024:.1f} KiB left to download" in message
    assert "only 1000 B is available" in message
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_insufficient_disk_space_for_unpacking_keeps_the_zip(
    tmp_path: Path,
    server: ServerState,
    dataset_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetch(tmp_path, server, keep_zip=True)
    shutil.rmtree(tmp_path / DATASET_DIRNAME)
    unpacked = sum(len(data) for data in dataset_files.values())
    monkeypatch.setattr(shutil, "disk_usage", nearly_full_disk)

    with pytest.raises(DownloadError, match="Not enough free disk space") as excinfo:
        fetch(tmp_path, server)

    assert f"need {unpacked / 1024:.1f} KiB ({unpacked / 1024:.1f} KiB unpacked)" in str(
        excinfo.value
    )
    assert (tmp_path / "data-v0.zip").exists()
    assert not (tmp_path / DATASET_DIRNAME).exists()


def test_cli_options_and_exit_status(
    tmp_path: Path,
    server: ServerState,
    zip_bytes: bytes,
    dataset_files: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="crowdplay-minari download")
    download.add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path), "--url", server.url, "--no-progress", "--keep-zip", "--retries", "0"]
        + ["--expected-size", str(len(zip_bytes))]
    )
    assert args.sha256 is None

    assert download.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / DATASET_DIRNAME)
    assert_unpacked(tmp_path / DATASET_DIRNAME, dataset_files)
    assert (tmp_path / "data-v0.zip").exists()

    bad = parser.parse_args([str(tmp_path / "other"), "--url", server.url, "--sha256", "xyz"])
    assert download.run(bad) == 1
    assert "sha256 must be 64 hexadecimal digits" in capsys.readouterr().err


def test_default_url_is_crowdplays_bucket() -> None:
    parser = argparse.ArgumentParser()
    download.add_arguments(parser)
    args = parser.parse_args(["somewhere"])
    assert (
        args.url
        == download.DEFAULT_URL
        == ("http://crowdplay-atari.s3-website-us-east-1.amazonaws.com/data-v0.zip")
    )
    assert (args.dest, args.keep_zip, args.no_progress) == (Path("somewhere"), False, False)


def test_kept_zip_of_the_wrong_size_is_not_unpacked(
    tmp_path: Path, server: ServerState, zip_bytes: bytes
) -> None:
    fetch(tmp_path, server, keep_zip=True)
    shutil.rmtree(tmp_path / DATASET_DIRNAME)

    with pytest.raises(DownloadError, match=f"{len(zip_bytes)} bytes, expected 12345"):
        fetch(tmp_path, server, expected_size=12345)

    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert (tmp_path / "data-v0.zip.corrupt").read_bytes() == zip_bytes
