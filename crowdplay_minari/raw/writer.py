"""Write episodes in the raw CrowdPlay layout: pickled step dicts plus `dataset.sqlite`.

Used by the emulator-backed sample generator, so the project can develop and test against files
that have exactly the shape of the real release: bz2 pickles (protocol 3) of a list of step dicts,
two-player frames shared between agents, numpy-typed rewards and lives, timedelta statistics, and
SQLite values pickled with protocol 4.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, insert

from ..episode import Episode, EpisodeMetadata, User
from . import schema
from .reader import DB_FILENAME

TRAJECTORY_PROTOCOL = 3  # CrowdPlay pickled trajectories under Python 3.7
DB_VALUE_PROTOCOL = 4


def _statistic_value(value: float, is_timedelta: bool) -> Any:
    """A running statistic as CrowdPlay's callables produced it (timedelta, int or float)."""
    if is_timedelta:
        return dt.timedelta(seconds=float(value))
    if float(value).is_integer():
        return int(value)
    return float(value)


def episode_to_steps(episode: Episode) -> list[dict]:
    """The CrowdPlay step dicts of `episode` (inverse of `reader.parse_steps`)."""
    agents = list(episode.agents.values())
    lead = agents[0]
    steps = []
    for i in range(episode.num_steps):
        shared_image = lead.frames[i]
        step: dict[str, Any] = {
            "prev_obs": {},
            "action": {},
            "action_step_iter": {},
            "reward": {},
            "done": {},
            "info": {},
            "step_iter": int(episode.step_iters[i]),
            "user_type": {},
            "task_callables": {},
            "episode_callables": {},
        }
        for agent in agents:
            a = agent.agent_id
            image = shared_image if agent.frames is lead.frames else agent.frames[i]
            step["prev_obs"][a] = OrderedDict(image=image)
            step["action"][a] = {"game": int(agent.actions[i])}
            step["action_step_iter"][a] = int(agent.action_step_iters[i])
            step["reward"][a] = np.int32(agent.rewards[i])
            step["done"][a] = bool(agent.dones[i])
            step["info"][a] = {"ale.lives": np.int64(agent.lives[i]), "RAM": agent.ram[i].tolist()}
            step["user_type"][a] = int(agent.user_types[i])
            for key, source in (
                ("episode_callables", agent.statistics),
                ("task_callables", agent.task_statistics),
            ):
                for name, values in source.items():
                    step[key].setdefault(name, {})[a] = _statistic_value(
                        values[i], name in agent.timedelta_statistics
                    )
        step["done"]["__all__"] = all(step["done"][a.agent_id] for a in agents)
        steps.append(step)
    return steps


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RawDatasetWriter:
    """Creates a raw CrowdPlay dataset directory and appends environments, users and episodes."""

    def __init__(
        self,
        root: str | Path,
        *,
        encodings: Iterable[str] = (".pickle.bz2",),
        create_db: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encodings = tuple(encodings)
        unknown = set(self.encodings) - {".pickle", ".pickle.gz", ".pickle.bz2"}
        if unknown:
            raise ValueError(f"unknown trajectory encodings {sorted(unknown)}")
        self._engine = create_engine(f"sqlite:///{self.root / DB_FILENAME}")
        if create_db:
            schema.metadata.create_all(self._engine)

    @staticmethod
    def _keyword_rows(owner_column: str, owner: str, data: Mapping[str, Mapping[str, Any]]):
        return [
            {
                owner_column: owner,
                "agent_id": agent,
                "key": key,
                "value": pickle.dumps(value, protocol=DB_VALUE_PROTOCOL),
            }
            for agent, values in data.items()
            for key, value in values.items()
        ]

    def add_environment(
        self, environment_id: str, task_id: str, keyword_data: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """One participant session: its task and `environmentkeyworddata` rows."""
        with self._engine.begin() as conn:
            conn.execute(
                insert(schema.environments),
                [{"environment_id": environment_id, "task_id": task_id}],
            )
            rows = self._keyword_rows("environment_id", environment_id, keyword_data)
            if rows:
                conn.execute(insert(schema.environment_keyword_data), rows)

    def add_users(self, users: Iterable[User]) -> None:
        rows = [vars(u) for u in users]
        if rows:
            with self._engine.begin() as conn:
                conn.execute(insert(schema.users), rows)

    def write_trajectory(self, episode: Episode) -> list[Path]:
        """Write the trajectory file(s) of `episode` in every configured encoding."""
        payload = pickle.dumps(episode_to_steps(episode), protocol=TRAJECTORY_PROTOCOL)
        written = []
        for suffix in self.encodings:
            path = self.root / f"{episode.episode_id}{suffix}"
            if suffix == ".pickle.bz2":
                data = bz2.compress(payload, compresslevel=9)
            elif suffix == ".pickle.gz":
                data = gzip.compress(payload, compresslevel=6, mtime=0)
            else:
                data = payload
            _atomic_write(path, data)
            written.append(path)
        return written

    def add_episode_rows(self, meta: EpisodeMetadata) -> None:
        """The `episodes` row and the `episodekeyworddata` rows of one episode."""
        with self._engine.begin() as conn:
            conn.execute(
                insert(schema.episodes),
                [{"episode_id": meta.episode_id, "environment_id": meta.environment_id}],
            )
            rows = self._keyword_rows("episode_id", meta.episode_id, meta.keyword_data)
            if rows:
                conn.execute(insert(schema.episode_keyword_data), rows)

    def add_episode(self, episode: Episode) -> list[Path]:
        """Write the trajectory file(s) and the DB rows of `episode`."""
        written = self.write_trajectory(episode)
        self.add_episode_rows(episode.metadata)
        return written
