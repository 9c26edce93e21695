"""Shared fixtures: one emulator-made raw sample per test session (real ALE frames, bz2 pickles)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crowdplay_minari.sample import generate_sample

SAMPLE_EPISODES = 8
SAMPLE_FRAMES = 1000


@pytest.fixture(scope="session")
def raw_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw CrowdPlay-format dataset covering every game/task/control case of the default sample,
    written in all three encodings (.pickle.bz2, .pickle.gz, .pickle)."""
    root = tmp_path_factory.mktemp("raw") / "crowdplay_atari-v0"
    generate_sample(
        root,
        seed=0,
        episodes=SAMPLE_EPISODES,
        max_frames=SAMPLE_FRAMES,
        encodings=(".pickle.bz2", ".pickle.gz", ".pickle"),
        workers=min(2, os.cpu_count() or 1),
    )
    return root


@pytest.fixture(scope="session")
def raw_sample_bz2(tmp_path_factory: pytest.TempPathFactory, raw_sample: Path) -> Path:
    """The same sample with only the .pickle.bz2 files (as CrowdPlay ships it)."""
    import shutil

    root = tmp_path_factory.mktemp("raw_bz2") / "crowdplay_atari-v0"
    root.mkdir(parents=True)
    shutil.copy2(raw_sample / "dataset.sqlite", root / "dataset.sqlite")
    for path in raw_sample.glob("*.pickle.bz2"):
        shutil.copy2(path, root / path.name)
    return root


@pytest.fixture(scope="session")
def converted_sample(tmp_path_factory: pytest.TempPathFactory, raw_sample_bz2: Path):
    """`(root, report)`: the bz2 sample converted once per session into a fresh Minari root.
    Tests must treat it as read-only (touching a file's mtime is fine)."""
    from crowdplay_minari.conversion.convert import ConversionConfig, convert

    root = tmp_path_factory.mktemp("minari")
    report = convert(  # leaves MINARI_DATASETS_PATH as it found it
        ConversionConfig(raw_sample_bz2, root=root, workers=2, progress=False),
        log=lambda message: None,
    )
    assert report.ok, report.skipped
    return root, report


@pytest.fixture(autouse=True)
def _restore_minari_root():
    """Tests point Minari at temporary roots; put the caller's setting back afterwards."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    yield
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous
