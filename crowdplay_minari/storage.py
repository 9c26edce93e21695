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

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import zstandard

DATA_DIR = "data"
"""Each dataset's folder of files, `<root>/<dataset id>/data/` (Minari's layout)."""
METADATA_FILE = "metadata.json"
NAMESPACE_METADATA_FILE = "namespace_metadata.json"
"""Minari's file describing a namespace folder (`<root>/<namespace>/`)."""
MAIN_DATA_FILE = "main_data.hdf5"
"""Minari's HDF5 file: one entry `episode_<i>` per episode, either the episode's group itself or,
in a dataset that episodes were added to, an HDF5 external link into a part file beside it."""
PART_FILE = re.compile(r"part-[0-9a-f]{32}\.hdf5")
"""The part files of an incrementally published dataset (`data/part-<uuid>.hdf5`): each holds
the groups `episode_<i>` one publish wrote, and is never changed after; `main_data.hdf5` then
holds only links into them, so adding episodes writes the new ones and a new index of links."""
EPISODE_NAME = re.compile(r"episode_(0|[1-9][0-9]*)")
EPISODE_TABLE_ATTRIBUTE = "crowdplay_episodes"
"""Root attribute of `main_data.hdf5` the converter writes: JSON, one row per episode in
episode order, `[crowdplay episode id, created_on, steps, part file or null, group path]`, so
that adding episodes need not open every published one (0.9 ms each: most of the time of
adding 4 episodes to 1,024). Minari reads no root attribute."""

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
    write_checksum=True,  # each chunk carries a checksum of its frames, checked on every read
)
SMALL_ZSTD_LEVEL = 9  # per-step scalars and RAM: 19 costs 20% of the writing for 3% of bytes
LIBVER = "latest"  # compact chunk indexes: ~3 KB less per dataset than HDF5's v1 B-trees

PORTABLE_GZIP_LEVEL = 6
"""`--portable` datasets: deflate (HDF5's built-in gzip filter), which every HDF5 build reads."""

DIGEST_ATTRIBUTE = "crowdplay_sha256"
"""Episode attribute: sha256 of the episode as stored (`episode_digest`), recorded when it is
written; `crowdplay-minari verify` recomputes it without the raw data."""
DIGEST_EXCLUDED_ATTRIBUTES = frozenset({DIGEST_ATTRIBUTE, "id", "total_steps"})
"""Attributes outside the digest: the digest itself, and what Minari's publishing numbers."""

VALUE_TYPES_ATTRIBUTE = "crowdplay_value_types"
"""Episode attribute: JSON map of attribute path -> the CrowdPlay type it was encoded from."""
SLASH_SUBSTITUTE = "\u2215"
"""A `/` inside a CrowdPlay key would split an HDF5 path; it is stored as U+2215."""


def small_array_filters(portable: bool = False) -> dict:
    """h5py keyword arguments for the per-step arrays: compressed, with HDF5's Fletcher-32
    checksum, which HDF5 checks on every read (a flipped byte is an error, never a value)."""
    if portable:
        return {"compression": "gzip", "compression_opts": PORTABLE_GZIP_LEVEL, "fletcher32": True}
    import hdf5plugin

    return {**hdf5plugin.Zstd(clevel=SMALL_ZSTD_LEVEL), "fletcher32": True}


def filter_ids(dataset) -> list[int]:
    """The HDF5 filter ids of a dataset's pipeline, in order."""
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def is_portable(observations) -> bool:
    """Whether an `observations` dataset is stored portably (deflate: HDF5's own filter)."""
    filters = filter_ids(observations)
    return 1 in filters and ZSTD_FILTER_ID not in filters


def episode_digest(group) -> str:
    """sha256 of one episode group as stored: every dataset's shape, type, filters and stored
    chunk bytes (as HDF5 keeps them, so nothing is decoded), and every attribute but
    `DIGEST_EXCLUDED_ATTRIBUTES`, all in name order. Copying the group (H5Ocopy) keeps it."""
    import h5py

    digest = hashlib.sha256()

    def feed(*parts: bytes | str) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)

    def attributes(node) -> None:
        for name in sorted(node.attrs):
            if node.name == group.name and name in DIGEST_EXCLUDED_ATTRIBUTES:
                continue
            value = node.attrs[name]
            if isinstance(value, str | bytes):
                feed("attr", name, "s", value)
            else:
                array = np.asarray(value)
                feed("attr", name, array.dtype.str, repr(array.shape), array.tobytes())

    def visit(node) -> None:
        attributes(node)
        for name in sorted(node):
            item = node[name]
            if isinstance(item, h5py.Group):
                feed("group", name)
                visit(item)
                continue
            plist = item.id.get_create_plist()
            filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
            feed("dataset", name, item.dtype.str, repr(item.shape), repr(filters))
            attributes(item)
            if item.chunks is None:
                feed(np.ascontiguousarray(item[()]).tobytes())
                continue
            offsets = sorted(
                item.id.get_chunk_info(i).chunk_offset for i in range(item.id.get_num_chunks())
            )
            for offset in offsets:
                mask, stored = item.id.read_direct_chunk(offset)
                feed(repr(offset), str(mask), stored)

    visit(group)
    return digest.hexdigest()


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


