"""Selective conversion: `convert --game/--task/--source/--agent-kind/--min-score/--episode`
converts exactly what the metadata selects, `--dry-run` writes nothing and predicts what a real
run then converts, narrower runs never shrink a dataset and wider ones convert only what is new.

Expected episodes are worked out here from the sample's metadata, independently of
`EpisodeSelection`, and the datasets are read back with the loader or plain Minari.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from crowdplay_minari.benchmarks.cli import main
from crowdplay_minari.cli import EXIT_OK, EXIT_USAGE
from crowdplay_minari.conversion.convert import (
    STAGING_DIR,
    ConversionConfig,
    EpisodeJob,
    convert,
    plan_conversion,
    stage_episode,
)
from crowdplay_minari.games import UnknownGameError
from crowdplay_minari.loading import load_dataset
from crowdplay_minari.raw import RawDataset
from crowdplay_minari.raw.selection import (
    EpisodeSelection,
    SelectionError,
    agent_kind,
    metadata_frames,
)

P0, P1 = "game_0>player_0", "game_0>player_1"


# -- helpers -----------------------------------------------------------------------------------


def _metadata(raw_dir: Path) -> dict:
    return RawDataset(raw_dir).metadata()


def _expected(raw_dir: Path, keep) -> set[tuple[str, str]]:
    """(dataset id, episode id) of every agent `keep(meta, agent_id)` accepts."""
    expected = set()
    for meta in _metadata(raw_dir).values():
        agents = [P0, P1] if meta.game in ("space_invaders_2p", "space_invaders_ai") else [P0]
        for agent in agents:
            if keep(meta, agent):
                player = agent.split(">")[1]
                expected.add((f"crowdplay/{meta.game}/{meta.task}-{player}-v1", meta.episode_id))
    return expected


def _converted(root: Path) -> set[tuple[str, str]]:
    """(dataset id, episode id) of every episode under `root`, read with the loader."""
    if not (root / "crowdplay").exists():
        return set()
    return {(e.dataset_id, e.episode_id) for e in load_dataset("crowdplay", root=root)}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["convert", *argv])
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tree(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every file and folder under `path` with its size and modification time (None: absent)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in [path, *path.rglob("*")]
    }


TABLE_ROW = re.compile(r"^  (crowdplay/\S+)\s+(\d+)\s+(\d+)\s+~([\d,]+)\s+~([\d.]+) ([KMG]?B)$")
TOTALS = re.compile(r"would convert (\d+) episode\(s\), ~([\d,]+) frames \(([\d,]+) to ([\d,]+)\)")
CONVERTED = re.compile(r"converted (\d+) episode\(s\), (\d+) frames")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _dry_run_table(out: str) -> dict[str, tuple[int, int]]:
    """dataset id -> (episodes after the run, new episodes), from the dry run's table."""
    rows = [TABLE_ROW.match(line) for line in out.splitlines()]
    return {m[1]: (int(m[2]), int(m[3])) for m in rows if m}


def _report_table(out: str) -> dict[str, int]:
    """dataset id -> episodes, from a real run's output."""
    rows = [re.match(r"^(crowdplay/\S+)  \((\d+) episodes", line) for line in out.splitlines()]
    return {m[1]: int(m[2]) for m in rows if m}


def _by_score(raw_dir: Path) -> dict[int, str]:
    """Score of player_0 -> episode id, for the sample's single-player Space Invaders episodes
    (plain 70 and 50, insideout 60, left 40: all different)."""
    found = {
        int(meta.keyword_data[P0]["Score"]): episode_id
        for episode_id, meta in _metadata(raw_dir).items()
        if meta.game == "space_invaders"
    }
    assert len(found) == 4, found
    return found


# -- which episodes and agents -----------------------------------------------------------------


