"""Download, authenticate and unpack the raw CrowdPlay Atari dataset.

The dataset is one zip of about 15 GB (``data-v0.zip``, made with ``zip -0``, so unpacking needs
about as much again). This module fetches it into ``DEST/data-v0.zip.part``, resuming with HTTP
``Range`` requests after a dropped connection or a killed process, checks its size, its sha256 and
the CRC-32 of every member, refuses members a CrowdPlay release does not hold, and unpacks it
atomically into ``DEST/crowdplay_atari-v0/``::

    from pathlib import Path
    from crowdplay_minari.download import check_unpacked, download_dataset

    dataset_dir = download_dataset(Path("data"))  # -> data/crowdplay_atari-v0
    print(check_unpacked(dataset_dir))  # [] while nothing changed since unpacking

or from the shell: ``crowdplay-minari download data``.

The archive comes from the internet, so it is checked against the sha256 that the release
manifest shipped with this package (``release_manifest.json``) pins for its address, or the one
given with ``--sha256`` (which wins: mirrors, re-uploads). A download with neither is *not
authenticated*: it goes ahead over HTTPS (the host proves who it is, so only the publisher can
change the bytes) with a one-line warning that shows the archive's digest, and is refused over plain
HTTP, where anyone on the way could change them. Unpacking records every file's size and sha256
in ``.crowdplay-minari-manifest.json``; :func:`check_unpacked` re-hashes against that record.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import importlib.resources
import ipaddress
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

DEFAULT_URL = "https://crowdplay-atari.s3.us-east-1.amazonaws.com/data-v0.zip"
"""The official archive over HTTPS, from S3's REST endpoint for CrowdPlay's bucket. CrowdPlay's
own installer uses the bucket's website endpoint (``CROWDPLAY_WEBSITE_URL``), which S3 serves over
plain HTTP only."""
CROWDPLAY_WEBSITE_URL = "http://crowdplay-atari.s3-website-us-east-1.amazonaws.com/data-v0.zip"
DATASET_DIRNAME = "crowdplay_atari-v0"
ZIP_NAME = "data-v0.zip"
PART_NAME = ZIP_NAME + ".part"
CORRUPT_NAME = ZIP_NAME + ".corrupt"
# Written into the dataset directory last, so its presence means the unpacking finished.
MANIFEST_NAME = ".crowdplay-minari-manifest.json"
MANIFEST_FORMAT = 2
"""Format 2 records ``{"size": bytes, "sha256": hex}`` per file; format 1 (no ``format`` key)
recorded sizes only."""
RELEASE_MANIFEST = "release_manifest.json"
"""Package data: the official archives' addresses with their pinned size and sha256."""

_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 30.0
_USER_AGENT = "crowdplay-minari-download"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class DownloadError(Exception):
    """The dataset could not be downloaded, verified or unpacked; the message says why."""


@dataclass(frozen=True)
class Release:
    """One published archive, as the release manifest pins it.

    ``size`` and ``sha256`` are None where nobody has recorded them from a trusted copy yet; an
    archive fetched from one of ``urls`` is then checked only against what ``--sha256`` and
    ``--expected-size`` give.
    """

    name: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None


def load_releases(path: Path | None = None) -> tuple[Release, ...]:
    """The releases in a release manifest (default: the one shipped with this package).

    Raises:
        DownloadError: the file is unreadable, or an entry has a malformed address, size or
            sha256 (named with the entry).
    """
    if path is None:
        resource = importlib.resources.files("crowdplay_minari") / RELEASE_MANIFEST
        where, read = f"the package's {RELEASE_MANIFEST}", resource.read_text
    else:
        where, read = str(path), Path(path).read_text
    try:
        entries = json.loads(read())["releases"]
        if not isinstance(entries, list):
            raise TypeError("'releases' is not a list")
        releases = tuple(_release(entry) for entry in entries)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DownloadError(f"Release manifest {where} is unusable: {err}") from None
    return releases


def _release(entry: Any) -> Release:
    if not isinstance(entry, dict):
        raise TypeError(f"entry {entry!r} is not an object")
    name, urls, size, sha256 = (entry.get(key) for key in ("name", "urls", "size", "sha256"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"entry {entry!r} has no name")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"release {name!r} has no list of urls")
    if size is not None and (type(size) is not int or size <= 0):
        raise ValueError(f"release {name!r} has size {size!r}, not a positive integer or null")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise ValueError(f"release {name!r} has sha256 {sha256!r}, not 64 hex digits or null")
    return Release(name, tuple(urls), size, sha256.lower() if sha256 else None)


