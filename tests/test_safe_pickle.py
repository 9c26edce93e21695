"""The restricted unpickler: pickles that would run code or corrupt memory are refused before
anything runs, in trajectories and in SQLite values alike; CrowdPlay's own values round-trip."""

from __future__ import annotations

import builtins
import bz2
import collections
import datetime as dt
import gc
import io
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crowdplay_minari.raw import CorruptTrajectoryError, RawDataset, UnsafePickleError, safe_pickle

REPO_ROOT = Path(__file__).resolve().parents[1]
P0 = "game_0>player_0"


class _Payload:
    """Pickles as a call of `func(*args)`: what an attacker puts into a file."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


class _Reduced:
    """Pickles as the given reduce tuple (callable, args[, state])."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def __reduce__(self) -> tuple:
        return self.parts


def _attacks(marker: Path) -> dict[str, _Payload]:
    """Payloads that create `marker` if anything ever calls them."""
    import posix

    command = f"touch {marker}"
    return {
        "os.system": _Payload(os.system, command),
        "posix.system": _Payload(posix.system, command),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "__import__ chain": _Payload(getattr, _Payload(builtins.__import__, "os"), "system"),
    }


ATTACK_NAMES = list(_attacks(Path("x")))


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Control: the stdlib unpickler does run these payloads (so the tests below mean something)."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_attacks(marker)["os.system"], protocol=3))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_malicious_pickle_is_refused_before_it_runs(
    tmp_path: Path, name: str, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(_attacks(marker)[name], protocol=protocol)
    with pytest.raises(UnsafePickleError, match="refusing to load it") as info:
        safe_pickle.loads(data, "evil.pickle")
    assert not marker.exists()
    assert str(info.value).startswith("evil.pickle: ")


def test_payload_buried_in_a_step_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    steps = [{"reward": {P0: np.int32(0)}, "info": {P0: {"RAM": [0] * 128}}} for _ in range(5)]
    steps[3]["info"][P0]["RAM"][7] = _attacks(marker)["os.system"]
    with pytest.raises(UnsafePickleError, match="posix.system"):
        safe_pickle.loads(pickle.dumps(steps, protocol=3), "steps")
    assert not marker.exists()


@pytest.fixture
def copied_sample(raw_sample_bz2: Path, tmp_path: Path) -> Path:
    root = tmp_path / "crowdplay_atari-v0"
    shutil.copytree(raw_sample_bz2, root)
    return root


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "builtins.exec"])
def test_malicious_trajectory_is_refused_by_the_reader(
    copied_sample: Path, tmp_path: Path, name: str
) -> None:
    raw = RawDataset(copied_sample)
    episode_id = raw.episode_ids()[0]
    path = raw.trajectory_path(episode_id)
    marker = tmp_path / "pwned"
    # A plausible trajectory whose fourth step carries the payload as its reward.
    steps = [{"prev_obs": {P0: {"image": np.zeros((210, 160, 3), np.uint8)}}} for _ in range(5)]
    steps[3]["reward"] = {P0: _attacks(marker)[name]}
    path.write_bytes(bz2.compress(pickle.dumps(steps, protocol=3)))
    with pytest.raises(UnsafePickleError) as info:
        raw.read_episode(episode_id)
    assert not marker.exists()
    assert info.value.path == path and str(path) in str(info.value)


def _set_keyword_value(db_path: Path, table: str, value: bytes) -> str:
    """Replace one pickled value in `table`; returns the owner id of the changed row."""
    owner_column = "episode_id" if table == "episodekeyworddata" else "environment_id"
    db = sqlite3.connect(db_path)
    with db:
        (owner,) = db.execute(f"SELECT {owner_column} FROM {table} LIMIT 1").fetchone()
        db.execute(
            f"UPDATE {table} SET value = ? WHERE {owner_column} = ? AND agent_id = 'all'",
            (value, owner),
        )
    db.close()
    return owner


@pytest.mark.parametrize("table", ["episodekeyworddata", "environmentkeyworddata"])
@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.exec"])
def test_malicious_sqlite_value_is_refused_by_metadata(
    copied_sample: Path, tmp_path: Path, table: str, name: str
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_attacks(marker)[name], protocol=4)
    owner = _set_keyword_value(copied_sample / "dataset.sqlite", table, payload)
    with pytest.raises(UnsafePickleError) as info:
        RawDataset(copied_sample).metadata()
    assert not marker.exists()
    message = str(info.value)
    assert "dataset.sqlite" in message and table in message and owner in message
    assert info.value.path == copied_sample / "dataset.sqlite"


