"""Incremental publishing: adding episodes writes the new ones, never the dataset again.

Episodes of one Space Invaders dataset are converted in several runs, in and out of their order
of creation. Each result must be the dataset one whole run makes (same order, ids, arrays and
digests), read the same by our loader and by plain Minari from any working directory; files of
earlier publishes are kept as they are (same inode, same bytes) wherever the new episodes come
after them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from crowdplay_minari.conversion.convert import (
    ConversionConfig,
    convert,
    published_episode_ids,
)
from crowdplay_minari.conversion.portable import portable_copy
from crowdplay_minari.conversion.verify import verify_datasets
from crowdplay_minari.loading import load_dataset
from crowdplay_minari.processing import ProcessingConfig
from crowdplay_minari.sample import DEFAULT_SESSIONS, generate_sample
from crowdplay_minari.storage import (
    DIGEST_ATTRIBUTE,
    EPISODE_TABLE_ATTRIBUTE,
    PART_FILE,
    EpisodeFile,
    episode_digest,
)

DATASET = "crowdplay/space_invaders/plain-player_0-v1"


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(raw, root, order): five Space Invaders episodes, converted in one run into `root`;
    `order` is their episode order there (order of creation)."""
    base = tmp_path_factory.mktemp("incremental")
    raw = base / "raw" / "crowdplay_atari-v0"
    sessions = tuple(s for s in DEFAULT_SESSIONS if s.task_id == "space_invaders_mturk")
    generate_sample(raw, seed=4, episodes=5, max_frames=100, sessions=sessions, workers=1)
    root = base / "whole"
    convert(ConversionConfig(raw, root=root, progress=False), log=lambda m: None)
    return raw, root, published_episode_ids(root / DATASET)


def _add(raw: Path, root: Path, episode_ids: list[str]) -> dict:
    report = convert(
        ConversionConfig(raw, root=root, episode_ids=tuple(episode_ids), progress=False),
        log=lambda m: None,
    )
    assert report.ok, report.skipped
    return report.datasets[DATASET]


def _data_files(root: Path) -> dict[str, tuple[int, str]]:
    """Each HDF5 file of the dataset: name -> (inode, sha256 of its bytes)."""
    data = root / DATASET / "data"
    return {
        p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(data.glob("*.hdf5"))
    }


def _parts_hold(root: Path) -> int:
    """Episode groups held by the dataset's part files, all told."""
    data = root / DATASET / "data"
    total = 0
    for part in data.glob("part-*.hdf5"):
        with h5py.File(part, "r") as file:
            total += sum(1 for name in file if isinstance(file[name], h5py.Group))
    return total


def _assert_same_dataset(root: Path, whole_root: Path) -> None:
    """`root`'s dataset is the one a whole run made: same episodes in the same order, every
    array equal, the same recorded digests, and those digests still right."""
    ours, theirs = load_dataset(DATASET, root=root), load_dataset(DATASET, root=whole_root)
    assert [e.episode_id for e in ours] == [e.episode_id for e in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.index == b.index and a.metadata[DIGEST_ATTRIBUTE] == b.metadata[DIGEST_ATTRIBUTE]
        loaded, expected = a.load(), b.load()
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(loaded, name), getattr(expected, name)), name
        assert loaded.infos.keys() == expected.infos.keys()
    meta = json.loads((root / DATASET / "data" / "metadata.json").read_text())
    whole_meta = json.loads((whole_root / DATASET / "data" / "metadata.json").read_text())
    for key in ("total_episodes", "total_steps"):
        assert meta[key] == whole_meta[key]
    with EpisodeFile(root / DATASET / "data" / "main_data.hdf5") as file:
        for index, name in enumerate(file.names()):
            group = file[name]
            assert int(group.attrs["id"]) == index
            assert episode_digest(group) == group.attrs[DIGEST_ATTRIBUTE]
    assert verify_datasets([DATASET], root=root, log=lambda m: None).ok