@functools.cache
def _shipped_releases() -> tuple[Release, ...]:
    return load_releases()


def release_for(url: str) -> Release | None:
    """The release of the shipped manifest that lists ``url`` (exactly), or None."""
    return next((release for release in _shipped_releases() if url in release.urls), None)


def _byte_bar(total: int, desc: str, progress: bool, initial: int = 0) -> tqdm:
    """A progress bar counting bytes (hidden unless `progress`)."""
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not progress,
    )


def download_dataset(
    dest: Path,
    url: str = DEFAULT_URL,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    keep_zip: bool = False,
    timeout: float = 30.0,
    retries: int = 5,
) -> Path:
    """Download and unpack; return the dataset directory DEST/crowdplay_atari-v0.

    Args:
        dest: folder that receives ``crowdplay_atari-v0/`` (created if missing). The partial
            download ``data-v0.zip.part`` is kept there, so rerunning after an interruption
            resumes where the last run stopped.
        url: where to fetch ``data-v0.zip`` from (a mirror, or a local server in tests). An
            address in the release manifest brings its pinned size and sha256 along.
        expected_size: size of the zip in bytes; refuse a server or a file of any other size.
            Overrides the size the release manifest pins for ``url``.
        sha256: hex digest the finished zip must have. Overrides the digest the release manifest
            pins for ``url``; needed for a plain ``http://`` address (loopback ones aside).
        progress: show progress bars and status lines on stderr (warnings show regardless).
        keep_zip: keep ``DEST/data-v0.zip`` after unpacking (a later run then unpacks it
            again without downloading).
        timeout: seconds to wait for the server to connect or to send more data.
        retries: how many times in a row a failed request is retried. A failure that came after
            some new data was received starts the count again, so a long download survives
            any number of dropped connections as long as each one made progress.

    Returns:
        The path of the unpacked dataset, holding ``dataset.sqlite`` and ``<uuid>.pickle.bz2``.
        Without a pinned or given sha256 a one-line warning on stderr says the archive is not
        authenticated and shows its digest.

    Raises:
        ValueError: a malformed option, ``dest`` is a file, ``url`` is not an http(s) address,
            or it is plain http with no sha256 to check (nothing is downloaded).
        DownloadError: the host cannot be reached or redirects to plain http without a sha256,
            the download failed its size, sha256 or CRC-32 check (the file is then moved to
            ``data-v0.zip.corrupt``), the archive holds unsafe, duplicate or unexpected members,
            or the disk is too full.
    """
    dest = Path(dest)
    if expected_size is not None and expected_size <= 0:
        raise ValueError(f"expected_size must be a positive number of bytes, got {expected_size}")
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    expected_size, sha256, checked_against = _expectations(url, expected_size, sha256)
    problem = _transport_problem(url, digest_known=sha256 is not None)
    if problem is not None:
        raise ValueError(problem)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"Destination {dest} exists and is not a directory.")
    dest.mkdir(parents=True, exist_ok=True)

    target = dest / DATASET_DIRNAME
    if target.exists():
        problem = _incompleteness(target)
        if problem is None:
            _say(progress, f"{target} is already downloaded and complete; nothing to do.")
            return target
        raise DownloadError(
            f"{target} already exists but {problem}. Remove or rename it and rerun to "
            "download a fresh copy."
        )

    zip_path = dest / ZIP_NAME
    if zip_path.exists():
        _say(progress, f"Using the previously downloaded {zip_path}.")
        digest = _verify_or_quarantine(zip_path, expected_size, sha256, progress)
    else:
        part_path = dest / PART_NAME
        digest_known = sha256 is not None
        _Transfer(url, part_path, expected_size, progress, timeout, retries, digest_known).run()
        digest = _verify_or_quarantine(part_path, expected_size, sha256, progress)
        part_path.replace(zip_path)
    if checked_against is None:
        _warn(
            f"{zip_path} is not authenticated: no sha256 is pinned for {url} and none was given, "
            f"so nothing shows it is the published release (its sha256 is {digest}; pass "
            "--sha256 with a digest from a source you trust to check it)."
        )

    archive = {
        "url": url,
        "size": zip_path.stat().st_size,
        "sha256": digest,
        "checked_against": checked_against,
    }
    _extract(zip_path, target, archive, progress)
    if not keep_zip:
        zip_path.unlink()
    _say(progress, f"The CrowdPlay dataset is ready in {target}.")
    return target


