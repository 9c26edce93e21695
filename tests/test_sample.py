"""The emulator-made sample: deterministic per seed, cycling through sessions, scripted players
that hold keys and score, and the `crowdplay-minari sample` command."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crowdplay_minari.benchmarks import cli
from crowdplay_minari.episode import AI, HUMAN
from crowdplay_minari.raw import RawDataset
from crowdplay_minari.raw.schema import TABLES
from crowdplay_minari.sample import DEFAULT_SESSIONS, SessionSpec, generate_sample

SMALL = {"episodes": 2, "max_frames": 120, "encodings": (".pickle.gz",), "workers": 1}


def _db_rows(root: Path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(root / "dataset.sqlite")
    try:
        return {t.name: sorted(db.execute(f"SELECT * FROM {t.name}").fetchall()) for t in TABLES}
    finally:
        db.close()


def _trajectory_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.pickle*"))}


@pytest.fixture(scope="module")
def seed_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seed_3") / "raw"
    generate_sample(root, seed=3, **SMALL)
    return root


def test_same_seed_gives_identical_files_and_rows(
    seed_3: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    again = tmp_path_factory.mktemp("seed_3_again") / "raw"
    summary = generate_sample(again, seed=3, **SMALL)
    files = _trajectory_bytes(seed_3)
    assert len(files) == 2 and all(name.endswith(".pickle.gz") for name in files)
    assert _trajectory_bytes(again) == files  # byte for byte (gzip without a timestamp)
    assert _db_rows(again) == _db_rows(seed_3)
    assert sorted(summary["episodes"]) == sorted(n.removesuffix(".pickle.gz") for n in files)
    assert summary["frames"] == 2 * 120


def test_a_different_seed_gives_different_play(
    seed_3: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("seed_4") / "raw"
    generate_sample(other, seed=4, **SMALL)
    assert set(_trajectory_bytes(other)).isdisjoint(_trajectory_bytes(seed_3))  # new ids

    def actions_by_task(root: Path) -> dict[str, np.ndarray]:
        raw = RawDataset(root)
        return {
            raw.metadata()[e].task_id: raw.read_episode(e).agents["game_0>player_0"].actions
            for e in raw.episode_ids()
        }

    mine, theirs = actions_by_task(seed_3), actions_by_task(other)
    assert mine.keys() == theirs.keys()
    assert all(not np.array_equal(mine[task], theirs[task]) for task in mine)


def test_episodes_cycle_through_sessions(raw_sample: Path, tmp_path: Path) -> None:
    counts = Counter(m.task_id for m in RawDataset(raw_sample).metadata().values())
    assert counts == {s.task_id: 2 if i == 0 else 1 for i, s in enumerate(DEFAULT_SESSIONS)}

    sessions = (
        SessionSpec("qbert_mturk", "qbert", "plain", "mturk"),
        SessionSpec("space_invaders_right", "space_invaders", "right", "mturk"),
    )
    generate_sample(tmp_path, seed=1, episodes=5, max_frames=60, sessions=sessions, workers=1)
    raw = RawDataset(tmp_path)
    by_task: dict[str, list] = {}
    for meta in raw.metadata().values():
        by_task.setdefault(meta.task_id, []).append(meta)
    assert {task: len(v) for task, v in by_task.items()} == {
        "qbert_mturk": 3,
        "space_invaders_right": 2,
    }
    for metas in by_task.values():
        metas.sort(key=lambda m: m.keyword_data["all"]["created_on"])
        assert len({m.environment_id for m in metas}) == 1  # one session, several episodes
        lengths = [raw.read_episode(m.episode_id).num_steps for m in metas]
        # The last episode of a session is cut short at two thirds of the cap.
        assert lengths[-1] == 40 and all(n == 60 for n in lengths[:-1])
    right = by_task["space_invaders_right"][0]
    assert "Time spent on right side of screen (fraction)" in right.keyword_data["game_0>player_0"]


def test_refuses_a_directory_that_already_holds_a_dataset(seed_3: Path) -> None:
    before = _trajectory_bytes(seed_3), (seed_3 / "dataset.sqlite").read_bytes()
    with pytest.raises(FileExistsError, match="dataset.sqlite"):
        generate_sample(seed_3, seed=3, **SMALL)
    assert (_trajectory_bytes(seed_3), (seed_3 / "dataset.sqlite").read_bytes()) == before


@pytest.mark.parametrize(
    ("arguments", "problem"), [({"episodes": 0}, "episode"), ({"max_frames": 1}, "frames")]
)
def test_rejects_empty_samples(tmp_path: Path, arguments: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        generate_sample(tmp_path, **{**SMALL, **arguments})
    assert not (tmp_path / "dataset.sqlite").exists()


def test_scripted_players_hold_keys_act_and_score(raw_sample: Path) -> None:
    raw = RawDataset(raw_sample)
    space_invaders_scores = []
    for episode in raw.iter_episodes():
        n = episode.num_steps
        for trajectory in episode.agents.values():
            actions = trajectory.actions
            changes = np.flatnonzero(np.diff(actions)) + 1  # steps whose action is new
            human = trajectory.user_types == HUMAN
            human_changes = int(human[changes].sum())
            ai_changes = int((trajectory.user_types[changes] == AI).sum())
            # People hold a key for a while; an AI partner acts every 4 frames at most.
            if human.any():
                assert human_changes < human.sum() / 5, episode.metadata.task_id
            assert ai_changes <= (~human).sum() / 4 + 1, episode.metadata.task_id
            assert (actions != 0).mean() > 0.5  # mostly pressing keys, not idling
            assert len(np.unique(actions[actions != 0])) >= 3
            assert n > 1
        if episode.metadata.game.startswith("space_invaders"):
            space_invaders_scores.append(episode.agents["game_0>player_0"].rewards.sum())
    assert len(space_invaders_scores) == 6
    assert max(space_invaders_scores) > 0
    assert sum(score > 0 for score in space_invaders_scores) >= 4  # they aim and fire


def test_task_players_follow_their_task(raw_sample: Path) -> None:
    """The left-side participant stays left; the insideout one shoots inner columns first."""
    raw = RawDataset(raw_sample)
    tasks = {m.task_id: e for e, m in raw.metadata().items()}
    left = raw.read_episode(tasks["space_invaders_left_email"]).agents["game_0>player_0"]
    assert left.statistics["Time spent on left side of screen (fraction)"][-1] > 0.8
    insideout = raw.read_episode(tasks["space_invaders_insideout"]).agents["game_0>player_0"]
    assert insideout.statistics["Correct aliens shot (fraction)"][-1] > 0.5


def test_sample_command_writes_a_readable_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli_raw"
    argv = ["sample", str(out), "--seed", "7", "--episodes", "1", "--frames", "60"]
    argv += ["--encodings", ".pickle", ".pickle.bz2", "--workers", "1", "--quiet"]
    assert cli.main(argv) == 0
    assert "wrote 1 episodes, 60 frames" in capsys.readouterr().out
    raw = RawDataset(out)
    (episode_id,) = raw.episode_ids()
    assert sorted(p.name for p in out.glob(f"{episode_id}.*")) == [
        f"{episode_id}.pickle",
        f"{episode_id}.pickle.bz2",
    ]
    episode = raw.read_episode(episode_id)
    assert episode.metadata.task_id == DEFAULT_SESSIONS[0].task_id
    assert episode.num_steps == 60
    assert episode.agents["game_0>player_0"].frames.shape == (60, 210, 160, 3)