def test_episodes_added_after_the_published_ones_cost_only_themselves(whole, tmp_path) -> None:
    raw, whole_root, order = whole
    root = tmp_path / "root"
    assert _add(raw, root, order[:2])["copied"] == 2
    first = _data_files(root)
    assert list(first) == ["main_data.hdf5"]  # published whole: one self-contained file
    assert _add(raw, root, order[2:4]) == {"episodes": 4, "steps": _steps(root), "copied": 2}
    second = _data_files(root)
    parts = sorted(name for name in second if PART_FILE.fullmatch(name))
    assert len(parts) == 2
    # the first publish's file is one of the parts, untouched: same inode, same bytes
    assert first["main_data.hdf5"] in [second[p] for p in parts]
    assert _add(raw, root, order[4:])["copied"] == 1
    third = _data_files(root)
    assert all(third[p] == second[p] for p in parts)  # nothing published before was rewritten
    assert len([n for n in third if PART_FILE.fullmatch(n)]) == 3
    assert _parts_hold(root) == len(order)
    with h5py.File(root / DATASET / "data" / "main_data.hdf5", "r") as index:
        links = [index.get(name, getlink=True) for name in index]
    assert all(isinstance(link, h5py.ExternalLink) for link in links)
    assert all(PART_FILE.fullmatch(link.filename) for link in links)
    _assert_same_dataset(root, whole_root)


def _steps(root: Path) -> int:
    return json.loads((root / DATASET / "data" / "metadata.json").read_text())["total_steps"]


def test_episodes_that_sort_before_published_ones_rewrite_from_there(whole, tmp_path) -> None:
    raw, whole_root, order = whole
    root = tmp_path / "root"
    for episode in (order[0], order[1], order[3]):  # three publishes: three files
        _add(raw, root, [episode])
    before = _data_files(root)
    assert len(before) == 4  # main_data.hdf5 (the index) and three parts
    # order[2] goes between the second and third: the third's part is rewritten with it
    assert _add(raw, root, [order[2], order[4]])["copied"] == 3
    after = _data_files(root)
    kept = {name for name in before if name in after and before[name] == after[name]}
    assert len(kept & {n for n in before if PART_FILE.fullmatch(n)}) == 2
    assert _parts_hold(root) == len(order)  # the dropped part's episode is in no other part
    _assert_same_dataset(root, whole_root)
    # one that sorts first: everything is rewritten, back to one self-contained file
    root_first = tmp_path / "first"
    _add(raw, root_first, order[1:])
    assert _add(raw, root_first, order[:1])["copied"] == len(order)
    assert list(_data_files(root_first)) == ["main_data.hdf5"]
    _assert_same_dataset(root_first, whole_root)


def test_reconverting_a_published_episode_replaces_it_in_place(whole, tmp_path) -> None:
    """`--episode` of one already published, its staged file put back: the dataset keeps one
    copy of it, at its place."""
    raw, whole_root, order = whole
    root = tmp_path / "root"
    _add(raw, root, order[:3])
    _add(raw, root, order[3:])
    staged = root / ".crowdplay-staging" / "episodes" / DATASET.replace("/", "__")
    scratch = tmp_path / "scratch"
    _add(raw, scratch, [order[4]])  # stage order[4] again, made the same way
    staged.mkdir(parents=True, exist_ok=True)
    with EpisodeFile(scratch / DATASET / "data" / "main_data.hdf5") as src:
        group = src["episode_0"]
        with h5py.File(staged / f"{order[4]}.h5", "w") as out:
            for child in group:
                group.copy(group[child], out, name=child)
            out.attrs.update(dict(group.attrs))
    result = _add(raw, root, [order[0]])  # already published; publishes what is staged
    # order[4] shares its part with order[3]: both are written again, nothing else
    assert result["episodes"] == len(order) and result["copied"] == 2
    _assert_same_dataset(root, whole_root)


