"""Checksums on what the converter writes: a flipped byte in any stored array is an error for
the loader and for plain Minari, `verify` finds it (and deleted episodes, changed attributes)
without the raw data, and a damaged processed-cache entry is recomputed, never returned."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from crowdplay_minari import loading
from crowdplay_minari.cli import EXIT_MISMATCH, EXIT_OK, EXIT_USAGE
from crowdplay_minari.conversion.verify import verify_datasets
from crowdplay_minari.loading import CACHE_ENV, load_dataset
from crowdplay_minari.processing import ProcessingConfig
from crowdplay_minari.storage import (
    DIGEST_ATTRIBUTE,
    DamagedDatasetError,
    dataset_dir,
    episode_digest,
    local_dataset_ids,
    main_data_path,
)
from tests.commands import run_cli

STORED_ARRAYS = ["observations", "actions", "rewards", "terminations", "infos/ram", "infos/lives"]


@pytest.fixture
def one_dataset(converted_sample, tmp_path: Path) -> tuple[Path, str]:
    """A private copy of one converted dataset (the session's stays untouched)."""
    source_root = converted_sample[0]
    dataset_id = local_dataset_ids(source_root, prefix="crowdplay/space_invaders/")[0]
    root = tmp_path / "minari"
    shutil.copytree(source_root / dataset_id, root / dataset_id)
    return root, dataset_id


def _main(root: Path, dataset_id: str) -> Path:
    return main_data_path(dataset_dir(dataset_id, root))


def _flip_stored_byte(path: Path, array: str, episode: int = 0) -> None:
    """Flip one bit in the middle of the array's first stored chunk, in the file's bytes."""
    with h5py.File(path, "r") as file:
        info = file[f"episode_{episode}/{array}"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)[0]
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte ^ 0x10]))


def test_every_published_episode_carries_the_digest_of_its_stored_bytes(converted_sample):
    root, _ = converted_sample
    ids = local_dataset_ids(root)
    checked = 0
    for dataset_id in ids:
        with h5py.File(_main(root, dataset_id), "r") as file:
            for name in file:
                assert file[name].attrs[DIGEST_ATTRIBUTE] == episode_digest(file[name])
                checked += 1
    assert checked >= len(ids) > 0
    report = verify_datasets(ids, root=root, log=lambda _: None)
    assert report.ok, report.problems
    assert report.episodes_checked == checked


@pytest.mark.parametrize("array", STORED_ARRAYS)
def test_a_flipped_byte_in_any_array_is_refused_by_name_and_found_by_verify(
    one_dataset, array, tmp_path, monkeypatch
):
    root, dataset_id = one_dataset
    main = _main(root, dataset_id)
    _flip_stored_byte(main, array)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    episode = load_dataset(dataset_id, root=root).episodes[0]
    with pytest.raises(DamagedDatasetError, match=str(main)):
        episode.load()
    if array in ("observations", "actions", "rewards", "terminations"):
        with pytest.raises(DamagedDatasetError):
            episode.process(ProcessingConfig.d3rlpy_preset(), cache=False)

    if array != "observations":
        # plain Minari gets HDF5's Fletcher-32 error, not wrong values. (hdf5plugin's zstd
        # filter ignores zstd's own checksums, so frames are checked by our loader and verify;
        # portable datasets carry Fletcher-32 on frames too: test_portable.)
        import hdf5plugin  # noqa: F401
        import minari

        plain = minari.MinariDataset(dataset_dir(dataset_id, root))
        with pytest.raises(OSError):
            next(iter(plain.iterate_episodes([0])))

    report = verify_datasets([dataset_id], root=root, log=lambda _: None)
    assert any("episode_0" in p and "digest mismatch" in p for p in report.problems), report
    assert len(report.problems) == 1  # the other episodes are intact


def test_verify_finds_changed_attributes_and_deleted_or_added_episodes(one_dataset):
    root, dataset_id = one_dataset
    main = _main(root, dataset_id)
    assert verify_datasets([dataset_id], root=root, log=lambda _: None).ok
    with h5py.File(main, "r+") as file:
        file["episode_0"].attrs["source"] = "tampered"
    report = verify_datasets([dataset_id], root=root, log=lambda _: None)
    assert [p for p in report.problems if "episode_0" in p and "digest" in p], report.problems

    with h5py.File(main, "r+") as file:
        n = len(file)
        file.copy(file["episode_0"], f"episode_{n}")
    report = verify_datasets([dataset_id], root=root, log=lambda _: None)
    assert any(f"unexpected episode_{n}" in p for p in report.problems), report.problems

    with h5py.File(main, "r+") as file:
        del file[f"episode_{n}"]
        del file[f"episode_{n - 1}"]
    report = verify_datasets([dataset_id], root=root, log=lambda _: None)
    assert any(f"missing episode_{n - 1}" in p for p in report.problems), report.problems


def test_an_episode_without_a_digest_is_reported_not_passed(one_dataset):
    root, dataset_id = one_dataset
    with h5py.File(_main(root, dataset_id), "r+") as file:
        del file["episode_0"].attrs[DIGEST_ATTRIBUTE]
    report = verify_datasets([dataset_id], root=root, log=lambda _: None)
    assert any("no digest recorded" in p for p in report.problems), report.problems


