"""Convert a raw CrowdPlay dataset into per-agent Minari datasets: parallel, resumable, atomic.

Work happens in two phases under `<datasets root>/.crowdplay-staging/` (hidden, so Minari ignores
it):
1. **stage**: each episode is read (one episode in memory per worker) and written as one HDF5 file
   per agent, `episodes/<dataset>/<crowdplay_episode_id>.h5`, atomically (tmp + rename). A finished
   file is never redone; a killed run leaves at worst a `.tmp`, which the next run deletes.
2. **publish**: per dataset, as soon as its last episode is staged (so publishing overlaps the
   staging of other datasets' episodes), a complete Minari dataset directory is assembled in
   staging, then swapped into place with directory renames. Minari never sees a half-written
   dataset. New episodes that come after every published one go into a new part file and the
   published files are hard-linked, so adding episodes costs the new episodes
   (`publish_dataset`); otherwise episodes are copied chunk for chunk, without recompression.

Which episodes, and which of their agents, a run converts is an `EpisodeSelection` (games, tasks,
sources, agent kind, minimum score, episode ids; default: all), resolved from `dataset.sqlite`
before any trajectory file is opened. `plan_conversion` says what a run would publish, with
estimated frames and bytes, writing nothing (the dry run). Publishing keeps every episode a
dataset already holds, so runs of different selections add up and never shrink a dataset, and
a wider run after a narrow one converts only what is new.

A corrupt, truncated, missing or malicious input file is reported by name (stdout and
`<root>/<namespace>/conversion_report.json`); every other episode still converts, and the exit
status of the command is 2.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import functools
import json
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from crowdplay_minari import files
from crowdplay_minari.episode import EpisodeMetadata
from crowdplay_minari.executors import ExecutorConfig, TaskLost, run_tasks
from crowdplay_minari.games import TWO_PLAYER_GAMES
from crowdplay_minari.raw import (
    CrowdPlayDataError,
    RawDataset,
    TrajectoryNotFoundError,
    load_steps,
    parse_steps,
    trajectory_files,
)
from crowdplay_minari.raw.selection import EpisodeSelection, SelectedEpisodes, metadata_frames
from crowdplay_minari.storage import (
    DATA_DIR,
    EPISODE_NAME,
    EPISODE_TABLE_ATTRIBUTE,
    LIBVER,
    METADATA_FILE,
    NAMESPACE_METADATA_FILE,
    PART_FILE,
    EpisodeFile,
    is_portable,
    main_data_path,
)
from crowdplay_minari.storage import datasets_root as storage_datasets_root

from .episode_writer import FrameChunkCompressor, write_staged_episode
from .layout import (
    DEFAULT_NAMESPACE,
    DatasetKey,
    action_space,
    collection_env_spec,
    dataset_metadata,
    observation_space,
)

STAGING_DIR = ".crowdplay-staging"
LOCK_NAME = ".crowdplay-convert.lock"
REPORT_NAME = "conversion_report.json"


def datasets_root(root: str | Path | None = None) -> Path:
    """Minari's datasets directory: `root`, else $MINARI_DATASETS_PATH, else Minari's default."""
    if root is not None:
        return Path(root).resolve()
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path()).resolve()


def _slug(dataset_id: str) -> str:
    return dataset_id.replace("/", "__")


@dataclass(frozen=True)
class EpisodeJob:
    """One raw episode to stage: everything a worker needs, no DB access."""

    raw_root: Path
    metadata: EpisodeMetadata
    namespace: str
    staging: Path
    agents: tuple[str, ...]  # agents still to stage
    trajectory: bytes | None = None
    """The trajectory file's bytes, shipped to a worker that cannot see the driver's files
    (a Ray cluster without a shared file system); None: the worker reads `raw_root`."""
    trajectory_name: str = ""
    portable: bool = False
    """Write with HDF5's built-in filters only (`conversion.portable`)."""


@dataclass
class EpisodeResult:
    episode_id: str
    frames: int = 0
    staged: list[tuple[str, str]] = field(default_factory=list)  # (dataset_id, agent_id)
    error: str | None = None
    error_file: str | None = None
    seconds: float = 0.0
    files: dict[str, bytes] = field(default_factory=dict)
    """Staged files returned through the executor (path relative to the staging folder ->
    bytes) when the worker staged into a folder of its own; the driver writes them."""


def ship_trajectory(job: EpisodeJob) -> EpisodeJob:
    """`job` with its trajectory file's bytes, for a worker on another machine (read in the
    driver, with the reader's checks on the file's path). A missing file ships empty bytes
    and no name: the worker reports it as not found."""
    files = trajectory_files(job.raw_root, job.metadata.episode_id)
    if not files:
        return dataclasses.replace(job, trajectory=b"", trajectory_name="")
    return dataclasses.replace(job, trajectory=files[0].read_bytes(), trajectory_name=files[0].name)


