"""The on-disk layout, in one place: where datasets live and how their files are made.

Writer (`conversion.episode_writer`, `conversion.convert`), reader (`loading`, `frame_store`,
`attributes`), verifier and benchmarks all take file names, chunking, compression and attribute
conventions from here.

Where datasets live: an explicit root, or Minari's own default. Every public function that reads or
writes datasets takes `root=` (a folder that holds `<namespace>/<name>-v<k>/data/` directories,
what Minari calls the datasets path). `None` means Minari's default resolution:
`$MINARI_DATASETS_PATH`, else `~/.minari/datasets`. Nothing here changes the process environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import zstandard

DATA_DIR = "data"
"""Each dataset's folder of files, `<root>/<dataset id>/data/` (Minari's layout)."""
METADATA_FILE = "metadata.json"
NAMESPACE_METADATA_FILE = "namespace_metadata.json"
"""Minari's file describing a namespace folder (`<root>/<namespace>/`)."""
MAIN_DATA_FILE = "main_data.hdf5"
"""Minari's HDF5 file: one group `episode_<i>` per episode."""

FRAME_CHUNK = 256
"""Frames per HDF5 chunk of `observations` (each chunk one zstd frame of whole frames)."""
ZSTD_FILTER_ID = 32015
"""HDF5's registered id of the zstd filter (the one hdf5plugin provides)."""
FRAME_ZSTD = zstandard.ZstdCompressionParameters(
    window_log=23,
    hash_log=18,
    chain_log=18,
    search_log=6,
    min_match=5,
    strategy=zstandard.STRATEGY_LAZY2,
    write_content_size=True,  # hdf5plugin's decoder sizes its output from it
)
SMALL_ZSTD_LEVEL = 9  # per-step scalars and RAM: 19 costs 20% of the writing for 3% of bytes
LIBVER = "latest"  # compact chunk indexes: ~3 KB less per dataset than HDF5's v1 B-trees

VALUE_TYPES_ATTRIBUTE = "crowdplay_value_types"
"""Episode attribute: JSON map of attribute path -> the CrowdPlay type it was encoded from."""
SLASH_SUBSTITUTE = "\u2215"
"""A `/` inside a CrowdPlay key would split an HDF5 path; it is stored as U+2215."""


def datasets_root(root: str | os.PathLike | None = None) -> Path:
    """`root` as an absolute path, or Minari's default datasets path when it is None."""
    if root is not None:
        return Path(root).expanduser().resolve()
    from_env = os.environ.get("MINARI_DATASETS_PATH")
    if from_env:
        return Path(from_env).expanduser().resolve()
    return Path.home() / ".minari" / "datasets"


def dataset_dir(dataset_id: str, root: str | os.PathLike | None = None) -> Path:
    """The `data/` folder of `dataset_id` under `root`."""
    return datasets_root(root) / dataset_id / DATA_DIR


def main_data_path(data_dir: Path) -> Path:
    """The HDF5 file inside a dataset's `data/` folder."""
    return data_dir / MAIN_DATA_FILE


def local_dataset_ids(root: str | os.PathLike | None = None, prefix: str = "") -> list[str]:
    """Ids of the complete datasets under `root` whose id starts with `prefix`, sorted."""
    base = datasets_root(root)
    if not base.is_dir():
        return []
    found = []
    for metadata in base.glob(f"**/{DATA_DIR}/{METADATA_FILE}"):
        dataset_id = metadata.parent.parent.relative_to(base).as_posix()
        if any(part.startswith(".") for part in dataset_id.split("/")):
            continue  # staging and trash folders
        if dataset_id.startswith(prefix):
            found.append(dataset_id)
    return sorted(found)


class ForeignStorageError(ValueError):
    """An episode whose arrays live outside its file (HDF5 external storage, external or soft
    links, virtual datasets): a crafted dataset could read any file, e.g. `/etc/passwd`, as an
    array."""


def check_self_contained(group, where: str) -> None:
    """Refuse an HDF5 episode group whose arrays are not stored in the file itself."""
    import h5py

    def visit(node, prefix: str) -> None:
        for name in node:
            link = node.get(name, getlink=True)
            path = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink | h5py.SoftLink):
                kind = "an external" if isinstance(link, h5py.ExternalLink) else "a soft"
                raise ForeignStorageError(f"{where}{path}: {kind} link; refused")
            item = node[name]
            if isinstance(item, h5py.Group):
                visit(item, path)
            elif item.external or item.is_virtual:
                raise ForeignStorageError(
                    f"{where}{path}: data stored outside the file "
                    f"({'virtual' if item.is_virtual else 'external storage'}); refused"
                )

    visit(group, "")
