"""Tests for `crowdplay_minari.processing` on real Space Invaders frames.

`crowdplay_compat=True` is compared bit for bit with `tests/reference_processing.py`, an
independent per-frame ring-buffer implementation of CrowdPlay's `get_processed_trajectory()`.
The corrected mode is checked for what it promises: the kept phase, forward reward windows,
the episode end always present, and the same pixels as compat mode.
"""

from __future__ import annotations

import itertools

import ale_py
import cv2
import numpy as np
import pytest

from crowdplay_minari import processing
from crowdplay_minari.processing import (
    ProcessedTrajectory,
    ProcessingConfig,
    _resize_frames,
    _tall_resize_is_exact,
    frames_needed,
    process_trajectory,
    stacked_observations,
)
from tests.reference_processing import reference_process

EPISODE_FRAMES = 400
TINY_FRAMES = 7
PIXEL_OPTIONS = (
    "framestack_axis_first",
    "stack_n",
    "max_n",
    "skip_n",
    "warp",
    "scale",
    "warp_width",
    "warp_height",
)


class Episode:
    """Raw per-frame arrays of one emulated episode."""

    def __init__(self, frames, actions, rewards, dones):
        self.frames = np.asarray(frames, dtype=np.uint8)
        self.actions = np.asarray(actions, dtype=np.int64)
        self.rewards = np.asarray(rewards, dtype=np.int64)
        self.dones = np.asarray(dones, dtype=bool)

    def head(self, n: int) -> Episode:
        return Episode(self.frames[:n], self.actions[:n], self.rewards[:n], self.dones[:n])


def _play(ale: ale_py.ALEInterface, n_frames: int, rng: np.random.Generator) -> Episode:
    """Hold a random action for 10-30 frames at a time, firing two times out of three."""
    action_set = ale.getMinimalActionSet()
    fire = [i for i, a in enumerate(action_set) if "FIRE" in a.name]
    other = [i for i, a in enumerate(action_set) if "FIRE" not in a.name]
    frames, actions, rewards, dones = [], [], [], []
    action, hold = 0, 0
    while len(frames) < n_frames and not ale.game_over():
        if hold == 0:
            action = int(rng.choice(fire if rng.random() < 2 / 3 else other))
            hold = int(rng.integers(10, 31))
        hold -= 1
        frames.append(ale.getScreenRGB())
        actions.append(action)
        rewards.append(ale.act(action_set[action]))
        dones.append(ale.game_over())
    return Episode(frames, actions, rewards, dones)


@pytest.fixture(scope="module")
def episodes() -> tuple[Episode, Episode]:
    """A ~400-frame Space Invaders episode and a 7-frame one (for the tiny-episode quirk)."""
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", 0)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.setInt("frame_skip", 1)
    ale.loadROM(ale_py.roms.get_rom_path("space_invaders"))
    rng = np.random.default_rng(1)  # a seed whose play scores in the first 400 frames
    episode = _play(ale, EPISODE_FRAMES, rng)
    ale.reset_game()
    for _ in range(50):  # a different screen from the first episode's start
        ale.act(ale.getMinimalActionSet()[0])
    tiny = _play(ale, TINY_FRAMES, rng)
    return episode, tiny


@pytest.fixture(scope="module")
def episode(episodes: tuple[Episode, Episode]) -> Episode:
    return episodes[0]


@pytest.fixture(scope="module")
def tiny_episode(episodes: tuple[Episode, Episode]) -> Episode:
    return episodes[1]