def test_verify_command_without_raw_data(one_dataset, raw_sample_bz2):
    root, dataset_id = one_dataset
    good = run_cli("verify", "--root", str(root))
    assert good.returncode == EXIT_OK, good.stdout + good.stderr
    assert "all intact" in good.stdout

    wrong = run_cli("verify", str(raw_sample_bz2), "--root", str(root))
    assert wrong.returncode == EXIT_USAGE
    assert wrong.stderr.count("\n") == 1 and f"--raw {raw_sample_bz2}" in wrong.stderr

    _flip_stored_byte(_main(root, dataset_id), "observations", episode=0)
    bad = run_cli("verify", dataset_id, "--root", str(root))
    assert bad.returncode == EXIT_MISMATCH, bad.stdout + bad.stderr
    assert f"MISMATCH: {dataset_id} episode_0" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_a_damaged_cache_entry_is_recomputed_never_returned(
    converted_sample, tmp_path, monkeypatch
):
    root, _ = converted_sample
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    episode = load_dataset("crowdplay/space_invaders", root=root).episodes[0]
    config = ProcessingConfig.d3rlpy_preset()
    expected = episode.compact(config)
    (entry,) = (tmp_path / "cache").rglob("*.npys")
    assert loading.check_cache(tmp_path / "cache") == []

    data = bytearray(entry.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside the frames record: still a well-formed .npy
    entry.write_bytes(bytes(data))
    problems = loading.check_cache(tmp_path / "cache")
    assert len(problems) == 1 and str(entry) in problems[0] and "checksum" in problems[0]

    calls = []
    real = loading.compact_trajectory

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "compact_trajectory", counting)
    again = episode.compact(config)
    assert calls == [1]  # recomputed from the dataset
    assert np.array_equal(again.stacks.frames, expected.stacks.frames)
    assert np.array_equal(again.actions, expected.actions)
    assert loading.check_cache(tmp_path / "cache") == []  # and written again, whole


def test_a_full_disk_only_costs_the_cache_entry(converted_sample, tmp_path, monkeypatch):
    import errno
    import os

    root, _ = converted_sample
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    episode = load_dataset("crowdplay/riverraid", root=root).episodes[0]
    config = ProcessingConfig.d3rlpy_preset()
    expected = episode.compact(config, cache=False)

    class FullDisk:
        """`os` for loading.py, whose rename of a finished cache entry finds the disk full."""

        def __getattr__(self, name: str):
            return getattr(os, name)

        def replace(self, src, dst) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(loading, "os", FullDisk())
        got = episode.compact(config)
    assert np.array_equal(got.stacks.frames, expected.stacks.frames)
    assert np.array_equal(got.actions, expected.actions)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no entry, no temporary file
    episode.compact(config)
    assert len(list(cache.rglob("*.npys"))) == 1  # with space, the entry is written


CONCURRENT_LOADER = """
import sys, time
import numpy as np
from crowdplay_minari.loading import load_dataset
from crowdplay_minari.processing import ProcessingConfig
root, start = sys.argv[1], float(sys.argv[2])
episodes = load_dataset("crowdplay/space_invaders", root=root).episodes
time.sleep(max(0.0, start - time.time()))  # both processes fill the same entries at once
for episode in episodes:
    steps = episode.compact(ProcessingConfig.d3rlpy_preset())
    print(episode.dataset_id, episode.index, int(steps.stacks.frames.sum()), len(steps.actions))
"""


def test_two_loader_processes_share_the_cache(converted_sample, tmp_path):
    import os
    import subprocess
    import sys
    import time

    root, _ = converted_sample
    cache = tmp_path / "cache"
    env = {**os.environ, CACHE_ENV: str(cache)}
    start = str(time.time() + 8)
    loaders = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_LOADER, str(root), start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [loader.communicate(timeout=300) for loader in loaders]
    assert all(loader.returncode == 0 for loader in loaders), outputs
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].strip()
    entries = list(cache.rglob("*.npys"))
    assert len(entries) == len(outputs[0][0].strip().splitlines())
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".npys"]
    assert loading.check_cache(cache) == []
    # and what they left is what a fresh computation gives
    episode = load_dataset("crowdplay/space_invaders", root=root).episodes[0]
    fresh = episode.compact(ProcessingConfig.d3rlpy_preset(), cache=False)
    first = outputs[0][0].splitlines()[0].split()
    assert int(first[2]) == int(fresh.stacks.frames.sum()) and int(first[3]) == len(fresh.actions)


def test_verify_cache_finds_a_flipped_byte_in_a_store_and_in_a_cache_entry(
    converted_sample, tmp_path, monkeypatch
):
    from crowdplay_minari.d3rlpy_bridge import to_replay_buffer
    from crowdplay_minari.processed_store import STORES_ENV, check_stores

    root, _ = converted_sample
    cache, stores = tmp_path / "cache", tmp_path / "stores"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setenv(STORES_ENV, str(stores))
    episodes = load_dataset("crowdplay/riverraid", root=root).episodes
    to_replay_buffer(episodes, ProcessingConfig.d3rlpy_preset(), memory_map=True)
    assert check_stores() == [] and loading.check_cache() == []
    good = run_cli("verify", "--cache", "--root", str(tmp_path / "no-datasets"))
    assert good.returncode == EXIT_OK, good.stdout + good.stderr

    (observations,) = stores.rglob("observations.npy")
    data = bytearray(observations.read_bytes())
    data[-len(data) // 3] ^= 0x01
    observations.write_bytes(bytes(data))
    (entry,) = cache.rglob("*.npys")
    data = bytearray(entry.read_bytes())
    data[len(data) // 3] ^= 0x01
    entry.write_bytes(bytes(data))
    assert [str(observations) in p for p in check_stores()] == [True]
    bad = run_cli("verify", "--cache", "--root", str(tmp_path / "no-datasets"))
    assert bad.returncode == EXIT_MISMATCH, bad.stdout + bad.stderr
    assert f"MISMATCH: {observations}: checksum mismatch" in bad.stdout
    assert f"MISMATCH: {entry}" in bad.stdout
