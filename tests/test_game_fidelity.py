"""The datasets' environments are the game the humans played, and behave like standard envs.

Every converted dataset of the emulator-made sample is replayed through plain Minari's
`recover_environment()`: its actions (and, in two-player games, the partner's recorded actions)
must reproduce every recorded observation and reward exactly. The evaluation env must do the
same for the loader's processed observations, pass gymnasium's checker, pickle, and give
different starts to different seeds under the default protocol.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from crowdplay_minari.envs import CrowdPlayAtariEnv, collection_env_spec
from crowdplay_minari.games import GAMES, game_info
from crowdplay_minari.processing import ProcessingConfig

EPISODES_PER_DATASET = 2


def _datasets(root) -> list[str]:
    return sorted(
        str(path.parent.parent.relative_to(root))
        for path in root.glob("crowdplay/*/*/data/main_data.hdf5")
    )


def _episode_ids(dataset) -> list[str]:
    metadata = dataset.storage.get_episode_metadata(range(dataset.total_episodes))
    return [str(m["crowdplay_episode_id"]) for m in metadata]


def _partner_actions(root, dataset_id: str) -> dict[str, np.ndarray]:
    """crowdplay_episode_id -> the other player's recorded actions, from its own dataset."""
    import minari

    own = dataset_id.rsplit("-", 2)
    other = "player_1" if own[1] == "player_0" else "player_0"
    partner = minari.load_dataset(f"{own[0]}-{other}-{own[2]}")
    ids = _episode_ids(partner)
    return {ids[e.id]: np.asarray(e.actions) for e in partner.iterate_episodes()}


@pytest.mark.slow
def test_replaying_every_dataset_reproduces_its_frames_and_rewards(converted_sample, monkeypatch):
    import minari

    root, _ = converted_sample
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    dataset_ids = _datasets(root)
    assert len(dataset_ids) >= 9 and any("space_invaders_2p" in d for d in dataset_ids)
    frames = 0
    for dataset_id in dataset_ids:
        dataset = minari.load_dataset(dataset_id)
        two_player = "/space_invaders_2p/" in dataset_id or "/space_invaders_ai/" in dataset_id
        partners = _partner_actions(root, dataset_id) if two_player else {}
        ids = _episode_ids(dataset)
        for episode in dataset.iterate_episodes(range(min(EPISODES_PER_DATASET, len(ids)))):
            options = {"partner": partners[ids[episode.id]]} if two_player else {}
            env = dataset.recover_environment(**options)
            observation, _ = env.reset(seed=episode.id)
            np.testing.assert_array_equal(observation, episode.observations[0], err_msg=dataset_id)
            n = len(episode.actions)
            for t in range(n):
                observation, reward, terminated, truncated, info = env.step(int(episode.actions[t]))
                where = f"{dataset_id} episode {episode.id} step {t}"
                # infos[t + 1] goes with observations[t + 1]: the state after step t
                np.testing.assert_array_equal(info["ram"], episode.infos["ram"][t + 1], where)
                assert info["lives"] == episode.infos["lives"][t + 1], where
                if t + 1 < n:  # observation n repeats n-1: CrowdPlay stores no final screen
                    np.testing.assert_array_equal(
                        observation, episode.observations[t + 1], err_msg=where
                    )
                assert reward == episode.rewards[t], where
            assert terminated == bool(episode.terminations[-1]), dataset_id
            frames += n
            env.close()
    assert frames > 5_000


def test_eval_env_replays_the_loaders_processed_observations(converted_sample, monkeypatch):
    from crowdplay_minari.loading import load_dataset

    root, _ = converted_sample
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    import minari

    dataset_id = "crowdplay/space_invaders/insideout-player_0-v1"
    plain = minari.load_dataset(dataset_id)
    options = {"downsample_frequency": 1, "stack_n": 1}
    env = plain.recover_environment(eval_env=True, noop_max=0, **options)
    episode = next(iter(load_dataset(dataset_id, root=root)))
    observations, actions, rewards, _ = episode.get_processed_trajectory(**options)
    observation, _ = env.reset(seed=0)
    np.testing.assert_array_equal(observation, observations[0])
    for t in range(len(actions) - 1):
        observation, reward, *_ = env.step(int(actions[t]))
        np.testing.assert_array_equal(observation, observations[t + 1], err_msg=f"step {t}")
        assert reward == rewards[t]


