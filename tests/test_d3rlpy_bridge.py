"""Tests for `crowdplay_minari.d3rlpy_bridge`: processed CrowdPlay episodes in a d3rlpy buffer.

Three converted episodes of the raw sample (riverraid, ended by game over; two Space Invaders
episodes, stopped by the session, one of them short) go into d3rlpy 2.8 replay buffers; every
d3rlpy episode must be exactly its CrowdPlay episode's processed steps, with nothing shifted
from one episode into the next (the bug of `d3rlpy.datasets.get_minari`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from crowdplay_minari.conversion.convert import ConversionConfig, convert
from crowdplay_minari.d3rlpy_bridge import kept_frames, split_episodes, to_arrays, to_replay_buffer
from crowdplay_minari.games import num_actions
from crowdplay_minari.loading import CACHE_ENV, CrowdPlayDataset, load_dataset
from crowdplay_minari.processing import ProcessingConfig
from crowdplay_minari.raw import RawDataset

d3rlpy = pytest.importorskip("d3rlpy")

N_FRAMES = 4
PRESET = ProcessingConfig.d3rlpy_preset()


@pytest.fixture(scope="module")
def converted_root(tmp_path_factory: pytest.TempPathFactory, raw_sample_bz2: Path) -> Path:
    """The riverraid and Space Invaders plain episodes of the raw sample, converted once."""
    raw = RawDataset(raw_sample_bz2)
    chosen = tuple(
        episode_id
        for episode_id, meta in raw.metadata().items()
        if meta.game == "riverraid" or (meta.game == "space_invaders" and meta.task == "plain")
    )
    assert len(chosen) == 3
    root = tmp_path_factory.mktemp("d3rlpy_minari")
    report = convert(  # leaves MINARI_DATASETS_PATH as it found it
        ConversionConfig(raw_sample_bz2, root=root, workers=2, episode_ids=chosen, progress=False),
        log=lambda message: None,
    )
    assert report.ok and report.episodes_converted == 3, report
    return root


@pytest.fixture
def data(converted_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CrowdPlayDataset:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(converted_root))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "processed-cache"))
    data = load_dataset("crowdplay")
    # riverraid first: the game-over episode then sits before the others in the buffer
    data.episodes.sort(key=lambda e: (e.game != "riverraid", -e.num_steps))
    assert [(e.game, e.num_steps, e.metadata["ended_by"]) for e in data] == [
        ("riverraid", 932, "game_over"),
        ("space_invaders", 1000, "session_stopped"),
        ("space_invaders", 666, "session_stopped"),
    ]
    return data


def _stacked(frames: np.ndarray, index: int, n_frames: int = N_FRAMES) -> np.ndarray:
    """`frames[index - n_frames + 1 .. index]` on the first axis, zeros before the start."""
    slots = [
        frames[i, 0] if i >= 0 else np.zeros_like(frames[0, 0])
        for i in range(index - n_frames + 1, index + 1)
    ]
    return np.stack(slots)


def test_kept_frames_counts_what_processing_keeps(data: CrowdPlayDataset) -> None:
    short = data[2]
    for compat in (False, True):
        for frequency in (1, 3, 4, 5):
            for offset in range(frequency):
                config = ProcessingConfig.d3rlpy_preset(
                    downsample_frequency=frequency,
                    downsample_offset=offset,
                    crowdplay_compat=compat,
                )
                expected = len(short.process(config, cache=False))
                assert kept_frames(short.num_steps, config) == expected, config
    assert kept_frames(3, ProcessingConfig.d3rlpy_preset(downsample_offset=3)) == 0
    # compat's quirk: an episode no longer than the frequency keeps its last frame too
    assert kept_frames(3, ProcessingConfig.d3rlpy_preset(crowdplay_compat=True)) == 2


def test_replay_buffer_episodes_equal_processed_episodes(data: CrowdPlayDataset) -> None:
    buffer = to_replay_buffer(data, PRESET, n_frames=N_FRAMES, mixed_action_sets=True)
    assert len(buffer.episodes) == len(data) == 3
    assert buffer.dataset_info.action_size == max(num_actions(e.game) for e in data) == 18
    for episode, d3_episode in zip(data, buffer.episodes, strict=True):
        processed = episode.process(PRESET)
        assert d3_episode.size() == len(processed) == kept_frames(episode.num_steps, PRESET)
        assert len(processed) == len(range(0, episode.num_steps, 4))
        assert d3_episode.observations.shape == (len(processed), 1, 84, 84)
        assert d3_episode.observations.dtype == np.uint8
        # no shift: the first and every later step are this episode's own
        assert np.array_equal(d3_episode.observations, processed.observations)
        assert np.array_equal(d3_episode.actions[:, 0], processed.actions)
        assert np.array_equal(d3_episode.rewards[:, 0], processed.rewards.astype(np.float32))
        game_over = episode.metadata["ended_by"] == "game_over"
        assert d3_episode.terminated == game_over
        assert d3_episode.transition_count == len(processed) - (0 if game_over else 1)
    assert buffer.transition_count == sum(e.transition_count for e in buffer.episodes)
    # the game-over episode scored and its last step is the terminal one
    assert buffer.episodes[0].rewards.sum() == data[0].score


def test_frame_stacked_transitions(data: CrowdPlayDataset) -> None:
    buffer = to_replay_buffer(data, PRESET, n_frames=N_FRAMES, mixed_action_sets=True)
    picker = buffer.transition_picker
    for episode, d3_episode in zip(data, buffer.episodes, strict=True):
        frames = episode.process(PRESET).observations
        # a stopped episode's last step has no next observation, so it is no transition
        last = d3_episode.transition_count - 1
        assert last == len(frames) - (1 if d3_episode.terminated else 2)
        for index in (0, 1, 2, 3, 4, last // 2, last - 1, last):
            transition = picker(d3_episode, index)
            assert transition.observation.shape == (N_FRAMES, 84, 84)
            assert np.array_equal(transition.observation, _stacked(frames, index)), index
            assert transition.action[0] == episode.process(PRESET).actions[index]
            if index + 1 < len(frames):
                assert np.array_equal(transition.next_observation, _stacked(frames, index + 1))
        assert np.count_nonzero(picker(d3_episode, 0).observation[:-1]) == 0  # zeros before
        assert np.count_nonzero(picker(d3_episode, 0).observation[-1]) > 0
        assert picker(d3_episode, last).terminal == float(d3_episode.terminated)
        if d3_episode.terminated:  # game over: nothing after the last frame
            assert np.count_nonzero(picker(d3_episode, last).next_observation) == 0
    batch = buffer.sample_transition_batch(32)
    assert batch.observations.shape == (32, N_FRAMES, 84, 84)
    # d3rlpy's mini-batches are float32, the stored pixels unscaled
    assert batch.observations.max() <= 255 and np.all(batch.observations % 1 == 0)
    trajectories = buffer.sample_trajectory_batch(2, length=8)
    assert trajectories.observations.shape == (2, 8, N_FRAMES, 84, 84)


def test_prestacked_observations_without_d3rlpy_stacking(data: CrowdPlayDataset) -> None:
    config = ProcessingConfig(framestack_axis_first=True, downsample_frequency=4)
    buffer = to_replay_buffer(data, config, n_frames=1, mixed_action_sets=True)
    assert buffer.sample_transition().observation.shape == (4, 84, 84)
    for episode, d3_episode in zip(data, buffer.episodes, strict=True):
        assert np.array_equal(d3_episode.observations, episode.process(config).observations)
    with pytest.raises(ValueError, match="stack_n=1"):
        to_replay_buffer(data, config, n_frames=4, mixed_action_sets=True)
    with pytest.raises(ValueError, match="no episodes"):
        to_replay_buffer([], PRESET)
    # riverraid's action 3 is another key than Space Invaders' action 3: not mixed unasked
    with pytest.raises(ValueError, match="different action sets \\(riverraid, space_invaders\\)"):
        to_replay_buffer(data, PRESET)
    one_game = [e for e in data if e.game == "space_invaders"]
    assert to_replay_buffer(one_game, PRESET).transition_count > 0


@pytest.mark.parametrize("offset", [0, 3])
def test_compat_mode_still_ends_every_episode_once(data: CrowdPlayDataset, offset: int) -> None:
    config = ProcessingConfig.d3rlpy_preset(downsample_offset=offset, crowdplay_compat=True)
    arrays = to_arrays(data, config)
    ends = np.flatnonzero(arrays["terminals"] + arrays["timeouts"])
    lengths = [kept_frames(e.num_steps, config) for e in data]
    assert ends.tolist() == (np.cumsum(lengths) - 1).tolist()
    assert not np.any(arrays["terminals"] * arrays["timeouts"])
    buffer = to_replay_buffer(data, config, n_frames=N_FRAMES, mixed_action_sets=True)
    assert [e.size() for e in buffer.episodes] == lengths
    # riverraid's game-over frame (931) is on phase 3: kept by offset 3, dropped by offset 0
    # (then the episode still ends there, as a timeout)
    assert buffer.episodes[0].terminated == (offset == 3)
    assert not buffer.episodes[1].terminated and not buffer.episodes[2].terminated
    for episode, d3_episode in zip(data, buffer.episodes, strict=True):
        observations, actions, rewards, _ = episode.get_processed_trajectory(
            framestack_axis_first=True,
            downsample_frequency=4,
            downsample_offset=offset,
            stack_n=1,
            crowdplay_compat=True,
        )
        assert np.array_equal(d3_episode.observations, observations)
        assert np.array_equal(d3_episode.actions[:, 0], actions)
        assert np.array_equal(d3_episode.rewards[:, 0], rewards.astype(np.float32))


def test_to_arrays_allocates_observations_once(data: CrowdPlayDataset) -> None:
    arrays = to_arrays(data, PRESET)
    processed = [e.process(PRESET) for e in data]
    frames_bytes = sum(p.observations.nbytes for p in processed)
    observations = arrays["observations"]
    owner = observations if observations.base is None else observations.base
    assert owner.base is None and owner.nbytes == frames_bytes == observations.nbytes
    assert np.array_equal(observations, np.concatenate([p.observations for p in processed]))
    for key, dtype in (
        ("actions", np.int64),
        ("rewards", np.float32),
        ("terminals", np.float32),
        ("timeouts", np.float32),
    ):
        assert arrays[key].dtype == dtype and arrays[key].shape == (len(observations),)

    # the buffer's episodes are views into one array: no copy per episode
    buffer = to_replay_buffer(data, PRESET, n_frames=N_FRAMES, mixed_action_sets=True)
    first = buffer.episodes[0].observations
    root = first
    while root.base is not None:
        root = root.base
    assert root.nbytes == frames_bytes
    for d3_episode in buffer.episodes:
        assert np.shares_memory(d3_episode.observations, root)


def test_split_episodes_is_episode_level_and_deterministic(data: CrowdPlayDataset) -> None:
    train, test = split_episodes(data, test_size=0.1, seed=0)
    assert len(test) == 1 and len(train) == 2  # at least one episode on each side
    assert {id(e) for e in train}.isdisjoint({id(e) for e in test})
    assert sorted(id(e) for e in train + test) == sorted(id(e) for e in data)

    items = [SimpleNamespace(n=i) for i in range(50)]
    splits = {seed: split_episodes(items, test_size=0.2, seed=seed) for seed in range(5)}
    for seed, (train, test) in splits.items():
        assert len(test) == 10 and len(train) == 40
        names_train, names_test = [e.n for e in train], [e.n for e in test]
        assert set(names_train).isdisjoint(names_test)
        assert sorted(names_train + names_test) == list(range(50))
        assert names_train == sorted(names_train) and names_test == sorted(names_test)
        again = split_episodes(items, test_size=0.2, seed=seed)
        assert [e.n for e in again[1]] == names_test
    assert len({tuple(e.n for e in test) for _, test in splits.values()}) == len(splits)
    assert split_episodes(items[:1], test_size=0.5) == (items[:1], [])
    assert len(split_episodes(items, test_size=0.0)[1]) == 1


def test_short_discrete_bc_training(data: CrowdPlayDataset, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    train, test = split_episodes(data, test_size=0.34, seed=0)
    buffer = to_replay_buffer(train, PRESET, n_frames=N_FRAMES, mixed_action_sets=True)
    action_size = buffer.dataset_info.action_size
    algo = d3rlpy.algos.DiscreteBCConfig(
        batch_size=32,
        learning_rate=3e-4,
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler(),
    ).create(device="cpu:0")
    history = algo.fit(
        buffer,
        n_steps=20,
        n_steps_per_epoch=10,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        experiment_name=str(tmp_path / "bc"),
    )
    assert [epoch for epoch, _ in history] == [1, 2]
    assert all(np.isfinite(metrics["loss"]) for _, metrics in history)
    assert algo.impl is not None
    observations = (
        to_replay_buffer(test, PRESET, n_frames=N_FRAMES, mixed_action_sets=True)
        .sample_transition_batch(1)
        .observations
    )
    assert observations.shape == (1, N_FRAMES, 84, 84)
    action = algo.predict(observations)
    assert action.shape == (1,) and 0 <= int(action[0]) < action_size
    zeros = algo.predict(np.zeros((1, N_FRAMES, 84, 84), dtype=np.uint8))
    assert zeros.shape == (1,) and 0 <= int(zeros[0]) < action_size
