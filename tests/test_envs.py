"""The evaluation environment against raw 60 Hz ALE recordings and the loader's processing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

import crowdplay_minari
from crowdplay_minari.emulator import CrowdPlayEmulator
from crowdplay_minari.envs import (
    EVAL_ENV_IDS,
    GAME_ROMS,
    CrowdPlayAtariEnv,
    collection_env_spec,
    eval_env_spec,
    rom_for_game,
)
from crowdplay_minari.processing import ProcessingConfig, process_trajectory

SEED = 7
HOLD_BLOCK = 4
"""The scripted player only changes its action at multiples of this many frames, so a recording
can be replayed with any action repeat dividing it."""

CONFIGS = {
    "default": ProcessingConfig(),
    "d3rlpy": ProcessingConfig.d3rlpy_preset(),
    "raw_rgb_k2": ProcessingConfig(
        warp=False, stack_n=2, skip_n=3, downsample_frequency=2, framestack_axis_first=True
    ),
    "scaled": ProcessingConfig(scale=True),
}


@dataclass
class Recording:
    """One episode played directly on ALE at 60 Hz, as CrowdPlay recorded people."""

    frames: np.ndarray  # frames[i]: the screen before actions[i]
    actions: np.ndarray  # minimal-action-set indices
    rewards: np.ndarray
    ram: np.ndarray  # after each frame
    lives: np.ndarray  # after each frame
    game_over: bool


def record(game: str, policy, max_frames: int, seed: int = SEED) -> Recording:
    """Play `policy` in CrowdPlay's emulator set-up, as CrowdPlay recorded participants."""
    emulator = CrowdPlayEmulator(game, seed=seed)
    emulator.reset()
    frames, actions, rewards, ram, lives = [], [], [], [], []
    while len(frames) < max_frames and not emulator.game_over():
        action = policy(len(frames))
        frames.append(emulator.screen())
        actions.append(action)
        rewards.append(emulator.act([action])[0])
        ram.append(emulator.ram())
        lives.append(emulator.lives()[0])
    return Recording(
        np.stack(frames),
        np.array(actions, dtype=np.int64),
        np.array(rewards, dtype=np.int64),
        np.stack(ram),
        np.array(lives),
        emulator.game_over(),
    )


def persistent_policy(seed: int, n_actions: int, fire_actions: list[int]):
    """Hold an action for 2..8 blocks of `HOLD_BLOCK` frames, firing most of the time."""
    rng = np.random.default_rng(seed)
    state = {"action": 0, "until": 0}

    def policy(frame: int) -> int:
        if frame >= state["until"]:
            pool = fire_actions if rng.random() < 0.7 else range(n_actions)
            state["action"] = int(rng.choice(list(pool)))
            state["until"] = frame + HOLD_BLOCK * int(rng.integers(2, 9))
        return state["action"]

    return policy


@pytest.fixture(scope="module")
def space_invaders_recording() -> Recording:
    # space_invaders minimal set: NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE
    recording = record("space_invaders", persistent_policy(0, 6, [1, 4, 5]), max_frames=900)
    assert not recording.game_over
    # Rewards must arrive inside action-repeat windows, or the reward sums test nothing.
    assert recording.rewards.sum() > 0
    assert (recording.rewards[np.arange(len(recording.rewards)) % 4 != 0] > 0).any()
    return recording


@pytest.fixture(scope="module")
def breakout_game_over() -> Recording:
    # Breakout ends when FIRE is held: each serve is missed (NOOP alone never serves).
    recording = record("breakout", lambda frame: 1, max_frames=5_000)
    assert recording.game_over
    assert len(recording.frames) % 4 != 0  # the last env step is cut short by the game over
    return recording


def replay(env: CrowdPlayAtariEnv, recording: Recording, config: ProcessingConfig):
    """Play the recording's actions at the kept frames; check every step against the loader."""
    k = config.downsample_frequency
    terminations = np.zeros(len(recording.frames), dtype=bool)
    terminations[-1] = recording.game_over
    processed = process_trajectory(
        recording.frames,
        recording.actions,
        recording.rewards,
        terminations,
        truncated=not recording.game_over,
        config=config,
    )
    np.testing.assert_array_equal(processed.frame_indices, np.arange(0, len(recording.frames), k))

    observation, info = env.reset(seed=SEED)
    assert info["frame_number"] == 0
    np.testing.assert_array_equal(observation, processed.observations[0])
    step_rewards, ends = [], []
    for j, action in enumerate(processed.actions):
        observation, reward, terminated, truncated, info = env.step(int(action))
        step_rewards.append(reward)
        ends.append((terminated, truncated))
        frame = info["frame_number"]
        assert frame == min((j + 1) * k, len(recording.frames))
        assert info["raw_reward_frames"] == frame - j * k
        np.testing.assert_array_equal(info["ram"], recording.ram[frame - 1])
        assert info["lives"] == recording.lives[frame - 1]
        if j + 1 < len(processed):
            np.testing.assert_array_equal(observation, processed.observations[j + 1])
    np.testing.assert_array_equal(np.array(step_rewards), processed.rewards)
    assert [terminated for terminated, _ in ends] == list(processed.terminals == 1)
    return ends


