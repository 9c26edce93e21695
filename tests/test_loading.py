"""Tests for `crowdplay_minari.loading` on the emulator-made raw sample, converted once per module.

Everything is checked against the raw CrowdPlay files themselves: metadata against
`RawDataset.metadata()`, trajectories against the step dicts unpickled from the `.pickle.bz2`
files, and processed trajectories (`crowdplay_compat=True`) against the independent per-frame
reference in `tests/reference_processing.py` applied to those raw frames, so the whole chain
raw -> Minari -> loader is compared bit for bit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crowdplay_minari import loading
from crowdplay_minari.loading import CACHE_ENV, CrowdPlayDataset, EpisodeView, load_dataset
from crowdplay_minari.raw import RawDataset
from crowdplay_minari.raw.reader import load_steps
from crowdplay_minari.storage import DIGEST_ATTRIBUTE
from tests.reference_processing import reference_process

P0, P1 = "game_0>player_0", "game_0>player_1"
TWO_PLAYER_GAMES = ("space_invaders_2p", "space_invaders_ai")
SCALING_EPISODES = 10_000


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_root(converted_sample) -> Path:
    """The whole raw sample converted into a Minari root (shared by the session)."""
    return converted_sample[0]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "processed-cache"


@pytest.fixture
def minari_root(converted_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point Minari and the processing cache at this module's data for one test."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(converted_root))
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    return converted_root


@pytest.fixture
def data(minari_root: Path) -> CrowdPlayDataset:
    return load_dataset("crowdplay")


@pytest.fixture(scope="module")
def raw(raw_sample_bz2: Path) -> RawDataset:
    return RawDataset(raw_sample_bz2)


@dataclass(frozen=True)
class RawAgent:
    """One agent's per-frame arrays, taken straight from the raw step dicts."""

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray


class RawSource:
    """Raw step dicts (unpickled from the bz2 files by the raw reader), read once per episode."""

    def __init__(self, raw: RawDataset) -> None:
        self.raw = raw
        self._steps: dict[str, list[dict]] = {}
        self._agents: dict[tuple[str, str], RawAgent] = {}

    def steps(self, episode_id: str) -> list[dict]:
        if episode_id not in self._steps:
            path = self.raw.trajectory_path(episode_id)
            assert path.name.endswith(".pickle.bz2")
            self._steps[episode_id] = load_steps(path)
        return self._steps[episode_id]

    def agent(self, episode_id: str, agent: str) -> RawAgent:
        key = (episode_id, agent)
        if key not in self._agents:
            steps = self.steps(episode_id)
            self._agents[key] = RawAgent(
                frames=np.stack([s["prev_obs"][agent]["image"] for s in steps]),
                actions=np.array([s["action"][agent]["game"] for s in steps]),
                rewards=np.array([s["reward"][agent] for s in steps]),  # numpy ints, as stored
                dones=np.array([s["done"][agent] for s in steps]),
            )
        return self._agents[key]


@pytest.fixture(scope="module")
def raw_source(raw: RawDataset) -> RawSource:
    return RawSource(raw)


def _one(data: CrowdPlayDataset, **conditions) -> EpisodeView:
    matches = data.filter(**conditions)
    assert len(matches) == 1, (conditions, matches.episodes)
    return matches[0]


def _game_over_episode(data: CrowdPlayDataset) -> EpisodeView:
    """The sample's one episode that ends by game over (riverraid, 932 frames)."""
    return _one(data, predicate=lambda e: e.metadata["ended_by"] == "game_over")


def _short_episode(data: CrowdPlayDataset) -> EpisodeView:
    """The second Space Invaders plain episode, cut short (666 frames, session stopped)."""
    return _one(data, game="space_invaders", task="plain", max_score=50)


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.npys"))


# -- loading by id, list and namespace -----------------------------------------------------------


def test_load_by_id(minari_root: Path, raw: RawDataset) -> None:
    data = load_dataset("crowdplay/riverraid/plain-player_0-v1")
    assert len(data) == 1
    (episode,) = data
    assert episode.dataset_id == "crowdplay/riverraid/plain-player_0-v1"
    assert episode.game == "riverraid" and episode.agent_id == P0
    expected = next(m for m in raw.metadata().values() if m.game == "riverraid")
    assert episode.episode_id == expected.episode_id
    assert episode.num_steps == data.total_steps == 932


