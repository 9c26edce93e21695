"""Names from `dataset.sqlite` are data, not paths: a hostile metadata row is named and skipped,
nothing outside the datasets root is touched, and the rest of the release converts."""

from __future__ import annotations

import pickle
import shutil
import sqlite3
from pathlib import Path

import pytest

from crowdplay_minari.conversion.convert import ConversionConfig, convert
from crowdplay_minari.raw import InvalidMetadataError, RawDataset, UnsafePathError


def _episodes(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT episode_id, environment_id FROM episodes ORDER BY episode_id"
        ).fetchall()


def _set_environment_keyword(db: Path, environment_id: str, key: str, value: object) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE environmentkeyworddata SET value = ? "
            "WHERE environment_id = ? AND agent_id = 'all' AND key = ?",
            (pickle.dumps(value), environment_id, key),
        )


def _rename_episode(db: Path, old: str, new: str | None) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        if new is None:  # a hostile DB need not keep the NOT NULL constraints
            conn.execute("DELETE FROM episodekeyworddata WHERE episode_id = ?", (old,))
            conn.execute("CREATE TABLE loose AS SELECT * FROM episodes")
            conn.execute("DROP TABLE episodes")
            conn.execute("ALTER TABLE loose RENAME TO episodes")
        conn.execute(
            "UPDATE episodekeyworddata SET episode_id = ? WHERE episode_id = ?", (new, old)
        )
        conn.execute("UPDATE episodes SET episode_id = ? WHERE episode_id = ?", (new, old))


@pytest.fixture
def hostile_raw(raw_sample_bz2: Path, tmp_path: Path) -> dict:
    """A copy of the sample whose metadata attacks the file system in six ways, one episode
    each (session-level attacks on sessions of one episode); the others stay good."""
    raw = tmp_path / "raw"
    shutil.copytree(raw_sample_bz2, raw)
    db = raw / "dataset.sqlite"
    episodes = _episodes(db)
    per_env: dict[str, list[str]] = {}
    for ep, env in episodes:
        per_env.setdefault(env, []).append(ep)
    single = [(eps[0], env) for env, eps in per_env.items() if len(eps) == 1]
    assert len(single) >= 3 and len(episodes) >= 8
    rest = [(ep, env) for ep, env in episodes if (ep, env) not in single[:3]]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("a user's file")
    escape = "../" * (len((tmp_path / "minari").parts) + 2) + str(victim).lstrip("/")
    bad = {}
    ep, env = single[0]
    _set_environment_keyword(db, env, "task", escape)
    bad["dotdot_task"] = ep
    ep, env = single[1]
    _set_environment_keyword(db, env, "task", "a/b")
    bad["nested_task"] = ep
    ep, env = single[2]
    _set_environment_keyword(db, env, "game", "pong_not_in_catalogue")
    bad["unknown_game"] = ep
    ep, _ = rest[0]
    _rename_episode(db, ep, "/abs/x")
    bad["absolute_id"] = "/abs/x"
    ep, _ = rest[1]
    _rename_episode(db, ep, None)
    bad["null_id"] = "episodes row"
    ep, _ = rest[2]
    outside = tmp_path / "elsewhere" / f"{ep}.pickle.bz2"
    outside.parent.mkdir()
    shutil.move(raw / f"{ep}.pickle.bz2", outside)
    (raw / f"{ep}.pickle.bz2").symlink_to(outside)
    bad["symlink_out"] = ep
    good = [e for e, _ in rest[3:]]
    return {"raw": raw, "bad": bad, "good": good, "victim": victim, "tmp": tmp_path}


def test_the_reader_rejects_each_bad_row_by_name(hostile_raw: dict) -> None:
    raw = RawDataset(hostile_raw["raw"])
    metadata = raw.metadata()
    bad = hostile_raw["bad"]
    for name in ("dotdot_task", "nested_task", "unknown_game", "absolute_id"):
        assert bad[name] not in metadata
        assert bad[name] in raw.rejected, raw.rejected
    assert "not a safe name" in raw.rejected[bad["dotdot_task"]]
    assert "not in the games catalogue" in raw.rejected[bad["unknown_game"]]
    assert any(name.startswith("episodes row") for name in raw.rejected)
    assert len(raw.rejected) == 5
    assert set(hostile_raw["good"]) | {bad["symlink_out"]} == set(metadata)
    with pytest.raises(UnsafePathError, match="outside the raw directory"):
        raw.read_episode(bad["symlink_out"])
    with pytest.raises(InvalidMetadataError):
        raw.trajectory_path("../../etc/passwd")


def test_convert_skips_hostile_rows_and_touches_nothing_outside_the_root(
    hostile_raw: dict,
) -> None:
    tmp: Path = hostile_raw["tmp"]
    outside_before = sorted(p for p in tmp.rglob("*") if not p.is_relative_to(tmp / "minari"))
    root = tmp / "minari"
    report = convert(
        ConversionConfig(hostile_raw["raw"], root=root, workers=1, progress=False),
        log=lambda message: None,
    )
    outside_after = sorted(p for p in tmp.rglob("*") if not p.is_relative_to(root))
    assert outside_after == outside_before, "files outside the datasets root changed"
    assert (hostile_raw["victim"] / "keep.txt").read_text() == "a user's file"
    skipped = {entry["episode_id"]: entry for entry in report.skipped}
    bad = hostile_raw["bad"]
    for name in ("dotdot_task", "nested_task", "unknown_game", "absolute_id", "symlink_out"):
        assert bad[name] in skipped, (name, skipped)
    assert any(name.startswith("episodes row") for name in skipped)
    assert "outside the raw directory" in skipped[bad["symlink_out"]]["error"]
    assert report.episodes_converted == len(hostile_raw["good"])
    assert report.episodes_total == len(hostile_raw["good"]) + 6
    assert all(dataset.startswith("crowdplay/") for dataset in report.datasets)
    assert all((root / dataset).resolve().is_relative_to(root) for dataset in report.datasets)


