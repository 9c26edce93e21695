"""Write one agent's view of one CrowdPlay episode as a Minari episode group in HDF5.

Storage layout, chosen by measurement (benchmarks/bench_conversion.py, README "Storage"): frames
are compressed with zstd level 12 in chunks of 256 whole frames. A chunk that long lets zstd's
long-range matching encode a frame that equals or nearly equals an earlier one in a few bytes:
~91-106 B/frame, about half of CrowdPlay's own bz2 files, at ~3,500 frames/s to write and
~27,000 frames/s to read (level 9 writes faster but grows the files past bz2's size). gzip
cannot get there (deflate matches stop at 258 bytes: >= 330 B/frame even at level 9).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from crowdplay_minari.attributes import VALUE_TYPES_ATTRIBUTE, encode_nested, encode_value
from crowdplay_minari.episode import AgentTrajectory, Episode

from .layout import FINAL_OBSERVATION

FRAME_CHUNK = 256
FRAME_ZSTD_LEVEL = 12
SMALL_ZSTD_LEVEL = 9  # per-step scalars and RAM: 19 costs 20% of the writing for 3% of bytes
LIBVER = "latest"  # compact chunk indexes: ~3 KB less per dataset than HDF5's v1 B-trees


def _frame_compression() -> dict:
    return dict(hdf5plugin.Zstd(clevel=FRAME_ZSTD_LEVEL))


def _small(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """A per-step array as one zstd-compressed chunk."""
    group.create_dataset(
        name, data=data, chunks=data.shape, **hdf5plugin.Zstd(clevel=SMALL_ZSTD_LEVEL)
    )


def _padded(values: np.ndarray) -> np.ndarray:
    """N+1 entries: the N recorded ones plus a repeat of the last."""
    return np.concatenate([values, values[-1:]])


def episode_attributes(episode: Episode, agent: AgentTrajectory) -> dict:
    """Every piece of CrowdPlay metadata for `agent`, as flat HDF5 attributes."""
    meta = episode.metadata
    user = meta.users.get(agent.agent_id)
    scalars = {
        "crowdplay_episode_id": meta.episode_id,
        "environment_id": meta.environment_id,
        "task_id": meta.task_id,
        "game": meta.game,
        "task": meta.task,
        "source": meta.source,
        "agent_id": agent.agent_id,
        "player": agent.player,
        "user_id": user.user_id if user else None,
        "permanent_user_id": user.permanent_user_id if user else None,
        "human_fraction": agent.human_fraction,
        "ended_by": "game_over" if agent.terminated else "session_stopped",
        "final_observation": FINAL_OBSERVATION,
        "num_raw_steps": agent.num_steps,
        "episode_return": agent.rewards.sum().item(),
    }
    attributes: dict = {}
    types: dict[str, str] = {}
    for key, value in scalars.items():
        attributes[key], types[key] = encode_value(value)
    keyword = {a: v for a, v in meta.keyword_data.items() if a in (agent.agent_id, "all")}
    for group, nested in (
        ("keyword_data", keyword),
        ("environment_keyword_data", meta.environment_keyword_data),
    ):
        a, t = encode_nested(group, nested)
        attributes.update(a)
        types.update(t)
    attributes[VALUE_TYPES_ATTRIBUTE] = json.dumps(types, sort_keys=True)
    return attributes


def write_episode_group(group: h5py.Group, episode: Episode, agent: AgentTrajectory) -> None:
    """Fill an (empty) HDF5 group with one Minari episode."""
    n = agent.num_steps
    frames = agent.frames
    obs = group.create_dataset(
        "observations",
        shape=(n + 1, *frames.shape[1:]),
        dtype=np.uint8,
        chunks=(min(FRAME_CHUNK, n + 1), *frames.shape[1:]),
        **_frame_compression(),
    )
    obs[:n] = frames
    obs[n] = frames[n - 1]
    _small(group, "actions", agent.actions.astype(np.int64))
    _small(group, "rewards", agent.rewards.astype(np.float64))
    terminations = np.zeros(n, dtype=bool)
    truncations = np.zeros(n, dtype=bool)
    terminations[-1] = agent.terminated
    truncations[-1] = agent.truncated
    _small(group, "terminations", terminations)
    _small(group, "truncations", truncations)

    infos = group.create_group("infos")
    _small(infos, "ram", _padded(agent.ram))
    _small(infos, "lives", _padded(agent.lives))
    _small(infos, "user_type", _padded(agent.user_types))
    _small(infos, "action_step_iter", _padded(agent.action_step_iters))
    _small(infos, "step_iter", _padded(episode.step_iters))
    recorded = np.ones(n + 1, dtype=bool)
    recorded[n] = False
    _small(infos, "recorded", recorded)
    for name, source in (
        ("statistics", agent.statistics),
        ("task_statistics", agent.task_statistics),
    ):
        sub = infos.create_group(name)
        for stat, values in source.items():
            _small(sub, stat.replace("/", "\u2215"), _padded(values))
    group.attrs.update(episode_attributes(episode, agent))


def write_staged_episode(path: Path, episode: Episode, agent: AgentTrajectory) -> None:
    """Write one episode file atomically: readers see the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as file:
            write_episode_group(file, episode, agent)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