@pytest.mark.parametrize("name", ["default", "d3rlpy", "raw_rgb_k2"])
def test_env_observations_and_rewards_equal_the_loaders(
    name: str, space_invaders_recording: Recording
) -> None:
    config = CONFIGS[name]
    env = CrowdPlayAtariEnv("space_invaders", config, seed=SEED, noop_max=0)
    ends = replay(env, space_invaders_recording, config)
    assert not any(terminated or truncated for terminated, truncated in ends)


@pytest.mark.parametrize("name", ["default", "d3rlpy"])
def test_env_terminates_at_game_over_like_the_loader(
    name: str, breakout_game_over: Recording
) -> None:
    config = CONFIGS[name]
    env = CrowdPlayAtariEnv("breakout", config, seed=SEED, max_episode_frames=100_000, noop_max=0)
    ends = replay(env, breakout_game_over, config)
    assert ends[-1] == (True, False)
    assert not any(terminated or truncated for terminated, truncated in ends[:-1])
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_observation_space_matches_config(name: str) -> None:
    config = CONFIGS[name]
    env = CrowdPlayAtariEnv("space_invaders", config, seed=0)
    space = env.observation_space
    assert space.shape == config.observation_shape()
    assert space.dtype == config.observation_dtype()
    observation, _ = env.reset()
    for _ in range(20):
        observation, *_ = env.step(1)
    assert observation.shape == config.observation_shape()
    assert observation.dtype == config.observation_dtype()
    assert space.contains(observation)
    assert observation.max() > 0
    if config.scale:
        assert space.high.max() == 1.0 and observation.max() <= 1.0
    else:
        assert space.high.max() == 255


def test_expected_shapes() -> None:
    shapes = {
        name: CrowdPlayAtariEnv("breakout", config, seed=0).observation_space.shape
        for name, config in CONFIGS.items()
    }
    assert shapes == {
        "default": (84, 84, 4),
        "d3rlpy": (1, 84, 84),
        "raw_rgb_k2": (6, 210, 160),
        "scaled": (84, 84, 4),
    }


def test_reset_observation_is_the_first_screen_over_black_history() -> None:
    env = CrowdPlayAtariEnv("space_invaders", seed=0, render_mode="rgb_array", noop_max=0)
    observation, _ = env.reset()
    # Stack of 4: three black slots, then the first screen.
    assert (observation[..., :3] == 0).all()
    assert observation[..., 3].max() > 0
    assert env.render().shape == (210, 160, 3)


def test_gym_make_registered_id_with_processing_options() -> None:
    env = gym.make("CrowdPlay/SpaceInvaders-v0", stack_n=1, downsample_frequency=4)
    assert env.unwrapped.processing == ProcessingConfig(stack_n=1, downsample_frequency=4)
    assert env.observation_space.shape == (84, 84, 1)
    env.reset(seed=0)
    _, _, _, _, info = env.step(1)
    assert info["raw_reward_frames"] == 4  # after the protocol's no-op start of 4-frame steps
    assert info["frame_number"] == 4 * (info["noop_steps"] + 1)
    env.close()


@pytest.mark.parametrize("game", sorted(GAME_ROMS))
def test_every_game_matches_the_collection_env_actions(game: str) -> None:
    rom = rom_for_game(game)
    env = gym.make(EVAL_ENV_IDS[game])
    collection = gym.make(collection_env_spec(game))
    assert env.unwrapped.rom == rom
    assert env.action_space == collection.action_space
    assert env.unwrapped.get_action_meanings() == collection.unwrapped.get_action_meanings()


def test_collection_env_is_the_raw_60hz_game() -> None:
    collection = gym.make(collection_env_spec("space_invaders"))
    assert collection.action_space == gym.spaces.Discrete(6)
    assert collection.observation_space.shape == (210, 160, 3)
    eval_env = CrowdPlayAtariEnv("space_invaders", seed=0, render_mode="rgb_array", noop_max=0)
    screen, _ = collection.reset(seed=0)
    eval_env.reset()
    np.testing.assert_array_equal(screen, eval_env.render())
    rng = np.random.default_rng(0)
    for action in rng.integers(0, 6, size=120):
        screen, reward, *_ = collection.step(int(action))
        _, eval_reward, *_ = eval_env.step(int(action))
        np.testing.assert_array_equal(screen, eval_env.render())
        assert reward == eval_reward