def test_load_by_list_keeps_order_and_drops_repeats(minari_root: Path) -> None:
    ids = [
        "crowdplay/space_invaders_2p/cooperative-player_1-v1",
        "crowdplay/qbert/plain-player_0-v1",
        "crowdplay/space_invaders_2p/cooperative-player_1-v1",
    ]
    data = load_dataset(ids)
    assert [e.dataset_id for e in data] == ids[:2]
    assert [e.agent_id for e in data] == [P1, P0]


def test_load_by_namespace(minari_root: Path, raw: RawDataset) -> None:
    everything = load_dataset("crowdplay")
    expected = {
        (episode_id, agent)
        for episode_id, meta in raw.metadata().items()
        for agent in ((P0, P1) if meta.game in TWO_PLAYER_GAMES else (P0,))
    }
    assert {(e.episode_id, e.agent_id) for e in everything} == expected
    assert len(everything) == len(expected) == 10

    space_invaders = load_dataset("crowdplay/space_invaders")  # not space_invaders_2p / _ai
    assert {e.game for e in space_invaders} == {"space_invaders"}
    assert len(space_invaders) == 4
    assert load_dataset("crowdplay/space_invaders/").total_steps == space_invaders.total_steps
    assert len(load_dataset(["crowdplay/space_invaders_2p", "crowdplay/qbert"])) == 3


def test_unknown_ids_and_namespaces_raise_clear_errors(minari_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"crowdplay/pong/plain-player_0-v1"):
        load_dataset("crowdplay/pong/plain-player_0-v1")
    with pytest.raises(ValueError, match=r"'crowdplay/pong'"):
        load_dataset("crowdplay/pong")
    with pytest.raises(ValueError, match=r"'nothing_here'"):
        load_dataset(["crowdplay/qbert", "nothing_here"])


# -- CrowdPlay-compatible metadata ---------------------------------------------------------------


def test_keyword_data_equals_the_raw_database(data: CrowdPlayDataset, raw: RawDataset) -> None:
    metadata = raw.metadata()
    for episode in data:
        meta = metadata[episode.episode_id]  # episode_id is CrowdPlay's own id
        agent = episode.agent_id
        assert episode.keyword_data[agent] == meta.keyword_data[agent]
        assert episode.keyword_data["all"] == meta.keyword_data["all"]
        for key, value in meta.keyword_data[agent].items():
            assert type(episode.keyword_data[agent][key]) is type(value), key
        assert episode.keyword_data[agent]["Score"] == meta.keyword_data[agent]["Score"]
        assert episode.score == float(meta.keyword_data[agent]["Score"])
        environment = episode.environment
        assert environment.keyword_data == meta.environment_keyword_data
        for key in ("game", "task", "source"):
            assert environment.keyword_data["all"][key] == getattr(meta, key)
        assert environment.environment_id == meta.environment_id
        assert environment.task_id == meta.task_id
        assert (episode.game, episode.task, episode.source) == (meta.game, meta.task, meta.source)


