"""End-to-end tests of the dataset download against a real HTTP server on 127.0.0.1.

The server serves a small zip built here in the layout of ``data-v0.zip`` (a ``dataset.sqlite``
and a few ``<uuid>.pickle.bz2`` files), answers ``Range`` requests, and can drop the connection
after a given number of bytes, flip a byte, ignore ``Range``, stall or redirect. No test talks to
any other host: addresses elsewhere appear only where the download must refuse them before
connecting.
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
import warnings
import zipfile
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from crowdplay_minari import download
from crowdplay_minari.download import (
    CROWDPLAY_WEBSITE_URL,
    DATASET_DIRNAME,
    DEFAULT_URL,
    MANIFEST_NAME,
    DownloadError,
    Release,
    check_unpacked,
    download_dataset,
    load_releases,
    release_for,
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
    return make_zip_of([(prefix + name, data) for name, data in files.items()])


def make_zip_of(members: list[tuple[str, bytes]]) -> bytes:
    """Stored zip with exactly these members, in order (a name may repeat; "x/" is a folder)."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name" warning
        for name, data in members:
            archive.writestr(name, data)
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
    redirect_to: str | None = None  # answer GET /data-v0.zip with 302 to this Location
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
            if state.redirect_to is not None and self.path == "/data-v0.zip":
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
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
            try:
                self.wfile.write(body)
                self.wfile.flush()
                if self.close_connection:
                    # A clean FIN after the data: the client gets exactly `budget` bytes, then EOF.
                    self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                self.close_connection = True  # the client hung up first (it refused the file)

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
    tmp_path: Path, server: ServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first member is written, then the disk fills up during the second.
    unpack_member = download._unpack_member
    calls: list[str] = []

    def fill_up_on_the_second(archive, info, out_path, bar):  # type: ignore[no-untyped-def]
        calls.append(info.filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return unpack_member(archive, info, out_path, bar)

    monkeypatch.setattr(download, "_unpack_member", fill_up_on_the_second)

    with pytest.raises(DownloadError, match="Could not unpack .*No space left on device"):
        fetch(tmp_path, server)

    assert len(calls) == 2

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
    assert manifest["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in dataset_files.items()
    }


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
    assert download.run(bad) == 2  # a usage error
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sha256 must be 64 hexadecimal digits" in err


def test_default_url_is_crowdplays_bucket_over_https() -> None:
    parser = argparse.ArgumentParser()
    download.add_arguments(parser)
    args = parser.parse_args(["somewhere"])
    # S3's website endpoint (CrowdPlay's own installer) speaks plain http only; the REST
    # endpoint of the same bucket serves the same object over https.
    assert (
        args.url == DEFAULT_URL == "https://crowdplay-atari.s3.us-east-1.amazonaws.com/data-v0.zip"
    )
    assert CROWDPLAY_WEBSITE_URL.startswith("http://crowdplay-atari.s3-website-us-east-1.")
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


# ---------------------------------------------------------------- authentication


def pin(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str | None, size: int | None = None):
    """Make the shipped release manifest list ``url`` with this digest and size."""
    release = Release("test-release", (url,), size, sha256)
    monkeypatch.setattr(download, "_shipped_releases", lambda: (release,))


def test_shipped_release_manifest_covers_the_official_addresses() -> None:
    releases = load_releases()
    release = release_for(DEFAULT_URL)

    assert release is not None and release in releases
    assert release.name == DATASET_DIRNAME
    assert release_for(CROWDPLAY_WEBSITE_URL) is release
    assert all(url.endswith("/data-v0.zip") for url in release.urls)
    # No digest is pinned until one is taken from a trusted copy: never a made-up one.
    assert release.sha256 is None or len(release.sha256) == 64
    assert release_for("https://mirror.example/data-v0.zip") is None


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"name": "x", "urls": ["https://h/x.zip"], "size": None, "sha256": "abc"}, "sha256"),
        ({"name": "x", "urls": ["https://h/x.zip"], "size": -1, "sha256": None}, "size"),
        ({"name": "x", "urls": [], "size": None, "sha256": None}, "urls"),
    ],
)
def test_malformed_release_manifest_is_refused(tmp_path: Path, entry: dict, complaint: str) -> None:
    path = tmp_path / "releases.json"
    path.write_text(json.dumps({"releases": [entry]}))
    with pytest.raises(DownloadError, match=f"Release manifest {path} is unusable: .*{complaint}"):
        load_releases(path)