def test_persistent_ids_are_refused() -> None:
    class _Persisting(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "external" if obj == "secret" else None

    buffer = io.BytesIO()
    _Persisting(buffer, protocol=3).dump(["fine", "secret"])
    with pytest.raises(UnsafePickleError, match="persistent"):
        safe_pickle.loads(buffer.getvalue())


# ---------------------------------------------------------------- numpy's unchecked states

# Each payload is built only from admitted names, and the stdlib unpickler would crash the
# interpreter on it or read memory it does not own (see safe_pickle's docstring). They run in a
# child process so that a regression shows as a failing test, not as a dead test session.
_NUMPY_ATTACKS = r"""
import json, pickle, sys
import numpy as np
from numpy._core.multiarray import _reconstruct
from crowdplay_minari.raw import safe_pickle
from crowdplay_minari.raw.errors import UnsafePickleError


class Reduce:
    def __init__(self, *parts):
        self.parts = parts

    def __reduce__(self):
        return self.parts


def array(shape, dtype, data):
    return Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


attacks = {
    # dtype state of a length numpy does not handle: uninitialised reads (numpy issue 30476)
    "dtype state of the wrong length": Reduce(
        np.dtype, ("i4", False, True), (3, "<", None, -1, -1, 0)
    ),
    # object dtype whose flags say "no objects": the bytes become PyObject pointers
    "forged object dtype flags": array(
        (1,), Reduce(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0)),
        b"A" * 8,
    ),
    # object array filled from a list shorter than the array: reads past the list
    "short object list": array((5,), np.dtype("O"), [1]),
    # ndarray called directly: a negative offset reads before the buffer
    "ndarray with a negative offset": Reduce(np.ndarray, ((2,), "u1", b"abcdef", -3)),
    # structured dtypes take their field offsets from the pickle
    "structured dtype": Reduce(np.dtype, ([("a", "O")],)),
    "_reconstruct of another type": Reduce(_reconstruct, (dict, (0,), b"b")),
}
results = {}
for name, payload in attacks.items():
    try:
        safe_pickle.loads(pickle.dumps(payload, protocol=int(sys.argv[1])), "evil")
        results[name] = "loaded"
    except UnsafePickleError as exc:
        results[name] = "refused: " + str(exc)
print(json.dumps(results))
"""


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_forged_numpy_states_are_refused(protocol: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _NUMPY_ATTACKS, str(protocol)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, f"child died ({done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for name, outcome in results.items():
        assert outcome.startswith("refused: evil: "), (name, outcome)


# ---------------------------------------------------------------- legitimate values


def _crowdplay_like_values() -> dict[str, Any]:
    image = np.arange(210 * 160 * 3, dtype=np.uint64).astype(np.uint8).reshape(210, 160, 3)
    return {
        "step": {
            "prev_obs": {P0: collections.OrderedDict(image=image), "p1": {"image": image}},
            "action": {P0: {"game": 3}},
            "reward": {P0: np.int32(30), "p1": np.int64(-5)},
            "done": {P0: False, "__all__": np.bool_(True)},
            "info": {P0: {"ale.lives": np.int64(2), "RAM": list(range(128))}},
            "step_iter": 17,
            "user_type": {P0: 1},
        },
        "datetime": dt.datetime(2021, 6, 1, 12, 30, 5, 123456),
        "aware": dt.datetime(2021, 6, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "date": dt.date(2021, 6, 1),
        "time": dt.time(12, 30),
        "timedelta": dt.timedelta(minutes=10, microseconds=7),
        "scalars": [np.float64(0.25), np.float32(1.5), np.uint8(255), np.int16(-3), np.bool_(0)],
        "arrays": [
            np.array([0.5, 1.0]),
            np.array([1, 2], dtype=">i4"),
            np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
            np.arange(10)[::3],
            np.array(["left", "right"]),
            np.array([1, None, "x"], dtype=object),
            np.array([], dtype=np.float32),
            np.array(7),
            np.array([1, 2], dtype="M8[s]"),
        ],
        "containers": ({1, 2}, frozenset({"a"}), (1, (2, [3, {4: 5}])), bytearray(b"ab")),
        "other": [None, True, 2**70, -1.5, 1 + 2j, "text", b"bytes", b""],
        "datetime64": np.datetime64("2021-06-01T12:00"),
    }


def _assert_same(got: Any, want: Any, where: str = "value") -> None:
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.flags.f_contiguous == want.flags.f_contiguous, where
        np.testing.assert_array_equal(got, want, err_msg=where)
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_crowdplay_values_round_trip(protocol: int) -> None:
    values = _crowdplay_like_values()
    data = pickle.dumps(values, protocol=protocol)
    loaded = safe_pickle.loads(data, "values")
    _assert_same(loaded, pickle.loads(data))  # exactly what the stdlib unpickler gives
    _assert_same(loaded["scalars"], values["scalars"])
    _assert_same(loaded["containers"], values["containers"])
    # Shared objects stay shared: two-player frames are one array in CrowdPlay files.
    prev_obs = loaded["step"]["prev_obs"]
    assert prev_obs[P0]["image"] is prev_obs["p1"]["image"]
    np.testing.assert_array_equal(prev_obs[P0]["image"], values["step"]["prev_obs"][P0]["image"])


@pytest.mark.parametrize("protocol", [0, 3, 4, 5])
@pytest.mark.parametrize("piece_bytes", [1, 7, 4096, 100_799, 100_801])
def test_a_file_read_in_pieces_loads_the_same(
    protocol: int, piece_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are read a piece at a time: opcodes, lines (protocol 0), frames (4+) and a frame's
    100,800 pixel bytes cut anywhere still load exactly."""
    data = pickle.dumps(_crowdplay_like_values(), protocol=protocol)
    monkeypatch.setattr(safe_pickle, "PIECE_BYTES", piece_bytes)
    _assert_same(safe_pickle.load(io.BytesIO(data), "pieces"), pickle.loads(data))
    with pytest.raises(CorruptTrajectoryError, match="truncated"):
        safe_pickle.load(io.BytesIO(data[: len(data) * 2 // 3]), "cut.pickle")


def test_unpickled_objects_live_only_as_long_as_the_result() -> None:
    """Nothing of a loaded trajectory outlives it (the unpickler's memo would otherwise keep a
    whole episode alive until the cyclic garbage collector ran)."""
    data = pickle.dumps([{"image": np.zeros((210, 160, 3), np.uint8)}], protocol=3)
    gc.disable()
    try:
        loaded = safe_pickle.loads(data)
        image = weakref.ref(loaded[0]["image"])
        del loaded
        assert image() is None
    finally:
        gc.enable()


def test_numpy_1_pickles_load() -> None:
    """CrowdPlay's files were written by numpy 1.x: `numpy.core` names, dtype flags as ints."""
    values = {"image": np.ones((2, 3), np.uint8), "reward": np.int32(5)}
    data = pickle.dumps(values, protocol=3).replace(b"numpy._core", b"numpy.core")
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core
        loaded = safe_pickle.loads(data)
    _assert_same(loaded, values)
    # numpy 1.x reduced a dtype to ("u1", 0, 1): ints, not bools
    numpy1_dtype = _Reduced(np.dtype, ("u1", 0, 1), (3, "|", None, None, None, -1, -1, 0))
    assert safe_pickle.loads(pickle.dumps(numpy1_dtype, protocol=3)) == np.dtype(np.uint8)


# ---------------------------------------------------------------- damaged streams


def test_truncated_and_garbage_streams_are_corrupt_not_crashes() -> None:
    data = pickle.dumps(_crowdplay_like_values(), protocol=3)
    with pytest.raises(CorruptTrajectoryError, match="truncated") as info:
        safe_pickle.loads(data[: len(data) // 2], "half.pickle")
    assert info.value.path == Path("half.pickle")
    for garbage in (b"", b"\x80\x03", b"not a pickle at all", b"\x80\x04\x95" + b"\xff" * 20):
        with pytest.raises(CorruptTrajectoryError):
            safe_pickle.loads(garbage, "garbage.pickle")


def test_flipped_bytes_never_escape_as_other_errors() -> None:
    """Random damage to a real pickle gives CrowdPlay errors only (the reader relies on it)."""
    rng = np.random.default_rng(0)
    values = _crowdplay_like_values()
    del values["step"]["prev_obs"]  # keep the damage on structure, not on pixels
    data = bytearray(pickle.dumps(values, protocol=3))
    outcomes = collections.Counter()
    for _ in range(400):
        damaged = bytearray(data)
        for position in rng.integers(0, len(damaged), size=3):
            damaged[position] = rng.integers(0, 256)
        try:
            safe_pickle.loads(bytes(damaged), "damaged")
            outcomes["loaded"] += 1
        except (CorruptTrajectoryError, UnsafePickleError) as exc:
            outcomes[type(exc).__name__] += 1
    assert outcomes["CorruptTrajectoryError"] > 0
    assert sum(outcomes.values()) == 400