def test_timedelta_and_datetime_types_are_restored(data: CrowdPlayDataset) -> None:
    episode = _game_over_episode(data)
    stats = episode.keyword_data[P0]
    assert isinstance(stats["Time played"], dt.timedelta)
    assert stats["Time played"] == dt.timedelta(seconds=932 // 60)
    assert isinstance(stats["Active playtime"], dt.timedelta)
    assert isinstance(episode.keyword_data["all"]["created_on"], dt.datetime)
    assert isinstance(episode.environment.keyword_data["all"]["created_on"], dt.datetime)
    assert episode.environment.keyword_data["all"]["created_on"].tzinfo is None  # naive, as raw


def test_two_player_episode_shares_its_id_and_finds_its_partner(data: CrowdPlayDataset) -> None:
    p0 = _one(data, game="space_invaders_2p", agent=P0)
    p1 = _one(data, game="space_invaders_2p", agent=P1)
    assert p0.episode_id == p1.episode_id
    assert p0.dataset_id != p1.dataset_id
    assert p0.partner(P1) is p1 and p1.partner(P0) is p0
    assert p0.partner(P0) is p0
    assert data.by_episode_id[p0.episode_id] == [p0, p1]
    # a co-operative game: CrowdPlay's co-op wrapper gave both players the shared reward
    assert p0.keyword_data[P0]["Score"] == p1.keyword_data[P1]["Score"] == 875
    # a subset still reaches partners that were filtered out
    only_p0 = data.filter(agent=P0, game="space_invaders_2p")
    assert only_p0[0].partner(P1) is p1
    single = _game_over_episode(data)
    with pytest.raises(KeyError, match=single.episode_id):
        single.partner(P1)
    # the partner's dataset has to be loaded for partner() to find it
    alone = load_dataset("crowdplay/space_invaders_2p/cooperative-player_0-v1")
    with pytest.raises(KeyError, match="load that player's dataset"):
        alone[0].partner(P1)


# -- filtering -----------------------------------------------------------------------------------


def _keys(episodes) -> set[tuple[str, str]]:
    return {(e.episode_id, e.agent_id) for e in episodes}


def _expected(raw: RawDataset, keep) -> set[tuple[str, str]]:
    """(episode id, agent) pairs whose raw metadata satisfies `keep(meta, agent)`."""
    return {
        (episode_id, agent)
        for episode_id, meta in raw.metadata().items()
        for agent in ((P0, P1) if meta.game in TWO_PLAYER_GAMES else (P0,))
        if keep(meta, agent)
    }


def test_filter_by_game_task_source_agent(data: CrowdPlayDataset, raw: RawDataset) -> None:
    cases = [
        ({"game": "space_invaders"}, lambda m, a: m.game == "space_invaders", 4),
        (
            {"game": ["riverraid", "qbert"]},
            lambda m, a: m.game in ("riverraid", "qbert"),
            2,
        ),
        ({"task": "plain"}, lambda m, a: m.task == "plain", 4),
        ({"source": "email"}, lambda m, a: m.source == "email", 1),
        ({"source": {"socialmedia", "email"}}, lambda m, a: m.source != "mturk", 2),
        ({"agent": P1}, lambda m, a: a == P1, 2),
        ({"agent": "player_1"}, lambda m, a: a == P1, 2),
        (
            {"game": "space_invaders_ai", "agent": "player_0"},
            lambda m, a: m.game == "space_invaders_ai" and a == P0,
            1,
        ),
        ({"game": "pong"}, lambda m, a: False, 0),
    ]
    for conditions, keep, count in cases:
        selected = data.filter(**conditions)
        assert _keys(selected) == _expected(raw, keep), conditions
        assert len(selected) == count, conditions


def test_filter_by_score(data: CrowdPlayDataset, raw: RawDataset) -> None:
    def score(meta, agent) -> float:
        return float(meta.keyword_data[agent]["Score"])

    selected = data.filter(min_score=100)
    assert _keys(selected) == _expected(raw, lambda m, a: score(m, a) >= 100)
    assert len(selected) == 5  # qbert 150, riverraid 150, co-op 2p 875 / 875 (shared), AI 430
    between = data.filter(min_score=45, max_score=85)
    assert _keys(between) == _expected(raw, lambda m, a: 45 <= score(m, a) <= 85)
    assert sorted(e.score for e in between) == [50, 60, 70]
    # CrowdPlay's list comprehension gives the same
    crowdplay_style = [
        e
        for e in data.episodes
        if e.environment.keyword_data["all"]["game"] == "space_invaders"
        and e.environment.keyword_data["all"]["source"] == "mturk"
        and e.keyword_data[e.agent_id]["Score"] >= 50
    ]
    assert (
        crowdplay_style == data.filter(game="space_invaders", source="mturk", min_score=50).episodes
    )
    assert len(crowdplay_style) == 3


def test_filter_by_human_fraction(data: CrowdPlayDataset) -> None:
    takeover = _one(data, game="space_invaders_ai", agent=P0)
    always_ai = _one(data, game="space_invaders_ai", agent=P1)
    assert 0.0 < takeover.human_fraction < 1.0
    assert takeover.human_fraction == pytest.approx(0.5)
    assert always_ai.human_fraction == 0.0
    others = [e for e in data if e.game != "space_invaders_ai"]
    assert all(e.human_fraction == 1.0 for e in others)

    assert _keys(data.filter(min_human_fraction=1.0)) == _keys(others)
    assert _keys(data.filter(min_human_fraction=0.5)) == _keys([*others, takeover])
    assert _keys(data.filter(min_human_fraction=0.0)) == _keys(data)
    assert _keys(data.filter(min_human_fraction=1e-9)) == _keys(data) - _keys([always_ai])


def test_filter_by_keyword_bounds(data: CrowdPlayDataset, raw: RawDataset) -> None:
    short = _short_episode(data)
    assert short.keyword_data[P0]["Time played"] == dt.timedelta(seconds=11)
    # timedeltas compare in seconds; bounds are inclusive
    long_enough = data.filter(keyword={"Time played": (12, None)})
    assert _keys(long_enough) == _keys(data) - _keys([short])
    assert _keys(data.filter(keyword={"Time played": (None, 11)})) == _keys([short])
    assert _keys(data.filter(keyword={"Time played": (11, 11)})) == _keys([short])
    # a statistic the episode does not have excludes it
    aliens = data.filter(keyword={"Correct aliens shot (fraction)": (0.0, None)})
    assert [e.task for e in aliens] == ["insideout"]
    assert len(data.filter(keyword={"Correct aliens shot (fraction)": (None, 0.79)})) == 0
    assert len(data.filter(keyword={"Correct aliens shot (fraction)": (0.8, 0.8)})) == 1
    both = data.filter(keyword={"Score": (100, 300), "Time played": (15, 15)})
    assert _keys(both) == _expected(
        raw,
        lambda m, a: (
            100 <= m.keyword_data[a]["Score"] <= 300
            and m.keyword_data[a]["Time played"].total_seconds() == 15
        ),
    )
    assert [e.game for e in both] == ["riverraid"]
    # the two-player spelling of the same statistic
    assert {e.game for e in data.filter(keyword={"Active Playtime": (0, None)})} == set(
        TWO_PLAYER_GAMES
    )


def test_filter_by_task_adherence(data: CrowdPlayDataset) -> None:
    with_statistic = {e.task for e in data if e.task_adherence is not None}
    assert with_statistic == {"insideout", "left"}
    assert _one(data, task="insideout").task_adherence == 0.8
    # tasks without an adherence statistic always pass; bounds are inclusive
    lowest = min(e.task_adherence for e in data if e.task_adherence is not None)
    assert _keys(data.filter(min_task_adherence=lowest)) == _keys(data)
    assert {e.task for e in data.filter(min_task_adherence=1.5)} == {
        "plain",
        "cooperative",
        "competitive",
    }
    # the same episode with a worse (or missing) adherence statistic is dropped
    insideout = _one(data, task="insideout")
    key = "keyword_data/game_0>player_0/Correct aliens shot (fraction)"
    poor = EpisodeView(
        insideout.dataset_id,
        insideout.index,
        insideout.data_file,
        {**insideout.metadata, key: 0.3},
    )
    missing = EpisodeView(
        insideout.dataset_id,
        insideout.index,
        insideout.data_file,
        {k: v for k, v in insideout.metadata.items() if k != key},
    )
    mixed = CrowdPlayDataset([insideout, poor, missing])
    assert mixed.filter(min_task_adherence=0.5).episodes == [insideout]
    assert mixed.filter(min_task_adherence=0.3).episodes == [insideout, poor]


def test_filter_by_predicate_and_chaining(data: CrowdPlayDataset) -> None:
    long = data.filter(lambda e: e.num_steps >= 1000)
    assert all(e.num_steps >= 1000 for e in long)
    assert len(long) == 8  # all but the 932-frame riverraid and the 666-frame plain episode
    chained = long.filter(game="space_invaders").filter(min_score=50)
    assert sorted((e.task, e.score) for e in chained) == [("insideout", 60.0), ("plain", 70.0)]
    combined = data.filter(lambda e: e.num_steps >= 1000, game="space_invaders", min_score=50)
    assert combined.episodes == chained.episodes


def test_metadata_table_rows_match_episodes(data: CrowdPlayDataset, raw: RawDataset) -> None:
    table = data.metadata_table()
    assert len(table) == len(data)
    assert list(table.index) == list(range(len(data)))
    metadata = raw.metadata()
    for position, episode in enumerate(data):
        row = table.iloc[position]
        meta = metadata[episode.episode_id]
        stats = meta.keyword_data[episode.agent_id]
        assert row["episode_id"] == episode.episode_id
        assert row["agent_id"] == episode.agent_id
        assert row["dataset_id"] == episode.dataset_id and row["index"] == episode.index
        assert (row["game"], row["task"], row["source"]) == (meta.game, meta.task, meta.source)
        assert row["score"] == float(stats["Score"])
        assert row["Score"] == float(stats["Score"])
        assert row["Time played"] == stats["Time played"].total_seconds()
        assert row["human_fraction"] == episode.human_fraction
        assert row["num_steps"] == episode.num_steps
        assert row["ended_by"] == episode.metadata["ended_by"]
        user = meta.users.get(episode.agent_id)  # the AI partner has no user row
        if user is None:
            assert pd.isna(row["user_id"]) and episode.metadata["user_id"] is None
        else:
            assert row["user_id"] == user.user_id
        if episode.task_adherence is None:
            assert pd.isna(row["task_adherence"])
        else:
            assert row["task_adherence"] == episode.task_adherence
    assert (table["ended_by"] == "game_over").sum() == 1


def test_select_from_a_pandas_query(data: CrowdPlayDataset) -> None:
    table = data.metadata_table()
    rows = table.query("score >= 100 and player == 'player_0'")
    selected = data.select(rows.index)
    assert [e.episode_id for e in selected] == list(rows["episode_id"])
    assert _keys(selected) == _keys(data.filter(min_score=100, agent=P0))
    assert len(selected) == 4
    ai_game = data.select(table.index[table["game"] == "space_invaders_ai"])
    assert [e.agent_id for e in ai_game] == [P0, P1]
    assert ai_game[0].partner(P1) is ai_game[1]
    assert len(data.select([])) == 0


def test_filter_and_table_scale_to_ten_thousand_episodes(data: CrowdPlayDataset) -> None:
    views = []
    for i in range(SCALING_EPISODES):
        source = data.episodes[i % len(data)]
        metadata = dict(source.metadata)
        metadata["crowdplay_episode_id"] = f"synthetic-{i // 2:05d}"  # pairs share an id
        score_key = f"keyword_data/{source.agent_id}/Score"
        metadata[score_key] = np.int64(i % 500)
        views.append(EpisodeView(source.dataset_id, source.index, source.data_file, metadata))
    started = time.perf_counter()
    big = CrowdPlayDataset(views)
    built = time.perf_counter()
    selected = big.filter(game="space_invaders", min_score=250, keyword={"Time played": (12, None)})
    filtered = time.perf_counter()
    table = big.metadata_table()
    tabled = time.perf_counter()
    print(
        f"\n{SCALING_EPISODES} episodes: build {built - started:.3f} s, "
        f"filter {filtered - built:.3f} s, metadata_table {tabled - filtered:.3f} s"
    )
    expected = [
        v
        for v in views
        if v.game == "space_invaders"
        and v.metadata[f"keyword_data/{v.agent_id}/Score"] >= 250
        and v.keyword_data[v.agent_id]["Time played"].total_seconds() >= 12
    ]
    assert selected.episodes == expected and len(expected) > 0
    assert len(big.by_episode_id) == SCALING_EPISODES // 2
    assert len(table) == SCALING_EPISODES
    assert table["score"].tolist() == [float(i % 500) for i in range(SCALING_EPISODES)]
    assert big.select(table.index[table["score"] >= 250]).episodes == [
        v for i, v in enumerate(views) if i % 500 >= 250
    ]


# -- processed trajectories ----------------------------------------------------------------------

# (name, options): warp on/off, scale, stack 1/4, max 1/2, skip 1/4, odd warp sizes, downsampling
# 1/3/4 with several offsets (the riverraid episode has 932 frames: its last frame, 931, is on
# phase 3 of 4 and phase 1 of 3, where compat mode keeps the game-over flag), axis first.
COMPAT_CASES: list[tuple[str, dict]] = [
    ("default", {}),
    ("d3rlpy_o0", dict(framestack_axis_first=True, downsample_frequency=4, stack_n=1)),
    (
        "d3rlpy_o2",
        dict(framestack_axis_first=True, downsample_frequency=4, downsample_offset=2, stack_n=1),
    ),
    (
        "d3rlpy_o3_scaled",
        dict(
            framestack_axis_first=True,
            downsample_frequency=4,
            downsample_offset=3,
            stack_n=1,
            scale=True,
        ),
    ),
    ("stack4_skip1_max1", dict(stack_n=4, skip_n=1, max_n=1)),
    (
        "scaled_axis_first_k3_o1",
        dict(scale=True, framestack_axis_first=True, downsample_frequency=3, downsample_offset=1),
    ),
    (
        "odd_warp_k3_o2",
        dict(warp_width=85, warp_height=61, downsample_frequency=3, downsample_offset=2),
    ),
    (
        "odd_warp_small_k4_o1",
        dict(
            warp_width=33,
            warp_height=47,
            stack_n=2,
            max_n=1,
            downsample_frequency=4,
            downsample_offset=1,
        ),
    ),
    ("upscale_width", dict(warp_width=200, warp_height=105, stack_n=1, downsample_frequency=4)),
    (
        "no_warp_stack2_k4_o2",
        dict(warp=False, stack_n=2, downsample_frequency=4, downsample_offset=2),
    ),
    ("no_warp_max1_k3", dict(warp=False, stack_n=1, max_n=1, downsample_frequency=3)),
    (
        "no_warp_scaled_axis_first_k4_o3",
        dict(
            warp=False,
            scale=True,
            stack_n=1,
            framestack_axis_first=True,
            downsample_frequency=4,
            downsample_offset=3,
        ),
    ),
]


def _assert_matches_reference(got: tuple[np.ndarray, ...], source: RawAgent, options: dict) -> None:
    observations, actions, rewards, terminals = got
    ref_obs, ref_actions, ref_rewards, ref_terminals = reference_process(
        source.frames, source.actions, source.rewards, source.dones, **options
    )
    assert len(observations) == len(ref_obs) > 0
    assert observations.dtype == ref_obs[0].dtype
    assert observations.shape[1:] == ref_obs[0].shape
    assert np.array_equal(observations, np.stack(ref_obs))
    assert actions.tolist() == ref_actions
    # CrowdPlay's rewards are numpy integers: sums must stay integers, not floats
    assert rewards.dtype.kind == "i", rewards.dtype
    assert rewards.tolist() == [int(r) for r in ref_rewards]
    assert terminals.tolist() == ref_terminals


@pytest.mark.parametrize("options", [c[1] for c in COMPAT_CASES], ids=[c[0] for c in COMPAT_CASES])
def test_compat_processing_equals_the_reference_on_raw_frames(
    data: CrowdPlayDataset, raw_source: RawSource, options: dict
) -> None:
    episode = _game_over_episode(data)
    source = raw_source.agent(episode.episode_id, P0)
    got = episode.get_processed_trajectory(crowdplay_compat=True, **options)
    _assert_matches_reference(got, source, options)
    k = options.get("downsample_frequency", 1)
    if (episode.num_steps - 1) % k == options.get("downsample_offset", 0):
        assert got[3][-1] == 1  # the game-over frame is on the kept phase


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(framestack_axis_first=True, downsample_frequency=4, downsample_offset=1, stack_n=1),
        dict(downsample_frequency=3, downsample_offset=2, max_n=1, skip_n=1),
    ],
    ids=["default", "d3rlpy_o1", "k3_o2"],
)
def test_compat_processing_of_other_episodes(
    data: CrowdPlayDataset, raw_source: RawSource, options: dict
) -> None:
    short = _short_episode(data)  # 666 frames, truncated
    _assert_matches_reference(
        short.get_processed_trajectory(crowdplay_compat=True, **options),
        raw_source.agent(short.episode_id, P0),
        options,
    )
    # the second player of a two-player game, reached from the first player's episode
    p0 = _one(data, game="space_invaders_2p", agent=P0)
    got = p0.get_processed_trajectory(agent=P1, crowdplay_compat=True, **options)
    _assert_matches_reference(got, raw_source.agent(p0.episode_id, P1), options)
    own = p0.partner(P1).get_processed_trajectory(crowdplay_compat=True, **options)
    for a, b in zip(got, own, strict=True):
        assert np.array_equal(a, b)
    # both players see the same screen but act and score differently
    mine = p0.get_processed_trajectory(crowdplay_compat=True, **options)
    assert np.array_equal(mine[0], got[0])
    assert not np.array_equal(mine[1], got[1])


