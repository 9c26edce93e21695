"""The in-memory episode model every stage after the raw reader speaks.

A CrowdPlay episode is one game (one trajectory file); in two-player games it holds two agents.
Arrays are per emulator frame (60 Hz): index `i` is step `i`, whose observation `frames[i]` is the
screen the agent saw *before* taking `actions[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HUMAN = 1
"""`user_types` value: a human controlled the agent on this frame."""
AI = 2
"""`user_types` value: an AI policy controlled the agent on this frame."""

FRAME_SHAPE = (210, 160, 3)
RAM_SIZE = 128


def player_name(agent_id: str) -> str:
    """`'game_0>player_1'` -> `'player_1'` (the part after the last `>`)."""
    return agent_id.rsplit(">", 1)[-1]


def player_index(agent_id: str) -> int:
    """`'game_0>player_1'` -> 1."""
    return int(player_name(agent_id).rsplit("_", 1)[-1])


@dataclass(frozen=True)
class User:
    """A human participant (anonymised), as in CrowdPlay's `users` table."""

    user_id: str
    permanent_user_id: str
    task_id: str
    environment_id: str
    agent_id: str


@dataclass(frozen=True)
class EpisodeMetadata:
    """Relational metadata of one episode (from `dataset.sqlite`), values as CrowdPlay stored them.

    `keyword_data[agent][key]` holds the per-episode statistics (`agent` is an agent id or
    `"all"`), `environment_keyword_data` the per-environment (session) data.
    """

    episode_id: str
    environment_id: str
    task_id: str
    game: str
    task: str
    source: str
    keyword_data: dict[str, dict[str, Any]]
    environment_keyword_data: dict[str, dict[str, Any]]
    users: dict[str, User]


class StepFrames(Sequence):
    """An episode's frames left as the per-step arrays its trajectory file held, unstacked.

    The converter compresses frames a chunk at a time, so stacking them first into one
    (N, 210, 160, 3) array would cost a copy of every frame and an episode's worth of memory.
    `np.asarray(frames)` stacks them; `copy_to` copies a run of them into an array.
    """

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._arrays = arrays

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._arrays), *FRAME_SHAPE)

    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return StepFrames(self._arrays[index])
        return self._arrays[index]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        stacked = np.empty(self.shape, dtype=np.uint8)
        self.copy_to(stacked, 0, len(self))
        return stacked if dtype is None else stacked.astype(dtype, copy=False)

    def copy_to(self, out: np.ndarray, start: int, stop: int) -> None:
        """`out[:stop - start] = frames[start:stop]`."""
        for row, array in enumerate(self._arrays[start:stop]):
            out[row] = array


@dataclass(frozen=True)
class AgentTrajectory:
    """One agent's view of an episode: N steps of arrays.

    `statistics[name]` and `task_statistics[name]` are CrowdPlay's running statistics at each step
    (`episode_callables` / `task_callables`) as float64; timedelta-valued ones are in seconds,
    and their names are listed in `timedelta_statistics`.
    """

    agent_id: str
    frames: np.ndarray | StepFrames  # (N, 210, 160, 3) uint8; see parse_steps' stack_frames
    actions: np.ndarray  # (N,) int64, index into the game's minimal action set
    rewards: np.ndarray  # (N,) int64 (float64 if the file held float rewards), unclipped
    dones: np.ndarray  # (N,) bool
    ram: np.ndarray  # (N, 128) uint8, emulator RAM after the step
    lives: np.ndarray  # (N,) int64, ALE lives after the step
    user_types: np.ndarray  # (N,) int8, HUMAN or AI
    action_step_iters: np.ndarray  # (N,) int64
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
    task_statistics: dict[str, np.ndarray] = field(default_factory=dict)
    timedelta_statistics: frozenset[str] = frozenset()

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def player(self) -> str:
        return player_name(self.agent_id)

    @property
    def terminated(self) -> bool:
        """True when the episode ended by game over (last `done` set)."""
        return bool(self.dones[-1])

    @property
    def truncated(self) -> bool:
        """True when the session stopped before game over."""
        return not self.terminated

    @property
    def human_fraction(self) -> float:
        """Share of frames on which a human controlled this agent."""
        return float(np.mean(self.user_types == HUMAN)) if self.num_steps else 0.0


@dataclass(frozen=True)
class Episode:
    """One CrowdPlay episode: metadata plus one `AgentTrajectory` per agent."""

    metadata: EpisodeMetadata
    step_iters: np.ndarray  # (N,) int64, 1-based frame counter
    agents: dict[str, AgentTrajectory]

    @property
    def episode_id(self) -> str:
        return self.metadata.episode_id

    @property
    def num_steps(self) -> int:
        return int(self.step_iters.shape[0])
