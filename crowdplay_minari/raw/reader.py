"""Read a raw CrowdPlay dataset directory (`crowdplay_atari-v0/`) into typed `Episode` objects.

This is the only module that knows the raw layout: `dataset.sqlite` plus one pickled list of
step dicts per episode (`<episode_id>.pickle`, `.pickle.gz` or `.pickle.bz2`). Everything is
validated on the way in; problems raise a `CrowdPlayDataError` subclass naming the file, the step
and the field.

    >>> raw = RawDataset("crowdplay_atari-v0")            # doctest: +SKIP
    >>> episode = raw.read_episode(raw.episode_ids()[0])  # doctest: +SKIP
    >>> episode.agents["game_0>player_0"].frames.shape    # doctest: +SKIP
    (1234, 210, 160, 3)
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from ..episode import (
    FRAME_SHAPE,
    RAM_SIZE,
    AgentTrajectory,
    Episode,
    EpisodeMetadata,
    StepFrames,
    User,
)
from ..games import GAMES
from . import safe_pickle, schema
from .errors import (
    CorruptTrajectoryError,
    CrowdPlayDataError,
    InvalidMetadataError,
    SchemaError,
    TrajectoryNotFoundError,
    UnsafePathError,
)

DB_FILENAME = "dataset.sqlite"
# Fastest first: reading raw pickles beats gunzip, which beats bunzip2 by ~10x (see benchmarks/).
TRAJECTORY_SUFFIXES = (".pickle", ".pickle.gz", ".pickle.bz2")
STEP_KEYS = ("prev_obs", "action", "reward", "done", "info", "step_iter", "user_type")

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Episode ids and tasks become file names and dataset ids: letters, digits, `_.-`, no
leading dot (so never `..`, `/`, an absolute path or a hidden file)."""
SAFE_AGENT_ID = re.compile(r"(all|game_[0-9]{1,3}>player_[0-9]{1,3})")


def check_name(value: Any, what: str, where: Path, pattern: re.Pattern = SAFE_NAME) -> str:
    """`value` if it is a string matching `pattern`, else `InvalidMetadataError` naming it."""
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InvalidMetadataError(where, f"{what} {value!r} is not a safe name", field=what)
    return value


def trajectory_files(root: Path, episode_id: str) -> list[Path]:
    """Every encoding of `episode_id`'s trajectory present under `root`, fastest first. A file
    that resolves outside `root` (a symlink out of it) is refused with `UnsafePathError`."""
    check_name(episode_id, "episode_id", root)
    found = [p for s in TRAJECTORY_SUFFIXES if (p := root / f"{episode_id}{s}").is_file()]
    base = root.resolve()
    for path in found:
        if not path.resolve().is_relative_to(base):
            raise UnsafePathError(
                path, f"resolves to {path.resolve()}, outside the raw directory {base}"
            )
    return found