@pytest.mark.parametrize("frequency", [1, 3, 4])
def test_corrected_mode_keeps_every_episode_end(
    data: CrowdPlayDataset, raw_source: RawSource, frequency: int
) -> None:
    for episode in (_game_over_episode(data), _short_episode(data)):
        source = raw_source.agent(episode.episode_id, P0)
        n = episode.num_steps
        game_over = episode.metadata["ended_by"] == "game_over"
        assert game_over == bool(source.dones[-1])
        every_frame, _, _, _ = reference_process(
            source.frames,
            source.actions,
            source.rewards,
            source.dones,
            framestack_axis_first=True,
            stack_n=1,
        )
        for offset in range(frequency):
            config = loading.ProcessingConfig.d3rlpy_preset(
                downsample_frequency=frequency, downsample_offset=offset
            )
            result = episode.process(config)
            kept = np.arange(offset, n, frequency)
            assert result.frame_indices.tolist() == kept.tolist()
            observations, actions, rewards, terminals = episode.get_processed_trajectory(
                framestack_axis_first=True,
                downsample_frequency=frequency,
                downsample_offset=offset,
                stack_n=1,
            )
            assert len(actions) == len(kept)
            # the end of the episode is always there, on the last kept step
            assert terminals.tolist() == [0] * (len(kept) - 1) + [int(game_over)]
            assert result.timeouts.tolist() == [0] * (len(kept) - 1) + [int(not game_over)]
            # the same pixels as CrowdPlay's processing of those frames
            assert np.array_equal(observations, np.stack([every_frame[i] for i in kept]))
            assert actions.tolist() == source.actions[kept].tolist()
            # a kept step's reward is earned over the frames its action is repeated for
            expected = [int(source.rewards[i : i + frequency].sum()) for i in kept]
            assert rewards.tolist() == expected
            assert rewards.dtype.kind == "i"
            assert rewards.sum() == source.rewards[offset:].sum()
        assert source.rewards.sum() > 0