def stage_episode(job: EpisodeJob) -> EpisodeResult:
    """Read one raw episode and write one staged HDF5 file per agent (runs in a worker). A job
    that carries its trajectory is staged in a private temporary folder and comes back as
    bytes: such a worker touches none of the driver's paths."""
    if job.trajectory is None:
        return _stage_episode(job)
    if not job.trajectory_name:
        path = job.raw_root / f"{job.metadata.episode_id}.pickle.bz2"
        return EpisodeResult(
            job.metadata.episode_id, error="trajectory file not found", error_file=str(path)
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="crowdplay-stage-") as private:
        raw_root, staging = Path(private) / "raw", Path(private) / "staging"
        raw_root.mkdir()
        (raw_root / job.trajectory_name).write_bytes(job.trajectory)
        local = dataclasses.replace(
            job, raw_root=raw_root, staging=staging, trajectory=None, trajectory_name=""
        )
        result = _stage_episode(local)
        if result.error_file:  # name the file as the driver knows it
            result.error_file = str(job.raw_root / job.trajectory_name)
        if not result.error:
            result.files = {
                path.relative_to(staging).as_posix(): path.read_bytes()
                for path in staging.rglob("*.h5")
            }
    return result


def receive_staged_files(result: EpisodeResult, staging: Path) -> None:
    """Write the staged files a remote worker returned, each atomically (temp + rename)."""
    for relative, data in result.files.items():
        target = (staging / relative).resolve()
        if not target.is_relative_to(staging.resolve()) or target.suffix != ".h5":
            raise ValueError(
                f"a worker returned a staged file outside the staging area: {relative}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(target, data)
    result.files = {}


def _stage_episode(job: EpisodeJob) -> EpisodeResult:
    started = time.perf_counter()
    meta = job.metadata
    result = EpisodeResult(meta.episode_id)
    path = None
    try:
        files = trajectory_files(job.raw_root, meta.episode_id)
        if not files:
            path = job.raw_root / f"{meta.episode_id}.pickle.bz2"
            raise TrajectoryNotFoundError(path, "trajectory file not found")
        path = files[0]
        episode = parse_steps(load_steps(path), meta, path, stack_frames=False)
        compressor = FrameChunkCompressor()
        for agent_id in job.agents:
            if agent_id not in episode.agents:
                raise CrowdPlayDataError(path, f"agent {agent_id} missing from trajectory")
            key = DatasetKey(job.namespace, meta.game, meta.task, agent_id)
            target = job.staging / "episodes" / _slug(key.dataset_id)
            target.mkdir(parents=True, exist_ok=True)
            write_staged_episode(
                target / f"{meta.episode_id}.h5",
                episode,
                episode.agents[agent_id],
                compressor,
                portable=job.portable,
            )
            result.staged.append((key.dataset_id, agent_id))
        result.frames = episode.num_steps
    except CrowdPlayDataError as exc:
        result.error = str(exc)
        result.error_file = str(exc.path) if exc.path else str(path)
    except Exception as exc:  # keep the grid going; report with the file name
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        result.error_file = str(path) if path else None
    result.seconds = time.perf_counter() - started
    return result


# -- executors ---------------------------------------------------------------------------------


def _stage_all(jobs: list[EpisodeJob], config: ConversionConfig) -> Iterator[EpisodeResult]:
    """Stage every job on the configured executor, yielding results as they finish. A worker
    lost mid-episode (killed, out of memory) skips that episode by name; a rerun retries it."""
    executor = ExecutorConfig(
        kind=config.executor,
        workers=config.workers,
        ray_address=config.ray_address,
        max_retries=2,
        prefetch=config.workers,  # bounded in flight: memory stays ~one episode per worker
    )
    # On Ray, workers may be other machines: each gets its trajectory as bytes and returns its
    # staged files through Ray, and only this process writes into the datasets folder.
    remote = config.executor == "ray"
    for job, outcome in run_tasks(
        stage_episode, jobs, executor, prepare=ship_trajectory if remote else None
    ):
        if isinstance(outcome, TaskLost):
            episode_id = job.metadata.episode_id
            yield EpisodeResult(episode_id, error=outcome.reason, error_file=episode_id)
            continue
        if outcome.files:
            receive_staged_files(outcome, job.staging)
        yield outcome


# -- publishing --------------------------------------------------------------------------------


def published_episode_ids(dataset_dir: Path) -> list[str]:
    """CrowdPlay episode ids in a published dataset, in episode order."""
    main = main_data_path(dataset_dir / DATA_DIR)
    if not main.exists():
        return []
    with EpisodeFile(main) as file:
        return [str(file[name].attrs["crowdplay_episode_id"]) for name in file.names()]


def _episode_sort_key(file: h5py.File | h5py.Group) -> tuple[str, str]:
    created = str(file.attrs.get("keyword_data/all/created_on", ""))
    return created, str(file.attrs["crowdplay_episode_id"])


@functools.cache
def _new_storage_metadata(game: str, agent_id: str, task: str) -> str:
    """The metadata.json `MinariStorage.new` writes for a dataset of `game`, made once per
    process. It serialises the (210, 160, 3) observation space as two lists of 100,800 numbers;
    doing that for every published dataset was two thirds of publishing's CPU time (0.4 of 0.6 s
    for the benchmark's 9 datasets), taken by the main process from workers that occupy every
    core."""
    import tempfile

    from minari.dataset.minari_storage import METADATA_FILE_NAME, MinariStorage

    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / DATA_DIR
        MinariStorage.new(
            data_path,
            observation_space=observation_space(),
            action_space=action_space(game),
            env_spec=collection_env_spec(game, agent_id, task),
            data_format="hdf5",
            jpeg_encoding=False,
        )
        return (data_path / METADATA_FILE_NAME).read_text()


@dataclass(frozen=True)
class _EpisodeSource:
    """One episode of a dataset being published: how it sorts and where its group lies."""

    order: tuple[str, str]
    episode_id: str
    steps: int
    file: Path  # the HDF5 file holding the group
    path: str  # the group's path in it; "/" for a staged file, whose root is the episode
    part: str | None = None  # a published episode's part file; None: inside main_data.hdf5


def _published_sources(main: Path) -> list[_EpisodeSource]:
    """The episodes of a published `main_data.hdf5`, in episode order: from its episode table
    where that names every episode it holds, else from the episodes' own attributes (a dataset
    published before the table, or one Minari added episodes to)."""
    if not main.exists():
        return []
    sources = []
    with EpisodeFile(main) as file:
        names = file.names()
        table = _episode_table(file, main, len(names))
        if table is not None:
            return table
        for name in names:
            group = file[name]
            part, path = file.location(name)
            sources.append(
                _EpisodeSource(
                    _episode_sort_key(group),
                    str(group.attrs["crowdplay_episode_id"]),
                    int(group.attrs.get("total_steps", group["actions"].shape[0])),
                    main if part is None else main.parent / part,
                    path,
                    part,
                )
            )
    return sources


def _episode_table(file: EpisodeFile, main: Path, episodes: int) -> list[_EpisodeSource] | None:
    """The sources `EPISODE_TABLE_ATTRIBUTE` lists; None where it is missing, malformed, or
    does not list exactly the episodes the file holds, or names a place no episode can be."""
    try:
        rows = json.loads(file.attrs.get(EPISODE_TABLE_ATTRIBUTE, "null"))
        if not isinstance(rows, list) or len(rows) != episodes:
            return None
        sources = [
            _EpisodeSource(
                (str(created), str(episode_id)),
                str(episode_id),
                int(steps),
                main if part is None else main.parent / part,
                str(path),
                part,
            )
            for episode_id, created, steps, part, path in rows
        ]
    except (TypeError, ValueError):
        return None
    for index, source in enumerate(sources):
        if source.part is None and source.path != f"/episode_{index}":
            return None
        if source.part is not None and not (
            isinstance(source.part, str)
            and PART_FILE.fullmatch(source.part)
            and EPISODE_NAME.fullmatch(source.path.removeprefix("/"))
        ):
            return None
    return sources


def _write_episode_table(
    out: h5py.File, sources: list[_EpisodeSource], places: list[tuple[str | None, str]]
) -> None:
    rows = [
        [source.episode_id, source.order[0], source.steps, part, path]
        for source, (part, path) in zip(sources, places, strict=True)
    ]
    out.attrs[EPISODE_TABLE_ATTRIBUTE] = json.dumps(rows)


def _staged_source(path: Path) -> _EpisodeSource:
    with h5py.File(path, "r") as src:
        return _EpisodeSource(
            _episode_sort_key(src), path.stem, int(src["actions"].shape[0]), path, "/"
        )


def _kept_prefix(old: list[_EpisodeSource], merged: list[_EpisodeSource]) -> int:
    """How many leading published episodes keep their place (and so their `id`) and can stay
    where they are: the longest common prefix of the old and the new order, cut back to the
    start of the first part file it would only partly keep (a part is kept whole or rewritten,
    so no part ever holds episodes the index no longer names)."""
    keep = 0
    while keep < min(len(old), len(merged)) and merged[keep] is old[keep]:
        keep += 1
    first_of_part: dict[str | None, int] = {}
    last_of_part: dict[str | None, int] = {}
    for index, source in enumerate(old):
        first_of_part.setdefault(source.part, index)
        last_of_part[source.part] = index
    while keep and last_of_part[old[keep - 1].part] >= keep:
        keep = first_of_part[old[keep - 1].part]
    return keep


def _copy_episodes(sources: list[_EpisodeSource], first_index: int, out: h5py.File) -> None:
    """Copy episode groups chunk for chunk (no recompression) into `out` as `episode_<i>`,
    numbered from `first_index`, with Minari's `id` and `total_steps`."""
    for index, source in enumerate(sources, start=first_index):
        with h5py.File(source.file, "r") as src:
            target = f"episode_{index}"
            if source.path == "/":  # a staged file: its root group is the episode
                group = out.create_group(target)
                for child in src:
                    src.copy(src[child], group, name=child)
                group.attrs.update(dict(src.attrs))
            else:
                src.copy(src[source.path], out, name=target)
                group = out[target]
            group.attrs["id"] = index
            group.attrs["total_steps"] = source.steps


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for a part file that is never written again: a hard link, which costs
    nothing; a copy where the file system has none (the result is the same)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if files.is_disk_full(exc):
            raise
        shutil.copyfile(source, target)


def publish_dataset(root: Path, staging: Path, key: DatasetKey, portable: bool = False) -> dict:
    """Publish a dataset's staged episodes: the published ones plus the new, in order of
    creation, swapped into place as a new dataset folder (Minari never sees one half-written).

    Adding episodes costs what the new episodes cost, not the dataset: when the new episodes
    come after every published one (a later day's recordings), the published episodes stay in
    their files, hard-linked into the new folder, the new ones go into one new part file
    (`storage.PART_FILE`), and `main_data.hdf5` becomes an index of external links, one per
    episode. Episodes that sort before published ones (or replace one) rewrite the parts from
    the first place that changes on. A dataset published whole is one self-contained file.
    Returns `{"episodes", "steps", "copied"}`, `copied` being the episodes written anew."""
    from minari.dataset._storages import get_minari_storage
    from minari.dataset.minari_storage import METADATA_FILE_NAME

    final_dir = root / key.dataset_id
    staged_dir = staging / "episodes" / _slug(key.dataset_id)
    staged_files = sorted(staged_dir.glob("*.h5")) if staged_dir.exists() else []
    build = staging / "publish" / uuid.uuid4().hex / "dataset"
    data_path = build / DATA_DIR
    data_path.mkdir(parents=True)
    _fault_point("started")
    (data_path / METADATA_FILE_NAME).write_text(
        _new_storage_metadata(key.game, key.agent_id, key.task)
    )
    main = main_data_path(data_path)
    # What `MinariStorage.new` does after writing metadata.json (minari is pinned).
    storage = get_minari_storage("hdf5")._create(
        data_path, observation_space(), action_space(key.game), jpeg_encoding=False
    )
    old = _published_sources(main_data_path(final_dir / DATA_DIR))
    staged = [_staged_source(path) for path in staged_files]
    replaced = {source.episode_id for source in staged}
    merged = sorted(
        [s for s in old if s.episode_id not in replaced] + staged, key=lambda s: s.order
    )
    keep = _kept_prefix(old, merged)
    rewritten = merged[keep:]
    if keep == 0:
        with h5py.File(main, "w", track_order=True, libver=LIBVER) as out:
            _copy_episodes(rewritten, 0, out)
            _write_episode_table(out, merged, [(None, f"/episode_{i}") for i in range(len(merged))])
    else:
        links: list[tuple[str, str]] = []  # (part file, group path) of each episode, in order
        part_names: dict[str | None, str] = {}
        for source in old[:keep]:
            if source.part not in part_names:
                # A whole published main_data.hdf5 becomes a part under a new name.
                name = source.part or f"part-{uuid.uuid4().hex}.hdf5"
                _link_or_copy(source.file, data_path / name)
                part_names[source.part] = name
            links.append((part_names[source.part], source.path))
        _fault_point("linked")
        if rewritten:
            part = f"part-{uuid.uuid4().hex}.hdf5"
            with h5py.File(data_path / part, "w", track_order=True, libver=LIBVER) as out:
                _copy_episodes(rewritten, keep, out)
            links += [(part, f"/episode_{i}") for i in range(keep, len(merged))]
        _fault_point("part-written")
        with h5py.File(main, "w", track_order=True, libver=LIBVER) as out:
            for index, (part, path) in enumerate(links):  # low-level: a fifth of h5py's cost
                out.id.links.create_external(
                    f"episode_{index}".encode(), part.encode(), path.encode()
                )
            _write_episode_table(out, merged, links)
    total_steps = sum(source.steps for source in merged)
    metadata = dataset_metadata(key, portable=portable)
    metadata.update({"total_episodes": len(merged), "total_steps": total_steps})
    storage.update_metadata(metadata)
    storage.update_metadata({"dataset_size": storage.get_size()})

    _fault_point("assembled")

    # Swap into place. The dataset's path always holds a complete dataset, the old or the new:
    # with an existing one the two directories are exchanged in one atomic rename
    # (renameat2 RENAME_EXCHANGE); where the file system cannot, the old one is moved aside with
    # a note naming its place, and a rerun puts it back if a crash came before the new one.
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if not final_dir.exists():
        os.replace(build, final_dir)  # atomic: nothing was there
    elif _exchange(build, final_dir):
        _fault_point("exchanged")
    else:
        trash = staging / "trash" / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(trash.with_suffix(".for"), str(final_dir))
        os.replace(final_dir, trash)
        _fault_point("moved-aside")
        os.replace(build, final_dir)
    _fault_point("swapped")
    shutil.rmtree(build.parent, ignore_errors=True)
    _fault_point("cleaned")
    for path in staged_files:
        path.unlink()
    return {"episodes": len(merged), "steps": total_steps, "copied": len(rewritten)}


def _publish(root: Path, staging: Path, key: DatasetKey, portable: bool) -> dict:
    """`publish_dataset`; on a full disk, the half-built copy is removed (the published dataset
    was never touched) and `files.DiskFull` says how much space the new dataset needs."""
    try:
        return publish_dataset(root, staging, key, portable)
    except OSError as exc:
        if not files.is_disk_full(exc):
            raise
        shutil.rmtree(staging / "publish", ignore_errors=True)
        staged = staging / "episodes" / _slug(key.dataset_id)
        needed = sum(p.stat().st_size for p in staged.glob("*.h5"))
        old = root / key.dataset_id / DATA_DIR  # at most all of it is rewritten
        needed += sum(p.stat().st_size for p in old.glob("*.hdf5")) if old.exists() else 0
        raise files.DiskFull(f"dataset {key.dataset_id}", root, needed) from None


FAULT_ENV = "CROWDPLAY_MINARI_FAULT_AT"
"""Test seam: the name of a publishing step at which the process kills itself (`os._exit`), as
a power cut would; the fault-injection tests set it in a subprocess."""


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        os._exit(86)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic rename (Linux `renameat2(RENAME_EXCHANGE)`); False
    where the system or file system cannot (the caller then moves the old one aside)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _recover_swaps(staging: Path) -> None:
    """Finish what a crash interrupted: an old dataset moved aside whose replacement never
    arrived goes back to its path; half-assembled datasets are removed."""
    for note in sorted((staging / "trash").glob("*.for")):
        trash = note.with_suffix("")
        final_dir = Path(note.read_text())
        if trash.exists() and not final_dir.exists():
            os.replace(trash, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
        note.unlink()
    shutil.rmtree(staging / "publish", ignore_errors=True)


def _ensure_namespaces(root: Path, namespace: str, games: Iterable[str]) -> None:
    """Write Minari's namespace files (`<root>/<ns>/namespace_metadata.json`) for the namespace
    and one per game where they are missing, the way `minari.create_namespace` lays them out, but
    under `root` and without touching `$MINARI_DATASETS_PATH`."""
    from minari.namespace import validate_namespace

    description = (
        "CrowdPlay human Atari demonstrations, converted by crowdplay-minari (one dataset per "
        "game, task and agent)."
    )
    for ns in [namespace] + [f"{namespace}/{g}" for g in sorted(set(games))]:
        validate_namespace(ns)
        path = root / ns / NAMESPACE_METADATA_FILE
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, json.dumps({"description": description}))


# -- the whole conversion ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionConfig:
    """Options of one conversion run.

    `selection` picks the episodes, and the agents of each, to convert (default: all of them);
    `episode_ids` is short for `selection=EpisodeSelection(episode_ids=...)`."""

    raw_dir: Path
    root: Path | None = None  # Minari datasets root; None: $MINARI_DATASETS_PATH or default
    namespace: str = DEFAULT_NAMESPACE
    workers: int = 1
    executor: str = "local"  # "local" (process pool) or "ray"
    ray_address: str | None = None
    episode_ids: tuple[str, ...] | None = None  # convert only these
    progress: bool = True
    selection: EpisodeSelection = EpisodeSelection()
    portable: bool = False  # HDF5's built-in filters only: stock minari[hdf5] reads them

    def __post_init__(self) -> None:
        if self.episode_ids is None:
            return
        ids = tuple(dict.fromkeys(self.episode_ids))
        if self.selection.episode_ids not in (None, ids):
            raise ValueError(
                "ConversionConfig: give the episode ids once, as episode_ids or in selection"
            )
        object.__setattr__(self, "episode_ids", ids)
        object.__setattr__(self, "selection", dataclasses.replace(self.selection, episode_ids=ids))


@dataclass
class ConversionReport:
    raw_dir: str
    root: str
    started: str
    finished: str = ""
    episodes_total: int = 0
    episodes_converted: int = 0
    episodes_already_done: int = 0
    frames_converted: int = 0
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    datasets: dict[str, dict] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    """The `EpisodeSelection` the run converted (its fields; None: not restricted)."""

    @property
    def ok(self) -> bool:
        return not self.skipped


# -- what a run will do (the dry run) ----------------------------------------------------------

CONVERTED_BYTES_PER_AGENT_FRAME = 110
"""`main_data.hdf5` bytes per agent frame, measured over the emulator sample
(`benchmarks/bench_conversion.py`, README "Measured numbers"): the basis of the size estimate.
Screens that change more from frame to frame than the sample's compress less."""
DATASET_METADATA_BYTES = 944_000
"""A dataset's `metadata.json` (Minari writes out the bounds of the (210, 160, 3) image space)."""
RAW_BYTES_PER_FRAME = {".pickle.bz2": 191, ".pickle.gz": 1_462, ".pickle": 101_606}
"""Trajectory file bytes per frame, measured over the sample (README "Measured numbers"): the
frame estimate of an episode whose metadata has no `Time played`."""


@dataclass(frozen=True)
class FrameCount:
    """A number of frames known before any trajectory is read: between `low` and `high`."""

    low: int = 0
    high: int = 0
    from_file_size: int = 0
    """Episodes counted whose metadata has no `Time played`: their frames are guessed from the
    trajectory file's size (`RAW_BYTES_PER_FRAME`), within a factor of two."""

    @property
    def estimate(self) -> int:
        return (self.low + self.high) // 2

    def __add__(self, other: FrameCount) -> FrameCount:
        return FrameCount(
            self.low + other.low,
            self.high + other.high,
            self.from_file_size + other.from_file_size,
        )

    @classmethod
    def of(cls, meta: EpisodeMetadata, agent_id: str, trajectory: Path) -> FrameCount:
        """The agent's frames by its `Time played` (whole seconds: 60 possible counts), else
        by the size of its trajectory file."""
        bounds = metadata_frames(meta, agent_id)
        if bounds is not None:
            return cls(*bounds)
        suffix = next(s for s in RAW_BYTES_PER_FRAME if trajectory.name.endswith(s))
        guess = max(1, trajectory.stat().st_size // RAW_BYTES_PER_FRAME[suffix])
        return cls(max(1, guess // 2), guess * 2, from_file_size=1)


@dataclass(frozen=True)
class DatasetPlan:
    """What a conversion does to one dataset its selection touches."""

    key: DatasetKey
    published: frozenset[str]
    """CrowdPlay episode ids the published dataset holds now: all kept, whatever the selection."""
    staged: frozenset[str]
    """Episodes an interrupted run staged: this run publishes them."""
    new: tuple[str, ...] = ()
    """Episodes this run stages for the dataset."""
    new_frames: FrameCount = FrameCount()
    bytes_now: int = 0
    """The dataset's size on disk now (0: not published yet)."""
    staged_bytes: int = 0

    @property
    def writes(self) -> bool:
        """Whether the run publishes the dataset anew (it has episodes to add)."""
        return bool(self.new or self.staged)

    @property
    def episodes_after(self) -> int:
        return len(self.published | self.staged | set(self.new))

    @property
    def estimated_bytes_after(self) -> int:
        """Its size once published: as now, plus the staged files, plus the new agent frames
        at `CONVERTED_BYTES_PER_AGENT_FRAME` (and `DATASET_METADATA_BYTES` if it is new)."""
        if not self.writes:
            return self.bytes_now
        new = self.new_frames.estimate * CONVERTED_BYTES_PER_AGENT_FRAME
        return (self.bytes_now or DATASET_METADATA_BYTES) + self.staged_bytes + new


@dataclass(frozen=True)
class ConversionPlan:
    """What `convert` does with a configuration, decided from the metadata database, the
    published datasets and the staging folder, before any trajectory file is opened."""

    root: Path
    selection: EpisodeSelection
    episodes_selected: int
    episodes_total: int
    """Selected episodes plus the invalid metadata rows reported (the report's)."""
    jobs: tuple[EpisodeJob, ...]
    """Episodes to stage, with the agents each still lacks; largest trajectory first."""
    frames: FrameCount
    """Frames of the episodes to stage, each counted once (the report's `frames_converted`)."""
    datasets: dict[str, DatasetPlan]
    already_done: int
    skipped: tuple[dict, ...]
    """Entries the report lists as skipped before staging (invalid rows, unsafe paths)."""
    missing: tuple[str, ...]
    """Episodes to stage that have no trajectory file: the run reports them as skipped."""
    unscored: int
    """Agents `min_score` left out because the metadata holds no `Score` for them."""

    @property
    def episodes_to_convert(self) -> int:
        """Episodes the run converts (the report's `episodes_converted`, unless a trajectory
        turns out corrupt)."""
        return len(self.jobs) - len(self.missing)

    @property
    def writing(self) -> dict[str, DatasetPlan]:
        """The datasets the run publishes anew."""
        return {d: p for d, p in sorted(self.datasets.items()) if p.writes}


def plan_conversion(config: ConversionConfig) -> ConversionPlan:
    """What `convert(config)` would do, with nothing written: no dataset, report, lock or
    staging file, not even the datasets folder. `SelectionError` (a `ValueError`) when the
    selection names an episode the database lacks or matches nothing."""
    raw = RawDataset(config.raw_dir)
    root = storage_datasets_root(config.root).resolve()
    return _plan(config, root, raw, _select(config, raw))


def _select(config: ConversionConfig, raw: RawDataset) -> SelectedEpisodes:
    return config.selection.resolve(
        raw.metadata(), _agents_of, rejected=raw.rejected, where=raw.db_path
    )


def _plan(
    config: ConversionConfig, root: Path, raw: RawDataset, selected: SelectedEpisodes
) -> ConversionPlan:
    """Which agents of the selected episodes still need staging (an agent is done once its
    dataset holds the episode, published or staged) and what each dataset will hold. Reads
    only: the dry run is this."""
    staging = root / STAGING_DIR
    raw_dir = Path(config.raw_dir)
    all_meta = raw.metadata()
    skipped = [
        {"episode_id": name, "file": str(raw.db_path), "error": problem}
        for name, problem in sorted(raw.rejected.items())
        # an invalid row's game and task are unknown: reported unless other ids are named
        if config.selection.episode_ids is None or name in config.selection.episode_ids
    ]
    episodes_total = len(selected.agents) + len(skipped)
    moved_aside = _moved_aside(staging)
    datasets: dict[str, DatasetPlan] = {}
    new: dict[str, list[str]] = {}
    new_frames: dict[str, FrameCount] = {}
    sized_jobs: list[tuple[int, EpisodeJob]] = []
    missing: list[str] = []
    frames = FrameCount()
    already_done = 0
    for episode_id, agents in selected.agents.items():
        meta = all_meta[episode_id]
        todo = []
        for agent_id in agents:
            key = DatasetKey(config.namespace, meta.game, meta.task, agent_id)
            dataset = datasets.get(key.dataset_id)
            if dataset is None:
                _check_inside(root, key.dataset_id)
                dataset = datasets[key.dataset_id] = _dataset_now(root, key, moved_aside)
                _check_format(root, key, moved_aside, config.portable)
            if episode_id not in dataset.published and episode_id not in dataset.staged:
                todo.append(agent_id)
        if not todo:
            already_done += 1
            continue
        try:  # refused here, before any worker: a trajectory symlinked out of the raw dir
            trajectories = trajectory_files(raw_dir, episode_id)
        except CrowdPlayDataError as exc:
            skipped.append({"episode_id": episode_id, "file": str(exc.path), "error": exc.problem})
            continue
        job = EpisodeJob(
            raw_dir, meta, config.namespace, staging, tuple(todo), portable=config.portable
        )
        if not trajectories:  # the worker reports it, by name
            missing.append(episode_id)
            sized_jobs.append((0, job))
            continue
        sized_jobs.append((trajectories[0].stat().st_size, job))
        frames += FrameCount.of(meta, todo[0], trajectories[0])
        for agent_id in todo:
            dataset_id = DatasetKey(config.namespace, meta.game, meta.task, agent_id).dataset_id
            new.setdefault(dataset_id, []).append(episode_id)
            counted = new_frames.get(dataset_id, FrameCount())
            new_frames[dataset_id] = counted + FrameCount.of(meta, agent_id, trajectories[0])
    for dataset_id, episodes in new.items():
        datasets[dataset_id] = dataclasses.replace(
            datasets[dataset_id], new=tuple(episodes), new_frames=new_frames[dataset_id]
        )
    # Largest first, so that no worker is left converting one long episode at the end while
    # the others idle (longest-processing-time-first scheduling).
    sized_jobs.sort(key=lambda sized: sized[0], reverse=True)
    return ConversionPlan(
        root=root,
        selection=config.selection,
        episodes_selected=len(selected.agents),
        episodes_total=episodes_total,
        jobs=tuple(job for _, job in sized_jobs),
        frames=frames,
        datasets=datasets,
        already_done=already_done,
        skipped=tuple(skipped),
        missing=tuple(missing),
        unscored=len(selected.unscored),
    )


def _dataset_now(root: Path, key: DatasetKey, moved_aside: dict[Path, Path]) -> DatasetPlan:
    """A dataset as it is before the run: published episodes, staged ones, bytes on disk."""
    final_dir = root / key.dataset_id
    published_dir = moved_aside.get(final_dir, final_dir)
    staged_dir = root / STAGING_DIR / "episodes" / _slug(key.dataset_id)
    staged = sorted(staged_dir.glob("*.h5")) if staged_dir.exists() else []
    data_dir = published_dir / DATA_DIR
    on_disk = [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []
    return DatasetPlan(
        key,
        published=frozenset(published_episode_ids(published_dir)),
        staged=frozenset(p.stem for p in staged),
        bytes_now=sum(p.stat().st_size for p in on_disk),
        staged_bytes=sum(p.stat().st_size for p in staged),
    )


class StorageFormatError(ValueError):
    """A run that would mix portable and default episodes in one dataset."""


def _check_format(
    root: Path, key: DatasetKey, moved_aside: dict[Path, Path], portable: bool
) -> None:
    """Refuse to add episodes of one storage format to a dataset (published or staged) of the
    other: a dataset is one or the other, as its metadata's requirements say."""
    final_dir = root / key.dataset_id
    main = main_data_path(moved_aside.get(final_dir, final_dir) / DATA_DIR)
    staged_dir = root / STAGING_DIR / "episodes" / _slug(key.dataset_id)
    held_portable = []
    if main.exists():
        with EpisodeFile(main) as file:
            names = file.names()
            if names and "observations" in file[names[0]]:
                held_portable.append(is_portable(file[names[0]]["observations"]))
    for path in sorted(staged_dir.glob("*.h5"))[:1] if staged_dir.exists() else []:
        with h5py.File(path, "r") as file:
            if "observations" in file:
                held_portable.append(is_portable(file["observations"]))
    if any(held != portable for held in held_portable):
        held = "default (zstd)" if portable else "portable"
        raise StorageFormatError(
            f"{key.dataset_id} under {root} holds {held} episodes; convert "
            f"{'without' if portable else 'with'} --portable, or into another --root "
            "(`crowdplay-minari portable` copies existing datasets)"
        )


def _moved_aside(staging: Path) -> dict[Path, Path]:
    """Published datasets an interrupted swap left moved aside (their path -> where they lie),
    which a run puts back first (`_recover_swaps`); read here without moving them."""
    aside = {}
    for note in sorted((staging / "trash").glob("*.for")):
        trash, final_dir = note.with_suffix(""), Path(note.read_text())
        if trash.exists() and not final_dir.exists():
            aside[final_dir] = trash
    return aside


# -- converting --------------------------------------------------------------------------------


def convert(config: ConversionConfig, log: Callable[[str], None] = print) -> ConversionReport:
    """Run (or resume) a conversion; returns the report, also written next to the datasets.

    The selection is resolved from the metadata first: one that names an episode the database
    lacks, or matches nothing, raises `SelectionError` before anything is written. Episodes
    already in a dataset are never converted again nor removed, so a run of one selection
    adds to the datasets other selections made.

    One conversion per datasets root at a time: a second one into the same root stops at once
    with `files.OutputInUse` (its staging and publishing would interleave with the first's)."""
    raw = RawDataset(config.raw_dir)
    selected = _select(config, raw)
    root = datasets_root(config.root)
    root.mkdir(parents=True, exist_ok=True)
    with files.exclusive(root / LOCK_NAME, f"datasets into {root}"):
        return _convert(config, root, raw, selected, log)


def _convert(
    config: ConversionConfig,
    root: Path,
    raw: RawDataset,
    selected: SelectedEpisodes,
    log: Callable[[str], None],
) -> ConversionReport:
    started = time.perf_counter()
    staging = root / STAGING_DIR
    _recover_swaps(staging)
    for tmp in staging.glob("episodes/*/*.tmp"):
        tmp.unlink()  # left by a killed run
    plan = _plan(config, root, raw, selected)
    report = ConversionReport(
        str(config.raw_dir),
        str(root),
        dt.datetime.now().isoformat(timespec="seconds"),
        selection=dataclasses.asdict(config.selection),
    )
    report.episodes_total = plan.episodes_total
    if config.selection.restricts:
        log(
            f"selected {plan.episodes_selected} of {len(raw.metadata())} episode(s): "
            f"{config.selection}"
        )
    if plan.unscored:
        log(f"min_score left out {plan.unscored} agent(s) whose metadata holds no Score")
    for entry in plan.skipped:  # bad metadata rows, unsafe paths: named, skipped
        report.skipped.append(entry)
        log(f"SKIPPED {entry['file']} (episode {entry['episode_id']}): {entry['error']}")
    report.episodes_already_done = plan.already_done
    if report.episodes_already_done:
        log(f"resuming: {report.episodes_already_done} episode(s) already converted")
    jobs = list(plan.jobs)
    keys = {dataset: planned.key for dataset, planned in plan.datasets.items()}

    from tqdm import tqdm

    _ensure_namespaces(root, config.namespace, {k.game for k in keys.values()})
    # Each dataset is published as soon as its last episode is staged, by a thread of this
    # (otherwise idle) process, so publishing overlaps the staging of the remaining episodes
    # instead of following it. (The local executor forks all its workers at its first submit,
    # before any publishing starts.)
    datasets_of = {
        job.metadata.episode_id: [
            DatasetKey(config.namespace, job.metadata.game, job.metadata.task, a).dataset_id
            for a in job.agents
        ]
        for job in jobs
    }
    waiting = {dataset: 0 for dataset in keys}
    for datasets in datasets_of.values():
        for dataset in datasets:
            waiting[dataset] += 1
    publisher = ThreadPoolExecutor(1, thread_name_prefix="publish")
    publishing: dict[str, Future] = {}

    def publish_when_staged(dataset: str) -> None:
        staged_dir = staging / "episodes" / _slug(dataset)
        if staged_dir.exists() and any(staged_dir.glob("*.h5")):
            publishing[dataset] = publisher.submit(
                _publish, root, staging, keys[dataset], config.portable
            )

    try:
        results = _stage_all(jobs, config)
        bar = tqdm(total=len(jobs), unit="episode", desc="converting", disable=not config.progress)
        for result in results:
            bar.update(1)
            if result.error and files.is_disk_full(result.error):
                raise files.DiskFull(f"episode {result.episode_id} into {staging}", root)
            if result.error:
                entry = {
                    "episode_id": result.episode_id,
                    "file": result.error_file,
                    "error": result.error.strip().splitlines()[0],
                }
                report.skipped.append(entry)
                log(f"SKIPPED {entry['file']}: {entry['error']}")
            else:
                report.episodes_converted += 1
                report.frames_converted += result.frames
            for dataset in datasets_of[result.episode_id]:
                waiting[dataset] -= 1
                if waiting[dataset] == 0:
                    publish_when_staged(dataset)
        bar.close()
        # Episodes staged by an earlier, interrupted run: published last, because the local
        # executor forks its workers, which must not happen while a publisher thread is busy.
        for dataset in sorted(keys):
            if dataset not in publishing and waiting[dataset] == 0:
                publish_when_staged(dataset)
        for dataset in sorted(keys):
            if dataset in publishing:
                report.datasets[dataset] = publishing[dataset].result()
            elif (root / dataset / DATA_DIR / METADATA_FILE).exists():
                with open(root / dataset / DATA_DIR / METADATA_FILE) as f:
                    meta = json.load(f)
                report.datasets[dataset] = {
                    "episodes": meta["total_episodes"],
                    "steps": meta["total_steps"],
                }
    finally:
        publisher.shutdown(wait=True)
    report.seconds = time.perf_counter() - started
    report.finished = dt.datetime.now().isoformat(timespec="seconds")
    report_path = root / config.namespace / REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(report_path, dataclasses.asdict(report))
    return report


def _check_inside(root: Path, dataset_id: str) -> None:
    """Belt and braces behind the reader's name checks: a dataset's folder is inside `root`."""
    if not (root / dataset_id).resolve().is_relative_to(root.resolve()):
        raise ValueError(f"dataset id {dataset_id!r} would lie outside the datasets root {root}")


def _agents_of(meta: EpisodeMetadata) -> list[str]:
    """Agent ids of an episode: both players in two-player games, plus any in its keyword data."""
    agents = {"game_0>player_0"}
    if meta.game in TWO_PLAYER_GAMES:
        agents.add("game_0>player_1")
    agents.update(a for a in meta.keyword_data if a != "all")
    return sorted(agents)
