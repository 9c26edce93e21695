"""Playing a trained policy in the evaluation environment: d3rlpy-style frame stacking
(`FrameStack`) and `play_episodes`, which also measures task adherence."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class FrameStack:
    """The last `n_frames` observations, oldest first, zeros before the episode's first one:
    the input d3rlpy's `FrameStackTransitionPicker` builds from a buffer during training.

        stack = FrameStack(4, (1, 84, 84))
        x = stack.reset(observation)   # (4, 84, 84): three zero frames, then `observation`
        x = stack.push(next_observation)
    """

    def __init__(self, n_frames: int, observation_shape: tuple[int, ...], dtype=np.uint8):
        self.channels = observation_shape[0]
        self.frames = np.zeros((n_frames * self.channels, *observation_shape[1:]), dtype=dtype)

    def reset(self, observation: np.ndarray) -> np.ndarray:
        self.frames[:] = 0
        return self.push(observation)

    def push(self, observation: np.ndarray) -> np.ndarray:
        c = self.channels
        self.frames[:-c] = self.frames[c:]
        self.frames[-c:] = observation
        return self.frames


def play_episodes(
    algo,
    game: str,
    task: str | None,
    *,
    player: int = 0,
    n_frames: int,
    episodes: int,
    max_frames: int,
    noop_max: int,
    seed: int,
    stream: int = 0,
) -> list[dict[str, Any]]:
    """Play `episodes` greedy episodes of `algo` in `CrowdPlayAtariEnv` (d3rlpy preset), as
    `player` of two-player games (its partner idle).

    Episode `i` resets ALE with a seed from `(seed, stream, i)` and starts with that many
    random NOOP steps (0..`noop_max`); `stream` separates the final evaluation (0) from the
    per-epoch ones (1), so every algorithm meets the same starts for the same seed.
    """
    from crowdplay_minari.envs import CrowdPlayAtariEnv
    from crowdplay_minari.games import task_adherence_key
    from crowdplay_minari.processing import ProcessingConfig
    from crowdplay_minari.statistics import running_statistics

    processing = ProcessingConfig.d3rlpy_preset()
    # The runner draws its own no-op starts (logged per episode), so the env adds none.
    env = CrowdPlayAtariEnv(
        game,
        processing,
        player=player,
        task=task,
        max_episode_frames=max_frames,
        seed=0,
        noop_max=0,
    )
    stack = FrameStack(n_frames, processing.observation_shape())
    adherence_key = task_adherence_key(game, task) if task else None
    results = []
    for i in range(episodes):
        rng = np.random.default_rng([seed, stream, i])
        ale_seed = int(rng.integers(0, 2**31 - 1))
        noops = int(rng.integers(0, noop_max + 1))
        observation, info = env.reset(seed=ale_seed)
        x = stack.reset(observation)
        rewards, actions, ram = [], [], []
        started = time.perf_counter()
        terminated = truncated = False
        while not (terminated or truncated):
            # minimal action sets start with NOOP
            action = 0 if len(actions) < noops else int(algo.predict(x[None])[0])
            observation, reward, terminated, truncated, info = env.step(action)
            x = stack.push(observation)
            rewards.append(float(reward))
            actions.append(action)
            ram.append(info["ram"])
        adherence = None
        if adherence_key is not None:
            stats = running_statistics(
                game, task, np.asarray(rewards), np.asarray(actions), np.asarray(ram)
            )
            if adherence_key in stats:
                adherence = float(stats[adherence_key][-1])
        results.append(
            {
                "episode": i,
                "ale_seed": ale_seed,
                "noop_steps": noops,
                "return": float(np.sum(rewards)),
                "agent_steps": len(actions),
                "frames": int(info["frame_number"]),
                "terminated": bool(terminated),
                "truncated": bool(truncated),
                "task_adherence": adherence,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    env.close()
    return results