@pytest.mark.parametrize("trick", ["external storage", "external link", "soft link"])
def test_episodes_whose_arrays_live_outside_their_file_are_refused(
    converted_sample, tmp_path: Path, trick: str
) -> None:
    """A crafted dataset could point `actions` at any file (here /etc/passwd); the loader reads
    nothing from outside the episode's own file."""
    import h5py

    from crowdplay_minari.loading import load_dataset
    from crowdplay_minari.storage import ForeignStorageError

    source, _ = converted_sample
    dataset_id = "crowdplay/riverraid/plain-player_0-v1"
    root = tmp_path / "root"
    shutil.copytree(source / dataset_id, root / dataset_id)
    main = root / dataset_id / "data" / "main_data.hdf5"
    with h5py.File(main, "r+") as file:
        group = file["episode_0"]
        n = group["actions"].shape[0]
        del group["actions"]
        if trick == "external storage":
            group.create_dataset("actions", (n,), "u1", external=[("/etc/passwd", 0, n)])
        elif trick == "external link":
            group["actions"] = h5py.ExternalLink("/etc/passwd", "/x")
        else:
            group["actions"] = h5py.SoftLink("/episode_0/rewards")
    episode = load_dataset(dataset_id, root=root).episodes[0]
    with pytest.raises(ForeignStorageError, match=r"main_data\.hdf5 episode_0/actions: .*refused"):
        episode.load()
    with pytest.raises(ForeignStorageError):
        episode.get_processed_trajectory()


@pytest.mark.parametrize(
    "trick",
    ["absolute path", "climbing path", "another file", "not an episode", "soft link"],
)
def test_index_links_that_lead_anywhere_but_a_part_beside_it_are_refused(
    converted_sample, tmp_path: Path, trick: str
) -> None:
    """An added-to dataset's `main_data.hdf5` links each episode to `/episode_<i>` of a
    `part-<uuid>.hdf5` in its own folder; a crafted index could link anywhere else."""
    import h5py

    from crowdplay_minari.loading import load_dataset
    from crowdplay_minari.storage import ForeignStorageError

    source, _ = converted_sample
    dataset_id = "crowdplay/riverraid/plain-player_0-v1"
    root = tmp_path / "root"
    shutil.copytree(source / dataset_id, root / dataset_id)
    data = root / dataset_id / "data"
    part = "part-" + "0" * 32 + ".hdf5"
    (data / "main_data.hdf5").rename(data / part)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(data / part, elsewhere / part)
    shutil.copyfile(data / part, data / "other.hdf5")
    target = {
        "absolute path": h5py.ExternalLink(str(elsewhere / part), "/episode_0"),
        "climbing path": h5py.ExternalLink(f"../../../../elsewhere/{part}", "/episode_0"),
        "another file": h5py.ExternalLink("other.hdf5", "/episode_0"),
        "not an episode": h5py.ExternalLink(part, "/episode_0/actions"),
        "soft link": h5py.SoftLink("/episode_1"),
    }[trick]
    with h5py.File(data / "main_data.hdf5", "w") as index:
        index["episode_0"] = target
        index["episode_1"] = h5py.ExternalLink(part, "/episode_1")
    with pytest.raises(ForeignStorageError, match=r"main_data\.hdf5 episode_0: .*refused"):
        load_dataset(dataset_id, root=root)


@pytest.mark.parametrize("trick", ["missing", "a symbolic link"])
def test_a_part_file_missing_or_replaced_by_a_link_is_named(
    converted_sample, tmp_path: Path, trick: str
) -> None:
    """HDF5 would look for a missing part in the working directory too; the loader only ever
    opens the regular file beside the index, and names the one that is not there."""
    import h5py

    from crowdplay_minari.loading import load_dataset
    from crowdplay_minari.storage import DamagedDatasetError

    source, _ = converted_sample
    dataset_id = "crowdplay/riverraid/plain-player_0-v1"
    root = tmp_path / "root"
    shutil.copytree(source / dataset_id, root / dataset_id)
    data = root / dataset_id / "data"
    part = "part-" + "1" * 32 + ".hdf5"
    (data / "main_data.hdf5").rename(tmp_path / part)
    if trick == "a symbolic link":
        (data / part).symlink_to(tmp_path / part)
    with h5py.File(tmp_path / part, "r") as file:
        names = list(file)
    with h5py.File(data / "main_data.hdf5", "w") as index:
        for name in names:
            index[name] = h5py.ExternalLink(part, f"/{name}")
    with pytest.raises(DamagedDatasetError, match=rf"part file {data / part} is {trick}"):
        load_dataset(dataset_id, root=root)