def _open_trajectory(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def load_steps(path: Path) -> list[dict]:
    """Decompress and safely unpickle one trajectory file into its list of step dicts.

    The file decompresses a few MiB at a time as the unpickler reads it, so an episode is in
    memory once (its unpickled steps), not also as one decompressed pickle as large as its
    frames. That second copy, and the page faults of touching it, were much of what made two
    converter workers slow each other down (benchmarks/bench_conversion.py).
    """
    try:
        with _open_trajectory(path) as file:
            steps = safe_pickle.load(file, path)
    except FileNotFoundError as exc:
        raise TrajectoryNotFoundError(path, "trajectory file does not exist") from exc
    if not isinstance(steps, list):
        raise SchemaError(path, f"expected a list of step dicts, found {type(steps).__name__}")
    if not steps:
        raise SchemaError(path, "trajectory has no steps")
    return steps


class RawDataset:
    """A raw CrowdPlay dataset directory: metadata DB plus trajectory files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_FILENAME
        if not self.db_path.is_file():
            raise SchemaError(self.db_path, "metadata database not found")
        self._engine = create_engine(f"sqlite:///{self.db_path}")
        self._check_schema()
        self._metadata: dict[str, EpisodeMetadata] | None = None
        self.rejected: dict[str, str] = {}
        """Episodes whose metadata rows are invalid (episode id or row -> reason), filled by
        `metadata()`: they are left out of it, so one bad row does not stop the rest."""

    def _check_schema(self) -> None:
        try:
            inspector = inspect(self._engine)
            present = set(inspector.get_table_names())
            for table in schema.TABLES:
                if table.name not in present:
                    raise SchemaError(self.db_path, f"table {table.name!r} is missing")
                columns = {c["name"] for c in inspector.get_columns(table.name)}
                missing = [c.name for c in table.columns if c.name not in columns]
                if missing:
                    raise SchemaError(
                        self.db_path, f"table {table.name!r} lacks column(s) {', '.join(missing)}"
                    )
        except SQLAlchemyError as exc:
            raise SchemaError(self.db_path, f"not a readable SQLite database: {exc}") from exc

    # -- metadata --------------------------------------------------------------------------

    def _unpickle_value(self, blob: Any, table: str, owner: str, agent: str, key: str) -> Any:
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise SchemaError(
                self.db_path, f"{table} value for {owner}/{agent}/{key!r} is not a pickled blob"
            )
        try:
            return safe_pickle.loads(bytes(blob), self.db_path)
        except safe_pickle.UnsafePickleError as exc:
            raise type(exc)(
                self.db_path, f"{table} row {owner}/{agent}/{key!r}: {exc.problem}"
            ) from exc
        except CorruptTrajectoryError as exc:
            raise SchemaError(
                self.db_path, f"{table} row {owner}/{agent}/{key!r}: {exc.problem}"
            ) from exc

    def _read_keyword_table(self, table, owner_column: str) -> dict[str, dict[str, dict]]:
        nested: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(table.c[owner_column], table.c.agent_id, table.c.key, table.c.value)
            )
            for owner, agent, key, blob in rows:
                nested[owner][agent][key] = self._unpickle_value(
                    blob, table.name, owner, agent, key
                )
        return {
            owner: {a: dict(kv) for a, kv in agents.items()} for owner, agents in nested.items()
        }

    def metadata(self) -> dict[str, EpisodeMetadata]:
        """Metadata of every episode in the DB, keyed by episode id (read once, then cached)."""
        if self._metadata is not None:
            return self._metadata
        try:
            with self._engine.connect() as conn:
                episode_rows = conn.execute(
                    select(schema.episodes.c.episode_id, schema.episodes.c.environment_id)
                ).all()
                task_of = dict(
                    conn.execute(
                        select(schema.environments.c.environment_id, schema.environments.c.task_id)
                    ).all()
                )
                user_rows = conn.execute(select(schema.users)).mappings().all()
            episode_kw = self._read_keyword_table(schema.episode_keyword_data, "episode_id")
            environment_kw = self._read_keyword_table(
                schema.environment_keyword_data, "environment_id"
            )
        except SQLAlchemyError as exc:
            raise SchemaError(self.db_path, f"cannot query metadata: {exc}") from exc

        users_of: dict[str, dict[str, User]] = defaultdict(dict)
        for row in user_rows:
            users_of[row["environment_id"]][row["agent_id"]] = User(**dict(row))

        result = {}
        for number, (episode_id, environment_id) in enumerate(episode_rows):
            try:
                result[episode_id] = self._episode_metadata(
                    episode_id, environment_id, task_of, environment_kw, episode_kw, users_of
                )
            except CrowdPlayDataError as exc:
                name = episode_id if isinstance(episode_id, str) else f"episodes row {number}"
                self.rejected[str(name)] = exc.problem
        self._metadata = result
        return result

    def _episode_metadata(
        self,
        episode_id: Any,
        environment_id: Any,
        task_of: dict,
        environment_kw: dict,
        episode_kw: dict,
        users_of: dict,
    ) -> EpisodeMetadata:
        check_name(episode_id, "episode_id", self.db_path)
        if environment_id not in task_of:
            raise SchemaError(
                self.db_path,
                f"episode {episode_id} names environment {environment_id}, "
                "which has no row in 'environments'",
            )
        env_kw = environment_kw.get(environment_id, {})
        env_all = env_kw.get("all", {})
        missing = [k for k in ("game", "task", "source") if k not in env_all]
        if missing:
            raise SchemaError(
                self.db_path,
                f"environment {environment_id} lacks environment keyword(s) "
                f"{', '.join(missing)} under agent 'all'",
            )
        game = env_all["game"]
        if not isinstance(game, str) or game not in GAMES:
            raise InvalidMetadataError(
                self.db_path,
                f"episode {episode_id}: game {game!r} is not in the games catalogue "
                f"({', '.join(sorted(GAMES))})",
                field="game",
            )
        task = check_name(env_all["task"], "task", self.db_path)
        source = env_all["source"]
        if not isinstance(source, str):
            raise InvalidMetadataError(
                self.db_path,
                f"episode {episode_id}: source {source!r} is not a string",
                field="source",
            )
        keyword_data = episode_kw.get(episode_id, {})
        users = users_of.get(environment_id, {})
        for agent_id in [*keyword_data, *env_kw, *users]:
            check_name(agent_id, "agent_id", self.db_path, SAFE_AGENT_ID)
        return EpisodeMetadata(
            episode_id=episode_id,
            environment_id=environment_id,
            task_id=task_of[environment_id],
            game=game,
            task=task,
            source=source,
            keyword_data=keyword_data,
            environment_keyword_data=env_kw,
            users=users,
        )

    def episode_ids(self) -> list[str]:
        """All episode ids in the DB, sorted."""
        return sorted(self.metadata())

    # -- trajectories ----------------------------------------------------------------------

    def trajectory_path(self, episode_id: str) -> Path:
        """The fastest-to-read trajectory file of `episode_id`."""
        files = trajectory_files(self.root, episode_id)
        if not files:
            raise TrajectoryNotFoundError(
                self.root / f"{episode_id}.pickle.bz2",
                "trajectory file not found (looked for " + ", ".join(TRAJECTORY_SUFFIXES) + ")",
            )
        return files[0]

    def read_episode(
        self, episode_id: str, *, agents: Iterable[str] | None = None, path: Path | None = None
    ) -> Episode:
        """Read and validate one episode; `agents` limits which agents are parsed."""
        metadata = self.metadata().get(episode_id)
        if metadata is None:
            raise SchemaError(self.db_path, f"episode {episode_id} is not in the database")
        path = path or self.trajectory_path(episode_id)
        steps = load_steps(path)
        return parse_steps(steps, metadata, path, agents=agents)

    def iter_episodes(self, episode_ids: Iterable[str] | None = None) -> Iterator[Episode]:
        """Read episodes one at a time (memory: one episode)."""
        for episode_id in self.episode_ids() if episode_ids is None else episode_ids:
            yield self.read_episode(episode_id)


# -- parsing step dicts into arrays --------------------------------------------------------------


def _as_number(value: Any, path: Path, step: int, field: str) -> float:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool | int | float | np.integer | np.floating | np.bool_):
        return float(value)
    raise SchemaError(
        path,
        f"expected a number or timedelta, found {type(value).__name__}",
        step=step,
        field=field,
    )


def _statistics(
    steps: list[dict], key: str, agent: str, path: Path
) -> tuple[dict[str, np.ndarray], set[str]]:
    """Per-step values of the running statistics in `steps[i][key][name][agent]`, in one pass
    (names may first appear after step 0; first-seen order is kept; missing steps are NaN)."""
    columns: dict[str, np.ndarray] = {}
    timedeltas: set[str] = set()
    for i, step in enumerate(steps):
        for name, per_agent in (step.get(key) or {}).items():
            if not isinstance(per_agent, dict) or agent not in per_agent:
                continue
            values = columns.get(name)
            if values is None:
                values = columns[name] = np.full(len(steps), np.nan)
            value = per_agent[agent]
            if isinstance(value, dt.timedelta):
                timedeltas.add(name)
            values[i] = _as_number(value, path, i, f"{key}.{name}.{agent}")
    return columns, timedeltas


_PLAIN = {True: {int}, False: {int, float}}
"""Python types that need no closer look: ints (for integer fields) or ints and floats."""


def _first_not(values: list, accepted: tuple[type, ...]) -> int | None:
    """Index of the first value (or first step holding such a value) not of `accepted` types;
    bools never count as numbers."""
    for t, value in enumerate(values):
        items = value if isinstance(value, list | tuple | np.ndarray) else (value,)
        if isinstance(items, np.ndarray):
            if items.dtype.kind not in ("iu" if int in accepted else "iuf"):
                return t
            continue
        kinds = set(map(type, items))
        if kinds <= _PLAIN[int in accepted]:
            continue  # the common case, checked in C
        for item in items:
            if isinstance(item, bool | np.bool_) or not isinstance(item, accepted):
                return t
    return None


def _integers(
    values: list,
    path: Path,
    field: str,
    *,
    low: int | None = None,
    high: int | None = None,
    shape: tuple[int, ...] = (),
) -> np.ndarray:
    """`values` as an int64 array, or a `SchemaError` naming the step: every value a real int
    (never a bool, float or string: nothing is coerced), inside [low, high], of `shape`."""
    bad = _first_not(values, (int, np.integer))
    if bad is not None:
        raise SchemaError(
            path, f"expected integers, found {values[bad]!r:.80}", step=bad, field=field
        )
    try:
        array = np.asarray(values, dtype=np.int64)
    except (ValueError, OverflowError) as exc:
        raise SchemaError(path, f"expected integers ({exc})", field=field) from exc
    if array.shape[1:] != shape:
        raise SchemaError(
            path, f"expected {shape or 'one value'} per step, found {array.shape[1:]}", field=field
        )
    outside = np.zeros(array.shape, dtype=bool)
    if low is not None:
        outside |= array < low
    if high is not None:
        outside |= array > high
    if outside.any():
        t = int(np.flatnonzero(outside.reshape(len(array), -1).any(axis=1))[0])
        allowed = f"[{'' if low is None else low}, {'' if high is None else high}]"
        raise SchemaError(path, f"value outside {allowed}: {values[t]!r:.80}", step=t, field=field)
    return array


def _numbers(values: list, path: Path, field: str) -> np.ndarray:
    """Rewards: real, finite numbers (int64 when all are ints, else float64), never coerced."""
    bad = _first_not(values, (int, float, np.integer, np.floating))
    if bad is not None:
        raise SchemaError(
            path, f"expected a number, found {values[bad]!r:.80}", step=bad, field=field
        )
    array = np.asarray(values)
    if array.dtype.kind == "f":
        infinite = np.flatnonzero(~np.isfinite(array))
        if infinite.size:
            t = int(infinite[0])
            raise SchemaError(path, f"reward is {array[t]}", step=t, field=field)
        return array.astype(np.float64)
    return array.astype(np.int64)


def _action_count(metadata: EpisodeMetadata) -> int:
    """Size of the episode's minimal action set (18, the full set, for a game not catalogued)."""
    info = GAMES.get(getattr(metadata, "game", None))
    return 18 if info is None else info.num_actions


def parse_steps(
    steps: list[dict],
    metadata: EpisodeMetadata,
    path: Path,
    *,
    agents: Iterable[str] | None = None,
    stack_frames: bool = True,
) -> Episode:
    """Turn a list of CrowdPlay step dicts into an `Episode` of per-agent arrays.

    With `stack_frames=False` each agent's `frames` is a `StepFrames` over the steps' own frame
    arrays instead of one stacked array (for the converter, which compresses them in chunks).
    """
    n = len(steps)
    first = steps[0]
    if not isinstance(first, dict):
        raise SchemaError(path, f"step is a {type(first).__name__}, not a dict", step=0)
    for key in STEP_KEYS:
        if key not in first:
            raise SchemaError(path, "step lacks a required key", step=0, field=key)
    agent_ids = list(first["prev_obs"]) if agents is None else list(agents)
    for agent in agent_ids:
        if agent not in first["prev_obs"]:
            raise SchemaError(
                path, f"agent {agent!r} not in the trajectory", step=0, field="prev_obs"
            )

    step_iter_values: list = [None] * n
    frames: dict[str, np.ndarray | list] = {}
    shares_first: dict[str, bool] = {}
    columns: dict[str, dict[str, list]] = {
        a: {
            "actions": [],
            "rewards": [],
            "dones": [],
            "ram": [],
            "lives": [],
            "user_types": [],
            "action_step_iters": [],
        }
        for a in agent_ids
    }
    lead = agent_ids[0]
    frames[lead] = np.empty((n, *FRAME_SHAPE), dtype=np.uint8) if stack_frames else [None] * n
    for agent in agent_ids[1:]:
        shares_first[agent] = True

    for i, step in enumerate(steps):
        field = "?"
        try:
            if not isinstance(step, dict):
                raise SchemaError(path, f"step is a {type(step).__name__}, not a dict", step=i)
            field = "step_iter"
            step_iter_values[i] = step["step_iter"]
            lead_image = None
            for agent in agent_ids:
                field = f"prev_obs.{agent}.image"
                image = step["prev_obs"][agent]["image"]
                if (
                    not isinstance(image, np.ndarray)
                    or image.shape != FRAME_SHAPE
                    or image.dtype != np.uint8
                ):
                    raise SchemaError(
                        path,
                        f"expected a uint8 array of shape {FRAME_SHAPE}, found "
                        f"{getattr(image, 'dtype', type(image).__name__)} "
                        f"{getattr(image, 'shape', '')}",
                        step=i,
                        field=field,
                    )
                if agent == lead:
                    frames[lead][i] = image
                    lead_image = image
                elif (
                    shares_first[agent]
                    and image is not lead_image
                    and not np.array_equal(image, lead_image)
                ):
                    # Two-player frames are normally one shared array; keep a copy if not.
                    shares_first[agent] = False
                    frames[agent] = frames[lead].copy()
                    frames[agent][i] = image
                elif not shares_first[agent]:
                    frames[agent][i] = image
                col = columns[agent]
                field = f"action.{agent}.game"
                col["actions"].append(step["action"][agent]["game"])
                field = f"reward.{agent}"
                col["rewards"].append(step["reward"][agent])
                field = f"done.{agent}"
                col["dones"].append(step["done"][agent])
                field = f"info.{agent}.RAM"
                info = step["info"][agent]
                col["ram"].append(info["RAM"])
                field = f"info.{agent}.ale.lives"
                col["lives"].append(info["ale.lives"])
                field = f"user_type.{agent}"
                col["user_types"].append(step["user_type"][agent])
                field = f"action_step_iter.{agent}"
                col["action_step_iters"].append(step.get("action_step_iter", {}).get(agent, -1))
        except (KeyError, TypeError, IndexError) as exc:
            raise SchemaError(path, f"missing or malformed ({exc!r})", step=i, field=field) from exc

    if not stack_frames:
        frames = {agent: StepFrames(arrays) for agent, arrays in frames.items()}
    step_iters = _integers(step_iter_values, path, "step_iter")
    backwards = np.flatnonzero(np.diff(step_iters) <= 0)
    if backwards.size:
        t = int(backwards[0]) + 1
        raise SchemaError(
            path,
            f"step_iter must increase, found {step_iters[t - 1]} then {step_iters[t]}",
            step=t,
            field="step_iter",
        )
    n_actions = _action_count(metadata)
    trajectories = {}
    for agent in agent_ids:
        col = columns[agent]
        ram = _integers(col["ram"], path, f"info.{agent}.RAM", low=0, high=255, shape=(RAM_SIZE,))
        rewards = _numbers(col["rewards"], path, f"reward.{agent}")
        actions = _integers(col["actions"], path, f"action.{agent}.game", low=0, high=n_actions - 1)
        dones = col["dones"]
        not_bool = [t for t, d in enumerate(dones) if not isinstance(d, bool | np.bool_)]
        if not_bool:
            t = not_bool[0]
            raise SchemaError(
                path, f"done must be a bool, found {dones[t]!r}", step=t, field=f"done.{agent}"
            )
        user_types = _integers(col["user_types"], path, f"user_type.{agent}", low=1, high=2)
        lives = _integers(col["lives"], path, f"info.{agent}.ale.lives", low=-1)
        action_step_iters = _integers(
            col["action_step_iters"], path, f"action_step_iter.{agent}", low=-1
        )
        statistics, td1 = _statistics(steps, "episode_callables", agent, path)
        task_statistics, td2 = _statistics(steps, "task_callables", agent, path)
        trajectories[agent] = AgentTrajectory(
            agent_id=agent,
            frames=frames[lead] if agent == lead or shares_first[agent] else frames[agent],
            actions=actions,
            rewards=rewards,
            dones=np.asarray(dones, dtype=bool),
            ram=ram.astype(np.uint8),
            lives=lives,
            user_types=user_types.astype(np.int8),
            action_step_iters=action_step_iters,
            statistics=statistics,
            task_statistics=task_statistics,
            timedelta_statistics=frozenset(td1 | td2),
        )
    return Episode(metadata=metadata, step_iters=step_iters, agents=trajectories)