@pytest.mark.parametrize(
    "game, options",
    [("breakout", {}), ("space_invaders_2p", {"player": 1, "partner": "random"})],
)
def test_eval_env_passes_gymnasiums_checker_and_pickles(game: str, options: dict) -> None:
    config = ProcessingConfig.d3rlpy_preset()
    env = CrowdPlayAtariEnv(game, config, **options)
    check_env(env, skip_render_check=True)
    copy = pickle.loads(pickle.dumps(env))
    first, _ = env.reset(seed=5)
    again, _ = copy.reset(seed=5)
    np.testing.assert_array_equal(first, again)
    for _ in range(30):
        a, ra, *_ = env.step(1)
        b, rb, *_ = copy.step(1)
        np.testing.assert_array_equal(a, b)
        assert ra == rb


def _play(env: gym.Env, seed: int, steps: int = 60, action: int = 1) -> np.ndarray:
    observation, _ = env.reset(seed=seed)
    observations = [observation]
    for _ in range(steps):
        observation, *_ = env.step(action)
        observations.append(observation)
    return np.stack(observations)


def test_default_protocol_gives_seeds_different_starts_and_one_seed_one_start() -> None:
    env = gym.make("crowdplay_minari.envs:CrowdPlay/SpaceInvaders-v0", downsample_frequency=4)
    runs = [_play(env, seed) for seed in range(5)]
    distinct = {run.tobytes() for run in runs}
    assert len(distinct) >= 3  # 0..30 no-op steps: five seeds rarely share a start
    np.testing.assert_array_equal(_play(env, 3), runs[3])
    assert env.spec.max_episode_steps == 108_000
    replay = CrowdPlayAtariEnv("space_invaders", downsample_frequency=4, noop_max=0)
    assert len({_play(replay, seed).tobytes() for seed in range(3)}) == 1


