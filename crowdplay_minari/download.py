"""Download and unpack the raw CrowdPlay Atari dataset.

The dataset is one zip of about 15 GB (``data-v0.zip``, made with ``zip -0``, so unpacking needs
about as much again). This module fetches it into ``DEST/data-v0.zip.part``, resuming with HTTP
``Range`` requests after a dropped connection or a killed process, checks its size and the CRC-32
of every member (and a sha256 if given), and unpacks it atomically into
``DEST/crowdplay_atari-v0/``::

    from pathlib import Path
    from crowdplay_minari.download import download_dataset

    dataset_dir = download_dataset(Path("data"))  # -> data/crowdplay_atari-v0
    print(sorted(p.name for p in dataset_dir.iterdir())[:3])

or from the shell: ``crowdplay-minari download data``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

DEFAULT_URL = "http://crowdplay-atari.s3-website-us-east-1.amazonaws.com/data-v0.zip"
DATASET_DIRNAME = "crowdplay_atari-v0"
ZIP_NAME = "data-v0.zip"
PART_NAME = ZIP_NAME + ".part"
CORRUPT_NAME = ZIP_NAME + ".corrupt"
# Written into the dataset directory last, so its presence means the unpacking finished.
MANIFEST_NAME = ".crowdplay-minari-manifest.json"

_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 30.0
_USER_AGENT = "crowdplay-minari-download"


class DownloadError(Exception):
    """The dataset could not be downloaded, verified or unpacked; the message says why."""


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
        url: where to fetch ``data-v0.zip`` from (a mirror, or a local server in tests).
        expected_size: size of the zip in bytes; refuse a server or a file of any other size.
        sha256: hex digest the finished zip must have.
        progress: show progress bars and status lines on stderr.
        keep_zip: keep ``DEST/data-v0.zip`` after unpacking (a later run then unpacks it
            again without downloading).
        timeout: seconds to wait for the server to connect or to send more data.
        retries: how many times in a row a failed request is retried. A failure that came after
            some new data was received starts the count again, so a long download survives
            any number of dropped connections as long as each one made progress.

    Returns:
        The path of the unpacked dataset, holding ``dataset.sqlite`` and ``<uuid>.pickle.bz2``.

    Raises:
        DownloadError: the host cannot be reached, the download failed its size, CRC-32 or
            sha256 check, the archive holds unsafe paths, or the disk is too full.
    """
    dest = Path(dest)
    if expected_size is not None and expected_size <= 0:
        raise ValueError(f"expected_size must be a positive number of bytes, got {expected_size}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"Destination {dest} exists and is not a directory.")
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
        _verify_or_quarantine(zip_path, expected_size, sha256, progress)
    else:
        part_path = dest / PART_NAME
        _Transfer(url, part_path, expected_size, progress, timeout, retries).run()
        _verify_or_quarantine(part_path, expected_size, sha256, progress)
        part_path.replace(zip_path)

    _extract(zip_path, target, url, progress)
    if not keep_zip:
        zip_path.unlink()
    _say(progress, f"The CrowdPlay dataset is ready in {target}.")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``crowdplay-minari download DEST`` to ``parser``."""
    parser.add_argument(
        "dest",
        type=Path,
        help=f"folder to put {DATASET_DIRNAME}/ in (needs about 30 GB free while unpacking)",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="where to download %(default)s from")
    parser.add_argument("--sha256", default=None, help="hex sha256 the zip must have")
    parser.add_argument(
        "--expected-size", type=int, default=None, help="size in bytes the zip must have"
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
    """Body of ``crowdplay-minari download``: 0 on success, 1 on a download error."""
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
    except (DownloadError, ValueError) as err:
        print(f"crowdplay-minari download: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "crowdplay-minari download: interrupted; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    print(target)
    return 0


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
        self.opener = urllib.request.build_opener()

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
) -> None:
    """Check size, sha256 and every member's CRC-32; move a bad file aside so it is not reused."""
    problem = _integrity_problem(path, expected_size, sha256, progress)
    if problem is not None:
        quarantined = _quarantine(path)
        raise DownloadError(
            f"Integrity check of {path} failed: {problem}. The file was moved to {quarantined} "
            f"so it is not used again; delete it and rerun to download afresh."
        )


def _integrity_problem(
    path: Path, expected_size: int | None, sha256: str | None, progress: bool
) -> str | None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size mismatch: {size} bytes, expected {expected_size}"
    if sha256 is not None:
        digest = hashlib.sha256()
        with (
            open(path, "rb") as file,
            _byte_bar(size, "sha256", progress) as bar,
        ):
            while chunk := file.read(_CHUNK_BYTES):
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256.lower():
            return f"sha256 is {digest.hexdigest()}, expected {sha256.lower()}"
    try:
        with zipfile.ZipFile(path) as archive:
            return _crc_problem(archive, progress)
    except zipfile.BadZipFile as err:
        return f"not a readable zip archive ({err})"


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


def _extract(zip_path: Path, target: Path, url: str, progress: bool) -> None:
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
            with _byte_bar(unpacked, "unpack", progress) as bar:
                for info, relative in plan:
                    out_path = staging.joinpath(*relative.parts)
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as member, open(out_path, "wb") as out:
                        while chunk := member.read(_CHUNK_BYTES):
                            out.write(chunk)
                            bar.update(len(chunk))
            manifest = {
                "source": url,
                "files": {relative.as_posix(): info.file_size for info, relative in plan},
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
            staging.rename(target)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError | zipfile.BadZipFile | zlib.error | EOFError):
                raise DownloadError(f"Could not unpack {zip_path} into {target}: {err}") from err
            raise


def _member_plan(
    archive: zipfile.ZipFile, zip_path: Path
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Each file member with its path inside the dataset folder; refuse unsafe names."""
    files: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in archive.infolist():
        if info.filename.startswith("__MACOSX/"):
            continue
        relative = _safe_member_path(info.filename, zip_path)
        if relative is not None and not info.is_dir():
            files.append((info, relative))
    names = {relative for _, relative in files}
    if PurePosixPath("dataset.sqlite") in names:
        return files
    # The zip may instead hold everything under one top-level folder: strip it.
    tops = {relative.parts[0] for relative in names}
    if len(tops) == 1:
        (top,) = tops
        if PurePosixPath(top, "dataset.sqlite") in names:
            return [(info, PurePosixPath(*relative.parts[1:])) for info, relative in files]
    raise DownloadError(
        f"{zip_path} does not look like the CrowdPlay dataset: it has no dataset.sqlite at its "
        "top level or inside a single top-level folder."
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


def _incompleteness(target: Path) -> str | None:
    """Why ``target`` is not a complete unpacked dataset, or None if it is complete."""
    manifest_path = target / MANIFEST_NAME
    if not manifest_path.is_file():
        return (
            "has no download manifest, so it was not unpacked (completely) by this tool and "
            "cannot be checked"
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest {manifest_path} is unreadable ({err})"
    for relative, size in files.items():
        path = target / relative
        if not path.is_file():
            return f"is missing {relative}"
        if path.stat().st_size != size:
            return f"has {relative} with {path.stat().st_size} bytes instead of {size}"
    return None


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