def test_pinned_digest_is_checked_and_a_wrong_archive_quarantined(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin(monkeypatch, server.url, "ab" * 32)

    with pytest.raises(DownloadError, match=f"sha256 is [0-9a-f]{{64}}, expected {'ab' * 32}"):
        fetch(tmp_path, server)  # no sha256 given: the pinned one is used

    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert not (tmp_path / "data-v0.zip").exists()
    assert (tmp_path / "data-v0.zip.corrupt").read_bytes() == zip_bytes


def test_pinned_digest_accepts_the_archive_and_is_recorded(
    tmp_path: Path,
    server: ServerState,
    zip_bytes: bytes,
    dataset_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digest = hashlib.sha256(zip_bytes).hexdigest()
    pin(monkeypatch, server.url, digest, len(zip_bytes))

    dataset_dir = fetch(tmp_path, server)

    assert_unpacked(dataset_dir, dataset_files)
    assert "warning" not in capsys.readouterr().err
    archive = json.loads((dataset_dir / MANIFEST_NAME).read_text())["archive"]
    assert archive == {
        "url": server.url,
        "size": len(zip_bytes),
        "sha256": digest,
        "checked_against": "pinned",
    }


def test_pinned_size_is_checked_before_downloading(
    tmp_path: Path, server: ServerState, zip_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin(monkeypatch, server.url, hashlib.sha256(zip_bytes).hexdigest(), len(zip_bytes) + 1)
    with pytest.raises(DownloadError, match="Size mismatch"):
        fetch(tmp_path, server)
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_given_sha256_overrides_the_pinned_one_with_a_warning(
    tmp_path: Path,
    server: ServerState,
    zip_bytes: bytes,
    dataset_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pin(monkeypatch, server.url, "ab" * 32)
    digest = hashlib.sha256(zip_bytes).hexdigest()

    dataset_dir = fetch(tmp_path, server, sha256=digest)

    assert_unpacked(dataset_dir, dataset_files)
    err = capsys.readouterr().err
    assert f"--sha256 {digest} differs from the sha256 {'ab' * 32} pinned for {server.url}" in err
    assert "not authenticated" not in err
    archive = json.loads((dataset_dir / MANIFEST_NAME).read_text())["archive"]
    assert archive["checked_against"] == "given"


def test_wrong_given_sha256_is_quarantined(
    tmp_path: Path, server: ServerState, zip_bytes: bytes
) -> None:
    with pytest.raises(DownloadError, match="sha256 is [0-9a-f]{64}, expected 0{64}") as excinfo:
        fetch(tmp_path, server, sha256="0" * 64)

    assert str(tmp_path / "data-v0.zip.part") in str(excinfo.value)
    assert (tmp_path / "data-v0.zip.corrupt").read_bytes() == zip_bytes
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_unauthenticated_download_warns_on_one_line_with_its_digest(
    tmp_path: Path,
    server: ServerState,
    zip_bytes: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset_dir = fetch(tmp_path, server)  # progress=False: the warning shows regardless

    warning_lines = [line for line in capsys.readouterr().err.splitlines() if line]
    digest = hashlib.sha256(zip_bytes).hexdigest()
    assert len(warning_lines) == 1
    assert warning_lines[0].startswith(f"warning: {tmp_path / 'data-v0.zip'} is not authenticated")
    assert digest in warning_lines[0] and "--sha256" in warning_lines[0]
    archive = json.loads((dataset_dir / MANIFEST_NAME).read_text())["archive"]
    assert (archive["sha256"], archive["checked_against"]) == (digest, None)


@pytest.mark.parametrize(
    ("url", "digest_known", "refused"),
    [
        ("http://mirror.example/data-v0.zip", False, True),
        (CROWDPLAY_WEBSITE_URL, False, True),
        ("http://mirror.example/data-v0.zip", True, False),
        ("https://mirror.example/data-v0.zip", False, False),
        (DEFAULT_URL, False, False),
        ("http://127.0.0.1:8000/data-v0.zip", False, False),
        ("http://[::1]:8000/data-v0.zip", False, False),
        ("http://localhost/data-v0.zip", False, False),
        ("http://127.0.0.1.mirror.example/data-v0.zip", False, True),
    ],
)
def test_plain_http_needs_a_digest_unless_on_loopback(
    url: str, digest_known: bool, refused: bool
) -> None:
    problem = download._transport_problem(url, digest_known=digest_known)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"Refusing to download {url} over plain http")


@pytest.mark.parametrize("url", ["http://mirror.example/data-v0.zip", CROWDPLAY_WEBSITE_URL])
def test_plain_http_without_digest_is_refused_before_connecting(
    tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="over plain http without a sha256"):
        download_dataset(dest, url, progress=False, retries=0)
    assert not dest.exists()

    parser = argparse.ArgumentParser(prog="crowdplay-minari download")
    download.add_arguments(parser)
    assert download.run(parser.parse_args([str(dest), "--url", url])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"crowdplay-minari download: error: Refusing to download {url} ")
    assert not dest.exists()


def test_plain_http_with_a_pinned_digest_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    pin(monkeypatch, CROWDPLAY_WEBSITE_URL, "ab" * 32)
    size, sha256, checked_against = download._expectations(CROWDPLAY_WEBSITE_URL, None, None)
    assert (size, sha256, checked_against) == (None, "ab" * 32, "pinned")
    assert download._transport_problem(CROWDPLAY_WEBSITE_URL, digest_known=True) is None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://mirror.example/data-v0.zip", "x"])
def test_non_http_address_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="is not an http:// or https:// address"):
        download_dataset(tmp_path / "dest", url, progress=False)
    assert not (tmp_path / "dest").exists()


def test_redirect_to_plain_http_without_digest_is_refused(
    tmp_path: Path, server: ServerState
) -> None:
    server.redirect_to = "http://mirror.example/data-v0.zip"

    with pytest.raises(DownloadError, match="redirected to http://mirror.example/") as excinfo:
        fetch(tmp_path, server, retries=3)

    assert "over plain http without a sha256" in str(excinfo.value)
    assert len(server.range_headers) == 1  # refused, not retried
    assert not (tmp_path / "data-v0.zip.part").exists()


def test_redirect_is_followed_when_allowed(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    server.redirect_to = server.url.replace("/data-v0.zip", "/moved/data-v0.zip")

    dataset_dir = fetch(tmp_path, server)

    assert server.range_headers == [None, None]  # the redirect, then the file
    assert_unpacked(dataset_dir, dataset_files)


# ---------------------------------------------------------------- what the archive may hold


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        ([("dataset.sqlite", b"second database")], "dataset.sqlite"),
        ([("./dataset.sqlite", b"second database")], "./dataset.sqlite"),
        ([("Dataset.SQLite", b"a case-insensitive disk's dataset.sqlite")], "Dataset.SQLite"),
        ([("{episode}.pickle.bz2", b"second trajectory")], "{episode}.pickle.bz2"),
        ([("{episode}.pickle", b"same episode, other encoding")], "{episode}.pickle"),
    ],
)
def test_duplicate_member_is_refused(
    tmp_path: Path,
    server: ServerState,
    dataset_files: dict[str, bytes],
    extra: list[tuple[str, bytes]],
    culprit: str,
) -> None:
    episode = next(name for name in dataset_files if name.endswith(".pickle.bz2"))
    episode = episode.removesuffix(".pickle.bz2")
    culprit = culprit.format(episode=episode)
    members = list(dataset_files.items()) + [(n.format(episode=episode), d) for n, d in extra]
    server.data = make_zip_of(members)

    with pytest.raises(DownloadError, match="Refusing to unpack") as excinfo:
        fetch(tmp_path, server, keep_zip=True)

    message = str(excinfo.value)
    assert "\n" not in message
    assert str(tmp_path / "data-v0.zip") in message
    assert f"member {culprit!r} " in message
    assert "twice" in message or "duplicates member" in message
    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert not (tmp_path / f".{DATASET_DIRNAME}.extracting").exists()


@pytest.mark.parametrize(
    "culprit",
    [
        "README.txt",
        "run_me.sh",
        "sitecustomize.py",
        MANIFEST_NAME,  # a forged record of what was unpacked
        ".hidden.pickle.bz2",
        "dataset.sqlite-journal",
        "sub/1234.pickle.bz2",
        "dataset.sqlite/oops",
        "extra/",  # a folder in a flat archive
        "1234.pickle.xz",
    ],
)
def test_unexpected_member_is_refused(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes], culprit: str
) -> None:
    server.data = make_zip_of(list(dataset_files.items()) + [(culprit, b"not CrowdPlay")])

    with pytest.raises(DownloadError, match="Refusing to unpack") as excinfo:
        fetch(tmp_path, server)

    message = str(excinfo.value)
    assert "\n" not in message
    assert str(tmp_path / "data-v0.zip") in message
    assert f"member {culprit!r} is not part of a CrowdPlay release" in message
    assert not (tmp_path / DATASET_DIRNAME).exists()
    assert not (tmp_path / f".{DATASET_DIRNAME}.extracting").exists()


def test_unexpected_member_inside_the_top_level_folder_is_refused(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    members = [("data-v0/" + name, data) for name, data in dataset_files.items()]
    server.data = make_zip_of(members + [("data-v0/nested/", b"")])

    with pytest.raises(DownloadError, match="member 'data-v0/nested/' is not part of"):
        fetch(tmp_path, server)


def test_release_layouts_with_folder_entries_and_other_encodings_are_accepted(
    tmp_path: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    # `zip -r` writes an entry for the folder itself; a mirror may hold .pickle or .pickle.gz.
    renamed = {
        name.replace(".pickle.bz2", ".pickle.gz") if i == 1 else name: data
        for i, (name, data) in enumerate(dataset_files.items())
    }
    members = [("data-v0/", b"")] + [("data-v0/" + n, d) for n, d in renamed.items()]
    server.data = make_zip_of(members)

    dataset_dir = fetch(tmp_path, server)

    assert_unpacked(dataset_dir, renamed)


def test_cli_reports_a_bad_archive_on_one_line_with_status_1(
    tmp_path: Path,
    server: ServerState,
    dataset_files: dict[str, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.data = make_zip_of(list(dataset_files.items()) + [("dataset.sqlite", b"again")])
    digest = hashlib.sha256(server.data).hexdigest()
    parser = argparse.ArgumentParser(prog="crowdplay-minari download")
    download.add_arguments(parser)
    argv = [str(tmp_path), "--url", server.url, "--sha256", digest, "--no-progress"]

    assert download.run(parser.parse_args(argv)) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("crowdplay-minari download: error: Refusing to unpack ")
    assert "member 'dataset.sqlite' appears twice" in captured.err


# ---------------------------------------------------------------- check_unpacked


@pytest.fixture
def unpacked(tmp_path: Path, server: ServerState) -> Path:
    return fetch(tmp_path, server)


def test_manifest_records_every_file_and_check_finds_nothing(
    unpacked: Path, dataset_files: dict[str, bytes]
) -> None:
    manifest = json.loads((unpacked / MANIFEST_NAME).read_text())
    assert manifest["format"] == 2
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: hashlib.sha256(data).hexdigest() for name, data in dataset_files.items()
    }
    assert check_unpacked(unpacked) == []
    assert check_unpacked(unpacked, progress=True) == []


def test_check_reports_a_file_with_one_byte_changed(
    unpacked: Path, dataset_files: dict[str, bytes]
) -> None:
    victim = unpacked / next(name for name in dataset_files if name.endswith(".pickle.bz2"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the digest can tell
    victim.write_bytes(bytes(data))

    problems = check_unpacked(unpacked)

    recorded = hashlib.sha256(dataset_files[victim.name]).hexdigest()
    now = hashlib.sha256(data).hexdigest()
    assert problems == [f"{victim}: changed since unpacking (sha256 {now}, recorded {recorded})"]


def test_check_reports_a_file_of_another_size(unpacked: Path) -> None:
    victim = unpacked / "dataset.sqlite"
    size = victim.stat().st_size
    with open(victim, "ab") as file:
        file.write(b"\0")

    assert check_unpacked(unpacked) == [
        f"{victim}: changed since unpacking ({size + 1} bytes, recorded {size})"
    ]


def test_check_reports_a_deleted_file(unpacked: Path, dataset_files: dict[str, bytes]) -> None:
    victim = unpacked / next(name for name in dataset_files if name.endswith(".pickle.bz2"))
    victim.unlink()

    assert check_unpacked(unpacked) == [
        f"{victim}: missing (unpacked with {len(dataset_files[victim.name])} bytes)"
    ]


def test_check_reports_added_files_and_links(unpacked: Path, tmp_path: Path) -> None:
    (unpacked / "0000.pickle").write_bytes(b"planted")
    (unpacked / "sub").mkdir()
    (unpacked / "sub" / "note.txt").write_text("planted")
    (unpacked / "elsewhere").symlink_to(tmp_path)

    assert check_unpacked(unpacked) == [
        f"{unpacked / name}: added since unpacking (not in {MANIFEST_NAME})"
        for name in ("0000.pickle", "elsewhere", "sub/note.txt")
    ]


def test_check_reports_a_file_replaced_by_a_link(unpacked: Path, tmp_path: Path) -> None:
    victim = unpacked / "dataset.sqlite"
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(victim.read_bytes())  # same bytes, but now outside the folder
    victim.unlink()
    victim.symlink_to(copy)

    assert check_unpacked(unpacked) == [f"{victim}: replaced by a symbolic link since unpacking"]


def test_check_of_an_old_manifest_says_no_digests_are_recorded(
    unpacked: Path, server: ServerState, dataset_files: dict[str, bytes]
) -> None:
    # What an older crowdplay-minari wrote: sizes only.
    old = {"source": server.url, "files": {n: len(d) for n, d in dataset_files.items()}}
    (unpacked / MANIFEST_NAME).write_text(json.dumps(old))

    with pytest.raises(DownloadError, match="no digests recorded") as excinfo:
        check_unpacked(unpacked)
    assert str(unpacked / MANIFEST_NAME) in str(excinfo.value)
    # A rerun of the download still takes the old folder as complete.
    assert fetch(unpacked.parent, server) == unpacked


@pytest.mark.parametrize(
    ("manifest_text", "complaint"),
    [
        (None, "has no download manifest"),
        ("{not json", "is unreadable"),
        ('{"files": {"../outside": {"size": 1, "sha256": null}}}', "unsafe path"),
    ],
)
def test_check_without_a_usable_manifest_is_an_error(
    unpacked: Path, manifest_text: str | None, complaint: str
) -> None:
    manifest = unpacked / MANIFEST_NAME
    if manifest_text is None:
        manifest.unlink()
    else:
        manifest.write_text(manifest_text)

    with pytest.raises(DownloadError, match=complaint) as excinfo:
        check_unpacked(unpacked)
    assert str(unpacked) in str(excinfo.value)


def test_destination_that_is_a_file_is_a_usage_error(
    tmp_path: Path, server: ServerState, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "a-file"
    dest.write_text("not a folder")
    parser = argparse.ArgumentParser(prog="crowdplay-minari download")
    download.add_arguments(parser)

    assert download.run(parser.parse_args([str(dest), "--url", server.url])) == 2

    err = capsys.readouterr().err
    assert (
        err
        == f"crowdplay-minari download: error: Destination {dest} exists and is not a directory.\n"
    )
    assert server.range_headers == []
