"""Portable copies of converted datasets: readable by any h5py, with no HDF5 plugin installed.

The default layout stores arrays zstd-compressed behind hdf5plugin's filter (`storage`): small
and fast to read, but a reader must install and import `hdf5plugin`. A portable copy stores the
same arrays with HDF5's built-in deflate filter and Fletcher-32 checksums, so stock
`minari[hdf5]` reads it and HDF5 itself refuses a flipped byte. What it costs in bytes and read
speed is measured by `benchmarks/bench_conversion.py` (README "Storage").

    portable_copy(["crowdplay/qbert/plain-player_0-v1"], root="data/minari", to_root="portable")

`crowdplay-minari convert RAW --portable` writes portable datasets directly.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from crowdplay_minari import files
from crowdplay_minari.episode import FRAME_SHAPE
from crowdplay_minari.frame_store import StoredFrames
from crowdplay_minari.storage import (
    DATA_DIR,
    DIGEST_ATTRIBUTE,
    LIBVER,
    METADATA_FILE,
    NAMESPACE_METADATA_FILE,
    EpisodeFile,
    check_self_contained,
    dataset_dir,
    datasets_root,
    episode_digest,
    main_data_path,
    read_array,
    small_array_filters,
)

from .episode_writer import write_observations
from .layout import PORTABLE_REQUIREMENTS, portable_description


class PortableCopyError(ValueError):
    """A dataset that cannot be copied (damaged, or the target already exists); names it."""


class _StoredEpisodeFrames:
    """The N recorded frames of a stored `observations` dataset (N + 1 with the repeat), as the
    episode writer takes them: decoded a chunk at a time, never the whole episode at once."""

    dtype = np.dtype(np.uint8)

    def __init__(self, observations: h5py.Dataset) -> None:
        self._stored = StoredFrames(observations, n_frames=observations.shape[0] - 1)
        self._buffer = np.empty((self._stored.chunk_frames, *FRAME_SHAPE), np.uint8)
        self._chunk = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._stored), *FRAME_SHAPE)

    def __len__(self) -> int:
        return len(self._stored)

    def _frame(self, index: int) -> np.ndarray:
        chunk, row = divmod(index, self._stored.chunk_frames)
        if chunk != self._chunk:
            self._stored.read_chunk(chunk, self._buffer)
            self._chunk = chunk
        return self._buffer[row]

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frame(index % len(self)).copy()

    def copy_to(self, out: np.ndarray, start: int, stop: int) -> None:
        for row, index in enumerate(range(start, stop)):
            out[row] = self._frame(index)


def copy_episode(source: h5py.Group, target: h5py.Group, where: str) -> None:
    """Re-encode one episode group portably: the same values, attributes and digest rule."""
    check_self_contained(source, where)
    recorded = source.attrs.get(DIGEST_ATTRIBUTE)
    if recorded is not None and episode_digest(source) != recorded:
        raise PortableCopyError(f"{where}: damaged (digest mismatch); not copied")

    def copy_arrays(src: h5py.Group, dst: h5py.Group) -> None:
        for name, item in src.items():
            if isinstance(item, h5py.Group):
                copy_arrays(item, dst.create_group(name))
            elif src.name == source.name and name == "observations":
                write_observations(dst, _StoredEpisodeFrames(item), portable=True)
            else:
                data = read_array(item)
                chunks = item.chunks or (data.shape if data.size else None)
                if chunks is None:
                    dst.create_dataset(name, data=data)
                else:
                    dst.create_dataset(
                        name, data=data, chunks=chunks, **small_array_filters(portable=True)
                    )

    copy_arrays(source, target)
    target.attrs.update({k: v for k, v in source.attrs.items() if k != DIGEST_ATTRIBUTE})
    target.file.flush()
    target.attrs[DIGEST_ATTRIBUTE] = episode_digest(target)


def portable_copy(
    dataset_ids: Sequence[str],
    *,
    root: str | Path | None = None,
    to_root: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Copy datasets from `root` (default: Minari's) into `to_root`, re-encoded portably; each
    appears there whole or not at all. Returns `{dataset_id: {"episodes", "bytes"}}`."""
    source_root, target_root = datasets_root(root), datasets_root(to_root)
    if source_root == target_root:
        raise PortableCopyError(f"{target_root}: copy into another root than the source's")
    done = {}
    for dataset_id in dataset_ids:
        source = dataset_dir(dataset_id, source_root)
        final = target_root / dataset_id
        if not (source / METADATA_FILE).is_file():
            raise PortableCopyError(f"no dataset {dataset_id} under {source_root}")
        if final.exists():
            raise PortableCopyError(f"{final} already exists; remove it or choose another root")
        build = target_root / f".portable-{uuid.uuid4().hex}" / "dataset"
        (build / DATA_DIR).mkdir(parents=True)
        try:
            with (
                EpisodeFile(main_data_path(source)) as src,
                h5py.File(
                    main_data_path(build / DATA_DIR), "w", track_order=True, libver=LIBVER
                ) as out,
            ):
                names = src.names()
                for name in names:
                    copy_episode(
                        src[name], out.create_group(name), f"{main_data_path(source)} {name}"
                    )
            metadata = json.loads((source / METADATA_FILE).read_text())
            metadata["requirements"] = PORTABLE_REQUIREMENTS
            metadata["description"] = portable_description(metadata["description"])
            size = sum(p.stat().st_size for p in (build / DATA_DIR).iterdir())
            metadata["dataset_size"] = round(size / 1e6, 1)  # MB, as Minari's get_size
            files.write_text(build / DATA_DIR / METADATA_FILE, json.dumps(metadata))
            namespace_file = source_root / dataset_id.split("/")[0] / NAMESPACE_METADATA_FILE
            target_namespace = target_root / dataset_id.split("/")[0] / NAMESPACE_METADATA_FILE
            if namespace_file.is_file() and not target_namespace.exists():
                target_namespace.parent.mkdir(parents=True, exist_ok=True)
                files.write_bytes(target_namespace, namespace_file.read_bytes())
            final.parent.mkdir(parents=True, exist_ok=True)
            build.rename(final)  # fails rather than replace anything that appeared meanwhile
        finally:
            shutil.rmtree(build.parent, ignore_errors=True)
        done[dataset_id] = {"episodes": len(names), "bytes": size}
        log(f"{dataset_id}: {len(names)} episodes, {size / 1e6:.1f} MB (portable)")
    return done
