"""Crash-safe publishing, proven by killing the converter at every step of publishing.

A dataset of one episode is published; then a conversion that adds two more is killed
(`os._exit`, as a power cut would) at each step of publishing in turn. Right after each crash,
plain `minari.load_dataset` must read a complete dataset at the dataset's path, the old one or the
new one, every array of every episode; a rerun must then finish with the new one and leave no
debris. The fallback for file systems without an atomic exchange is killed the same way: there a
rerun restores the old dataset before finishing. The incremental path (the new episodes come after
the published one, which stays in its file) is killed at each of its steps too, and must leave
the published file exactly as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hdf5plugin  # noqa: F401  (our arrays are zstd; a plain reader imports this)
import pytest

from crowdplay_minari.conversion.convert import (
    FAULT_ENV,
    STAGING_DIR,
    ConversionConfig,
    convert,
)
from crowdplay_minari.raw import RawDataset
from crowdplay_minari.sample import DEFAULT_SESSIONS, generate_sample

REPO = Path(__file__).resolve().parent.parent
DATASET = "crowdplay/space_invaders/plain-player_0-v1"
STEPS = ["started", "assembled", "exchanged", "swapped", "cleaned"]
FALLBACK_STEPS = ["assembled", "moved-aside", "swapped", "cleaned"]
APPEND_STEPS = ["linked", "part-written", "assembled", "exchanged", "cleaned"]
CONVERT = """
import json, sys
from pathlib import Path
from crowdplay_minari.conversion import convert as module
if sys.argv[3] == "fallback":
    module._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
module.convert(module.ConversionConfig(Path(sys.argv[1]), root=Path(sys.argv[2]), progress=False),
               log=lambda message: None)
"""


@pytest.fixture(scope="module")
def raw_three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three Space Invaders episodes of one session."""
    raw = tmp_path_factory.mktemp("faults") / "raw" / "crowdplay_atari-v0"
    sessions = tuple(s for s in DEFAULT_SESSIONS if s.task_id == "space_invaders_mturk")
    generate_sample(raw, seed=0, episodes=3, max_frames=150, sessions=sessions, workers=1)
    return raw


def _published(raw: Path, root: Path, episode_id: str) -> tuple[Path, Path]:
    convert(ConversionConfig(raw, root=root, episode_ids=(episode_id,), progress=False), log=print)
    assert _episodes(root) == 1
    return raw, root


@pytest.fixture(scope="module")
def published_once(raw_three: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw, root): the root holds a dataset of the first of three episodes by id."""
    first = sorted(RawDataset(raw_three).metadata())[0]
    return _published(raw_three, tmp_path_factory.mktemp("old"), first)


@pytest.fixture(scope="module")
def published_earliest(
    raw_three: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(raw, root): the root holds a dataset of the earliest made of three episodes, so the
    other two are added after it (the incremental path)."""
    metadata = RawDataset(raw_three).metadata()
    earliest = min(metadata, key=lambda e: metadata[e].keyword_data["all"]["created_on"])
    return _published(raw_three, tmp_path_factory.mktemp("earliest"), earliest)


