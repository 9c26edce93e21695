"""A restricted unpickler for CrowdPlay trajectories and pickled SQLite values.

Pickles can name any importable callable, and unpickling calls it: a pickle from the internet can
run `os.system`. CrowdPlay files need only builtin containers and scalars (which pickle encodes
with opcodes, not callables), numpy arrays and scalars, `OrderedDict`, and `datetime` types. Only
those callables are admitted; anything else raises `UnsafePickleError` *before* it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

from .errors import CorruptTrajectoryError, UnsafePickleError

# (module, name) pairs a CrowdPlay pickle may reference. numpy moved its internals from
# numpy.core to numpy._core in 2.0; files written by either version name one of them.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("datetime", "datetime"),
        ("datetime", "timedelta"),
        ("datetime", "date"),
        ("datetime", "time"),
        ("datetime", "timezone"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the callables in `_ALLOWED`."""

    def __init__(self, file: IO[bytes], source: str | Path | None) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                self._source,
                f"pickle references {module}.{name}, which the CrowdPlay format never uses; "
                "refusing to load it (it could run code)",
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self._source, "pickle uses persistent ids; refusing to load it")


def load(file: IO[bytes], source: str | Path | None = None) -> Any:
    """Unpickle one object from `file`, admitting only CrowdPlay's types.

    Raises `UnsafePickleError` for a forbidden callable and `CorruptTrajectoryError` for a
    damaged or truncated stream; both name `source`.
    """
    try:
        return RestrictedUnpickler(file, source).load()
    except UnsafePickleError:
        raise
    except EOFError as exc:  # bz2/gzip streams and pickles both end early this way
        raise CorruptTrajectoryError(source, f"file is truncated: {exc}") from exc
    except OSError as exc:  # damaged compressed data
        raise CorruptTrajectoryError(source, f"cannot decompress: {exc}") from exc
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CorruptTrajectoryError(source, f"cannot unpickle: {exc}") from exc


def loads(data: bytes, source: str | Path | None = None) -> Any:
    """`load` for an in-memory bytes object (e.g. a pickled SQLite value)."""
    return load(io.BytesIO(data), source)