def test_sticky_actions_repeat_the_previous_frames_action() -> None:
    """With probability 1 every frame repeats the last one's action: the game start's NOOP."""

    def env(**options) -> CrowdPlayAtariEnv:
        return CrowdPlayAtariEnv("space_invaders", downsample_frequency=4, noop_max=0, **options)

    moved = _play(env(repeat_action_probability=1.0), 0, action=4)  # RIGHTFIRE, stuck on NOOP
    np.testing.assert_array_equal(moved, _play(env(), 0, action=0))
    assert not np.array_equal(moved, _play(env(), 0, action=4))

    def zigzag(seed: int) -> np.ndarray:  # RIGHTFIRE / LEFTFIRE in turn: stickiness shows
        sticky = env(repeat_action_probability=0.5)
        sticky.reset(seed=seed)
        return np.stack([sticky.step(4 + (t // 3) % 2)[0] for t in range(90)])

    assert not np.array_equal(zigzag(0), zigzag(1))  # the env's seeded generator decides
    np.testing.assert_array_equal(zigzag(0), zigzag(0))


def test_two_player_partners_and_shared_reward() -> None:
    calls = []

    def partner(observation: np.ndarray, info: dict) -> int:
        calls.append(observation.shape)
        return 1  # FIRE

    env = CrowdPlayAtariEnv("space_invaders_2p", player=0, partner=partner, noop_max=0)
    env.reset(seed=0)
    for _ in range(10):
        env.step(0)
    assert calls and calls[0] == env.observation_space.shape
    # Co-operative games give each player both players' rewards, as CrowdPlay's co-op wrapper
    # did: the same game (same actions, same random partner) pays at least as much every step.
    rewards = {}
    for task in (None, "cooperative"):
        env = CrowdPlayAtariEnv("space_invaders_2p", partner="random", task=task, noop_max=0)
        env.reset(seed=1)
        rewards[task] = np.array([env.step(int(a))[1] for a in np.tile([1, 4, 5], 300)])
    assert (rewards["cooperative"] >= rewards[None]).all()
    assert rewards["cooperative"].sum() > rewards[None].sum() > 0
    with pytest.raises(ValueError, match="partner"):
        CrowdPlayAtariEnv("breakout", partner="random")
    with pytest.raises(ValueError, match="player"):
        CrowdPlayAtariEnv("breakout", player=1)


def _crowdplays_own_recording(game: str, actions: np.ndarray, seed: int) -> np.ndarray:
    """Screens of `actions` played the way CrowdPlay's `MultiAgentAtariGame` played them,
    spelled out call by call on `multi_agent_ale_py` (an independent reference for the env)."""
    import multi_agent_ale_py
    from ale_py import roms

    info = game_info(game)
    multi_agent_ale_py.ALEInterface.setLoggerMode("error")
    ale = multi_agent_ale_py.ALEInterface()
    ale.setFloat(b"repeat_action_probability", 0.0)
    path = str(roms.get_rom_path(info.rom))
    ale.loadROM(path)
    mode = ale.getAvailableModes(info.players)[0]
    ale.setMode(mode)
    ale.setInt(b"random_seed", seed)  # MultiAgentAtariGame.seed()
    ale.loadROM(path)
    ale.setMode(mode)
    ale.reset_game()  # MultiAgentAtariGame.reset()
    minimal = ale.getMinimalActionSet()
    screens = [ale.getScreenRGB()]
    for action in actions:
        ale.act(minimal[np.array([action] * info.players)])
        screens.append(ale.getScreenRGB())
    return np.stack(screens)


def _ale_py_recording(rom: str, actions: np.ndarray, seed: int) -> np.ndarray:
    import ale_py
    from ale_py import roms

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(str(roms.get_rom_path(rom)))
    ale.reset_game()
    minimal = ale.getMinimalActionSet()
    screens = [ale.getScreenRGB()]
    for action in actions:
        ale.act(minimal[action])
        screens.append(ale.getScreenRGB())
    return np.stack(screens)


@pytest.mark.parametrize("game", sorted(GAMES))
def test_collection_env_is_crowdplays_emulator_set_up(game: str) -> None:
    n_actions = game_info(game).num_actions
    actions = np.repeat(np.random.default_rng(0).integers(0, n_actions, 40), 8)
    reference = _crowdplays_own_recording(game, actions, seed=11)
    options = {"partner": actions} if game_info(game).two_player else {}
    env = gym.make(collection_env_spec(game), **options)
    observation, _ = env.reset(seed=11)
    screens = [observation]
    for action in actions:
        observation, *_ = env.step(int(action))
        screens.append(observation)
    np.testing.assert_array_equal(np.stack(screens), reference)


def test_ale_pys_own_set_up_is_another_game() -> None:
    """Why the emulator matters: ale-py's interface shows other screens for the same actions
    (the reference above would catch an env built on it)."""
    actions = np.repeat(np.random.default_rng(0).integers(0, 6, 40), 8)
    crowdplay = _crowdplays_own_recording("space_invaders", actions, seed=11)
    ale_py_screens = _ale_py_recording("space_invaders", actions, seed=11)
    same = (crowdplay == ale_py_screens).all(axis=(1, 2, 3))
    assert same.mean() < 0.5


@pytest.mark.parametrize(
    "dataset_id",
    [
        "crowdplay/riverraid/plain-player_0-v1",
        "crowdplay/space_invaders_2p/cooperative-player_1-v1",
    ],
)
def test_d3rlpys_own_minari_loader_reads_our_datasets(converted_sample, monkeypatch, dataset_id):
    """`d3rlpy.datasets.get_minari` needs `max_episode_steps` and an env for every dataset."""
    import d3rlpy
    import minari

    root, _ = converted_sample
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    dataset, env = d3rlpy.datasets.get_minari(dataset_id)
    steps = sum(len(e.actions) for e in minari.load_dataset(dataset_id).iterate_episodes())
    assert dataset.transition_count >= steps - len(dataset.episodes)
    assert env.spec.max_episode_steps == 108_000
    observation, _ = env.reset(seed=0)
    assert observation.shape == (210, 160, 3)
