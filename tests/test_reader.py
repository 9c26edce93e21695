"""The raw CrowdPlay reader on emulator-made sample data: real ALE frames and RAM, scripted
players, a human-to-AI takeover, all three encodings, and damaged copies of the files."""

from __future__ import annotations

import bz2
import datetime as dt
import pickle
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crowdplay_minari.episode import (
    AI,
    FRAME_SHAPE,
    HUMAN,
    RAM_SIZE,
    Episode,
    StepFrames,
)
from crowdplay_minari.games import GAMES, TWO_PLAYER_GAMES
from crowdplay_minari.raw import (
    CorruptTrajectoryError,
    RawDataset,
    SchemaError,
    TrajectoryNotFoundError,
    load_steps,
    parse_steps,
    trajectory_files,
)
from crowdplay_minari.sample import AGENT_IDS, DEFAULT_SESSIONS
from crowdplay_minari.statistics import (
    ACTIVE_PLAYTIME,
    ACTIVE_PLAYTIME_2P,
    CORRECT_ALIENS,
    LEFT_SIDE,
    SCORE,
    TIME_PLAYED,
    TIMEDELTA_STATISTICS,
    running_statistics,
)

from .conftest import SAMPLE_EPISODES, SAMPLE_FRAMES

SESSIONS = {spec.task_id: spec for spec in DEFAULT_SESSIONS}
ENCODINGS = (".pickle", ".pickle.gz", ".pickle.bz2")
P0, P1 = AGENT_IDS


@pytest.fixture(scope="module")
def raw(raw_sample: Path) -> RawDataset:
    return RawDataset(raw_sample)


@pytest.fixture(scope="module")
def episodes(raw: RawDataset) -> dict[str, Episode]:
    """Every sample episode, read once (from `.pickle`, the fastest encoding)."""
    return {episode_id: raw.read_episode(episode_id) for episode_id in raw.episode_ids()}


def _session_episodes(episodes: dict[str, Episode], task_id: str) -> list[Episode]:
    found = [e for e in episodes.values() if e.metadata.task_id == task_id]
    return sorted(found, key=lambda e: e.metadata.keyword_data["all"]["created_on"])


def _two_player(game: str) -> bool:
    return game in TWO_PLAYER_GAMES


# ---------------------------------------------------------------- metadata


def test_metadata_matches_the_default_sessions(raw: RawDataset) -> None:
    metadata = raw.metadata()
    assert len(metadata) == SAMPLE_EPISODES
    # 8 episodes cycle through the 7 sessions: the first session gets two.
    counts = Counter(m.task_id for m in metadata.values())
    assert counts == {spec.task_id: 1 + (i == 0) for i, spec in enumerate(DEFAULT_SESSIONS)}
    environments = {}
    for episode_id, meta in metadata.items():
        spec = SESSIONS[meta.task_id]
        assert meta.episode_id == episode_id
        assert (meta.game, meta.task, meta.source) == (spec.game, spec.task, spec.source)
        env_all = meta.environment_keyword_data["all"]
        assert (env_all["game"], env_all["task"], env_all["source"]) == (
            spec.game,
            spec.task,
            spec.source,
        )
        assert type(env_all["created_on"]) is dt.datetime
        environments.setdefault(meta.task_id, set()).add(meta.environment_id)
    # One environment (participant session) per task, shared by that session's episodes.
    assert all(len(ids) == 1 for ids in environments.values())
    assert len(set().union(*environments.values())) == len(DEFAULT_SESSIONS)


def test_users_rows_exist_for_human_agents_only(
    raw: RawDataset, episodes: dict[str, Episode]
) -> None:
    for episode_id, episode in episodes.items():
        meta = raw.metadata()[episode_id]
        humans = {a for a, t in episode.agents.items() if (t.user_types == HUMAN).any()}
        assert set(meta.users) == humans, meta.task_id
        for agent_id, user in meta.users.items():
            assert user.agent_id == agent_id
            assert (user.environment_id, user.task_id) == (meta.environment_id, meta.task_id)
            assert len(user.user_id) == 64 and user.user_id != user.permanent_user_id
    (ai_episode,) = _session_episodes(episodes, "space_invaders_ai_competitive_mturk")
    assert set(ai_episode.metadata.users) == {P0}  # the AI partner has no users row


