"""The two-player PettingZoo env: PettingZoo's API test, and replays of recorded two-player and
human + AI episodes that reproduce both players' processed observations and rewards."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from crowdplay_minari.parallel import parallel_env

AGENTS = ["game_0>player_0", "game_0>player_1"]


def test_passes_pettingzoos_parallel_api_test() -> None:
    import crowdplay_minari

    env = crowdplay_minari.parallel_env("space_invaders_2p", stack_n=1, downsample_frequency=4)
    assert env.possible_agents == AGENTS
    parallel_api_test(env, num_cycles=200)


@pytest.mark.parametrize(
    "dataset",
    ["crowdplay/space_invaders_2p/cooperative", "crowdplay/space_invaders_ai/competitive"],
)
def test_replaying_both_players_reproduces_the_loaders_arrays(converted_sample, dataset: str):
    from crowdplay_minari.loading import load_dataset

    root, _ = converted_sample
    task = dataset.rsplit("/", 1)[-1]
    ids = [f"{dataset}-player_0-v1", f"{dataset}-player_1-v1"]
    data = load_dataset(ids, root=root)
    options = {"stack_n": 2}  # every raw frame: each recorded key press is replayed
    replayed = 0
    for first in (e for e in data if e.agent_id == AGENTS[0]):
        second = first.partner(AGENTS[1])
        arrays = {
            AGENTS[0]: first.get_processed_trajectory(**options),
            AGENTS[1]: second.get_processed_trajectory(**options),
        }
        env = parallel_env(dataset.split("/")[1], task=task, noop_max=0, **options)
        observations, _ = env.reset(seed=0)
        steps = len(arrays[AGENTS[0]][1])
        for t in range(steps):
            for agent in AGENTS:
                expected = arrays[agent][0][t]
                np.testing.assert_array_equal(observations[agent], expected, f"{agent} {t}")
            actions = {a: int(arrays[a][1][t]) for a in AGENTS}
            observations, rewards, terminations, truncations, _ = env.step(actions)
            for agent in AGENTS:
                assert rewards[agent] == arrays[agent][2][t], f"{agent} reward at step {t}"
            replayed += 1
            if any(terminations.values()) or any(truncations.values()):
                assert t == steps - 1
                break
        assert replayed == steps
    assert replayed > 100


def test_one_player_games_and_misuse_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="one player"):
        parallel_env("breakout")
    with pytest.raises(TypeError, match="partner"):
        parallel_env("space_invaders_2p", partner="random")
    env = parallel_env("space_invaders_2p")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="missing"):
        env.step({AGENTS[0]: 0})
