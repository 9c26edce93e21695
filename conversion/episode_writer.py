"""Write one agent's view of one CrowdPlay episode as a Minari episode group in HDF5.

Storage layout, chosen by measurement (benchmarks/bench_conversion.py, README "Storage"): frames
are stored in chunks of 256 whole frames, each chunk one standard zstd frame behind HDF5 filter
32015 (hdf5plugin's `Zstd`, so plain h5py and Minari read them). A chunk that long lets zstd
match a frame against the frames before it (an 8 MiB window: 83 frames back), so a frame that
equals or nearly equals an earlier one costs a few bytes: ~110 B/frame on emulator data, under
60% of CrowdPlay's own bz2 files.

The chunks are compressed here with `zstandard` and written with `write_direct_chunk`, not
through the HDF5 filter, for the parameters: level 12 (what the filter offers) spends its time
in 16 + 32 MiB match tables that two workers fight over in the CPU caches, and scaled 1.67x on
two cores. `FRAME_ZSTD` keeps level 12's window and lazy2 search but 1 MiB tables: 3% more
bytes, 1.8x less CPU, and 1.98x on two cores. gzip cannot get near (deflate matches stop at
258 bytes: >= 330 B/frame even at level 9).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import zstandard

from crowdplay_minari.attributes import encode_nested, encode_value
from crowdplay_minari.episode import AgentTrajectory, Episode, StepFrames
from crowdplay_minari.scratch import scratch_buffer
from crowdplay_minari.storage import (
    DIGEST_ATTRIBUTE,
    FRAME_CHUNK,
    FRAME_ZSTD,
    LIBVER,
    SLASH_SUBSTITUTE,
    VALUE_TYPES_ATTRIBUTE,
    episode_digest,
    small_array_filters,
)

from .layout import FINAL_OBSERVATION


class FrameChunkCompressor:
    """Compresses an episode's frames into zstd chunks, once per frame array: the two players
    of a two-player game see the same screens, which the reader gives both as one array (it
    compares them), and their datasets share the compressed chunks."""

    def __init__(self) -> None:
        self._compressor = zstandard.ZstdCompressor(compression_params=FRAME_ZSTD)
        self._last: tuple[np.ndarray | StepFrames, int, list[bytes]] | None = None

    def chunks(self, frames: np.ndarray | StepFrames, chunk: int) -> list[bytes]:
        """The compressed chunks of `frames` plus a repeat of the last frame (N+1 frames), each
        `chunk` frames long (the last one padded with black, as HDF5 stores edge chunks).
        Chunks not already contiguous in `frames` are gathered in this thread's scratch buffer,
        the same memory chunk after chunk, episode after episode."""
        if self._last is not None:
            seen, seen_chunk, compressed = self._last
            if seen is frames and seen_chunk == chunk:
                return compressed
        n = len(frames)
        compressed = []
        for start in range(0, n + 1, chunk):
            stop = min(start + chunk, n)
            if isinstance(frames, np.ndarray) and stop - start == chunk:
                data = np.ascontiguousarray(frames[start:stop])
            else:
                data = scratch_buffer("frame chunk", (chunk, *frames.shape[1:]))
                if isinstance(frames, np.ndarray):
                    data[: stop - start] = frames[start:stop]
                else:
                    frames.copy_to(data, start, stop)
                if stop - start < chunk:
                    data[stop - start] = frames[n - 1]
                    data[stop - start + 1 :] = 0
            compressed.append(self._compressor.compress(data))
        self._last = (frames, chunk, compressed)
        return compressed


def _small(group: h5py.Group, name: str, data: np.ndarray, portable: bool = False) -> None:
    """A per-step array as one compressed, checksummed chunk."""
    group.create_dataset(name, data=data, chunks=data.shape, **small_array_filters(portable))


def _aligned(values: np.ndarray) -> np.ndarray:
    """N+1 entries in Minari's convention, where `infos[t]` goes with `observations[t]`: entry
    t + 1 is what CrowdPlay recorded with step t (the RAM after it, the step's user type...).
    Entry 0, the state at reset, was never recorded; it repeats entry 1 (`recorded` false)."""
    return np.concatenate([values[:1], values])


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


def write_observations(
    group: h5py.Group,
    frames: np.ndarray | StepFrames,
    compressor: FrameChunkCompressor | None = None,
    portable: bool = False,
) -> h5py.Dataset:
    """The `observations` dataset: the N frames plus a repeat of the last (Minari's N+1).

    Portable: HDF5's own gzip filter with its Fletcher-32 checksum, so any h5py reads them
    without hdf5plugin; chunks of one image row across 256 frames, where deflate finds the same
    row a frame earlier (larger and slower to read than zstd: README "Storage")."""
    n = len(frames)
    chunk = min(FRAME_CHUNK, n + 1)
    if portable:
        observations = group.create_dataset(
            "observations",
            shape=(n + 1, *frames.shape[1:]),
            dtype=np.uint8,
            chunks=(chunk, 1, *frames.shape[2:]),  # a row of 256 frames: deflate's 32 KiB
            **small_array_filters(portable=True),  # window sees the row above, not a frame
        )
        data = scratch_buffer("frame chunk", (chunk, *frames.shape[1:]))
        for start in range(0, n + 1, chunk):
            stop = min(start + chunk, n + 1)
            real = min(stop, n) - start
            if isinstance(frames, np.ndarray):
                data[:real] = frames[start : start + real]
            else:
                frames.copy_to(data, start, start + real)
            if stop > n:
                data[real] = frames[n - 1]
            observations[start:stop] = data[: stop - start]
        return observations
    observations = group.create_dataset(
        "observations",
        shape=(n + 1, *frames.shape[1:]),
        dtype=np.uint8,
        chunks=(chunk, *frames.shape[1:]),
        **hdf5plugin.Zstd(),  # declares the filter readers decode with
    )
    compressor = compressor or FrameChunkCompressor()
    for index, data in enumerate(compressor.chunks(frames, chunk)):
        observations.id.write_direct_chunk((index * chunk, 0, 0, 0), data)
    return observations


def write_episode_group(
    group: h5py.Group,
    episode: Episode,
    agent: AgentTrajectory,
    compressor: FrameChunkCompressor | None = None,
    portable: bool = False,
) -> None:
    """Fill an (empty) HDF5 group with one Minari episode, its digest recorded last."""
    n = agent.num_steps

    def small(parent: h5py.Group, name: str, data: np.ndarray) -> None:
        _small(parent, name, data, portable)

    write_observations(group, agent.frames, compressor, portable)
    small(group, "actions", agent.actions.astype(np.int64))
    small(group, "rewards", agent.rewards.astype(np.float64))
    terminations = np.zeros(n, dtype=bool)
    truncations = np.zeros(n, dtype=bool)
    terminations[-1] = agent.terminated
    truncations[-1] = agent.truncated
    small(group, "terminations", terminations)
    small(group, "truncations", truncations)

    infos = group.create_group("infos")
    small(infos, "ram", _aligned(agent.ram))
    small(infos, "lives", _aligned(agent.lives))
    small(infos, "user_type", _aligned(agent.user_types))
    small(infos, "action_step_iter", _aligned(agent.action_step_iters))
    small(infos, "step_iter", _aligned(episode.step_iters))
    recorded = np.ones(n + 1, dtype=bool)
    recorded[0] = False
    small(infos, "recorded", recorded)
    for name, source in (
        ("statistics", agent.statistics),
        ("task_statistics", agent.task_statistics),
    ):
        sub = infos.create_group(name)
        for stat, values in source.items():
            small(sub, stat.replace("/", SLASH_SUBSTITUTE), _aligned(values))
    group.attrs.update(episode_attributes(episode, agent))
    group.file.flush()
    group.attrs[DIGEST_ATTRIBUTE] = episode_digest(group)


def write_staged_episode(
    path: Path,
    episode: Episode,
    agent: AgentTrajectory,
    compressor: FrameChunkCompressor | None = None,
    portable: bool = False,
) -> None:
    """Write one episode file atomically: readers see the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as file:
            write_episode_group(file, episode, agent, compressor, portable)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