def test_keyword_data_has_crowdplays_types(raw: RawDataset) -> None:
    for meta in raw.metadata().values():
        kw = meta.keyword_data
        created_on = kw["all"]["created_on"]
        assert type(created_on) is dt.datetime
        assert created_on >= meta.environment_keyword_data["all"]["created_on"]
        two_player = _two_player(meta.game)
        assert sorted(a for a in kw if a != "all") == list(AGENT_IDS[: 1 + two_player])
        active = ACTIVE_PLAYTIME_2P if two_player else ACTIVE_PLAYTIME
        other_spelling = ACTIVE_PLAYTIME if two_player else ACTIVE_PLAYTIME_2P
        for agent in AGENT_IDS[: 1 + two_player]:
            values = kw[agent]
            assert isinstance(values[SCORE], np.integer), type(values[SCORE])
            assert type(values[TIME_PLAYED]) is dt.timedelta
            assert type(values[active]) is dt.timedelta
            assert other_spelling not in values
            assert values[active] <= values[TIME_PLAYED]
    spellings = {
        meta.game: {k for a, v in meta.keyword_data.items() if a != "all" for k in v}
        for meta in raw.metadata().values()
    }
    assert "Active Playtime" in spellings["space_invaders_2p"]
    assert "Active playtime" in spellings["space_invaders"]


# ---------------------------------------------------------------- arrays