SELECTIONS = {
    "games and tasks": (
        ["--game", "space_invaders", "--task", "plain", "--task", "left"],
        lambda meta, agent: meta.game == "space_invaders" and meta.task in ("plain", "left"),
    ),
    "sources": (
        ["--source", "email", "--source", "socialmedia"],
        lambda meta, agent: meta.source in ("email", "socialmedia"),
    ),
    "ai agents": (
        ["--agent-kind", "ai"],
        lambda meta, agent: meta.game == "space_invaders_ai" and agent == P1,
    ),
    "human agents of two-player games": (
        ["--game", "space_invaders_2p", "--game", "space_invaders_ai", "--agent-kind", "human"],
        lambda meta, agent: (
            meta.game.startswith("space_invaders_")
            and (meta.game == "space_invaders_2p" or agent == P0)
        ),
    ),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_a_selection_converts_exactly_what_it_selects_and_the_dry_run_said_so(
    name, raw_sample_bz2, tmp_path, capsys
):
    argv, keep = SELECTIONS[name]
    expected = _expected(raw_sample_bz2, keep)
    assert expected, "the selection must select something in the sample"
    root = tmp_path / "minari"
    args = [str(raw_sample_bz2), "--root", str(root), "--workers", "1", "--quiet", *argv]

    code, dry, _ = _cli([*args, "--dry-run"], capsys)
    assert code == EXIT_OK, dry
    assert not root.exists(), "the dry run created the datasets folder"
    predicted = _dry_run_table(dry)
    dry_episodes, _, low, high = TOTALS.search(dry).groups()

    code, out, err = _cli(args, capsys)
    assert code == EXIT_OK, out + err
    assert _converted(root) == expected
    # The dry run's numbers are the real run's.
    published = _report_table(out)
    assert predicted == {d: (n, n) for d, n in published.items()}
    assert set(predicted) == {dataset for dataset, _ in expected}
    episodes, frames = map(int, CONVERTED.search(out).groups())
    assert episodes == int(dry_episodes) == len({episode for _, episode in expected})
    assert _number(low) <= frames <= _number(high)
    assert not list((root / STAGING_DIR / "episodes").glob("*/*.h5"))


def test_min_score_keeps_the_agents_the_loaders_filter_keeps(
    converted_sample, raw_sample_bz2, tmp_path
):
    """`min_score` reads the score as the loader does (`Score`, inclusive): converting with it
    gives the episodes `filter(min_score=...)` picks out of a full conversion."""
    full_root, _ = converted_sample
    threshold = 60  # the insideout episode scored exactly 60; 50, 40 and 35 fall short
    kept = load_dataset("crowdplay", root=full_root).filter(min_score=threshold)
    expected = {(e.dataset_id, e.episode_id) for e in kept}
    assert 0 < len(expected) < len(load_dataset("crowdplay", root=full_root))
    assert any(e.score == threshold for e in kept)

    root = tmp_path / "minari"
    config = ConversionConfig(
        raw_sample_bz2,
        root=root,
        progress=False,
        selection=EpisodeSelection(min_score=threshold),
    )
    planned = plan_conversion(config)
    report = convert(config, log=lambda message: None)
    assert report.ok
    assert _converted(root) == expected
    assert all(e.score >= threshold for e in load_dataset("crowdplay", root=root))
    # The space_invaders_ai episode: player_0 (430) converted, its AI partner (35) not.
    assert "crowdplay/space_invaders_ai/competitive-player_1-v1" not in report.datasets
    assert "crowdplay/space_invaders_ai/competitive-player_0-v1" in report.datasets
    # What the plan said: counts exactly, frames within its bounds, size near its estimate.
    assert planned.episodes_to_convert == report.episodes_converted
    assert planned.frames.low <= report.frames_converted <= planned.frames.high
    assert {d: p.episodes_after for d, p in planned.writing.items()} == {
        d: info["episodes"] for d, info in report.datasets.items()
    }
    for dataset_id, dataset in planned.writing.items():
        assert dataset.new_frames.low <= report.datasets[dataset_id]["steps"]
        assert report.datasets[dataset_id]["steps"] <= dataset.new_frames.high
    actual = sum(p.stat().st_size for p in root.rglob("data/*") if p.is_file())
    estimated = sum(dataset.estimated_bytes_after for dataset in planned.writing.values())
    assert 0.75 < estimated / actual < 1.25, (estimated, actual)
    assert report.selection["min_score"] == threshold


# -- resuming and adding up --------------------------------------------------------------------


def test_narrow_runs_add_up_never_shrink_a_dataset_and_wider_runs_convert_only_the_new(
    raw_sample_bz2, tmp_path, monkeypatch, capsys
):
    import hdf5plugin  # noqa: F401  (the zstd filter, for plain Minari)
    import minari

    scores = _by_score(raw_sample_bz2)
    root = tmp_path / "minari"
    base = [str(raw_sample_bz2), "--root", str(root), "--workers", "1", "--quiet"]
    plain = "crowdplay/space_invaders/plain-player_0-v1"
    insideout = "crowdplay/space_invaders/insideout-player_0-v1"
    left = "crowdplay/space_invaders/left-player_0-v1"

    code, out, _ = _cli([*base, "--game", "space_invaders", "--min-score", "60"], capsys)
    assert code == EXIT_OK, out
    assert _converted(root) == {(plain, scores[70]), (insideout, scores[60])}
    insideout_file = root / insideout / "data" / "main_data.hdf5"
    insideout_before = insideout_file.stat().st_mtime_ns

    # A narrower, different selection adds its episode to the dataset and keeps the other.
    code, out, _ = _cli([*base, "--episode", scores[50]], capsys)
    assert code == EXIT_OK, out
    assert _converted(root) == {(plain, scores[70]), (plain, scores[50]), (insideout, scores[60])}
    assert insideout_file.stat().st_mtime_ns == insideout_before  # not touched at all

    # A wider one: the dry run and the run agree that only the left episode is new.
    wider = [*base, "--game", "space_invaders"]
    code, dry, _ = _cli([*wider, "--dry-run"], capsys)
    assert code == EXIT_OK
    assert _dry_run_table(dry) == {left: (1, 1)}
    assert "3 already converted; 2 selected dataset(s) already complete" in dry
    code, out, _ = _cli(wider, capsys)
    assert code == EXIT_OK, out
    assert "converted 1 episode(s)" in out and "3 already done" in out
    expected = {(plain, scores[70]), (plain, scores[50]), (insideout, scores[60])}
    assert _converted(root) == expected | {(left, scores[40])}

    # Rerunning the narrowest selection converts nothing and removes nothing.
    code, out, _ = _cli([*base, "--episode", scores[70]], capsys)
    assert code == EXIT_OK and "converted 0 episode(s)" in out
    # Plain Minari reads the merged dataset whole.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    dataset = minari.load_dataset(plain)
    assert dataset.total_episodes == 2
    ids = {
        meta["crowdplay_episode_id"]
        for meta in dataset.storage.get_episode_metadata(dataset.episode_indices)
    }
    assert ids == {scores[70], scores[50]}
    assert sum(len(e.actions) for e in dataset.iterate_episodes()) == dataset.total_steps


def test_the_other_agent_of_an_episode_is_converted_later_without_touching_the_first(
    raw_sample_bz2, tmp_path, capsys
):
    root = tmp_path / "minari"
    base = [str(raw_sample_bz2), "--root", str(root), "--workers", "1", "--quiet"]
    (episode_id,) = [
        e for e, m in _metadata(raw_sample_bz2).items() if m.game == "space_invaders_ai"
    ]
    human = "crowdplay/space_invaders_ai/competitive-player_0-v1"
    ai = "crowdplay/space_invaders_ai/competitive-player_1-v1"

    code, out, _ = _cli([*base, "--game", "space_invaders_ai", "--agent-kind", "human"], capsys)
    assert code == EXIT_OK, out
    assert _converted(root) == {(human, episode_id)}
    human_file = root / human / "data" / "main_data.hdf5"
    before = human_file.stat().st_mtime_ns

    code, out, _ = _cli([*base, "--game", "space_invaders_ai"], capsys)
    assert code == EXIT_OK, out
    assert "converted 1 episode(s)" in out  # staged again, for its AI player only
    assert _converted(root) == {(human, episode_id), (ai, episode_id)}
    assert human_file.stat().st_mtime_ns == before


# -- the dry run writes nothing --------------------------------------------------------------


def test_the_dry_run_writes_nothing_and_counts_what_an_interrupted_run_left(
    raw_sample_bz2, tmp_path, capsys
):
    """A root holding a published dataset, an episode staged by an interrupted run and a
    killed run's temporary file: the dry run leaves every byte and time stamp as it was, and
    the real run then publishes what it said."""
    scores = _by_score(raw_sample_bz2)
    meta = _metadata(raw_sample_bz2)
    root = tmp_path / "minari"
    plain = "crowdplay/space_invaders/plain-player_0-v1"
    report = convert(
        ConversionConfig(raw_sample_bz2, root=root, episode_ids=(scores[70],), progress=False),
        log=lambda message: None,
    )
    assert report.datasets == {
        plain: {"episodes": 1, "steps": report.frames_converted, "copied": 1}
    }
    staging = root / STAGING_DIR
    staged = stage_episode(
        EpisodeJob(raw_sample_bz2, meta[scores[50]], "crowdplay", staging, (P0,))
    )
    assert not staged.error and staged.staged == [(plain, P0)]
    stray = staging / "episodes" / "crowdplay__space_invaders__plain-player_0-v1" / "x.h5.tmp"
    stray.write_bytes(b"left by a killed run")
    before, raw_before = _tree(root), _tree(raw_sample_bz2)

    args = [str(raw_sample_bz2), "--root", str(root), "--game", "space_invaders", "--quiet"]
    code, dry, err = _cli([*args, "--dry-run"], capsys)
    assert code == EXIT_OK, dry + err
    assert _tree(root) == before and _tree(raw_sample_bz2) == raw_before
    assert stray.exists()
    table = _dry_run_table(dry)
    # plain: the published one, the staged one (published by the run), nothing new to stage.
    assert table[plain] == (2, 0)
    assert set(table) == {
        plain,
        "crowdplay/space_invaders/insideout-player_0-v1",
        "crowdplay/space_invaders/left-player_0-v1",
    }
    assert "would convert 2 episode(s)" in dry and "2 already converted" in dry

    code, out, err = _cli([*args, "--workers", "1"], capsys)
    assert code == EXIT_OK, out + err
    assert _report_table(out) == {dataset: episodes for dataset, (episodes, _) in table.items()}
    assert "converted 2 episode(s)" in out and "2 already done" in out
    assert not stray.exists()


def test_the_dry_run_does_not_create_minaris_default_folder(
    raw_sample_bz2, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MINARI_DATASETS_PATH", raising=False)
    code, out, err = _cli([str(raw_sample_bz2), "--game", "qbert", "--dry-run"], capsys)
    assert code == EXIT_OK, out + err
    assert str(home / ".minari" / "datasets") in out
    assert "crowdplay/qbert/plain-player_0-v1" in _dry_run_table(out)
    assert list(home.iterdir()) == []


# -- bad selections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--game", "pong"], "expected one of space_invaders"),
        (["--game", "qbert", "--task", "left"], "tasks there: plain; give --task one of those"),
        (["--min-score", "100000"], "best Score there is 875; give a lower --min-score"),
        (["--min-score", "inf"], "expected a finite number"),
        (["--agent-kind", "ai", "--source", "email"], "kinds there: human"),
        (["--agent-kind", "robot"], "invalid choice"),
        (["--episode", "no-such-episode"], "'no-such-episode' is not in"),
        (["--dry-run", "--verify"], "give one of them"),
    ],
)
def test_a_bad_selection_is_one_line_exit_2_and_writes_nothing(
    argv, says, raw_sample_bz2, tmp_path, capsys
):
    root = tmp_path / "minari"
    code, out, err = _cli([str(raw_sample_bz2), "--root", str(root), *argv], capsys)
    assert code == EXIT_USAGE, out + err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("crowdplay-minari convert: error: ") and says in err, err
    assert not root.exists()


