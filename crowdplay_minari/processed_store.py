"""A selection's processed steps, written to disk once and read back memory-mapped.

All of Space Invaders at the d3rlpy preset is about 120 GB of frames: more than a training
machine's RAM. `open_store` processes the episodes of a selection one at a time, streams their
steps into one `.npy` file per array and opens the files with `np.load(mmap_mode="r")`. A page is
read (from disk or the page cache) only when a sample touches it, and the kernel may drop it
again, so the process training on the store holds almost none of it in anonymous memory.

    from crowdplay_minari.processed_store import open_store
    store = open_store(train, ProcessingConfig.d3rlpy_preset())  # processed the first time only
    store.arrays["observations"]        # read-only np.memmap, (steps, 1, 84, 84) uint8
    [(e.start, e.length, e.terminated) for e in store.episodes]

`d3rlpy_bridge.to_replay_buffer(..., memory_map=True)` builds a d3rlpy buffer over one.

A store is a folder `<store_dir>/<key>/`: `observations.npy`, `actions.npy` (int64),
`rewards.npy`, `terminals.npy`, `timeouts.npy` (float32), the arrays `d3rlpy_bridge.to_arrays`
returns, and `index.json`: the format, the processing config, each episode's identity, offset,
length and end, each file's size and the small arrays' CRC-32. The key hashes the selection
(every episode's data file identity, index and agent, in order) and the config, so a
reconverted dataset or another config is another store, and cells of a grid that select the same
episodes share one. It is written into a temporary folder renamed into place when complete (a
reader sees all of it or nothing), under a lock so that processes asking for the same store
build it once; one that does not match its index (a torn or truncated file, no index) is
rebuilt, with a warning. Stores of selections no longer used stay on disk until removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import files
from .loading import EpisodeView, default_cache_dir
from .processing import FrameStacks, ProcessingConfig, kept_frame_indices

STORES_ENV = "CROWDPLAY_MINARI_STORES"
STORE_FORMAT = 2  # bump when the layout or processing changes (2: observations' CRC-32)
INDEX_FILE = "index.json"
STEP_DTYPES: dict[str, np.dtype] = {
    "actions": np.dtype(np.int64),
    "rewards": np.dtype(np.float32),
    "terminals": np.dtype(np.float32),
    "timeouts": np.dtype(np.float32),
}
ARRAYS = ("observations", *STEP_DTYPES)


def default_store_dir() -> Path:
    """`$CROWDPLAY_MINARI_STORES`, else `stores/` beside the loader's processing cache
    (`~/.cache/crowdplay_minari/stores` by default)."""
    env = os.environ.get(STORES_ENV)
    if env:
        return Path(env)
    return default_cache_dir().parent / "stores"


class DamagedStore(ValueError):
    """A store folder that does not match its index: a missing, torn or truncated file, an index
    that is missing, unreadable or of another selection or format."""


# -- one episode's steps, as every buffer holds them ----------------------------------------------


@dataclass(frozen=True)
class EpisodeSteps:
    """One episode's processed steps in d3rlpy's dtypes, observations still `FrameStacks`.

    Only the last step may end the episode: `terminals=1` for game over, else `timeouts=1` (in
    `crowdplay_compat` mode the reference may drop an episode's last frame; the boundary is still
    marked, so that episodes never run together in a buffer).
    """

    episode: EpisodeView
    stacks: FrameStacks
    actions: np.ndarray  # (M,) int64
    rewards: np.ndarray  # (M,) float32
    terminals: np.ndarray  # (M,) float32
    timeouts: np.ndarray  # (M,) float32

    def __len__(self) -> int:
        return len(self.actions)


def kept_steps(episode: EpisodeView, config: ProcessingConfig) -> int:
    """How many steps processing keeps of `episode` (from its metadata: nothing is decoded)."""
    return len(kept_frame_indices(episode.num_steps, config))


def selection_steps(
    episodes: Iterable[EpisodeView], config: ProcessingConfig
) -> Iterator[EpisodeSteps]:
    """Each episode processed, in order, one at a time; episodes that keep no step are skipped."""
    for episode in episodes:
        length = kept_steps(episode, config)
        if length == 0:
            continue
        steps = episode.compact(config)
        if len(steps.actions) != length:
            raise RuntimeError(
                f"{episode}: expected {length} processed steps, got {len(steps.actions)}"
            )
        terminals = np.zeros(length, dtype=np.float32)
        timeouts = np.zeros(length, dtype=np.float32)
        terminals[-1] = steps.terminals[-1]
        timeouts[-1] = steps.timeouts[-1]
        if not terminals[-1] and not timeouts[-1]:
            timeouts[-1] = 1
        yield EpisodeSteps(
            episode=episode,
            stacks=steps.stacks,
            actions=steps.actions.astype(STEP_DTYPES["actions"], copy=False),
            rewards=steps.rewards.astype(STEP_DTYPES["rewards"]),
            terminals=terminals,
            timeouts=timeouts,
        )


# -- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEpisode:
    """Where one episode's steps are in a store: rows `start` to `start + length`."""

    dataset_id: str
    index: int  # the Minari episode index in its dataset
    episode_id: str
    agent_id: str
    start: int
    length: int
    terminated: bool  # ended by game over (else by a timeout)

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, eq=False)
class ProcessedStore:
    """An opened store: its episodes and its arrays as read-only `np.memmap`s."""

    path: Path
    config: ProcessingConfig
    episodes: tuple[StoredEpisode, ...]
    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["actions"])

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (what an in-memory buffer of the selection would hold)."""
        return sum(array.nbytes for array in self.arrays.values())

    def episode_arrays(self, episode: StoredEpisode) -> dict[str, np.ndarray]:
        """The rows of `episode` in every array: memory-mapped views, nothing read yet."""
        return {name: array[episode.start : episode.stop] for name, array in self.arrays.items()}


def store_key(episodes: Sequence[EpisodeView], config: ProcessingConfig) -> str:
    """The name of the store of `episodes` (in this order) processed with `config`."""
    selection = [[*e.stored_identity(), e.episode_id, e.agent_id] for e in episodes]
    payload = {"format": STORE_FORMAT, "config": dataclasses.asdict(config), "episodes": selection}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def open_store(
    episodes: Sequence[EpisodeView] | Iterable[EpisodeView],
    config: ProcessingConfig,
    *,
    store_dir: Path | str | None = None,
) -> ProcessedStore:
    """The store of `episodes` processed with `config`, built first if it is not on disk yet.

    `store_dir` defaults to `default_store_dir()`. Building reads one episode at a time (through
    the loader's per-episode cache, `EpisodeView.compact`), so it never holds the selection in
    memory; it needs the store's size free on disk (`files.DiskFull` before starting otherwise).
    """
    episodes = list(episodes)
    if not episodes:
        raise ValueError("no episodes to put in a processed store")
    root = Path(store_dir) if store_dir is not None else default_store_dir()
    key = store_key(episodes, config)
    path = root / key
    with contextlib.suppress(FileNotFoundError, DamagedStore):
        return read_store(path, key=key)  # the common case: built before, no lock needed
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        try:
            return read_store(path, key=key)  # another process built it while we waited
        except FileNotFoundError:
            pass
        except DamagedStore as problem:
            warnings.warn(f"{problem}; rebuilding the store", stacklevel=2)
            shutil.rmtree(path)
        for partial in root.glob(f".{key}.*.part"):  # left by a builder that died
            shutil.rmtree(partial, ignore_errors=True)
        _build(path, episodes, config, key)
        return read_store(path, key=key)


def read_store(path: Path | str, *, key: str | None = None) -> ProcessedStore:
    """Open the store in `path` without reading its observations; `FileNotFoundError` if there is
    none, `DamagedStore` if its files do not match its index (or its key is not `key`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no processed store")
    index, problem = files.read_json(path / INDEX_FILE)
    if problem:
        raise DamagedStore(problem)
    try:
        if index["format"] != STORE_FORMAT:
            raise DamagedStore(f"{path / INDEX_FILE}: format {index['format']}, not {STORE_FORMAT}")
        if key is not None and index["key"] != key:
            raise DamagedStore(f"{path / INDEX_FILE}: the store of another selection")
        config = ProcessingConfig(**index["config"])
        episodes = tuple(StoredEpisode(**e) for e in index["episodes"])
        steps, described, checksums = int(index["steps"]), index["arrays"], index["checksums"]
        arrays = {name: _open_array(path / f"{name}.npy", described[name]) for name in ARRAYS}
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DamagedStore):
            raise
        raise DamagedStore(f"{path / INDEX_FILE}: unreadable index ({exc!r})") from None
    observation_shape = (steps, *config.observation_shape())
    if arrays["observations"].shape != observation_shape:
        raise DamagedStore(
            f"{path}: observations of shape {arrays['observations'].shape}, config says "
            f"{observation_shape}"
        )
    for name in STEP_DTYPES:
        if arrays[name].shape != (steps,):
            raise DamagedStore(f"{path / name}.npy: shape {arrays[name].shape}, not ({steps},)")
        if zlib.crc32(arrays[name]) != checksums[name]:
            raise DamagedStore(f"{path / name}.npy: checksum mismatch (damaged)")
    start = 0
    for episode in episodes:
        if episode.start != start or episode.length <= 0:
            raise DamagedStore(f"{path / INDEX_FILE}: episodes not contiguous at {episode}")
        start = episode.stop
    if start != steps:
        raise DamagedStore(f"{path / INDEX_FILE}: episodes cover {start} of {steps} steps")
    return ProcessedStore(path=path, config=config, episodes=episodes, arrays=arrays)


def check_store(path: Path | str) -> list[str]:
    """Every array of the store in `path` against its index, observations included (which
    opening a store does not read); one line per problem, none when it is intact."""
    try:
        store = read_store(path)
        index, _ = files.read_json(Path(path) / INDEX_FILE)
        expected = index["checksums"]["observations"]
    except (DamagedStore, FileNotFoundError, KeyError, TypeError) as exc:
        return [f"{path}: {exc}" if str(path) not in str(exc) else str(exc)]
    crc = 0
    observations = store.arrays["observations"]
    for start in range(0, len(observations), 4096):
        crc = zlib.crc32(np.ascontiguousarray(observations[start : start + 4096]), crc)
    if crc != expected:
        return [f"{Path(path) / 'observations.npy'}: checksum mismatch (damaged)"]
    return []


def check_stores(store_dir: Path | str | None = None) -> list[str]:
    """`check_store` for every store under `store_dir` (default: `default_store_dir()`)."""
    base = Path(store_dir) if store_dir is not None else default_store_dir()
    if not base.is_dir():
        return []
    stores = [p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [problem for store in stores for problem in check_store(store)]


def _open_array(file: Path, described: Mapping[str, Any]) -> np.ndarray:
    """`file` memory-mapped read-only, checked against its entry in the index."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise DamagedStore(f"{file}: missing") from None
    if size != described["bytes"]:
        raise DamagedStore(f"{file}: {size} bytes, the index says {described['bytes']} (torn)")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DamagedStore(f"{file}: unreadable ({exc})") from None
    if array.dtype.str != described["dtype"] or list(array.shape) != described["shape"]:
        raise DamagedStore(
            f"{file}: {array.dtype.str} {list(array.shape)}, the index says "
            f"{described['dtype']} {described['shape']}"
        )
    return array


# -- building ---------------------------------------------------------------------------------


class _NpyWriter:
    """One `.npy` file of a known shape, written row block by row block, never mapped."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, checksum: bool):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0
        self.crc = 0 if checksum else None
        self.file: BinaryIO = open(path, "wb")  # closed by `close`, or by `_build` on failure
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self.file, {**header, "shape": shape})

    def append(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: got a {block.dtype} {block.shape} block")
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        self.file.write(data)
        if self.crc is not None:
            self.crc = zlib.crc32(data, self.crc)
        self.rows += len(block)

    def close(self) -> dict[str, Any]:
        """Flush to disk; the file's entry in the index."""
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} of {self.shape[0]} rows")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {
            "dtype": self.dtype.str,
            "shape": list(self.shape),
            "bytes": self.path.stat().st_size,
        }