def test_frames_are_real_changing_screens(episodes: dict[str, Episode]) -> None:
    means = {}
    for episode in episodes.values():
        n = episode.num_steps
        frames = episode.agents[P0].frames
        assert frames.shape == (n, *FRAME_SHAPE) and frames.dtype == np.uint8
        flat = frames.reshape(n, -1)
        assert flat[:: n // 20].min() < flat[:: n // 20].max()
        # The emulator draws moving objects: most frames differ from the one before.
        changed = (flat[1:] != flat[:-1]).any(axis=1)
        assert changed.mean() > 0.5, episode.metadata.task_id
        assert len({frame.tobytes() for frame in flat[:: n // 10]}) >= 9
        means[episode.metadata.game] = frames[::25].mean(axis=(0, 1, 2))
    # Different games look different.
    assert not np.allclose(means["riverraid"], means["qbert"], atol=5)
    assert not np.allclose(means["riverraid"], means["space_invaders"], atol=5)


def test_two_player_agents_share_one_frame_array(episodes: dict[str, Episode]) -> None:
    two_player = [e for e in episodes.values() if _two_player(e.metadata.game)]
    assert len(two_player) == 2
    for episode in two_player:
        assert episode.agents[P0].frames is episode.agents[P1].frames
        # Both players see one emulator: the same RAM, different actions and rewards.
        np.testing.assert_array_equal(episode.agents[P0].ram, episode.agents[P1].ram)
        assert not np.array_equal(episode.agents[P0].actions, episode.agents[P1].actions)


@pytest.fixture(scope="module")
def minimal_action_counts() -> dict[str, int]:
    import ale_py
    from ale_py import roms

    counts = {}
    for game, rom in ((name, info.rom) for name, info in GAMES.items()):
        ale = ale_py.ALEInterface()
        ale.setLoggerMode(ale_py.LoggerMode.Error)
        ale.loadROM(str(roms.get_rom_path(rom)))
        counts[game] = len(ale.getMinimalActionSet())
    return counts


def test_actions_ram_lives_and_step_iters(
    episodes: dict[str, Episode], minimal_action_counts: dict[str, int]
) -> None:
    assert minimal_action_counts["space_invaders"] == 6
    assert minimal_action_counts["riverraid"] == 18
    for episode in episodes.values():
        n = episode.num_steps
        np.testing.assert_array_equal(episode.step_iters, np.arange(1, n + 1))
        for trajectory in episode.agents.values():
            actions = trajectory.actions
            assert actions.shape == (n,) and actions.dtype == np.int64
            assert (
                0 <= actions.min() and actions.max() < minimal_action_counts[episode.metadata.game]
            )
            assert len(np.unique(actions)) >= 3
            assert trajectory.ram.shape == (n, RAM_SIZE) and trajectory.ram.dtype == np.uint8
            assert (trajectory.ram[1:] != trajectory.ram[:-1]).any(axis=1).mean() > 0.9
            lives = trajectory.lives
            assert lives.shape == (n,) and lives[0] >= 2 and lives.min() >= 0
            assert (np.diff(lives) <= 0).all()  # nobody earned a life in 1,000 frames
            assert not trajectory.dones[:-1].any()
            assert trajectory.rewards.dtype == np.int64 and trajectory.rewards.min() >= 0


# ---------------------------------------------------------------- statistics


def test_statistics_recomputed_from_ram_match_the_stored_ones(
    episodes: dict[str, Episode],
) -> None:
    task_keys = Counter()
    for episode in episodes.values():
        meta = episode.metadata
        two_player = _two_player(meta.game)
        for p, (agent_id, trajectory) in enumerate(episode.agents.items()):
            recomputed = running_statistics(
                meta.game,
                meta.task,
                trajectory.rewards,
                trajectory.actions,
                trajectory.ram,
                player_index=p,
                two_player=two_player,
            )
            assert trajectory.statistics.keys() == recomputed.keys()
            for name, values in recomputed.items():
                np.testing.assert_array_equal(trajectory.statistics[name], values, err_msg=name)
            assert trajectory.timedelta_statistics == TIMEDELTA_STATISTICS & recomputed.keys()
            stored = meta.keyword_data[agent_id]
            assert stored.keys() == recomputed.keys()
            assert stored[SCORE] == trajectory.rewards.sum() == recomputed[SCORE][-1]
            for name, values in recomputed.items():
                if name in TIMEDELTA_STATISTICS:
                    assert stored[name] == dt.timedelta(seconds=values[-1]), name
                elif name != SCORE:
                    assert stored[name] == values[-1], name
                    task_keys[name] += 1
            assert stored[TIME_PLAYED] == dt.timedelta(seconds=episode.num_steps // 60)
    # The insideout and left tasks carry their adherence statistics.
    assert task_keys == {CORRECT_ALIENS: 1, LEFT_SIDE: 1}
    (insideout,) = _session_episodes(episodes, "space_invaders_insideout")
    assert insideout.agents[P0].statistics[CORRECT_ALIENS].max() > 0  # aliens were shot


def test_task_statistics_continue_across_a_sessions_episodes(
    episodes: dict[str, Episode],
) -> None:
    first, second = _session_episodes(episodes, DEFAULT_SESSIONS[0].task_id)
    a, b = first.agents[P0], second.agents[P0]
    session = running_statistics(
        first.metadata.game,
        first.metadata.task,
        np.concatenate([a.rewards, b.rewards]),
        np.concatenate([a.actions, b.actions]),
        np.concatenate([a.ram, b.ram]),
    )
    for name, values in session.items():
        np.testing.assert_array_equal(a.task_statistics[name], values[: first.num_steps])
        np.testing.assert_array_equal(b.task_statistics[name], values[first.num_steps :])
    # The second episode's session score starts from the first one's total...
    assert b.task_statistics[SCORE][-1] == a.rewards.sum() + b.rewards.sum()
    assert b.task_statistics[TIME_PLAYED][0] == first.num_steps // 60
    # ...while its episode statistics restart from zero.
    assert b.statistics[SCORE][-1] == b.rewards.sum()
    assert b.statistics[TIME_PLAYED][0] == 0
    # A session with one episode has equal task and episode statistics.
    (single,) = _session_episodes(episodes, "qbert_socialmedia")
    for name, values in single.agents[P0].statistics.items():
        np.testing.assert_array_equal(single.agents[P0].task_statistics[name], values)


def test_alien_fraction_is_stored_as_int_zero_before_the_first_kill(raw: RawDataset) -> None:
    (episode_id,) = [
        e for e, m in raw.metadata().items() if m.task_id == "space_invaders_insideout"
    ]
    with open(raw.root / f"{episode_id}.pickle", "rb") as file:
        steps = pickle.load(file)  # our own file: the stdlib unpickler shows the stored types
    values = [step["episode_callables"][CORRECT_ALIENS][P0] for step in steps]
    first_kill = next(i for i, v in enumerate(values) if v != 0)
    assert first_kill > 0
    assert all(type(v) is int and v == 0 for v in values[:first_kill])
    assert type(steps[0]["reward"][P0]) is np.int32
    assert isinstance(steps[0]["info"][P0]["ale.lives"], np.integer)
    assert type(steps[0]["info"][P0]["RAM"]) is list and len(steps[0]["info"][P0]["RAM"]) == 128


# ---------------------------------------------------------------- control and endings


def test_human_to_ai_takeover_is_visible(episodes: dict[str, Episode]) -> None:
    (episode,) = _session_episodes(episodes, "space_invaders_ai_competitive_mturk")
    human, partner = episode.agents[P0], episode.agents[P1]
    n = episode.num_steps
    switches = np.flatnonzero(np.diff(human.user_types))
    assert len(switches) == 1
    k = int(switches[0]) + 1  # first AI-controlled step
    assert 0 < k < n
    assert (human.user_types[:k] == HUMAN).all() and (human.user_types[k:] == AI).all()
    assert (partner.user_types == AI).all()
    assert human.human_fraction == pytest.approx(k / n)
    # An AI acts on the current frame; the human's actions arrived with latency.
    np.testing.assert_array_equal(human.action_step_iters[k:], episode.step_iters[k:] - 1)
    np.testing.assert_array_equal(partner.action_step_iters, episode.step_iters - 1)
    pressed = human.action_step_iters[:k] != -1
    assert (human.action_step_iters[:k][pressed] < episode.step_iters[:k][pressed] - 1).any()


def test_humans_action_step_iter_is_minus_one_before_the_first_key_press(
    episodes: dict[str, Episode],
) -> None:
    humans = 0
    for episode in episodes.values():
        for trajectory in episode.agents.values():
            if trajectory.user_types[0] != HUMAN:
                continue
            humans += 1
            iters = trajectory.action_step_iters
            first = int(np.flatnonzero(iters != -1)[0])
            assert first > 0  # people take a moment before their first key press
            assert (iters[:first] == -1).all()
            assert (trajectory.actions[:first] == 0).all()  # NOOP until then
            human_part = trajectory.user_types == HUMAN
            sent = iters[first:][human_part[first:]]
            assert (sent >= 1).all() and (np.diff(sent) >= 0).all()
            assert (sent < episode.step_iters[first:][human_part[first:]]).all()
    assert humans == SAMPLE_EPISODES + 1  # every episode's player_0, plus the 2p player_1


def test_episodes_end_by_game_over_or_are_cut_short(episodes: dict[str, Episode]) -> None:
    endings = Counter()
    for episode in episodes.values():
        trajectory = episode.agents[P0]
        assert trajectory.terminated != trajectory.truncated
        assert all(t.dones[-1] == trajectory.dones[-1] for t in episode.agents.values())
        if trajectory.terminated:
            endings["game over"] += 1
            assert episode.num_steps <= SAMPLE_FRAMES
            assert trajectory.lives[-1] == 0
        else:
            endings["cut short"] += 1
            assert episode.num_steps in (SAMPLE_FRAMES, SAMPLE_FRAMES * 2 // 3)
    assert endings["game over"] >= 1 and endings["cut short"] >= 1
    # The last episode of the two-episode session stops at two thirds of the frame cap.
    first, second = _session_episodes(episodes, DEFAULT_SESSIONS[0].task_id)
    assert second.agents[P0].truncated and second.num_steps == SAMPLE_FRAMES * 2 // 3


# ---------------------------------------------------------------- encodings


def _assert_same_episode(expected: Episode, actual: Episode) -> None:
    assert actual.metadata == expected.metadata
    np.testing.assert_array_equal(actual.step_iters, expected.step_iters)
    assert list(actual.agents) == list(expected.agents)
    for agent_id, want in expected.agents.items():
        got = actual.agents[agent_id]
        for field in (
            "frames",
            "actions",
            "rewards",
            "dones",
            "ram",
            "lives",
            "user_types",
            "action_step_iters",
        ):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=f"{agent_id} {field}")
        for field in ("statistics", "task_statistics"):
            a, b = getattr(got, field), getattr(want, field)
            assert list(a) == list(b)
            for name in b:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{field} {name}")
        assert got.timedelta_statistics == want.timedelta_statistics
    if len(expected.agents) == 2:
        assert actual.agents[P0].frames is actual.agents[P1].frames


def test_the_three_encodings_give_identical_episodes(
    raw: RawDataset, episodes: dict[str, Episode]
) -> None:
    # bunzip2 is slow (about 2 s per episode): read .pickle.bz2 for a two-player episode with
    # an AI takeover and a single-player one that ends by game over; .pickle.gz for all.
    with_bz2 = {
        next(e for e, ep in episodes.items() if ep.metadata.task_id == task_id)
        for task_id in ("space_invaders_ai_competitive_mturk", "riverraid_mturk")
    }
    for episode_id, episode in episodes.items():
        paths = trajectory_files(raw.root, episode_id)
        assert [p.name for p in paths] == [episode_id + s for s in ENCODINGS]
        assert raw.trajectory_path(episode_id) == raw.root / f"{episode_id}.pickle"
        # `episodes` came from paths[0], the .pickle
        for path in paths[1:] if episode_id in with_bz2 else paths[1:2]:
            _assert_same_episode(episode, raw.read_episode(episode_id, path=path))


def test_trajectory_path_prefers_the_fastest_encoding(
    raw_sample: Path, raw_sample_bz2: Path, tmp_path: Path
) -> None:
    bz2_only = RawDataset(raw_sample_bz2)
    episode_id = bz2_only.episode_ids()[0]
    assert bz2_only.trajectory_path(episode_id) == raw_sample_bz2 / f"{episode_id}.pickle.bz2"
    shutil.copy2(raw_sample / "dataset.sqlite", tmp_path / "dataset.sqlite")
    for suffix in (".pickle.gz", ".pickle.bz2"):
        shutil.copy2(raw_sample / f"{episode_id}{suffix}", tmp_path / f"{episode_id}{suffix}")
    assert RawDataset(tmp_path).trajectory_path(episode_id).name == f"{episode_id}.pickle.gz"


def test_agents_argument_limits_the_parsed_agents(
    raw: RawDataset, episodes: dict[str, Episode]
) -> None:
    (episode,) = _session_episodes(episodes, "space_invaders_2p_cooperative_mturk")
    only_p1 = raw.read_episode(episode.episode_id, agents=[P1])
    assert list(only_p1.agents) == [P1]
    np.testing.assert_array_equal(only_p1.agents[P1].frames, episode.agents[P1].frames)
    np.testing.assert_array_equal(only_p1.agents[P1].actions, episode.agents[P1].actions)
    with pytest.raises(SchemaError, match="game_0>player_7"):
        raw.read_episode(episode.episode_id, agents=["game_0>player_7"])


def test_unstacked_frames_are_the_steps_own_arrays(
    raw: RawDataset, episodes: dict[str, Episode]
) -> None:
    """`stack_frames=False` (the converter's) gives the same episode without copying frames."""
    for episode_id, episode in episodes.items():
        path = raw.trajectory_path(episode_id)
        steps = load_steps(path)
        unstacked = parse_steps(steps, episode.metadata, path, stack_frames=False)
        _assert_same_episode(episode, unstacked)
        for agent_id, agent in unstacked.agents.items():
            frames = agent.frames
            assert isinstance(frames, StepFrames)
            assert frames.shape == (agent.num_steps, *FRAME_SHAPE)
            assert frames[5] is steps[5]["prev_obs"][agent_id]["image"]
            out = np.zeros((4, *FRAME_SHAPE), np.uint8)
            frames.copy_to(out, 2, 5)
            np.testing.assert_array_equal(out[:3], episode.agents[agent_id].frames[2:5])
            assert not out[3].any()
            np.testing.assert_array_equal(frames[2:5], episode.agents[agent_id].frames[2:5])


@pytest.mark.parametrize("stack_frames", [True, False])
def test_two_players_with_different_screens_keep_their_own_frames(
    raw: RawDataset, episodes: dict[str, Episode], stack_frames: bool
) -> None:
    (episode,) = _session_episodes(episodes, "space_invaders_2p_cooperative_mturk")
    path = raw.trajectory_path(episode.episode_id)
    steps = load_steps(path)
    for i in (7, 9):  # player 1 sees a changed screen from step 7 on
        image = steps[i]["prev_obs"][P1]["image"].copy()
        image[100:110] = 255 - image[100:110]
        steps[i]["prev_obs"][P1]["image"] = image
    parsed = parse_steps(steps, episode.metadata, path, stack_frames=stack_frames)
    p0, p1 = (np.asarray(parsed.agents[a].frames) for a in (P0, P1))
    np.testing.assert_array_equal(p0, episode.agents[P0].frames)
    changed = [i for i in range(len(p1)) if not np.array_equal(p1[i], p0[i])]
    assert changed == [7, 9]
    np.testing.assert_array_equal(p1[9], steps[9]["prev_obs"][P1]["image"])


# ---------------------------------------------------------------- damaged input


@pytest.fixture(scope="module")
def single_player_id(raw: RawDataset) -> str:
    return next(e for e, m in raw.metadata().items() if m.task_id == "space_invaders_insideout")


def _copy_dataset(raw_sample: Path, dest: Path, episode_ids: tuple[str, ...] = ()) -> Path:
    """A copy of the DB and the `.pickle.bz2` files of `episode_ids`, to damage."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(raw_sample / "dataset.sqlite", dest / "dataset.sqlite")
    for episode_id in episode_ids:
        name = f"{episode_id}.pickle.bz2"
        shutil.copy2(raw_sample / name, dest / name)
    return dest


def _first_steps(raw_sample: Path, episode_id: str, count: int = 10) -> list[dict]:
    with open(raw_sample / f"{episode_id}.pickle", "rb") as file:
        return pickle.load(file)[:count]  # our own file, so the stdlib unpickler is fine


def _write_bz2(path: Path, steps: object) -> None:
    path.write_bytes(bz2.compress(pickle.dumps(steps, protocol=3), compresslevel=1))


def test_truncated_bz2_raises_corrupt_trajectory_naming_the_file(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path, (single_player_id,))
    path = root / f"{single_player_id}.pickle.bz2"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptTrajectoryError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert info.value.path == path
    assert str(path) in str(info.value) and "truncated" in str(info.value)


@pytest.mark.parametrize("suffix", ENCODINGS)
def test_garbage_bytes_raise_corrupt_trajectory(
    raw_sample: Path, single_player_id: str, tmp_path: Path, suffix: str
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    path = root / f"{single_player_id}{suffix}"
    path.write_bytes(b"this is not a CrowdPlay trajectory\n" * 100)
    with pytest.raises(CorruptTrajectoryError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert info.value.path == path and path.name in str(info.value)


def test_missing_trajectory_file_names_the_episode(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    raw = RawDataset(_copy_dataset(raw_sample, tmp_path))
    with pytest.raises(TrajectoryNotFoundError, match=single_player_id):
        raw.read_episode(single_player_id)
    missing = tmp_path / f"{single_player_id}.pickle.gz"
    with pytest.raises(TrajectoryNotFoundError, match=single_player_id) as info:
        raw.read_episode(single_player_id, path=missing)
    assert info.value.path == missing


def test_unknown_episode_id_is_a_schema_error(raw: RawDataset) -> None:
    with pytest.raises(SchemaError, match="not-an-episode"):
        raw.read_episode("not-an-episode")


def test_step_missing_a_key_names_the_step_and_field(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    steps = _first_steps(raw_sample, single_player_id)
    assert RawDataset(root).metadata()  # the copy itself is fine
    del steps[5]["reward"]
    path = root / f"{single_player_id}.pickle.bz2"
    _write_bz2(path, steps)
    with pytest.raises(SchemaError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert info.value.step == 5
    assert info.value.field == f"reward.{P0}"
    assert "step 5" in str(info.value) and "reward" in str(info.value)
    assert str(path) in str(info.value)


def test_step_missing_a_key_in_the_first_step(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    steps = _first_steps(raw_sample, single_player_id)
    del steps[0]["user_type"]
    _write_bz2(root / f"{single_player_id}.pickle.bz2", steps)
    with pytest.raises(SchemaError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert (info.value.step, info.value.field) == (0, "user_type")


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (np.zeros((84, 84, 3), dtype=np.uint8), "(84, 84, 3)"),
        (np.zeros(FRAME_SHAPE, dtype=np.float32), "float32"),
        ([[0] * 3] * 10, "list"),
    ],
)
def test_wrong_image_raises_schema_error(
    raw_sample: Path, single_player_id: str, tmp_path: Path, image: object, problem: str
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    steps = _first_steps(raw_sample, single_player_id)
    steps[3]["prev_obs"][P0]["image"] = image
    _write_bz2(root / f"{single_player_id}.pickle.bz2", steps)
    with pytest.raises(SchemaError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert (info.value.step, info.value.field) == (3, f"prev_obs.{P0}.image")
    assert problem in str(info.value) and "(210, 160, 3)" in str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [({"steps": []}, "list of step dicts"), ([], "no steps"), (["not a dict"], "not a dict")],
)
def test_trajectory_that_is_not_a_list_of_steps(
    raw_sample: Path, single_player_id: str, tmp_path: Path, content: object, problem: str
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    _write_bz2(root / f"{single_player_id}.pickle.bz2", content)
    with pytest.raises(SchemaError, match=problem):
        RawDataset(root).read_episode(single_player_id)


def test_bad_ram_and_user_type_raise_schema_errors(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    steps = _first_steps(raw_sample, single_player_id)
    steps[2]["info"][P0]["RAM"] = steps[2]["info"][P0]["RAM"][:100]
    _write_bz2(root / f"{single_player_id}.pickle.bz2", steps)
    with pytest.raises(SchemaError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert info.value.field == f"info.{P0}.RAM"

    steps = _first_steps(raw_sample, single_player_id)
    steps[7]["user_type"][P0] = 3
    _write_bz2(root / f"{single_player_id}.pickle.bz2", steps)
    with pytest.raises(SchemaError, match=r"value outside \[1, 2\]: 3") as info:
        RawDataset(root).read_episode(single_player_id)
    assert (info.value.step, info.value.field) == (7, f"user_type.{P0}")


def _set(field: str, value):
    """A change to step 5 of a single-player trajectory."""

    def change(step: dict) -> None:
        if field == "action":
            step["action"][P0]["game"] = value
        elif field in ("reward", "done", "user_type"):
            step[field][P0] = value
        elif field == "ram":
            step["info"][P0]["RAM"] = value
        elif field == "lives":
            step["info"][P0]["ale.lives"] = value
        elif field == "step_iter":
            step["step_iter"] = value
        elif field == "action_step_iter":
            step["action_step_iter"][P0] = value

    return change


STRICT_CASES = [  # (case, field, value, field named in the error)
    ("action as a string", "action", "3", f"action.{P0}.game"),
    ("action as a float", "action", 3.7, f"action.{P0}.game"),
    ("negative action", "action", -5, f"action.{P0}.game"),
    ("action as a bool", "action", True, f"action.{P0}.game"),
    ("action outside the set", "action", 99, f"action.{P0}.game"),
    ("NaN reward", "reward", float("nan"), f"reward.{P0}"),
    ("infinite reward", "reward", float("inf"), f"reward.{P0}"),
    ("reward as a string", "reward", "5", f"reward.{P0}"),
    ("done as a string", "done", "False", f"done.{P0}"),
    ("done as an int", "done", 2, f"done.{P0}"),
    ("done as None", "done", None, f"done.{P0}"),
    ("float RAM", "ram", [0.5] * 128, f"info.{P0}.RAM"),
    ("lives as a string", "lives", "3", f"info.{P0}.ale.lives"),
    ("lives as a float", "lives", 2.0, f"info.{P0}.ale.lives"),
    ("user_type as a string", "user_type", "1", f"user_type.{P0}"),
    ("user_type as a float", "user_type", 1.0, f"user_type.{P0}"),
    ("step_iter as a string", "step_iter", "6", "step_iter"),
    ("step_iter going back", "step_iter", 1, "step_iter"),
    ("action_step_iter as a float", "action_step_iter", 4.5, f"action_step_iter.{P0}"),
]


@pytest.mark.parametrize(
    "case, field, value, named", STRICT_CASES, ids=[c[0] for c in STRICT_CASES]
)
def test_bad_step_values_are_refused_by_file_step_and_field_never_coerced(
    raw_sample: Path, single_player_id: str, tmp_path: Path, case, field, value, named
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    steps = _first_steps(raw_sample, single_player_id)
    _set(field, value)(steps[5])
    _write_bz2(root / f"{single_player_id}.pickle.bz2", steps)
    with pytest.raises(SchemaError) as info:
        RawDataset(root).read_episode(single_player_id)
    assert info.value.field == named, case
    assert info.value.step == 5, case
    assert single_player_id in str(info.value)


def _damage_db(root: Path, statement: str, params: tuple = ()) -> None:
    db = sqlite3.connect(root / "dataset.sqlite")
    with db:  # commits
        db.execute(statement, params)
    db.close()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("DROP TABLE users", "'users' is missing"),
        ("DROP TABLE episodekeyworddata", "'episodekeyworddata' is missing"),
        ("ALTER TABLE users DROP COLUMN permanent_user_id", "permanent_user_id"),
        ("ALTER TABLE environments DROP COLUMN task_id", "task_id"),
    ],
)
def test_db_missing_a_table_or_column_names_the_db(
    raw_sample: Path, tmp_path: Path, statement: str, problem: str
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    _damage_db(root, statement)
    with pytest.raises(SchemaError, match=problem) as info:
        RawDataset(root)
    assert info.value.path == root / "dataset.sqlite"
    assert "dataset.sqlite" in str(info.value)


def test_missing_or_unreadable_db(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="metadata database not found"):
        RawDataset(tmp_path)
    (tmp_path / "dataset.sqlite").write_bytes(b"not a database" * 1000)
    with pytest.raises(SchemaError, match="dataset.sqlite"):
        RawDataset(tmp_path)


def test_episode_whose_environment_is_missing(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    environment_id = RawDataset(root).metadata()[single_player_id].environment_id
    _damage_db(root, "DELETE FROM environments WHERE environment_id = ?", params=(environment_id,))
    raw = RawDataset(root)
    assert single_player_id not in raw.metadata() and raw.metadata()  # skipped, the rest read
    message = raw.rejected[single_player_id]
    assert single_player_id in message and environment_id in message
    assert "environments" in message


def test_environment_without_game_keyword(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    environment_id = RawDataset(root).metadata()[single_player_id].environment_id
    _damage_db(
        root,
        "DELETE FROM environmentkeyworddata WHERE environment_id = ? AND key = 'game'",
        params=(environment_id,),
    )
    raw = RawDataset(root)
    assert single_player_id not in raw.metadata() and raw.metadata()  # skipped, the rest read
    assert "game" in raw.rejected[single_player_id]
    assert environment_id in raw.rejected[single_player_id]


def test_keyword_value_that_is_not_a_pickle(
    raw_sample: Path, single_player_id: str, tmp_path: Path
) -> None:
    root = _copy_dataset(raw_sample, tmp_path)
    _damage_db(
        root,
        "UPDATE episodekeyworddata SET value = ? WHERE episode_id = ? AND key = 'Score'",
        params=(b"\x80\x04garbage", single_player_id),
    )
    with pytest.raises(SchemaError) as info:
        RawDataset(root).metadata()
    message = str(info.value)
    assert "episodekeyworddata" in message and single_player_id in message
    assert "'Score'" in message and "dataset.sqlite" in message
