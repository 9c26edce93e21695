"""How CrowdPlay episodes map onto Minari datasets: ids, spaces, episode content, metadata.

Dataset ids: `<namespace>/<game>/<task>-<player>-v1`, e.g. `crowdplay/space_invaders/insideout-
player_0-v1` and `crowdplay/space_invaders_2p/cooperative-player_1-v1`: one dataset per game, task
and agent, so a plain Minari user gets homogeneous behaviour. The recruitment source and every
statistic are episode attributes. Every episode keeps CrowdPlay's `episode_id`, which links the two
players of one game across datasets.

Episode content (one Minari episode per CrowdPlay episode and agent, N raw 60 Hz steps):
- `observations` (N+1, 210, 160, 3) uint8 RGB, lossless. CrowdPlay does not store the screen after
  the last step, so observation N repeats observation N-1 (attribute `final_observation` =
  `"repeat_last"`).
- `actions` (N,) int64 minimal-action-set index; `rewards` (N,) float64, unclipped;
  `terminations` true on the last step iff the game was over; `truncations` true on the last step
  iff the session stopped first.
- `infos` (N+1 entries in Minari's convention: `infos[t]` goes with `observations[t]`, so entry
  t + 1 is what CrowdPlay recorded with step t; entry 0, the state at reset, was never recorded
  and repeats entry 1 with `recorded` false): `ram` (128 uint8, the RAM after step t, i.e. the
  state shown in observation t + 1), `lives`, `user_type` (1 human, 2 AI), `action_step_iter`,
  `step_iter`, `recorded`, `statistics/<name>` and `task_statistics/<name>` (CrowdPlay's running
  episode / task statistics, float64, timedeltas in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from crowdplay_minari import __version__
from crowdplay_minari.episode import FRAME_SHAPE, player_index, player_name
from crowdplay_minari.games import TWO_PLAYER_GAMES, game_info, num_actions

DEFAULT_NAMESPACE = "crowdplay"
DATASET_VERSION = 1
"""1: env specs run CrowdPlay's emulator set-up (multi-agent-ale-py), two-player ones too."""
FINAL_OBSERVATION = "repeat_last"
CODE_PERMALINK = "https://github.com/Farama-Foundation/CrowdPlay"
"""The source repository of the code that recorded the data (CrowdPlay, now kept by Farama);
the converter's name and version are in each dataset's description."""
AUTHORS = ["Matthias Gerstgrasser", "Rakshit Trivedi", "David C. Parkes"]
"""CrowdPlay's authors (ICLR 2022). No `author_email`: none is published for the dataset, and
Minari takes its absence rather than an address that is not one."""
REQUIREMENTS = [
    "hdf5plugin>=5",
    "pillow>=10",
    "ale-py==0.10.2",
    "multi-agent-ale-py==0.1.12",
    "gymnasium==1.0.0",
]
"""What a plain reader installs besides `minari[hdf5]`: `hdf5plugin` decodes the zstd arrays,
`pillow` is imported by Minari's HDF5 storage without being declared; the environments (entry point
`crowdplay_minari.envs`) also need this package itself."""
PORTABLE_REQUIREMENTS = [r for r in REQUIREMENTS if not r.startswith("hdf5plugin")]
"""A portable dataset (deflate, HDF5's own filter) needs nothing but `minari[hdf5]` to read."""
_ZSTD_STORAGE = "RGB observations stored losslessly (zstd via hdf5plugin)"
_ZSTD_READING = "Read with minari[hdf5] after `import hdf5plugin` (zstd)"
_PORTABLE_STORAGE = (
    "RGB observations stored losslessly (deflate and Fletcher-32, HDF5's built-in filters)"
)
_PORTABLE_READING = "Read with plain minari[hdf5]; no HDF5 plugin needed"


def portable_description(description: str) -> str:
    """A dataset's description, saying how its portable copy is stored and read."""
    return description.replace(_ZSTD_STORAGE, _PORTABLE_STORAGE).replace(
        _ZSTD_READING, _PORTABLE_READING
    )


def dataset_id(namespace: str, game: str, task: str, agent_id: str) -> str:
    """`crowdplay/space_invaders/insideout-player_0-v1`."""
    return f"{namespace}/{game}/{task}-{player_name(agent_id)}-v{DATASET_VERSION}"


@dataclass(frozen=True)
class DatasetKey:
    """What a dataset holds: one game, task and agent."""

    namespace: str
    game: str
    task: str
    agent_id: str

    @property
    def dataset_id(self) -> str:
        return dataset_id(self.namespace, self.game, self.task, self.agent_id)


def observation_space() -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, FRAME_SHAPE, dtype=np.uint8)


def action_space(game: str) -> gym.spaces.Discrete:
    return gym.spaces.Discrete(num_actions(game))


def description(key: DatasetKey) -> str:
    two_player = key.game in TWO_PLAYER_GAMES
    return (
        f"Human Atari demonstrations from CrowdPlay (crowdplay_atari-v0): game {key.game}, task "
        f"{key.task}, agent {key.agent_id}. Raw 60 Hz frames, no frame skip, no sticky actions, "
        f"minimal action set; {_ZSTD_STORAGE}. "
        "CrowdPlay stores no screen after the last step: the final (N+1-th) observation repeats "
        "the N-th (episode attribute final_observation='repeat_last'). Episode attributes hold "
        "every CrowdPlay metadata value (source, statistics, environment data, participant id); "
        "crowdplay_episode_id links both players of one game. Per-step infos (infos[t] goes "
        "with observations[t]; infos[0] is not recorded): RAM, lives, "
        "user_type (1 human, 2 AI), action_step_iter, step_iter, running statistics. "
        "ref_min_score / ref_max_score are the standard random / human Atari references "
        "(Mnih et al. 2015). " + f"{_ZSTD_READING}. env_spec is the raw "
        "collection env (CrowdPlay's multi-agent-ale-py set-up, frameskip 1); eval_env_spec is "
        "the crowdplay_minari evaluation env with the loader's frame processing"
        + (
            "; this agent plays the two-player game, its partner given as partner= to gym.make."
            if two_player
            else "."
        )
        + f" Converted by crowdplay-minari {__version__}."
    )


def dataset_metadata(key: DatasetKey, portable: bool = False) -> dict:
    """Minari metadata fields beyond what `MinariStorage.new` writes."""
    from crowdplay_minari.envs import eval_env_spec

    info = game_info(key.game)
    return {
        "dataset_id": key.dataset_id,
        "algorithm_name": "human",
        "author": set(AUTHORS),
        "code_permalink": CODE_PERMALINK,
        "description": portable_description(description(key)) if portable else description(key),
        "minari_version": _minari_version(),
        "eval_env_spec": eval_env_spec(
            key.game, player=player_index(key.agent_id), task=key.task
        ).to_json(),
        "ref_min_score": info.random_score,
        "ref_max_score": info.human_score,
        "num_episodes_average_score": 0,
        "requirements": PORTABLE_REQUIREMENTS if portable else REQUIREMENTS,
    }


def collection_env_spec(game: str, agent_id: str, task: str):
    """The raw collection env of `agent_id` in `game` (the agent's view of two-player games)."""
    from crowdplay_minari.envs import collection_env_spec as spec

    return spec(game, player=player_index(agent_id), task=task)


def _minari_version() -> str:
    import minari

    return minari.__version__