def _assert_matches_reference(episode: Episode, config: ProcessingConfig) -> ProcessedTrajectory:
    options = {name: getattr(config, name) for name in PIXEL_OPTIONS}
    ref_obs, ref_actions, ref_rewards, ref_terminals = reference_process(
        episode.frames,
        episode.actions,
        episode.rewards,
        episode.dones,
        downsample_frequency=config.downsample_frequency,
        downsample_offset=config.downsample_offset,
        **options,
    )
    result = process_trajectory(
        episode.frames, episode.actions, episode.rewards, episode.dones, False, config
    )
    expected = np.stack(ref_obs)
    assert result.observations.dtype == expected.dtype == config.observation_dtype()
    assert result.observations.shape == expected.shape
    assert result.observations.shape[1:] == config.observation_shape()
    assert np.array_equal(result.observations, expected)
    assert result.actions.tolist() == ref_actions
    assert result.rewards.tolist() == ref_rewards
    assert result.terminals.tolist() == ref_terminals
    assert not result.timeouts.any()
    return result


def test_episode_fixture_is_real_play(episode: Episode) -> None:
    assert len(episode.frames) == EPISODE_FRAMES
    assert episode.rewards.sum() > 0  # the scripted policy hits aliens
    assert len(np.unique(episode.actions)) > 2
    # Frames change over time (not a frozen screen).
    assert not np.array_equal(episode.frames[0], episode.frames[-1])


# Every pixel layout (warp, scale, axis, stack_n) crossed; the window options and sizes cycle
# through their values so each value meets several layouts.
_LAYOUTS = list(itertools.product([False, True], [False, True], [False, True], [1, 2, 4]))
_WINDOWS = [(1, 1), (2, 4), (3, 3), (2, 1), (1, 4), (3, 0)]
_SIZES = [(84, 84), (37, 53), (53, 37), (84, 42), (160, 210), (16, 211)]


@pytest.mark.parametrize("case", range(len(_LAYOUTS)))
def test_compat_pixels_match_reference(episode: Episode, case: int) -> None:
    warp, scale, axis_first, stack_n = _LAYOUTS[case]
    max_n, skip_n = _WINDOWS[case % len(_WINDOWS)]
    width, height = _SIZES[case % len(_SIZES)]
    frequency = [1, 3, 4][case % 3]
    config = ProcessingConfig(
        framestack_axis_first=axis_first,
        downsample_frequency=frequency,
        downsample_offset=case % frequency,
        stack_n=stack_n,
        max_n=max_n,
        skip_n=skip_n,
        warp=warp,
        scale=scale,
        warp_width=width,
        warp_height=height,
        crowdplay_compat=True,
    )
    _assert_matches_reference(episode.head(100), config)


@pytest.mark.parametrize(("max_n", "skip_n"), list(itertools.product([1, 2, 3], [0, 1, 3, 4])))
def test_compat_windows_match_reference(episode: Episode, max_n: int, skip_n: int) -> None:
    config = ProcessingConfig(max_n=max_n, skip_n=skip_n, crowdplay_compat=True)
    _assert_matches_reference(episode.head(60), config)


@pytest.mark.parametrize(("frequency", "offset"), [(k, o) for k in (1, 3, 4) for o in range(k)])
def test_compat_downsampling_matches_reference(
    episode: Episode, frequency: int, offset: int
) -> None:
    config = ProcessingConfig(
        downsample_frequency=frequency, downsample_offset=offset, crowdplay_compat=True
    )
    result = _assert_matches_reference(episode, config)
    kept = np.arange(offset, EPISODE_FRAMES, frequency)
    assert np.array_equal(result.frame_indices, kept)