def _episodes(root: Path) -> int:
    """Read every array of every episode with plain Minari, in a fresh process; the count."""
    script = (
        "import hdf5plugin, minari, sys\n"
        f"ds = minari.load_dataset({DATASET!r})\n"
        "n = 0\n"
        "for e in ds.iterate_episodes():\n"
        "    assert len(e.observations) == len(e.actions) + 1 and e.infos['ram'].shape[1] == 128\n"
        "    n += 1\n"
        "assert n == ds.total_episodes\n"
        "print(n)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "MINARI_DATASETS_PATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


def _crash(raw: Path, root: Path, step: str, mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CONVERT, str(raw), str(root), mode],
        env={**os.environ, FAULT_ENV: step, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,  # a whole conversion; the CI machine's 2 cores may be busy
    )
    assert result.returncode == 86, result.stdout[-2000:] + result.stderr[-3000:]
    return result.returncode


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, step",
    [("exchange", s) for s in STEPS] + [("fallback", s) for s in FALLBACK_STEPS],
)
def test_a_crash_at_any_step_of_publishing_loses_nothing(
    published_once: tuple[Path, Path], tmp_path: Path, mode: str, step: str
) -> None:
    raw, old_root = published_once
    root = tmp_path / "root"
    shutil.copytree(old_root, root)
    assert _crash(raw, root, step, mode) == 86, f"the converter did not reach {step}"
    if mode == "exchange" or step != "moved-aside":
        assert _episodes(root) in (1, 3)  # right after the crash: old or new, complete
    else:  # the fallback's one gap: the old dataset is aside, noted for the rerun
        note = next((root / STAGING_DIR / "trash").glob("*.for"))
        assert Path(note.read_text()) == root / DATASET
    report = convert(ConversionConfig(raw, root=root, progress=False), log=lambda m: None)
    assert report.ok, report.skipped
    # nothing is converted twice: the crash came after staging, and a dataset moved aside is
    # put back rather than rebuilt from the raw files
    assert report.episodes_converted == 0
    assert _episodes(root) == 3
    staging = root / STAGING_DIR
    assert not list(staging.glob("publish/*")) and not list(staging.glob("trash/*"))
    assert not list(staging.glob("episodes/*/*"))  # every staged episode published
    saved = json.loads((root / "crowdplay" / "conversion_report.json").read_text())
    assert saved["episodes_total"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("step", APPEND_STEPS)
def test_a_crash_while_adding_episodes_leaves_the_published_file_as_it_was(
    published_earliest: tuple[Path, Path], tmp_path: Path, step: str
) -> None:
    raw, old_root = published_earliest
    root = tmp_path / "root"
    shutil.copytree(old_root, root)
    published = root / DATASET / "data" / "main_data.hdf5"
    before = published.read_bytes()
    assert _crash(raw, root, step, "exchange") == 86, f"the converter did not reach {step}"
    data = root / DATASET / "data"
    episodes = _episodes(root)
    assert episodes in (1, 3)
    if episodes == 1:  # the old dataset: the very same file
        assert published.read_bytes() == before
    else:  # the new one: the old file is its first part, unchanged
        assert before in [p.read_bytes() for p in data.glob("part-*.hdf5")]
    report = convert(ConversionConfig(raw, root=root, progress=False), log=lambda m: None)
    assert report.ok and report.episodes_converted == 0
    assert _episodes(root) == 3
    parts = sorted(data.glob("part-*.hdf5"))
    assert len(parts) == 2 and before in [p.read_bytes() for p in parts]
    staging = root / STAGING_DIR
    assert not list(staging.glob("publish/*")) and not list(staging.glob("trash/*"))
    assert not list(staging.glob("episodes/*/*"))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["publishing", "staging"])
def test_a_full_disk_is_one_line_naming_the_space_and_a_rerun_finishes(
    published_once: tuple[Path, Path], tmp_path: Path, monkeypatch, capsys, where: str
) -> None:
    """ENOSPC injected at the writes of publishing (copying episodes into the new dataset) or
    of staging (a worker writing an episode): exit status 5, one line, old dataset intact."""
    import h5py

    from crowdplay_minari.benchmarks.cli import main
    from crowdplay_minari.cli import EXIT_DISK_FULL, EXIT_OK
    from crowdplay_minari.conversion import episode_writer

    raw, old_root = published_once
    root = tmp_path / "root"
    shutil.copytree(old_root, root)
    argv = ["convert", str(raw), "--root", str(root), "--workers", "1", "--quiet"]
    with monkeypatch.context() as patch:
        if where == "publishing":
            patch.setattr(h5py.Group, "copy", _no_space)
        else:  # the local executor forks its workers: they inherit the patch
            patch.setattr(episode_writer, "write_episode_group", _no_space)
        assert main(argv) == EXIT_DISK_FULL
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "disk full: no space left writing" in err and "MB free on" in err
    if where == "publishing":
        assert f"dataset {DATASET}" in err and "MB needed" in err
    else:
        assert "into " + str(root / STAGING_DIR) in err
    assert _episodes(root) == 1  # the published dataset was never touched
    assert not list((root / STAGING_DIR).glob("publish/*"))
    assert main(argv) == EXIT_OK
    assert _episodes(root) == 3