def test_plain_minari_reads_an_added_to_dataset_from_any_directory(whole, tmp_path) -> None:
    """HDF5 follows the index's links to the part files beside it, not to files of the same
    name in the reader's working directory."""
    raw, whole_root, order = whole
    root = tmp_path / "root"
    _add(raw, root, order[:3])
    _add(raw, root, order[3:])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = root / DATASET / "data"
    for part in data.glob("part-*.hdf5"):  # decoys: the same names, another episode inside
        shutil.copyfile(whole_root / DATASET / "data" / "main_data.hdf5", elsewhere / part.name)
    script = (
        "import hashlib, json, hdf5plugin, minari\n"
        f"ds = minari.load_dataset({DATASET!r})\n"
        "out = []\n"
        "for e in ds.iterate_episodes():\n"
        "    h = hashlib.sha256()\n"
        "    for a in (e.observations, e.actions, e.rewards, e.infos['ram']):\n"
        "        h.update(a.tobytes())\n"
        "    out.append([int(e.id), h.hexdigest()])\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env={**os.environ, "MINARI_DATASETS_PATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    read = json.loads(result.stdout)
    expected = []
    for episode in load_dataset(DATASET, root=whole_root):
        arrays = episode.load()
        digest = hashlib.sha256()
        for array in (arrays.observations, arrays.actions, arrays.rewards, arrays.infos["ram"]):
            digest.update(array.tobytes())
        expected.append([episode.index, digest.hexdigest()])
    # Minari stores rewards as float64: hash what plain Minari returns, from the whole dataset
    assert [i for i, _ in read] == [i for i, _ in expected] == list(range(len(order)))
    result_whole = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env={**os.environ, "MINARI_DATASETS_PATH": str(whole_root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result_whole.returncode == 0, result_whole.stderr[-2000:]
    assert read == json.loads(result_whole.stdout)


def test_processed_caches_outlive_added_episodes(whole, tmp_path, monkeypatch) -> None:
    """A cache entry is keyed by the episode's digest, not by its file: adding episodes to the
    dataset leaves every entry of the episodes already there usable."""
    raw, _, order = whole
    root = tmp_path / "root"
    monkeypatch.setenv("CROWDPLAY_MINARI_CACHE", str(tmp_path / "cache"))
    _add(raw, root, order[:2])
    config = ProcessingConfig.d3rlpy_preset()
    before = {e.episode_id: e._cache_path(config) for e in load_dataset(DATASET, root=root)}
    for episode in load_dataset(DATASET, root=root):
        episode.process(config)
    assert all(path.exists() for path in before.values())
    _add(raw, root, order[2:])
    after = {e.episode_id: e._cache_path(config) for e in load_dataset(DATASET, root=root)}
    assert all(after[episode_id] == path for episode_id, path in before.items())


def test_a_portable_copy_of_an_added_to_dataset_is_one_file(whole, tmp_path) -> None:
    raw, whole_root, order = whole
    root = tmp_path / "root"
    _add(raw, root, order[:2])
    _add(raw, root, order[2:])
    portable_copy([DATASET], root=root, to_root=tmp_path / "portable", log=lambda m: None)
    copied = tmp_path / "portable" / DATASET / "data"
    assert sorted(p.name for p in copied.glob("*.hdf5")) == ["main_data.hdf5"]
    ours = load_dataset(DATASET, root=tmp_path / "portable")
    assert [e.episode_id for e in ours] == order
    for a, b in zip(ours, load_dataset(DATASET, root=whole_root), strict=True):
        assert np.array_equal(a.load().observations, b.load().observations)


@pytest.mark.parametrize("damage", ["removed", "garbage", "one row short", "a path outside"])
def test_the_episode_table_is_only_a_shortcut(whole, tmp_path, damage: str) -> None:
    """Publishing reads the published episodes from the index's table; a table that is
    missing, unreadable or disagrees with the file is passed over for the episodes themselves."""
    raw, whole_root, order = whole
    root = tmp_path / "root"
    _add(raw, root, order[:2])
    _add(raw, root, order[2:4])
    index = root / DATASET / "data" / "main_data.hdf5"
    with h5py.File(index, "r+") as file:
        rows = json.loads(file.attrs[EPISODE_TABLE_ATTRIBUTE])
        assert [row[0] for row in rows] == order[:4]
        if damage == "removed":
            del file.attrs[EPISODE_TABLE_ATTRIBUTE]
        elif damage == "garbage":
            file.attrs[EPISODE_TABLE_ATTRIBUTE] = "[[1, 2"
        elif damage == "one row short":
            file.attrs[EPISODE_TABLE_ATTRIBUTE] = json.dumps(rows[:-1])
        else:
            rows[0][3] = "../../elsewhere.hdf5"
            file.attrs[EPISODE_TABLE_ATTRIBUTE] = json.dumps(rows)
    assert _add(raw, root, order[4:])["copied"] == 1
    _assert_same_dataset(root, whole_root)
    with h5py.File(index, "r") as file:
        assert [row[0] for row in json.loads(file.attrs[EPISODE_TABLE_ATTRIBUTE])] == order
