"""Where datasets live: an explicit root, or Minari's own default.

Every public function that reads or writes datasets takes `root=` (a folder that holds
`<namespace>/<name>-v<k>/data/` directories, what Minari calls the datasets path). `None` means
Minari's default resolution: `$MINARI_DATASETS_PATH`, else `~/.minari/datasets`. Nothing here
changes the process environment.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = "data"
METADATA_FILE = "metadata.json"


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