def _build(path: Path, episodes: Sequence[EpisodeView], config: ProcessingConfig, key: str) -> None:
    total = sum(kept_steps(e, config) for e in episodes)
    if total == 0:
        raise ValueError("the episodes keep no step with this processing config")
    shapes = {"observations": (total, *config.observation_shape())}
    dtypes = {"observations": config.observation_dtype(), **STEP_DTYPES}
    needed = sum(int(np.prod(shapes.get(n, (total,)))) * dtypes[n].itemsize for n in ARRAYS)
    if shutil.disk_usage(path.parent).free < needed:
        raise files.DiskFull(f"the processed store {path}", path.parent, needed)
    partial = path.with_name(f".{key}.{uuid.uuid4().hex[:12]}.part")
    partial.mkdir()
    writers: dict[str, _NpyWriter] = {}
    try:
        for name in ARRAYS:
            shape = shapes.get(name, (total,))
            writers[name] = _NpyWriter(partial / f"{name}.npy", shape, dtypes[name], True)
        stored, start = [], 0
        for steps in selection_steps(episodes, config):
            writers["observations"].append(steps.stacks.observations(config))
            for name in STEP_DTYPES:
                writers[name].append(getattr(steps, name))
            e = steps.episode
            stored.append(
                StoredEpisode(
                    dataset_id=e.dataset_id,
                    index=e.index,
                    episode_id=e.episode_id,
                    agent_id=e.agent_id,
                    start=start,
                    length=len(steps),
                    terminated=bool(steps.terminals[-1]),
                )
            )
            start += len(steps)
        described = {name: writer.close() for name, writer in writers.items()}
        index = {
            "format": STORE_FORMAT,
            "key": key,
            "config": dataclasses.asdict(config),
            "steps": total,
            "arrays": described,
            "checksums": {name: writers[name].crc for name in ARRAYS},
            "episodes": [dataclasses.asdict(e) for e in stored],
        }
        files.write_json(partial / INDEX_FILE, index)  # last: a store without it is torn
        _fsync_dir(partial)
        os.rename(partial, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        for writer in writers.values():
            writer.file.close()
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) and files.is_disk_full(exc):
            raise files.DiskFull(f"the processed store {path}", path.parent, needed) from exc
        raise


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive `flock` on `lock_path` (released if the process dies)."""
    import fcntl

    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