def test_eval_env_spec_round_trips_through_json_in_a_fresh_process() -> None:
    config = ProcessingConfig.d3rlpy_preset(scale=True)
    spec = EnvSpec.from_json(eval_env_spec("space_invaders_2p", config).to_json())
    assert spec.kwargs["game"] == "space_invaders_2p"
    fields = set(ProcessingConfig.__dataclass_fields__)
    assert ProcessingConfig(**{k: v for k, v in spec.kwargs.items() if k in fields}) == config
    assert spec.kwargs["player"] == 0 and spec.max_episode_steps == 27_000

    env = gym.make(spec)
    assert env.unwrapped.processing == config
    assert env.observation_space.shape == (1, 84, 84)

    # A new interpreter that never imported crowdplay_minari: the string entry point suffices.
    script = (
        "import json, sys, gymnasium as gym\n"
        "from gymnasium.envs.registration import EnvSpec\n"
        "assert 'CrowdPlay/SpaceInvaders-v0' not in gym.registry\n"
        "env = gym.make(EnvSpec.from_json(sys.argv[1]))\n"
        "observation, info = env.reset(seed=0)\n"
        "print(json.dumps([list(observation.shape), str(observation.dtype),"
        " int(env.action_space.n), env.unwrapped.rom]))\n"
    )
    # Import the package under test, not some other installed copy of it.
    package_root = Path(crowdplay_minari.__file__).resolve().parent.parent
    python_path = os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script, spec.to_json()],
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout) == [[1, 84, 84], "float32", 6, "space_invaders"]


def test_same_seed_same_episode_and_reset_clears_history() -> None:
    def play(env: CrowdPlayAtariEnv, seed: int) -> tuple[list[np.ndarray], list[float]]:
        rng = np.random.default_rng(1)
        observation, _ = env.reset(seed=seed)
        observations, rewards = [observation], []
        for _ in range(250):
            observation, reward, *_ = env.step(int(rng.integers(0, env.action_space.n)))
            observations.append(observation)
            rewards.append(reward)
        return observations, rewards

    config = ProcessingConfig(downsample_frequency=4)
    first = CrowdPlayAtariEnv("space_invaders", config, seed=3)
    observations, rewards = play(first, 3)
    again_observations, again_rewards = play(first, 3)  # stale history would show here
    fresh_observations, fresh_rewards = play(CrowdPlayAtariEnv("space_invaders", config), 3)
    assert sum(rewards) > 0
    for other in (again_observations, fresh_observations):
        np.testing.assert_array_equal(np.stack(other), np.stack(observations))
    assert again_rewards == rewards == fresh_rewards


def test_truncates_at_max_episode_frames() -> None:
    env = CrowdPlayAtariEnv(
        "space_invaders",
        ProcessingConfig.d3rlpy_preset(),
        seed=0,
        max_episode_frames=50,
        noop_max=0,
    )
    env.reset()
    ends, raw_frames = [], []
    while not (ends and any(ends[-1])):
        _, _, terminated, truncated, info = env.step(0)
        ends.append((terminated, truncated))
        raw_frames.append(info["raw_reward_frames"])
    assert len(ends) == 13 and ends[-1] == (False, True)
    assert raw_frames == [4] * 12 + [2]
    assert info["frame_number"] == 50
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)
    _, info = env.reset()
    assert info["frame_number"] == 0
    env.step(0)  # a new episode can be played


def test_info_ram_is_a_copy() -> None:
    env = CrowdPlayAtariEnv("space_invaders", seed=0, noop_max=0)
    _, info = env.reset()
    assert info["ram"].shape == (128,) and info["ram"].dtype == np.uint8
    assert info["lives"] == 2  # CrowdPlay's emulator counts Space Invaders' lives 2 .. -1
    ram = env.ale.getRAM().copy()
    assert ram.any()
    info["ram"][:] = 0
    np.testing.assert_array_equal(env.ale.getRAM(), ram)
    _, _, _, _, info = env.step(0)
    np.testing.assert_array_equal(info["ram"], env.ale.getRAM())


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="stack_size"):
        CrowdPlayAtariEnv("space_invaders", stack_size=4)
    with pytest.raises(TypeError, match="not both"):
        CrowdPlayAtariEnv("space_invaders", ProcessingConfig(), stack_n=1)
    with pytest.raises(ValueError, match="stack_n"):
        CrowdPlayAtariEnv("space_invaders", stack_n=0)
    with pytest.raises(ValueError, match="unknown CrowdPlay game 'pong'"):
        CrowdPlayAtariEnv("pong")
    with pytest.raises(ValueError, match="unknown CrowdPlay game"):
        eval_env_spec("pong")
    with pytest.raises(ValueError, match="max_episode_frames"):
        CrowdPlayAtariEnv("space_invaders", max_episode_frames=0)
    with pytest.raises(ValueError, match="render_mode"):
        CrowdPlayAtariEnv("space_invaders", render_mode="human")
    with pytest.raises(ValueError, match="seed"):
        CrowdPlayAtariEnv("space_invaders", seed=-1)
    env = CrowdPlayAtariEnv("space_invaders", seed=0)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)
    env.reset()
    with pytest.raises(ValueError, match="action"):
        env.step(6)


def test_rom_for_game() -> None:
    assert rom_for_game("space_invaders_ai") == "space_invaders"
    assert rom_for_game("montezuma_revenge") == "montezuma_revenge"
    assert sorted(EVAL_ENV_IDS) == sorted(GAME_ROMS)
    assert all(env_id in gym.registry for env_id in EVAL_ENV_IDS.values())