class DamagedDatasetError(ValueError):
    """A stored array that fails its checksum or cannot be decoded; names the file and array."""


def read_array(dataset) -> np.ndarray:
    """All of an HDF5 dataset, its checksums checked by HDF5 (`small_array_filters`); a
    damaged one raises `DamagedDatasetError` instead of h5py's bare OSError."""
    try:
        return dataset[()]
    except OSError as exc:
        raise DamagedDatasetError(
            f"{dataset.file.filename}:{dataset.name}: damaged (checksum or decoding failed: "
            f"{exc}); reconvert this dataset or restore it from a copy"
        ) from exc


class ForeignStorageError(ValueError):
    """An episode whose arrays live outside its file (HDF5 external storage, external or soft
    links, virtual datasets): a crafted dataset could read any file, e.g. `/etc/passwd`, as an
    array."""


def check_self_contained(group, where: str) -> None:
    """Refuse an HDF5 episode group whose arrays are not stored in the file itself.

    Walks the group with h5py's low-level API: link types and creation property lists only,
    no high-level objects (the high-level walk cost about 10 ms an episode, 5% of a cold
    processed load)."""
    import h5py
    from h5py import h5d, h5l, h5o

    def visit(node, prefix: str) -> None:
        for raw_name in node:
            path = f"{prefix}/{raw_name.decode()}"
            link_type = node.links.get_info(raw_name).type
            if link_type != h5l.TYPE_HARD:
                kind = "an external" if link_type == h5l.TYPE_EXTERNAL else "a soft"
                raise ForeignStorageError(f"{where}{path}: {kind} link; refused")
            item = h5o.open(node, raw_name)
            if isinstance(item, h5py.h5g.GroupID):
                visit(item, path)
            elif isinstance(item, h5d.DatasetID):
                plist = item.get_create_plist()
                virtual = plist.get_layout() == h5d.VIRTUAL
                if virtual or plist.get_external_count():
                    raise ForeignStorageError(
                        f"{where}{path}: data stored outside the file "
                        f"({'virtual' if virtual else 'external storage'}); refused"
                    )

    visit(group.id, "")


class EpisodeFile:
    """A dataset's `main_data.hdf5` opened for reading, each episode resolved to its group.

    An entry is either the episode's own group or an external link to `/episode_<i>` of a part
    file (`PART_FILE`) in the same folder. Links are followed here, never by HDF5: HDF5 would
    look for a missing part in `$HDF5_EXT_PREFIX` and the current directory as well, and a
    crafted link could name any file. Anything else (a soft link, a link to another file or
    folder) raises `ForeignStorageError`. Part files are opened once, kept open until `close`.

        with EpisodeFile(main_data_path(dataset_dir("crowdplay/..."))) as file:
            actions = file["episode_0"]["actions"][()]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        self._parts: dict[str, object] = {}

    def __enter__(self) -> EpisodeFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        self._parts.clear()
        self._file.close()

    @property
    def attrs(self):
        """The index file's own (root) attributes."""
        return self._file.attrs

    def names(self) -> list[str]:
        """The episode entries, in episode order (`episode_0`, `episode_1`, ...)."""
        names = [name for name in self._file if EPISODE_NAME.fullmatch(name)]
        return sorted(names, key=lambda name: int(name.rsplit("_", 1)[1]))

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def location(self, name: str) -> tuple[str | None, str]:
        """Where an episode's group lies: (part file name, or None for this file; its path)."""
        import h5py

        link = self._file.get(name, getlink=True)
        if link is None:
            raise KeyError(f"{self.path}: no {name}")
        if isinstance(link, h5py.HardLink):
            return None, self._file[name].name
        if isinstance(link, h5py.ExternalLink):
            part, target = link.filename, link.path
            if PART_FILE.fullmatch(part) and EPISODE_NAME.fullmatch(target.removeprefix("/")):
                return part, target
            raise ForeignStorageError(
                f"{self.path} {name}: an external link to {part}:{target}, not to an episode of "
                "a part file beside it; refused"
            )
        raise ForeignStorageError(f"{self.path} {name}: a soft link; refused")

    def __getitem__(self, name: str):
        part, target = self.location(name)
        if part is None:
            return self._file[name]
        return self._part(part, name)[target]

    def _part(self, part: str, name: str):
        import h5py

        if part not in self._parts:
            path = self.path.parent / part
            if path.is_symlink() or not path.is_file():
                problem = "a symbolic link" if path.is_symlink() else "missing"
                raise DamagedDatasetError(
                    f"{self.path} {name}: its part file {path} is {problem}; reconvert this "
                    "dataset or restore it from a copy"
                )
            self._parts[part] = h5py.File(path, "r")
        return self._parts[part]
