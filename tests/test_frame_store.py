"""Tests for `crowdplay_minari.frame_store`: processing frames decoded chunk by chunk from HDF5
equals processing the same frames in memory, for any chunking, codec and option set, and bad
chunks fail with the file named."""

from __future__ import annotations

from pathlib import Path

import ale_py
import h5py
import hdf5plugin
import numpy as np
import pytest
import zstandard

from crowdplay_minari.frame_store import StoredFrames, StoredFramesError
from crowdplay_minari.processing import ProcessingConfig, process_trajectory
from tests.test_processing import EPISODE_FRAMES, Episode, _play


@pytest.fixture(scope="module")
def episode() -> Episode:
    """A 400-frame Space Invaders episode from the emulator."""
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", 3)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(ale_py.roms.get_rom_path("space_invaders"))
    return _play(ale, EPISODE_FRAMES, np.random.default_rng(3))


CONFIGS = [
    ProcessingConfig(),
    ProcessingConfig.d3rlpy_preset(),
    ProcessingConfig.d3rlpy_preset(crowdplay_compat=True, downsample_offset=3),
    ProcessingConfig(max_n=3, skip_n=3, stack_n=3, scale=True, warp_width=37, warp_height=53),
    ProcessingConfig(warp=False, max_n=1, stack_n=2, framestack_axis_first=True),
    ProcessingConfig(max_n=7, skip_n=1, stack_n=2, downsample_frequency=5, downsample_offset=2),
]


def _write(path: Path, frames: np.ndarray, chunk: int | None, **filters) -> None:
    with h5py.File(path, "w") as file:
        chunks = None if chunk is None else (chunk, *frames.shape[1:])
        file.create_dataset("observations", data=frames, chunks=chunks, **filters)


def _empty_zstd_dataset(file: h5py.File, shape: tuple, chunk: int) -> h5py.Dataset:
    """An observations dataset declaring the zstd filter, its chunks to be written directly."""
    return file.create_dataset(
        "observations", shape=shape, dtype=np.uint8, chunks=(chunk, *shape[1:]), **hdf5plugin.Zstd()
    )


def _assert_same(frames_on_disk: StoredFrames, episode: Episode, config: ProcessingConfig) -> None:
    args = (episode.actions, episode.rewards, episode.dones, False, config)
    expected = process_trajectory(episode.frames, *args)
    got = process_trajectory(frames_on_disk, *args)
    for name in ("observations", "actions", "rewards", "terminals", "timeouts", "frame_indices"):
        a, b = getattr(expected, name), getattr(got, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), (name, config)


@pytest.mark.parametrize("chunk", [1, 5, 64, 256, 399])
def test_zstd_chunks_process_like_memory(tmp_path: Path, episode: Episode, chunk: int) -> None:
    # chunk 1 and 5: every max window of max_n=7 straddles chunks (5: it reaches two back)
    path = tmp_path / "frames.h5"
    _write(path, episode.frames, chunk, **hdf5plugin.Zstd(clevel=3))
    with h5py.File(path) as file:
        stored = StoredFrames(file["observations"])
        assert stored._direct and stored.chunk_frames == chunk
        for config in CONFIGS:
            _assert_same(stored, episode, config)


@pytest.mark.parametrize(
    "chunk, filters",
    [(16, {"compression": "gzip"}), (None, {}), ((8, 210, 80, 3), {})],
    ids=["gzip", "contiguous", "half-frame-chunks"],
)
def test_other_layouts_are_read_through_h5py(
    tmp_path: Path, episode: Episode, chunk, filters: dict
) -> None:
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as file:
        chunks = (chunk, 210, 160, 3) if isinstance(chunk, int) else chunk
        file.create_dataset("observations", data=episode.frames, chunks=chunks, **filters)
    with h5py.File(path) as file:
        stored = StoredFrames(file["observations"])
        assert not stored._direct
        for config in CONFIGS[:3]:
            _assert_same(stored, episode, config)


def test_only_the_first_n_frames_are_processed(tmp_path: Path, episode: Episode) -> None:
    path = tmp_path / "frames.h5"
    _write(path, episode.frames, 64, **hdf5plugin.Zstd())
    n = 150
    with h5py.File(path) as file:
        stored = StoredFrames(file["observations"], n_frames=n)
        assert len(stored) == n
        _assert_same(stored, episode.head(n), ProcessingConfig())
        with pytest.raises(StoredFramesError, match="frames asked for"):
            StoredFrames(file["observations"], n_frames=len(episode.frames) + 1)


def test_unfiltered_chunk_is_read_raw(tmp_path: Path, episode: Episode) -> None:
    frames = episode.frames[:8]
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as file:
        dataset = _empty_zstd_dataset(file, frames.shape, chunk=4)
        dataset.id.write_direct_chunk((0, 0, 0, 0), frames[:4].tobytes(), filter_mask=1)
        dataset.id.write_direct_chunk(
            (4, 0, 0, 0), zstandard.ZstdCompressor().compress(frames[4:].tobytes())
        )
    with h5py.File(path) as file:
        assert np.array_equal(file["observations"][()], frames)  # what h5py reads too
        stored = StoredFrames(file["observations"])
        buffer = np.empty((4, 210, 160, 3), dtype=np.uint8)
        assert np.array_equal(stored.read_chunk(0, buffer), frames[:4])
        assert np.array_equal(stored.read_chunk(1, buffer), frames[4:])


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"garbage bytes, not zstd", "not a zstd frame"),
        ("truncated", "zstd data ends|corrupt zstd"),
        ("short", "holds 403200 bytes"),
    ],
)
def test_bad_chunks_name_the_file(
    tmp_path: Path, episode: Episode, payload: bytes | str, message: str
) -> None:
    frames = episode.frames[:8]
    whole = zstandard.ZstdCompressor().compress(frames.tobytes())
    if payload == "truncated":
        payload = whole[: len(whole) // 2]
    elif payload == "short":
        payload = zstandard.ZstdCompressor().compress(frames[:4].tobytes())
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as file:
        dataset = _empty_zstd_dataset(file, frames.shape, chunk=len(frames))
        dataset.id.write_direct_chunk((0, 0, 0, 0), payload)
    with h5py.File(path) as file:
        stored = StoredFrames(file["observations"])
        with pytest.raises(StoredFramesError, match=message) as caught:
            process_trajectory(
                stored,
                episode.actions[:8],
                episode.rewards[:8],
                episode.dones[:8],
                False,
                ProcessingConfig(),
            )
        assert str(path) in str(caught.value) and "chunk at frame 0" in str(caught.value)


def test_not_frames_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ram.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("ram", data=np.zeros((5, 128), dtype=np.uint8))
    with h5py.File(path) as file, pytest.raises(StoredFramesError, match="ram"):
        StoredFrames(file["ram"])
