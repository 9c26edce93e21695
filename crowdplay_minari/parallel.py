"""CrowdPlay's two-player games as PettingZoo parallel environments.

`parallel_env("space_invaders_2p", task="cooperative", stack_n=1, downsample_frequency=4)` is
the game two people played in CrowdPlay (Space Invaders, ALE mode 33, CrowdPlay's emulator
set-up), with the loader's frame processing for each player and agents named as in the data:

    env = parallel_env("space_invaders_2p")
    observations, infos = env.reset(seed=0)
    actions = {agent: env.action_space(agent).sample() for agent in env.agents}
    observations, rewards, terminations, truncations, infos = env.step(actions)

Both players see the same screen, so both get the same observation. A step plays both actions
for `downsample_frequency` raw frames; rewards are each player's sum over them (in
`cooperative` games each player gets both players' rewards, as CrowdPlay's co-op wrapper gave
them). The episode ends for both players at game over (terminated) or after
`max_episode_frames` raw frames (truncated). Options are those of `CrowdPlayAtariEnv`; the
default evaluation protocol's no-op start (`noop_max`, 30) idles both players.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pettingzoo.utils.env import ParallelEnv

from .envs import CrowdPlayAtariEnv
from .games import game_info

__all__ = ["CrowdPlayParallelEnv", "parallel_env"]


class CrowdPlayParallelEnv(ParallelEnv):
    """Both players of a two-player CrowdPlay game (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "name": "crowdplay_parallel_v0", "render_fps": 60}

    def __init__(self, game: str = "space_invaders_2p", task: str | None = None, **options: Any):
        info = game_info(game)
        if not info.two_player:
            raise ValueError(
                f"{game} has one player: use CrowdPlayAtariEnv (gymnasium) for it; the "
                f"two-player games are space_invaders_2p and space_invaders_ai"
            )
        for name in ("player", "partner"):
            if name in options:
                raise TypeError(f"parallel_env takes no {name}=: every player is an agent")
        self._pending = 0
        self._game = CrowdPlayAtariEnv(
            game, player=0, partner=self._second_action, task=task, **options
        )
        self.possible_agents = list(info.agent_ids)
        self.agents: list[str] = []
        self.render_mode = self._game.render_mode
        self.observation_spaces = {a: self._game.observation_space for a in self.possible_agents}
        self.action_spaces = {a: self._game.action_space for a in self.possible_agents}

    def observation_space(self, agent: str):
        return self.observation_spaces[agent]

    def action_space(self, agent: str):
        return self.action_spaces[agent]

    def reset(self, seed: int | None = None, options: dict | None = None):
        self._pending = 0
        observation, info = self._game.reset(seed=seed, options=options)
        self.agents = list(self.possible_agents)
        return (
            {a: observation.copy() for a in self.agents},
            self._agent_infos(info, self.agents),
        )

    def step(self, actions: dict[str, Any]):
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"step needs an action for every agent; missing {', '.join(missing)}")
        first, second = (int(actions[a]) for a in self.possible_agents)
        if not self._game.action_space.contains(second):
            raise ValueError(
                f"action of {self.possible_agents[1]} must be an int in "
                f"[0, {self._game.action_space.n}), got {actions[self.possible_agents[1]]!r}"
            )
        self._pending = second
        observation, _, terminated, truncated, info = self._game.step(first)
        rewards = self._game.step_rewards
        agents = self.agents
        if terminated or truncated:
            self.agents = []
        return (
            {a: observation.copy() for a in agents},
            {a: float(rewards[p]) for p, a in enumerate(agents)},
            {a: bool(terminated) for a in agents},
            {a: bool(truncated) for a in agents},
            self._agent_infos(info, agents),
        )

    def render(self) -> np.ndarray | None:
        return self._game.render()

    def close(self) -> None:
        self._game.close()

    def _second_action(self, observation: np.ndarray, info: dict[str, Any]) -> int:
        return self._pending

    def _agent_infos(self, info: dict[str, Any], agents: list[str]) -> dict[str, dict[str, Any]]:
        lives = self._game.emulator.lives()
        return {a: {**info, "lives": lives[p]} for p, a in enumerate(agents)}


def parallel_env(
    game: str = "space_invaders_2p", task: str | None = None, **options: Any
) -> CrowdPlayParallelEnv:
    """A PettingZoo `ParallelEnv` of a two-player CrowdPlay game (see the module docstring)."""
    return CrowdPlayParallelEnv(game, task, **options)
