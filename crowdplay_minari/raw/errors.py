"""Errors raised while reading raw CrowdPlay data.

Every error names the file it came from and, where it applies, the step index and the field, so
that one bad file in a 300-hour release can be found and skipped without guesswork.
"""

from __future__ import annotations

from pathlib import Path


class CrowdPlayDataError(Exception):
    """Base class: something in a raw CrowdPlay file is wrong."""

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        step: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.step = step
        self.field = field
        where = [str(self.path) if self.path is not None else "<memory>"]
        if step is not None:
            where.append(f"step {step}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}")


class TrajectoryNotFoundError(CrowdPlayDataError):
    """The metadata DB names an episode whose trajectory file is missing."""


class CorruptTrajectoryError(CrowdPlayDataError):
    """A trajectory file cannot be decompressed or unpickled (truncated, damaged, wrong type)."""


class UnsafePickleError(CrowdPlayDataError):
    """A pickle asks for a callable outside the small set the CrowdPlay format needs."""


class SchemaError(CrowdPlayDataError):
    """A file decodes, but its content lacks the CrowdPlay layout (missing key, bad type)."""


class InvalidMetadataError(CrowdPlayDataError):
    """A metadata row names a game, task, agent or episode that is not a safe, known name (these
    names become dataset ids and file names, so they are checked like data, not trusted)."""


class UnsafePathError(CrowdPlayDataError):
    """A trajectory path leaves the raw directory (a symlink pointing outside it)."""
