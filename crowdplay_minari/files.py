"""Small files that survive a crash: written whole or not at all, read even when torn.

Every JSON, JSONL, CSV and Markdown file the converter and the grid runner write goes through
here. A write goes to a temporary file in the same folder, is flushed to disk and renamed over
the target, so a reader sees the old file or the new one, never half of it. A JSONL append
writes one whole line with a single `write` call; a crash can still tear that last line, so the
reader keeps every line it can parse and says which ones it could not.

    write_text(path, "...")                   # atomic
    append_jsonl(path, {"step": 10})          # one line
    points, problem = read_jsonl(path)        # problem: None, or what was wrong
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    write_bytes(path, text.encode())


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as indented JSON, atomically."""
    write_text(path, json.dumps(value, indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> tuple[Any, str | None]:
    """`(value, None)`, or `(None, problem)` when the file is missing, empty or not JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, f"{path}: missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not text.strip():
        return None, f"{path}: empty"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{path}: not JSON ({exc.msg} at line {exc.lineno})"


def append_jsonl(path: Path, value: Any) -> None:
    """Append `value` as one JSON line, flushed to disk."""
    line = (json.dumps(value, allow_nan=True) + "\n").encode()
    with open(path, "ab") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def read_jsonl(path: Path) -> tuple[list[Any], str | None]:
    """Every JSON line of `path` that parses, and a note naming the lines that did not (a line
    torn by a crash, garbage) or None. A missing file is no lines and no problem."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return [], None
    values, bad = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(number)
    if not bad:
        return values, None
    return values, f"{path}: skipped unreadable line(s) {', '.join(map(str, bad))}"


class OutputInUse(RuntimeError):
    """Another process holds the lock of an output (a datasets root, a grid directory)."""


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (an advisory `flock`, released when the process
    ends, even by kill -9) while writing `what`; `OutputInUse` at once if another process holds
    it. The lock file records the holder's pid, for the message."""
    import fcntl

    lock_path = Path(lock_path)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise OutputInUse(
                f"another run (pid {holder}) is writing {what}; wait for it to finish or choose "
                f"another output (lock file {lock_path})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DiskFull(OSError):
    """The disk filled up while writing `what`; says how much space was needed and was free."""

    def __init__(self, what: str, where: Path, needed: int | None = None) -> None:
        import errno
        import shutil

        free = shutil.disk_usage(where).free if Path(where).exists() else 0
        need = f"about {_mb(needed)} needed, " if needed else ""
        message = (
            f"no space left writing {what}: {need}{_mb(free)} free on {where}; nothing "
            "published before is damaged, free some space and rerun to finish"
        )
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def is_disk_full(error: BaseException | str) -> bool:
    """ENOSPC, also as HDF5 reports it (an OSError whose errno is unset but whose text says so)."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error) or "errno = 28" in str(error)
