"""A restricted unpickler for CrowdPlay trajectories and pickled SQLite values.

Pickles can name any importable callable, and unpickling calls it: a pickle from the internet can
run `os.system`. CrowdPlay files need only builtin containers and scalars (which pickle encodes
with opcodes, not callables), numpy arrays and scalars, `OrderedDict`, and `datetime` types. Only
those callables are admitted; anything else raises `UnsafePickleError` *before* it is called.

Admitting numpy is not enough on its own: numpy's `__setstate__` methods and the `ndarray`
constructor trust their arguments, and forged ones crash the interpreter or turn bytes into
object pointers (a dtype state tuple of the wrong length reads uninitialised memory, numpy issue
30476; a forged dtype `flags` value or a short list for an object array does the same;
`ndarray(shape, dtype, buffer, offset)` with a negative offset reads outside the buffer). So
numpy objects are only built the way numpy itself pickles them, and each state is checked before
numpy sees it. Checking `BUILD` needs the pure-Python unpickler (the C one cannot intercept it);
it adds 0.1 to 0.3 s per 1,000 frames, a fraction of what decompressing a `.pickle.bz2` takes.

The input is read as a stream of pieces of a few MiB (`load` reads a file, e.g. a bz2 file, that
way), so a trajectory is never in memory twice, once pickled and once unpickled.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import math
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import CorruptTrajectoryError, UnsafePickleError

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

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
        ("builtins", "bytes"),  # protocol 2 pickles b"" as bytes()
        ("builtins", "bytearray"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("_codecs", "encode"),
    }
)

_BYTE_ORDERS = ("<", ">")
PIECE_BYTES = 4 << 20  # read a file this much at a time


class _PieceReader:
    """The unpickler's input, served from a stream of byte pieces.

    The unpickler reads opcode by opcode, millions of tiny reads per trajectory; each is one call
    of `read` here, which serves it from a `BytesIO` over the current piece (in C, without copying
    the piece). It also stands in for pickle's unframer: protocol 4 frames only say how the
    stream may be buffered, so they are read through like any other bytes.
    """

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._piece = io.BytesIO()

    def read(self, n: int) -> bytes:
        data = self._piece.read(n)
        if len(data) == n:
            return data
        parts = [data]
        missing = n - len(data)
        while missing and self._next_piece():
            data = self._piece.read(missing)
            parts.append(data)
            missing -= len(data)
        return b"".join(parts)  # short at the end of the stream: the unpickler raises EOFError

    def readline(self) -> bytes:
        line = self._piece.readline()
        if line.endswith(b"\n"):
            return line
        parts = [line]
        while self._next_piece():
            line = self._piece.readline()
            parts.append(line)
            if line.endswith(b"\n"):
                break
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            data = self.read(len(target))
            target[: len(data)] = data
        return len(data)

    def load_frame(self, frame_size: int) -> None:
        pass

    def _next_piece(self) -> bool:
        """Move to the next non-empty piece; False at the end of the stream."""
        for piece in self._pieces:
            if piece:
                self._piece = io.BytesIO(piece)
                return True
        return False


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python `pickle` unpickler that resolves only the callables in `_ALLOWED` and checks
    numpy dtype and array states before numpy applies them. It reads `pieces`, the bytes of one
    pickle in any number of parts."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, pieces: Iterable[bytes], source: str | Path | None) -> None:
        self._reader = _PieceReader(pieces)
        super().__init__(self._reader)
        self._source = source
        # numpy pickles an array as `_reconstruct(numpy.ndarray, (0,), b"b")` followed by BUILD
        # and never calls `ndarray` itself. The name resolves to this stand-in, which
        # `_reconstruct` accepts and which refuses to be called.
        self._ndarray = self._refuse_ndarray_call

    def _unsafe(self, problem: str) -> UnsafePickleError:
        return UnsafePickleError(self._source, f"{problem}; refusing to load it")

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # protocol 2 spells builtins "__builtin__"
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                self._source,
                f"pickle references {module}.{name}, which the CrowdPlay format never uses; "
                "refusing to load it (it could run code)",
            )
        if name == "ndarray":
            return self._ndarray
        if name == "_reconstruct":
            return self._reconstruct
        if name == "dtype":
            return self._dtype
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise self._unsafe("pickle uses persistent ids")

    def _refuse_ndarray_call(self, *args: Any) -> None:
        raise self._unsafe("pickle calls numpy.ndarray directly (buffer, offset and strides)")

    def _reconstruct(self, subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
        if subtype is not self._ndarray:
            raise self._unsafe("numpy _reconstruct is asked for something other than an ndarray")
        return _numpy_reconstruct(np.ndarray, shape, typecode)

    def _dtype(self, spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        # numpy pickles a dtype by its type string (e.g. 'u1'); structured and subarray dtypes
        # would take their fields from the (unchecked) state, and CrowdPlay has none.
        if type(spec) is not str:
            raise self._unsafe(f"numpy dtype from a {type(spec).__name__}, not a type string")
        dtype = np.dtype(spec, bool(align), bool(copy))
        if dtype.fields is not None or dtype.subdtype is not None:
            raise self._unsafe(f"structured numpy dtype {spec!r}")
        return dtype

    def _check_dtype_state(self, dtype: np.dtype, state: Any) -> None:
        # Admit only the state numpy itself writes for this dtype, (version, byte order,
        # subarray, names, fields, itemsize, alignment, flags[, datetime unit]); the byte order
        # may be swapped. numpy checks the datetime unit itself.
        expected = dtype.__reduce__()[2]
        if type(state) is tuple and len(state) == len(expected):
            order, want_order = state[1], expected[1]
            order_ok = type(order) is str and (
                order == want_order or (order in _BYTE_ORDERS and want_order in _BYTE_ORDERS)
            )
            layout, want_layout = state[:1] + state[2:8], expected[:1] + expected[2:8]
            if order_ok and all(
                type(a) is type(b) and a == b for a, b in zip(layout, want_layout, strict=True)
            ):
                return
        raise self._unsafe(f"numpy dtype {dtype} has a forged or malformed state {state!r}")

    def _check_array_state(self, state: Any) -> None:
        # numpy fills an object array from the state's list without checking the list's length.
        if type(state) is not tuple or len(state) not in (4, 5):
            return  # numpy rejects these itself
        shape, dtype, data = state[-4], state[-3], state[-1]
        if not (isinstance(dtype, np.dtype) and dtype.hasobject):
            return
        if not (
            type(data) is list
            and type(shape) is tuple
            and all(type(n) is int and n >= 0 for n in shape)
            and len(data) == math.prod(shape)
        ):
            raise self._unsafe("numpy object array whose item list does not match its shape")

    def load_build(self) -> None:
        # BUILD calls stack[-2].__setstate__(stack[-1]); numpy's versions trust their input.
        if len(self.stack) >= 2:
            target, state = self.stack[-2], self.stack[-1]
            if isinstance(target, np.dtype):
                self._check_dtype_state(target, state)
            elif isinstance(target, np.ndarray):
                self._check_array_state(state)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load(self) -> Any:
        # `pickle._Unpickler.load`, reading through `_PieceReader` instead of pickle's unframer
        # over `file.read`: one Python call per read instead of two.
        self._unframer = self._reader
        self.read = self._reader.read
        self.readinto = self._reader.readinto
        self.readline = self._reader.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value
        finally:
            # The memo holds every object read, and also bound methods of this unpickler
            # (`_reconstruct`, `_dtype`), a reference cycle: without this, a whole trajectory
            # would stay alive until the cyclic garbage collector ran.
            self.memo.clear()
            self.stack.clear()
            self.metastack.clear()


def load(file: IO[bytes], source: str | Path | None = None) -> Any:
    """Unpickle the object in `file` (a file holding one pickle), admitting only CrowdPlay's types.
    The file is read `PIECE_BYTES` at a time (a bz2 or gzip file decompresses as it goes).

    Raises `UnsafePickleError` for a forbidden callable or forged numpy state and
    `CorruptTrajectoryError` for a damaged or truncated stream; both name `source`.
    """
    return _load(iter(functools.partial(file.read, PIECE_BYTES), b""), source)


def _load(pieces: Iterable[bytes], source: str | Path | None) -> Any:
    try:
        return RestrictedUnpickler(pieces, source).load()
    except UnsafePickleError:
        raise
    except EOFError as exc:  # bz2/gzip streams and pickles both end early this way
        raise CorruptTrajectoryError(source, f"file is truncated: {exc}") from exc
    except OSError as exc:  # damaged compressed data
        raise CorruptTrajectoryError(source, f"cannot decompress: {exc}") from exc
    except Exception as exc:  # only admitted numpy and builtin code ran: the bytes are bad
        raise CorruptTrajectoryError(source, f"cannot unpickle: {exc!r}") from exc


def loads(data: bytes, source: str | Path | None = None) -> Any:
    """`load` for an in-memory bytes object (e.g. a pickled SQLite value)."""
    return _load((data,), source)