def check_unpacked(raw_dir: Path, *, progress: bool = False) -> list[str]:
    """Re-hash what ``download_dataset`` unpacked into ``raw_dir`` against its manifest.

    Reads every file the manifest ``raw_dir/.crowdplay-minari-manifest.json`` lists and compares
    its size and sha256 with what was recorded while unpacking; then looks for files that were
    not unpacked. Nothing is modified.

        >>> for problem in check_unpacked(Path("data/crowdplay_atari-v0")):  # doctest: +SKIP
        ...     print(problem)
        data/crowdplay_atari-v0/dataset.sqlite: changed since unpacking (sha256 ..., recorded ...)

    Args:
        raw_dir: the unpacked dataset folder (``DEST/crowdplay_atari-v0``).
        progress: show a progress bar (bytes hashed) on stderr.

    Returns:
        One line per problem, each starting with the file's path: changed (other size or
        sha256), missing, no longer a regular file (a symbolic link, a folder), unreadable, or
        added since unpacking (any file or link under ``raw_dir`` the manifest does not list).
        Recorded files come first in manifest order, added ones after, sorted. An empty list
        means every recorded file is intact and nothing was added.

    Raises:
        DownloadError: there is nothing to check against: ``raw_dir`` is not a folder, holds no
            manifest (it was not unpacked by ``crowdplay-minari download``), the manifest is
            unreadable, or it records no digests (an older version recorded sizes only).
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DownloadError(f"{raw_dir} is not a directory.")
    manifest_path = raw_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DownloadError(
            f"{raw_dir} has no download manifest {MANIFEST_NAME}: it was not unpacked by "
            "`crowdplay-minari download`, so there is no record to check it against."
        )
    try:
        recorded = _read_manifest(manifest_path)
    except ValueError as err:
        raise DownloadError(
            f"The download manifest {manifest_path} is unreadable ({err})."
        ) from None
    if any(digest is None for _, digest in recorded.values()):
        raise DownloadError(
            f"{manifest_path} has no digests recorded (an older crowdplay-minari recorded sizes "
            "only), so the files cannot be checked; download the dataset again to record them."
        )

    problems: list[str] = []
    total = sum(size for size, _ in recorded.values())
    with _byte_bar(total, "sha256", progress) as bar:
        for name, (size, digest) in recorded.items():
            path = raw_dir.joinpath(*PurePosixPath(name).parts)
            problem = _file_problem(path, size, digest, bar)
            if problem is not None:
                problems.append(f"{path}: {problem}")
    for name in sorted(_entries_under(raw_dir) - set(recorded) - {MANIFEST_NAME}):
        problems.append(f"{raw_dir / name}: added since unpacking (not in {MANIFEST_NAME})")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``crowdplay-minari download DEST`` to ``parser``."""
    parser.add_argument(
        "dest",
        type=Path,
        help=f"folder to put {DATASET_DIRNAME}/ in (needs about 30 GB free while unpacking)",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="where to download from (default: the official archive over https, %(default)s); "
        "a plain http:// address needs --sha256",
    )
    parser.add_argument(
        "--sha256",
        default=None,
        help="hex sha256 the zip must have; overrides the digest pinned for --url in the release "
        "manifest (without either, the archive is not authenticated and a warning says so)",
    )
    parser.add_argument(
        "--expected-size",
        type=int,
        default=None,
        help="size in bytes the zip must have; overrides the size pinned for --url",
    )
    parser.add_argument(
        "--keep-zip", action="store_true", help=f"keep {ZIP_NAME} after unpacking it"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars or status lines"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="network timeout in seconds (%(default)s)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries in a row after a failed request (%(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Body of ``crowdplay-minari download``: 0 on success, 2 for a command line that asks for
    something impossible or unsafe, 1 when the download, a check or the unpacking failed."""
    try:
        target = download_dataset(
            args.dest,
            args.url,
            expected_size=args.expected_size,
            sha256=args.sha256,
            progress=not args.no_progress,
            keep_zip=args.keep_zip,
            timeout=args.timeout,
            retries=args.retries,
        )
    except ValueError as err:
        print(f"crowdplay-minari download: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DownloadError as err:
        print(f"crowdplay-minari download: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            "crowdplay-minari download: interrupted; rerun the same command to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(target)
    return EXIT_OK


def _expectations(
    url: str, expected_size: int | None, sha256: str | None
) -> tuple[int | None, str | None, str | None]:
    """(size, sha256, where the digest came from: "given", "pinned" or None) for ``url``: what
    the caller gave, else what the release manifest pins for ``url``."""
    release = release_for(url)
    pinned_size = release.size if release else None
    pinned_sha256 = release.sha256 if release else None
    if sha256 is not None and pinned_sha256 is not None and sha256.lower() != pinned_sha256:
        _warn(
            f"--sha256 {sha256.lower()} differs from the sha256 {pinned_sha256} pinned for {url} "
            "in the release manifest; checking the archive against --sha256."
        )
    if expected_size is not None and pinned_size is not None and expected_size != pinned_size:
        _warn(
            f"--expected-size {expected_size} differs from the size {pinned_size} pinned for "
            f"{url} in the release manifest; checking the archive against --expected-size."
        )
    if sha256 is not None:
        checked_against: str | None = "given"
    elif pinned_sha256 is not None:
        checked_against = "pinned"
    else:
        checked_against = None
    return (
        expected_size if expected_size is not None else pinned_size,
        sha256.lower() if sha256 is not None else pinned_sha256,
        checked_against,
    )


def _transport_problem(url: str, *, digest_known: bool) -> str | None:
    """Why ``url`` must not be fetched, or None. Plain http is refused unless a sha256 will check
    the result (then integrity does not depend on the transport) or the host is this machine's
    loopback interface (no network in between)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http:// or https:// address."
    if parts.scheme.lower() == "http" and not digest_known and not _is_loopback(parts.hostname):
        return (
            f"Refusing to download {url} over plain http without a sha256 to check: anyone on "
            "the way could change the archive. Use an https:// address, or pass --sha256 with "
            "the archive's digest from a source you trust."
        )
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an address the download policy allows, so a server cannot turn
    an https download without a sha256 into a plain-http one."""

    def __init__(self, digest_known: bool) -> None:
        super().__init__()
        self.digest_known = digest_known

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        problem = _transport_problem(newurl, digest_known=self.digest_known)
        if problem is not None:
            fp.close()
            raise DownloadError(f"{req.full_url} redirected to {newurl}. {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Interrupted(Exception):
    """A request failed in a way worth retrying (network trouble, HTTP 5xx)."""

    def __init__(self, reason: str, *, connected: bool, progressed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connected = connected
        self.progressed = progressed


class _Transfer:
    """Fetches ``url`` into ``part_path``, resuming from whatever the file already holds."""

    def __init__(
        self,
        url: str,
        part_path: Path,
        expected_size: int | None,
        progress: bool,
        timeout: float,
        retries: int,
        digest_known: bool,
    ) -> None:
        self.url = url
        self.part_path = part_path
        self.expected_size = expected_size
        self.progress = progress
        self.timeout = timeout
        self.retries = retries
        self.total: int | None = None  # size of the whole file, once the server has said it
        self.ever_connected = False
        # Furthest the partial file got: a drop only counts as progress when it got further.
        self.furthest = part_path.stat().st_size if part_path.exists() else 0
        self.bar: tqdm | None = None
        # Built per transfer so proxy settings are read from the environment at call time.
        self.opener = urllib.request.build_opener(_RedirectGuard(digest_known))

    def run(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    self._attempt()
                    return
                except _Interrupted as exc:
                    self.ever_connected |= exc.connected
                    failures = 1 if exc.progressed else failures + 1
                    if failures > self.retries:
                        raise DownloadError(self._give_up_message(exc)) from None
                    # Reconnect at once after a drop that made progress; back off otherwise.
                    wait = 0.0 if exc.progressed else min(2.0 ** (failures - 1), _MAX_BACKOFF_S)
                    _say(
                        self.progress,
                        f"Connection problem ({exc.reason}); retry {failures} of "
                        f"{self.retries} in {wait:.0f} s.",
                    )
                    time.sleep(wait)
        finally:
            if self.bar is not None:
                self.bar.close()

    def _attempt(self) -> None:
        offset = self.part_path.stat().st_size if self.part_path.exists() else 0
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            try:
                self._handle_http_error(err, offset)
            finally:
                err.close()
            return
        except (OSError, http.client.HTTPException) as err:
            raise _Interrupted(_reason(err), connected=False, progressed=False) from err

        with response:
            body_length = self._prepare(response, offset)
            if response.status == 200:
                offset = 0  # a full answer, even if we asked for a range: start over
            received = self._receive(response, offset)

        have = offset + received
        short_body = body_length is not None and received < body_length
        if short_body or (self.total is not None and have < self.total):
            raise _Interrupted(
                f"connection closed after {have} of {self.total} bytes",
                connected=True,
                progressed=self._got_further(have),
            )
        if self.total is not None and have > self.total:
            raise DownloadError(
                f"Size mismatch: {self.part_path} holds {have} bytes but {self.url} "
                f"reports {self.total}."
            )
        self.total = have

    def _handle_http_error(self, err: urllib.error.HTTPError, offset: int) -> None:
        if err.code == 416 and offset:
            # Nothing left after `offset`: the partial file is already whole, or too big.
            total = _range_total(err.headers.get("Content-Range")) or offset
            self._learn_total(total, offset)
            if offset > total:
                quarantined = _quarantine(self.part_path)
                raise DownloadError(
                    f"Size mismatch: {self.part_path} holds {offset} bytes but {self.url} is only "
                    f"{total} bytes, so it is not a partial copy of that file. It was moved to "
                    f"{quarantined}; rerun to download afresh."
                )
            return
        if err.code >= 500 or err.code in (408, 429):
            raise _Interrupted(
                f"HTTP {err.code} {err.reason}", connected=True, progressed=False
            ) from err
        raise DownloadError(
            f"{self.url} answered HTTP {err.code} {err.reason}. Check the address, or pass --url "
            "to download from a mirror."
        )

    def _prepare(self, response: http.client.HTTPResponse, offset: int) -> int | None:
        """Read the size from the headers and check it; return the body length if known."""
        if response.status == 206:
            content_range = response.headers.get("Content-Range")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (content_range or "").strip())
            if match is None:
                raise DownloadError(
                    f"{self.url} answered a resume request with an unreadable Content-Range "
                    f"{content_range!r}."
                )
            start, end = int(match[1]), int(match[2])
            if start != offset:
                raise DownloadError(
                    f"{self.url} resumed at byte {start} but {self.part_path} ends at byte "
                    f"{offset}. Delete {self.part_path} and rerun."
                )
            total = None if match[3] == "*" else int(match[3])
            self._learn_total(total, offset)
            return end - start + 1
        if response.status == 200:
            if offset:
                _say(self.progress, f"{self.url} cannot resume; downloading again from the start.")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            self._learn_total(total, 0)
            return total
        raise DownloadError(f"{self.url} answered with unexpected HTTP status {response.status}.")

    def _learn_total(self, total: int | None, offset: int) -> None:
        if total is not None and self.expected_size is not None and total != self.expected_size:
            raise DownloadError(
                f"Size mismatch: {self.url} is {total} bytes but the expected size is "
                f"{self.expected_size} bytes. Check --url and --expected-size."
            )
        if self.total is not None and total is not None and total != self.total:
            raise DownloadError(
                f"{self.url} changed size during the download ({self.total} bytes, now {total}). "
                f"Delete {self.part_path} and rerun."
            )
        first_time = self.total is None
        if total is not None:
            self.total = total
        size = total if total is not None else self.expected_size
        if first_time and size is not None and offset < size:
            # The finished zip and the unpacked copy (about as big: stored members) coexist.
            _check_free_space(
                self.part_path.parent,
                download=size - offset,
                unpack=size,
                what=f"download and unpack {self.url}",
            )

    def _receive(self, response: http.client.HTTPResponse, offset: int) -> int:
        """Append the body to the partial file; return how many bytes arrived."""
        if self.bar is None:
            self.bar = _byte_bar(self.total, ZIP_NAME, self.progress, initial=offset)
        else:
            self.bar.total = self.total
            self.bar.n = offset
            self.bar.refresh()
        received = 0
        with open(self.part_path, "ab" if offset else "wb") as part:
            while True:
                try:
                    chunk = response.read1(_CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as err:
                    progressed = self._got_further(offset + received)
                    raise _Interrupted(_reason(err), connected=True, progressed=progressed) from err
                if not chunk:
                    return received
                part.write(chunk)
                received += len(chunk)
                self.bar.update(len(chunk))

    def _got_further(self, have: int) -> bool:
        """Whether the partial file is longer than ever before in this call; a server that
        cannot resume and drops at the same place each time makes no progress."""
        if have > self.furthest:
            self.furthest = have
            return True
        return False

    def _give_up_message(self, exc: _Interrupted) -> str:
        have = self.part_path.stat().st_size if self.part_path.exists() else 0
        if not self.ever_connected and have == 0:
            return (
                f"Could not reach {self.url} ({exc.reason}). Check your network connection, or "
                "pass --url to download from a mirror."
            )
        of_total = f" of {self.total}" if self.total is not None else ""
        return (
            f"Download from {self.url} failed at {have}{of_total} bytes ({exc.reason}) after "
            f"{self.retries} retries. The partial data is kept in {self.part_path}; rerun the "
            "same command to resume, after checking your network connection (or pass --url "
            "to use a mirror)."
        )


def _verify_or_quarantine(
    path: Path, expected_size: int | None, sha256: str | None, progress: bool
) -> str:
    """Check size, sha256 and every member's CRC-32; move a bad file aside so it is not reused.
    Returns the file's sha256 (computed whether or not one was expected, for the record)."""
    problem, digest = _integrity_problem(path, expected_size, sha256, progress)
    if problem is not None:
        quarantined = _quarantine(path)
        raise DownloadError(
            f"Integrity check of {path} failed: {problem}. The file was moved to {quarantined} "
            f"so it is not used again; delete it and rerun to download afresh."
        )
    assert digest is not None
    return digest


def _integrity_problem(
    path: Path, expected_size: int | None, sha256: str | None, progress: bool
) -> tuple[str | None, str | None]:
    """(what is wrong or None, the file's sha256 once computed)."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size mismatch: {size} bytes, expected {expected_size}", None
    with _byte_bar(size, "sha256", progress) as bar:
        digest = _hash_file(path, bar)
    if sha256 is not None and digest != sha256.lower():
        return f"sha256 is {digest}, expected {sha256.lower()}", digest
    try:
        with zipfile.ZipFile(path) as archive:
            return _crc_problem(archive, progress), digest
    except zipfile.BadZipFile as err:
        return f"not a readable zip archive ({err})", digest


def _crc_problem(archive: zipfile.ZipFile, progress: bool) -> str | None:
    """What ``ZipFile.testzip`` does (read every member, which checks its CRC-32), with a bar."""
    members = archive.infolist()
    with _byte_bar(sum(info.file_size for info in members), "CRC check", progress) as bar:
        for info in members:
            try:
                with archive.open(info) as member:
                    while chunk := member.read(_CHUNK_BYTES):
                        bar.update(len(chunk))
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                return f"CRC/integrity error in member {info.filename!r} ({err})"
            except NotImplementedError as err:
                return f"member {info.filename!r} cannot be read ({err})"
    return None


def _extract(zip_path: Path, target: Path, archive_record: dict[str, Any], progress: bool) -> None:
    """Unpack into a sibling staging folder, then rename it to ``target`` in one step."""
    staging = target.parent / f".{target.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)  # left over from an unpacking that was killed
    with zipfile.ZipFile(zip_path) as archive:
        plan = _member_plan(archive, zip_path)
        unpacked = sum(info.file_size for info, _ in plan)
        _check_free_space(target.parent, download=0, unpack=unpacked, what=f"unpack {zip_path}")
        staging.mkdir()
        try:
            recorded: dict[str, dict[str, Any]] = {}
            with _byte_bar(unpacked, "unpack", progress) as bar:
                for info, relative in plan:
                    out_path = staging.joinpath(*relative.parts)
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    digest = _unpack_member(archive, info, out_path, bar)
                    recorded[relative.as_posix()] = {"size": info.file_size, "sha256": digest}
            manifest = {
                "format": MANIFEST_FORMAT,
                "source": archive_record["url"],
                "archive": archive_record,
                "files": recorded,
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
            staging.rename(target)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError | zipfile.BadZipFile | zlib.error | EOFError):
                raise DownloadError(f"Could not unpack {zip_path} into {target}: {err}") from err
            raise


def _unpack_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, out_path: Path, bar: tqdm
) -> str:
    """Write one member to ``out_path``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with archive.open(info) as member, open(out_path, "wb") as out:
        while chunk := member.read(_CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _member_plan(
    archive: zipfile.ZipFile, zip_path: Path
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Each file member with its path inside the dataset folder. Refuses unsafe names, a name
    that occurs twice (also once slashes, '.' and letter case are normalised, as a
    case-insensitive disk would see them), and anything a CrowdPlay release does not hold."""
    # The reader owns the raw layout; imported here, not at the top, because it pulls in
    # SQLAlchemy and numpy, which every `crowdplay-minari` command would then pay for.
    from .raw.reader import DB_FILENAME

    files: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    folders: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    seen: dict[str, str] = {}  # normalised name -> the member name first seen with it
    for info in archive.infolist():
        if info.filename.startswith("__MACOSX/"):
            continue  # macOS Finder's resource forks: never unpacked
        relative = _safe_member_path(info.filename, zip_path)
        if relative is None:
            if info.is_dir():
                continue  # "./": the dataset folder itself
            raise _unexpected_member(zip_path, info.filename)
        key = relative.as_posix().casefold()
        if key in seen:
            raise _duplicate_member(zip_path, info.filename, seen[key])
        seen[key] = info.filename
        (folders if info.is_dir() else files).append((info, relative))

    names = {relative for _, relative in files}
    if PurePosixPath(DB_FILENAME) in names:
        depth = 0
    else:
        # The zip may instead hold everything under one top-level folder: strip it.
        tops = {relative.parts[0] for relative in names}
        if len(tops) != 1 or PurePosixPath(next(iter(tops)), DB_FILENAME) not in names:
            raise DownloadError(
                f"{zip_path} does not look like the CrowdPlay dataset: it has no {DB_FILENAME} "
                "at its top level or inside a single top-level folder."
            )
        depth = 1
    for info, relative in folders:
        if len(relative.parts) != depth:  # only the one top-level folder, if any
            raise _unexpected_member(zip_path, info.filename)

    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    episodes: dict[str, str] = {}  # episode id (case-folded) -> its trajectory member
    for info, relative in files:
        inside = PurePosixPath(*relative.parts[depth:])
        if len(inside.parts) != 1:
            raise _unexpected_member(zip_path, info.filename)
        if inside.name != DB_FILENAME:
            episode_id = _episode_of(inside.name)
            if episode_id is None:
                raise _unexpected_member(zip_path, info.filename)
            if episode_id.casefold() in episodes:
                raise _duplicate_member(zip_path, info.filename, episodes[episode_id.casefold()])
            episodes[episode_id.casefold()] = info.filename
        plan.append((info, inside))
    return plan


def _episode_of(file_name: str) -> str | None:
    """The episode id of a trajectory file name the reader accepts, else None."""
    from .raw.reader import SAFE_NAME, TRAJECTORY_SUFFIXES

    for suffix in TRAJECTORY_SUFFIXES:
        episode_id = file_name.removesuffix(suffix)
        if episode_id != file_name and SAFE_NAME.fullmatch(episode_id) and ".." not in episode_id:
            return episode_id
    return None


def _unexpected_member(zip_path: Path, name: str) -> DownloadError:
    from .raw.reader import DB_FILENAME, TRAJECTORY_SUFFIXES

    suffixes = "|".join(TRAJECTORY_SUFFIXES)
    return DownloadError(
        f"Refusing to unpack {zip_path}: member {name!r} is not part of a CrowdPlay release, "
        f"which holds only {DB_FILENAME} and <episode_id>{{{suffixes}}} files, at its top level "
        "or in one folder."
    )


def _duplicate_member(zip_path: Path, name: str, first: str) -> DownloadError:
    again = "appears twice" if name == first else f"duplicates member {first!r}"
    return DownloadError(
        f"Refusing to unpack {zip_path}: member {name!r} {again} (two entries for one file or "
        "episode; which one would be used is anyone's guess)."
    )


def _safe_member_path(name: str, zip_path: Path) -> PurePosixPath | None:
    """The member's relative path, or None for an empty name; refuse absolute paths and '..'."""
    normalized = name.replace("\\", "/")
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if normalized.startswith("/") or re.match(r"[A-Za-z]:", normalized) or ".." in parts:
        raise DownloadError(
            f"Refusing to unpack {zip_path}: member {name!r} would be written outside the "
            "dataset folder (absolute path or '..')."
        )
    return PurePosixPath(*parts) if parts else None


def _read_manifest(manifest_path: Path) -> dict[str, tuple[int, str | None]]:
    """File name -> (size, sha256 or None where the manifest predates digests).

    Raises:
        ValueError: saying why the manifest cannot be used.
    """
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if not isinstance(files, dict):
        raise ValueError("'files' is not an object")
    recorded: dict[str, tuple[int, str | None]] = {}
    for name, entry in files.items():
        if isinstance(entry, dict):  # format 2
            size, digest = entry.get("size"), entry.get("sha256")
        else:  # format 1: the size alone
            size, digest = entry, None
        parts = PurePosixPath(name).parts
        if not parts or parts[0] == "/" or ".." in parts or "\\" in name:
            raise ValueError(f"it names the unsafe path {name!r}")
        if type(size) is not int or size < 0:
            raise ValueError(f"the size of {name!r} is {size!r}")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ValueError(f"the sha256 of {name!r} is {digest!r}")
        recorded[name] = (size, digest.lower() if digest else None)
    return recorded


def _incompleteness(target: Path) -> str | None:
    """Why ``target`` is not a complete unpacked dataset, or None if it is complete. Compares
    sizes only (re-hashing 15 GB on every rerun would be slow); ``check_unpacked`` hashes."""
    manifest_path = target / MANIFEST_NAME
    if not manifest_path.is_file():
        return (
            "has no download manifest, so it was not unpacked (completely) by this tool and "
            "cannot be checked"
        )
    try:
        recorded = _read_manifest(manifest_path)
    except ValueError as err:
        return f"its manifest {manifest_path} is unreadable ({err})"
    for relative, (size, _) in recorded.items():
        path = target / relative
        if not path.is_file():
            return f"is missing {relative}"
        if path.stat().st_size != size:
            return f"has {relative} with {path.stat().st_size} bytes instead of {size}"
    return None


def _file_problem(path: Path, size: int, digest: str | None, bar: tqdm) -> str | None:
    """What differs between ``path`` and its recorded size and sha256, or None."""
    if path.is_symlink() or not path.is_file():
        bar.update(size)
        if path.is_symlink():
            return "replaced by a symbolic link since unpacking"
        if path.exists():
            return "no longer a regular file"
        return f"missing (unpacked with {size} bytes)"
    try:
        actual_size = path.stat().st_size
        if actual_size != size:
            bar.update(size)
            return f"changed since unpacking ({actual_size} bytes, recorded {size})"
        actual = _hash_file(path, bar)
    except OSError as err:
        return f"cannot be read ({_reason(err)})"
    if actual != digest:
        return f"changed since unpacking (sha256 {actual}, recorded {digest})"
    return None


def _entries_under(folder: Path) -> set[str]:
    """Relative POSIX names of every file and symbolic link under ``folder`` (links to folders
    are listed, not followed)."""
    found: set[str] = set()
    for parent, dirnames, filenames in os.walk(folder):
        relative = Path(parent).relative_to(folder)
        linked = [name for name in dirnames if os.path.islink(os.path.join(parent, name))]
        found.update((relative / name).as_posix() for name in filenames + linked)
    return found


def _hash_file(path: Path, bar: tqdm) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _check_free_space(folder: Path, *, download: int, unpack: int, what: str) -> None:
    need = download + unpack
    free = shutil.disk_usage(folder).free
    if need > free:
        detail = (
            f"{_human(download)} left to download + {_human(unpack)} to unpack"
            if download
            else f"{_human(unpack)} unpacked"
        )
        raise DownloadError(
            f"Not enough free disk space in {folder} to {what}: need {_human(need)} ({detail}), "
            f"but only {_human(free)} is available. Free up space or choose another destination."
        )


def _quarantine(path: Path) -> Path:
    quarantined = path.with_name(CORRUPT_NAME)
    path.replace(quarantined)
    return quarantined


def _range_total(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (content_range or "").strip())
    return int(match[1]) if match else None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        if not isinstance(err.reason, BaseException):
            return str(err.reason)
        err = err.reason
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


def _human(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = float(n_bytes)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)


def _warn(message: str) -> None:
    """One line on stderr whatever ``progress`` says: a warning is not a status line."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