def test_processed_trajectories_are_cached(
    data: CrowdPlayDataset, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    episode = _short_episode(data)
    options = dict(framestack_axis_first=True, downsample_frequency=4, stack_n=1)
    assert _cache_files(cache_dir) == []
    first = episode.get_processed_trajectory(**options)
    (entry,) = _cache_files(cache_dir)

    # served from the cache file: computing again would fail
    real_process = loading.compact_trajectory

    def no_processing(*args, **kwargs):
        raise AssertionError("processed again instead of read from the cache")

    monkeypatch.setattr(loading, "compact_trajectory", no_processing)
    second = episode.get_processed_trajectory(**options)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert _cache_files(cache_dir) == [entry]

    # another option is another entry
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["config"])
        return real_process(*args, **kwargs)

    monkeypatch.setattr(loading, "compact_trajectory", counting)
    episode.get_processed_trajectory(**options, downsample_offset=1)
    assert len(calls) == 1 and len(_cache_files(cache_dir)) == 2
    episode.get_processed_trajectory(**options, crowdplay_compat=True)
    assert len(calls) == 2 and len(_cache_files(cache_dir)) == 3
    episode.get_processed_trajectory(**options)
    assert len(calls) == 2  # still cached

    # entries are keyed by the episode's recorded digest: a data file rewritten by a publish
    # (new modification time) holds the same episode, and its entry still serves
    stat = episode.data_file.stat()
    try:
        os.utime(episode.data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        episode.get_processed_trajectory(**options)
        assert len(calls) == 2
        # another digest is other data: a new entry
        recorded = episode.metadata[DIGEST_ATTRIBUTE]
        episode.metadata[DIGEST_ATTRIBUTE] = "0" * 64
        third = episode.get_processed_trajectory(**options)
        assert len(calls) == 3 and len(_cache_files(cache_dir)) == 4
        # an episode without a digest (converted before checksums) is keyed by its file
        del episode.metadata[DIGEST_ATTRIBUTE]
        episode.get_processed_trajectory(**options)
        assert len(calls) == 4
        os.utime(episode.data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000_000))
        episode.get_processed_trajectory(**options)
        assert len(calls) == 5 and len(_cache_files(cache_dir)) == 6
        episode.metadata[DIGEST_ATTRIBUTE] = recorded
    finally:
        os.utime(episode.data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for a, b in zip(first, third, strict=True):
        assert np.array_equal(a, b)

    # a damaged entry is recomputed, not returned
    entry.write_bytes(b"not a cache entry")
    fourth = episode.get_processed_trajectory(**options)
    assert len(calls) == 6
    for a, b in zip(first, fourth, strict=True):
        assert np.array_equal(a, b)

    # an entry whose stacks point past its frames is damaged too
    compact = loading._read_cache_entry(entry)
    loading._atomic_save(
        entry,
        dataclasses.replace(
            compact, stacks=loading.FrameStacks(compact.stacks.frames[:-1], compact.stacks.rows)
        ),
    )
    fifth = episode.get_processed_trajectory(**options)
    assert len(calls) == 7
    for a, b in zip(first, fifth, strict=True):
        assert np.array_equal(a, b)

    # the other player of the same game (same episode id) has its own entries
    p0 = _one(data, game="space_invaders_2p", agent=P0)
    p0.get_processed_trajectory(**options)
    p0.get_processed_trajectory(agent=P1, **options)
    assert len(calls) == 9 and len(_cache_files(cache_dir)) == 8
    assert all(path.is_relative_to(cache_dir) for path in _cache_files(cache_dir))


def test_process_without_cache_writes_nothing(data: CrowdPlayDataset, cache_dir: Path) -> None:
    episode = _short_episode(data)
    config = loading.ProcessingConfig.d3rlpy_preset()
    result = episode.process(config, cache=False)
    assert _cache_files(cache_dir) == []
    assert len(result) == len(range(0, episode.num_steps, 4))


# -- raw trajectories ----------------------------------------------------------------------------


@pytest.mark.parametrize("game", TWO_PLAYER_GAMES)
def test_raw_trajectory_equals_the_raw_step_dicts(
    data: CrowdPlayDataset, raw_source: RawSource, game: str
) -> None:
    p0 = _one(data, game=game, agent=P0)
    raw_steps = raw_source.steps(p0.episode_id)
    for view in (p0, p0.partner(P1)):
        steps = view.get_raw_trajectory()
        assert len(steps) == len(raw_steps) == view.num_steps
        for i, (got, want) in enumerate(zip(steps, raw_steps, strict=True)):
            assert got["step_iter"] == want["step_iter"], i
            assert got["done"]["__all__"] == want["done"]["__all__"], i
            for agent in (P0, P1):
                assert np.array_equal(
                    got["prev_obs"][agent]["image"], want["prev_obs"][agent]["image"]
                ), (i, agent)
                assert got["action"][agent] == want["action"][agent], (i, agent)
                assert got["action_step_iter"][agent] == want["action_step_iter"][agent]
                assert got["reward"][agent] == want["reward"][agent], (i, agent)
                assert got["done"][agent] == want["done"][agent], (i, agent)
                assert got["info"][agent]["RAM"] == list(want["info"][agent]["RAM"]), (i, agent)
                assert got["info"][agent]["ale.lives"] == want["info"][agent]["ale.lives"]
                assert got["user_type"][agent] == want["user_type"][agent], (i, agent)
    if game == "space_invaders_ai":  # the human of player 0 was replaced by the AI mid-episode
        user_types = [step["user_type"][P0] for step in p0.get_raw_trajectory()]
        assert user_types[0] == 1 and user_types[-1] == 2


def test_raw_trajectory_of_a_lone_dataset_has_only_its_agent(
    minari_root: Path, raw_source: RawSource
) -> None:
    (p1,) = load_dataset("crowdplay/space_invaders_2p/cooperative-player_1-v1")
    steps = p1.get_raw_trajectory()
    raw_steps = raw_source.steps(p1.episode_id)
    assert set(steps[0]["prev_obs"]) == {P1}
    assert [s["action"][P1]["game"] for s in steps] == [s["action"][P1]["game"] for s in raw_steps]
    assert [s["reward"][P1] for s in steps] == [s["reward"][P1] for s in raw_steps]
    # the running statistics travel too (timedeltas as seconds)
    assert (
        steps[-1]["episode_callables"]["Score"][P1]
        == raw_steps[-1]["episode_callables"]["Score"][P1]
    )


def test_the_metadata_index_gives_exactly_the_stored_attributes(converted_root, tmp_path):
    """load_dataset reads episode attributes from a JSON index kept beside the cache: the same
    values and types as h5py's, read again when the file changes or the index is damaged."""
    import h5py

    def direct(main: Path) -> list[tuple[int, dict]]:
        with h5py.File(main, "r") as file:
            return sorted((int(n.rsplit("_", 1)[1]), dict(file[n].attrs)) for n in file)

    def same(a: list[tuple[int, dict]], b: list[tuple[int, dict]]) -> bool:
        for (i, x), (j, y) in zip(a, b, strict=True):
            assert i == j and x.keys() == y.keys()
            for key in x:
                assert type(x[key]) is type(y[key]), key
                assert np.array_equal(x[key], y[key], equal_nan=not isinstance(x[key], str)), key
        return True

    cache = tmp_path / "processed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        mains = sorted(converted_root.glob("**/main_data.hdf5"))
        for main in mains:
            first = loading._episode_attributes(main)  # read from the file, index written
            again = loading._episode_attributes(main)  # read from the index
            assert same(first, direct(main)) and same(again, direct(main))
        indexes = sorted((tmp_path / "metadata").glob("*.json"))
        assert len(indexes) == len(mains)
        indexes[0].write_text('{"identity": ')  # torn: the file is read again
        assert all(same(loading._episode_attributes(m), direct(m)) for m in mains)
        from_index = load_dataset("crowdplay", root=converted_root).metadata_table()
        patch.setenv(CACHE_ENV, str(tmp_path / "other" / "processed"))
        from_files = load_dataset("crowdplay", root=converted_root).metadata_table()
        assert len(from_index) > 0 and from_index.equals(from_files)
