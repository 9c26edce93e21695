"""Portable copies: the same arrays, attributes and metadata, through HDF5's built-in filters
only, so stock `minari[hdf5]` reads them with no plugin (the fresh-venv read is in
.ci/wheel_smoke), and HDF5 itself refuses a flipped frame byte."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from crowdplay_minari.cli import EXIT_OK, EXIT_USAGE
from crowdplay_minari.conversion.portable import portable_copy
from crowdplay_minari.conversion.verify import verify_datasets
from crowdplay_minari.loading import load_dataset
from crowdplay_minari.storage import (
    DIGEST_ATTRIBUTE,
    METADATA_FILE,
    dataset_dir,
    filter_ids,
    local_dataset_ids,
    main_data_path,
)
from tests.commands import run_cli

BUILT_IN_FILTERS = {1, 3}  # deflate, Fletcher-32: in every HDF5 build


@pytest.fixture(scope="module")
def portable_root(converted_sample, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("portable")
    portable_copy(local_dataset_ids(converted_sample[0]), root=converted_sample[0], to_root=root)
    return root


def _dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(
        lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None
    )
    return names


def _filters(dataset: h5py.Dataset) -> set[int]:
    return set(filter_ids(dataset))


def test_a_portable_copy_holds_the_same_data_through_built_in_filters_only(
    converted_sample, portable_root
):
    source_root = converted_sample[0]
    ids = local_dataset_ids(source_root)
    assert local_dataset_ids(portable_root) == ids
    source, copy = (
        load_dataset("crowdplay", root=source_root),
        load_dataset("crowdplay", root=portable_root),
    )
    assert len(copy) == len(source) > 0
    for a, b in zip(source.episodes, copy.episodes, strict=True):
        assert (a.dataset_id, a.index) == (b.dataset_id, b.index)
        assert {k: v for k, v in a.metadata.items() if k != DIGEST_ATTRIBUTE} == {
            k: v for k, v in b.metadata.items() if k != DIGEST_ATTRIBUTE
        }
        x, y = a.load(), b.load()
        assert np.array_equal(x.observations, y.observations)
        for name in ("actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
        assert x.infos.keys() == y.infos.keys()
        assert np.array_equal(x.infos["ram"], y.infos["ram"])

    for dataset_id in ids:
        with h5py.File(main_data_path(dataset_dir(dataset_id, portable_root)), "r") as file:
            seen = [_filters(file[name]) for name in _dataset_names(file)]
        assert seen and all(f and f <= BUILT_IN_FILTERS and 3 in f for f in seen), seen
        metadata = json.loads((dataset_dir(dataset_id, portable_root) / METADATA_FILE).read_text())
        assert not any(r.startswith("hdf5plugin") for r in metadata["requirements"])
        assert "no HDF5 plugin needed" in metadata["description"]
        assert "hdf5plugin" not in metadata["description"]
    assert verify_datasets(ids, root=portable_root, log=lambda _: None).ok


def test_a_flipped_frame_byte_in_a_portable_copy_is_an_error_for_plain_minari(
    portable_root, tmp_path
):
    import shutil

    import minari

    dataset_id = local_dataset_ids(portable_root)[0]
    root = tmp_path / "copy"
    shutil.copytree(portable_root / dataset_id, root / dataset_id)
    path = main_data_path(dataset_dir(dataset_id, root))
    with h5py.File(path, "r") as file:
        info = file["episode_0/observations"].id.get_chunk_info(5)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)[0]
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte ^ 0x04]))
    plain = minari.MinariDataset(dataset_dir(dataset_id, root))
    with pytest.raises(OSError):
        next(iter(plain.iterate_episodes([0])))


def test_the_portable_command(converted_sample, tmp_path):
    source_root = converted_sample[0]
    dataset_id = local_dataset_ids(source_root, prefix="crowdplay/riverraid/")[0]
    done = run_cli("portable", dataset_id, "--root", str(source_root), "--to", str(tmp_path / "p"))
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert local_dataset_ids(tmp_path / "p") == [dataset_id]
    again = run_cli("portable", dataset_id, "--root", str(source_root), "--to", str(tmp_path / "p"))
    assert again.returncode == EXIT_USAGE
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    same = run_cli("portable", "--root", str(source_root), "--to", str(source_root))
    assert same.returncode == EXIT_USAGE and "another root" in same.stderr


def test_convert_portable_writes_the_same_episodes_portably(
    converted_sample, raw_sample_bz2, tmp_path
):
    root = tmp_path / "minari"
    args = ["convert", str(raw_sample_bz2), "--root", str(root), "--game", "riverraid"]
    done = run_cli(*args, "--portable", "--workers", "2", "--quiet")
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    (dataset_id,) = local_dataset_ids(root)
    with h5py.File(main_data_path(dataset_dir(dataset_id, root)), "r") as file:
        filters = [_filters(file[name]) for name in _dataset_names(file)]
    assert filters and all(f <= BUILT_IN_FILTERS and 3 in f for f in filters)
    metadata = json.loads((dataset_dir(dataset_id, root) / METADATA_FILE).read_text())
    assert not any(r.startswith("hdf5plugin") for r in metadata["requirements"])
    default = load_dataset(dataset_id, root=converted_sample[0]).episodes
    portable = load_dataset(dataset_id, root=root).episodes
    assert len(default) == len(portable) > 0
    for a, b in zip(default, portable, strict=True):
        x, y = a.load(), b.load()
        assert np.array_equal(x.observations, y.observations)
        assert np.array_equal(x.actions, y.actions) and np.array_equal(x.rewards, y.rewards)
    assert verify_datasets([dataset_id], root=root, log=lambda _: None).ok

    mixed = run_cli(*args, "--quiet")  # default episodes into a portable dataset: refused
    assert mixed.returncode == EXIT_USAGE, mixed.stdout + mixed.stderr
    assert mixed.stderr.count("\n") == 1 and "with --portable" in mixed.stderr