def test_a_selection_that_matches_nothing_raises_before_anything_is_written(
    raw_sample_bz2, tmp_path
):
    root = tmp_path / "minari"
    config = ConversionConfig(
        raw_sample_bz2, root=root, selection=EpisodeSelection(games="breakout"), progress=False
    )
    with pytest.raises(SelectionError, match="games there: ") as error:
        convert(config, log=lambda message: None)
    assert error.value.field == "games" and "space_invaders" in error.value.present
    assert "breakout" not in error.value.present
    assert not root.exists()


# -- the selection itself ----------------------------------------------------------------------


def test_agent_kind_comes_from_the_users_table(raw_sample_bz2):
    kinds = {
        (meta.game, agent): agent_kind(meta, agent)
        for meta in _metadata(raw_sample_bz2).values()
        for agent in ([P0, P1] if meta.game.startswith("space_invaders_") else [P0])
    }
    assert kinds[("space_invaders_ai", P1)] == "ai"  # the AI partner has no users row
    assert kinds[("space_invaders_ai", P0)] == "human"  # replaced by an AI halfway: still human
    assert kinds[("space_invaders_2p", P1)] == "human"
    assert [key for key, kind in kinds.items() if kind == "ai"] == [("space_invaders_ai", P1)]


def test_time_played_bounds_every_agents_frames(converted_sample, raw_sample_bz2):
    meta = _metadata(raw_sample_bz2)
    episodes = list(load_dataset("crowdplay", root=converted_sample[0]))
    assert len(episodes) == 10
    for episode in episodes:
        low, high = metadata_frames(meta[episode.episode_id], episode.agent_id)
        assert low <= episode.num_steps <= high and high - low == 59, episode