@pytest.mark.parametrize("scale", [False, True])
def test_compat_d3rlpy_preset_matches_reference(episode: Episode, scale: bool) -> None:
    config = ProcessingConfig.d3rlpy_preset(scale=scale, crowdplay_compat=True)
    result = _assert_matches_reference(episode, config)
    assert result.observations.shape == (EPISODE_FRAMES // 4, 1, 84, 84)


@pytest.mark.parametrize(("frequency", "offset"), [(4, 0), (8, 2), (8, 6), (10, 9), (7, 0)])
def test_compat_tiny_episode_quirk(tiny_episode: Episode, frequency: int, offset: int) -> None:
    """With at most `k` frames, the reference also keeps the last frame (`i % k == N - 1`)."""
    config = ProcessingConfig(
        downsample_frequency=frequency, downsample_offset=offset, crowdplay_compat=True
    )
    result = _assert_matches_reference(tiny_episode, config)
    n = len(tiny_episode.frames)
    expected = sorted({i for i in range(n) if i % frequency in (offset, n - 1)})
    assert result.frame_indices.tolist() == expected


def test_compat_float_rewards_sum_like_the_reference(episode: Episode) -> None:
    short = episode.head(80)
    rewards = (np.arange(80, dtype=np.float32) * np.float32(0.1)) + short.rewards
    config = ProcessingConfig(downsample_frequency=3, crowdplay_compat=True)
    _, _, ref_rewards, _ = reference_process(
        short.frames, short.actions, rewards, short.dones, downsample_frequency=3
    )
    result = process_trajectory(short.frames, short.actions, rewards, short.dones, False, config)
    assert result.rewards.dtype == np.float64
    assert result.rewards.tolist() == [float(r) for r in ref_rewards]


@pytest.mark.parametrize(("width", "height"), [(84, 84), (84, 42), (37, 53), (53, 37), (7, 5)])
def test_batched_resize_is_bit_exact(episode: Episode, width: int, height: int) -> None:
    gray = cv2.cvtColor(episode.frames.reshape(-1, 160, 3), cv2.COLOR_RGB2GRAY)
    config = ProcessingConfig(warp_width=width, warp_height=height)
    for n in (1, 3, 4, 37, 130):
        out = np.empty((n, height, width), dtype=np.uint8)
        _resize_frames(gray[: n * 210], n, config, out)
        for i in range(n):
            single = cv2.resize(
                gray[i * 210 : (i + 1) * 210], (width, height), interpolation=cv2.INTER_AREA
            )
            assert np.array_equal(out[i], single), (n, i)


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_repeated_frames_are_resized_once_and_exactly(
    episode: Episode, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    gray = cv2.cvtColor(episode.frames.reshape(-1, 160, 3), cv2.COLOR_RGB2GRAY)
    frames = gray.reshape(-1, 210, 160)
    distinct: list[int] = []  # real screens, pairwise different
    for i in range(len(frames)):
        if all(not np.array_equal(frames[i], frames[j]) for j in distinct):
            distinct.append(i)
        if len(distinct) == 7:
            break
    # repeats one and two back, and a repeat further back (not looked for)
    pick = np.array(distinct)[np.array([0, 0, 1, 0, 2, 3, 3, 3, 4, 5, 4, 6] * 3)[:n]]
    stack = np.ascontiguousarray(frames[pick]).reshape(-1, 160)
    config = ProcessingConfig()
    resized = []

    def counting(gray, n, config, out):
        resized.append(n)
        return _resize_frames(gray, n, config, out)

    monkeypatch.setattr(processing, "_resize_frames", counting)
    out = np.empty((n, 84, 84), dtype=np.uint8)
    processing._resize_unique_frames(stack, n, config, out)
    for i in range(n):
        single = cv2.resize(frames[pick[i]], (84, 84), interpolation=cv2.INTER_AREA)
        assert np.array_equal(out[i], single), i
    distinct_runs = 1 + sum(
        all(pick[i] != pick[i - b] for b in (1, 2) if i - b >= 0) for i in range(1, n)
    )
    assert sum(resized) == distinct_runs
    if n == 32:
        assert distinct_runs < n * 3 // 4  # the duplicates were found, not resized again


def test_episode_has_repeated_gray_frames(episode: Episode) -> None:
    # what makes `_resize_unique_frames` pay on real play (and exercised by every test above)
    gray = cv2.cvtColor(episode.frames.reshape(-1, 160, 3), cv2.COLOR_RGB2GRAY)
    words = gray.reshape(len(episode.frames), -1)
    repeats = (words[1:] == words[:-1]).all(axis=1).mean()
    assert repeats > 0.05


def test_tall_resize_only_for_exact_scales() -> None:
    assert _tall_resize_is_exact(84, 84)
    assert _tall_resize_is_exact(84, 105)
    assert not _tall_resize_is_exact(37, 53)
    assert not _tall_resize_is_exact(84, 211)
    assert not _tall_resize_is_exact(161, 84)


# --- corrected mode ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_frames_compat(episode: Episode) -> np.ndarray:
    """Compat observations of every frame (k=1), to index at the corrected mode's kept frames."""
    config = ProcessingConfig(crowdplay_compat=True)
    return process_trajectory(
        episode.frames, episode.actions, episode.rewards, episode.dones, False, config
    ).observations


@pytest.mark.parametrize(("frequency", "offset"), [(k, o) for k in (1, 3, 4) for o in range(k)])
@pytest.mark.parametrize("terminated", [False, True])
def test_corrected_mode_keeps_the_episode_end(
    episode: Episode,
    all_frames_compat: np.ndarray,
    frequency: int,
    offset: int,
    terminated: bool,
) -> None:
    dones = np.zeros(EPISODE_FRAMES, dtype=bool)
    dones[-1] = terminated
    rewards = episode.rewards + np.arange(EPISODE_FRAMES) % 5  # rewards on every frame
    config = ProcessingConfig(downsample_frequency=frequency, downsample_offset=offset)
    result = process_trajectory(episode.frames, episode.actions, rewards, dones, False, config)

    kept = np.arange(offset, EPISODE_FRAMES, frequency)
    assert np.array_equal(result.frame_indices, kept)
    assert np.array_equal(result.observations, all_frames_compat[kept])
    assert np.array_equal(result.actions, episode.actions[kept])
    expected_rewards = [rewards[i : i + frequency].sum() for i in kept]
    assert result.rewards.dtype == np.int64
    assert result.rewards.tolist() == expected_rewards
    assert result.rewards.sum() == rewards[offset:].sum()
    assert result.terminals.tolist() == [0] * (len(kept) - 1) + [int(terminated)]
    assert not result.timeouts.any()


def test_corrected_mode_flags_truncation(episode: Episode) -> None:
    config = ProcessingConfig.d3rlpy_preset(downsample_offset=1)
    result = process_trajectory(
        episode.frames, episode.actions, episode.rewards, episode.dones, True, config
    )
    assert result.timeouts.tolist() == [0] * (len(result) - 1) + [1]
    assert not result.terminals.any()


def test_corrected_mode_ignores_done_flags_before_the_end(episode: Episode) -> None:
    dones = np.zeros(EPISODE_FRAMES, dtype=bool)
    dones[100] = True
    config = ProcessingConfig(downsample_frequency=4)
    result = process_trajectory(
        episode.frames, episode.actions, episode.rewards, dones, False, config
    )
    assert not result.terminals.any()


def test_corrected_mode_float_rewards(episode: Episode) -> None:
    rewards = np.full(EPISODE_FRAMES, 0.5, dtype=np.float32)
    config = ProcessingConfig(downsample_frequency=3, downsample_offset=2)
    result = process_trajectory(
        episode.frames, episode.actions, rewards, episode.dones, False, config
    )
    assert result.rewards.dtype == np.float64
    assert result.rewards[:-1].tolist() == [1.5] * (len(result) - 1)
    assert result.rewards[-1] == 0.5 * len(range(result.frame_indices[-1], EPISODE_FRAMES))


def test_corrected_mode_episode_shorter_than_offset(tiny_episode: Episode) -> None:
    config = ProcessingConfig(downsample_frequency=10, downsample_offset=8)
    result = process_trajectory(
        tiny_episode.frames,
        tiny_episode.actions,
        tiny_episode.rewards,
        tiny_episode.dones,
        True,
        config,
    )
    assert len(result) == 0
    assert result.observations.shape == (0, 84, 84, 4)
    assert result.rewards.shape == result.terminals.shape == result.timeouts.shape == (0,)


@pytest.mark.parametrize("compat", [False, True])
def test_empty_episode(episode: Episode, compat: bool) -> None:
    empty = episode.head(0)
    config = ProcessingConfig.d3rlpy_preset(crowdplay_compat=compat)
    result = process_trajectory(
        empty.frames, empty.actions, empty.rewards, empty.dones, True, config
    )
    assert len(result) == 0
    assert result.observations.shape == (0, 1, 84, 84)
    assert result.observations.dtype == np.uint8


def test_corrected_and_compat_agree_without_downsampling(episode: Episode) -> None:
    dones = episode.dones.copy()
    dones[-1] = True
    args = (episode.frames, episode.actions, episode.rewards, dones, False)
    compat = process_trajectory(*args, ProcessingConfig(crowdplay_compat=True))
    corrected = process_trajectory(*args, ProcessingConfig())
    for field in ("observations", "actions", "rewards", "terminals", "frame_indices"):
        assert np.array_equal(getattr(compat, field), getattr(corrected, field)), field


# --- the frame pipeline on a short history (what the evaluation environment does) ------------


@pytest.mark.parametrize(
    "config",
    [
        ProcessingConfig(),
        ProcessingConfig.d3rlpy_preset(),
        ProcessingConfig(max_n=3, skip_n=3, stack_n=3, scale=True, warp_width=37, warp_height=53),
        ProcessingConfig(warp=False, stack_n=2, framestack_axis_first=True),
    ],
)
def test_stacked_observations_on_recent_history(episode: Episode, config: ProcessingConfig) -> None:
    history = frames_needed(config)
    whole = stacked_observations(episode.frames, np.arange(EPISODE_FRAMES), config)
    for t in (0, 1, history - 2, history - 1, history, 57, EPISODE_FRAMES - 1):
        window = episode.frames[max(0, t - history + 1) : t + 1]
        latest = stacked_observations(window, np.array([len(window) - 1]), config)
        assert latest.shape == (1, *config.observation_shape())
        assert latest.dtype == config.observation_dtype()
        assert np.array_equal(latest[0], whole[t]), t


def test_stacked_observations_any_time_order(episode: Episode) -> None:
    config = ProcessingConfig(max_n=3, skip_n=2)
    whole = stacked_observations(episode.frames, np.arange(EPISODE_FRAMES), config)
    times = np.array([399, 3, 3, 250, 0, 17])
    assert np.array_equal(stacked_observations(episode.frames, times, config), whole[times])


@pytest.mark.parametrize("max_n", [1, 2])
def test_stacked_observations_non_contiguous_frames(episode: Episode, max_n: int) -> None:
    short = episode.frames[:40]
    padded = np.zeros((*short.shape[:3], 4), dtype=np.uint8)
    padded[..., :3] = short
    view = padded[..., :3]
    assert not view.flags.c_contiguous
    config = ProcessingConfig(max_n=max_n)
    times = np.arange(40)
    assert np.array_equal(
        stacked_observations(view, times, config), stacked_observations(short, times, config)
    )


@pytest.mark.parametrize("warp", [True, False])
def test_channel_interleave_paths_agree(
    episode: Episode, warp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channels-last stacks use cv2.merge; the numpy fallback (too many channels) must agree."""
    config = ProcessingConfig(warp=warp, stack_n=3, skip_n=2)
    times = np.arange(0, 60, 3)
    merged = stacked_observations(episode.frames[:60], times, config)
    monkeypatch.setattr(processing, "_MAX_MERGE_CHANNELS", 0)
    transposed = stacked_observations(episode.frames[:60], times, config)
    assert np.array_equal(merged, transposed)


def test_stacked_observations_start_black(episode: Episode) -> None:
    config = ProcessingConfig()
    first = stacked_observations(episode.frames, np.array([0, 4]), config)
    assert not first[0, :, :, :3].any()  # older slots are before the episode start
    assert first[0, :, :, 3].any()
    assert not first[1, :, :, :2].any()
    assert first[1, :, :, 2:].any(axis=(0, 1)).all()


def test_stacked_observations_rejects_bad_input(episode: Episode) -> None:
    config = ProcessingConfig()
    with pytest.raises(ValueError, match="frames must be"):
        stacked_observations(episode.frames[:, :, :, 0], np.array([0]), config)
    with pytest.raises(ValueError, match="times must lie"):
        stacked_observations(episode.frames[:5], np.array([5]), config)
    with pytest.raises(ValueError, match="integer"):
        stacked_observations(episode.frames[:5], np.array([1.0]), config)


# --- config and validation ---------------------------------------------------------------------


def test_frames_needed() -> None:
    assert frames_needed(ProcessingConfig()) == 14
    assert frames_needed(ProcessingConfig.d3rlpy_preset()) == 2
    assert frames_needed(ProcessingConfig(stack_n=3, skip_n=2, max_n=3)) == 7


def test_d3rlpy_preset_and_shapes() -> None:
    config = ProcessingConfig.d3rlpy_preset()
    assert (config.framestack_axis_first, config.downsample_frequency, config.stack_n) == (
        True,
        4,
        1,
    )
    assert config.observation_shape() == (1, 84, 84)
    assert config.observation_dtype() == np.uint8
    scaled = ProcessingConfig.d3rlpy_preset(scale=True, warp_width=64, crowdplay_compat=True)
    assert scaled.observation_shape() == (1, 84, 64)
    assert scaled.observation_dtype() == np.float32
    assert scaled.crowdplay_compat
    assert ProcessingConfig().observation_shape() == (84, 84, 4)
    assert ProcessingConfig(warp=False, stack_n=2).observation_shape() == (210, 160, 6)
    assert ProcessingConfig(warp=False, framestack_axis_first=True).observation_shape() == (
        12,
        210,
        160,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"downsample_frequency": 0}, "downsample_frequency must be >= 1"),
        ({"downsample_offset": -1}, "downsample_offset must be >= 0"),
        ({"downsample_frequency": 4, "downsample_offset": 4}, "downsample_offset must be < "),
        ({"stack_n": 0}, "stack_n must be >= 1"),
        ({"max_n": 0}, "max_n must be >= 1"),
        ({"skip_n": -1}, "skip_n must be >= 0"),
        ({"warp_width": 0}, "warp_width must be >= 1"),
        ({"warp_height": 0}, "warp_height must be >= 1"),
        ({"stack_n": 2.0}, "stack_n must be an int"),
        ({"stack_n": True}, "stack_n must be an int"),
        ({"warp": 1}, "warp must be a bool"),
    ],
)
def test_config_validation(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProcessingConfig(**options)


def test_config_is_frozen() -> None:
    config = ProcessingConfig()
    with pytest.raises(AttributeError):
        config.stack_n = 2  # type: ignore[misc]


def test_process_trajectory_rejects_mismatched_lengths(episode: Episode) -> None:
    short = episode.head(10)
    with pytest.raises(ValueError, match="actions must have shape"):
        process_trajectory(
            short.frames, short.actions[:9], short.rewards, short.dones, False, ProcessingConfig()
        )
    with pytest.raises(ValueError, match="rewards must be numeric"):
        process_trajectory(
            short.frames,
            short.actions,
            np.array(["x"] * 10),
            short.dones,
            False,
            ProcessingConfig(),
        )


@pytest.mark.parametrize(
    "config",
    [ProcessingConfig(), ProcessingConfig.d3rlpy_preset(), ProcessingConfig(scale=True, stack_n=2)],
)
def test_observations_stack_into_a_given_array(episode: Episode, config: ProcessingConfig) -> None:
    times = np.arange(0, EPISODE_FRAMES, 3)
    stacks = processing.frame_stacks(episode.frames, times, config)
    expected = stacks.observations(config)
    whole = np.full((len(times) + 2, *config.observation_shape()), 7, config.observation_dtype())
    written = stacks.observations(config, out=whole[1:-1])
    assert np.array_equal(whole[1:-1], expected) and written.base is whole
    assert (whole[0] == 7).all() and (whole[-1] == 7).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        stacks.observations(config, out=np.empty_like(expected, order="F")[..., ::-1])