def test_the_command_lines_agent_kinds_are_the_selections():
    from crowdplay_minari.conversion import cli
    from crowdplay_minari.raw.selection import AGENT_KINDS

    assert cli.AGENT_KINDS == AGENT_KINDS


def test_selection_values_are_checked_when_made():
    with pytest.raises(UnknownGameError, match="expected one of"):
        EpisodeSelection(games=("qbert", "pong"))
    with pytest.raises(ValueError, match="agent_kind"):
        EpisodeSelection(agent_kind="robot")
    with pytest.raises(ValueError, match="finite"):
        EpisodeSelection(min_score=math.nan)
    selection = EpisodeSelection(games="qbert", tasks=["plain", "plain"], min_score=5)
    assert selection.games == ("qbert",) and selection.tasks == ("plain",)
    assert selection.min_score == 5.0 and selection.restricts
    assert str(selection) == "game qbert; task plain; Score >= 5"
    assert not EpisodeSelection().restricts


def test_episode_ids_of_the_config_are_its_selections(raw_sample_bz2):
    config = ConversionConfig(raw_sample_bz2, episode_ids=("a", "b", "a"))
    assert config.selection.episode_ids == ("a", "b")
    narrowed = ConversionConfig(
        raw_sample_bz2, episode_ids=("a",), selection=EpisodeSelection(games="qbert")
    )
    assert narrowed.selection == EpisodeSelection(games="qbert", episode_ids=("a",))
    with pytest.raises(ValueError, match="once"):
        ConversionConfig(
            raw_sample_bz2, episode_ids=("a",), selection=EpisodeSelection(episode_ids="b")
        )
