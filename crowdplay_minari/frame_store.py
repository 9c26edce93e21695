"""An episode's stored frames, decoded one HDF5 chunk at a time, in parallel threads.

The converter stores observations as `(N + 1, 210, 160, 3)` uint8 in chunks of whole frames,
each chunk one standard zstd frame behind HDF5 filter 32015 (hdf5plugin's `Zstd`), so plain
h5py and Minari read them through the plugin. Going through h5py costs about four times the
decoding itself here: HDF5 decompresses every chunk into freshly allocated memory (page faults)
and copies it out again, under h5py's global lock. `StoredFrames` instead reads the compressed
bytes of a chunk (`read_direct_chunk`) and decompresses them with `zstandard` straight into a
buffer the caller reuses, which releases the GIL, so chunks decode in parallel. Datasets stored
any other way (another filter, no chunks) are read through h5py into the same buffer.

Example::

    with h5py.File(path) as file:
        frames = StoredFrames(file["episode_0/observations"], n_frames=num_steps)
        steps = process_trajectory(frames, actions, rewards, terminations, False, config)
"""

from __future__ import annotations

import h5py
import numpy as np
import zstandard

from .episode import FRAME_SHAPE
from .storage import FRAME_CHUNK, ZSTD_FILTER_ID, DamagedDatasetError, filter_ids

_FILTER_SKIPPED = 1
"""Bit 0 of a chunk's filter mask: the zstd filter (the only one) was not applied."""

_FRAME_BYTES = int(np.prod(FRAME_SHAPE))


class StoredFramesError(DamagedDatasetError):
    """A stored observations dataset that cannot be read as frames; names the file and chunk."""


class StoredFrames:
    """The first `n_frames` frames of an observations dataset, as `processing.FrameChunks`."""

    def __init__(self, dataset: h5py.Dataset, n_frames: int | None = None) -> None:
        self.dataset = dataset
        self.name = f"{dataset.file.filename}:{dataset.name}"
        if dataset.dtype != np.uint8 or dataset.shape[1:] != FRAME_SHAPE:
            raise StoredFramesError(
                f"{self.name}: expected (N, {', '.join(map(str, FRAME_SHAPE))}) uint8 frames, "
                f"got {dataset.dtype} {dataset.shape}"
            )
        self.n_frames = dataset.shape[0] if n_frames is None else n_frames
        if not 0 <= self.n_frames <= dataset.shape[0]:
            raise StoredFramesError(
                f"{self.name}: {self.n_frames} frames asked for, the dataset holds "
                f"{dataset.shape[0]}"
            )
        chunks = dataset.chunks
        whole_frames = chunks is not None and tuple(chunks[1:]) == FRAME_SHAPE
        self.chunk_frames = chunks[0] if whole_frames else FRAME_CHUNK
        self._direct = whole_frames and _only_zstd(dataset)

    def __len__(self) -> int:
        return self.n_frames

    def read_chunk(self, index: int, out: np.ndarray) -> np.ndarray:
        """Frames `index * chunk_frames ...` into `out` (`(chunk_frames, 210, 160, 3)` uint8,
        C-contiguous); returns the view of the valid ones. Safe to call from several threads."""
        start = index * self.chunk_frames
        count = min(self.chunk_frames, self.n_frames - start)
        if count <= 0 or out.shape != (self.chunk_frames, *FRAME_SHAPE):
            raise IndexError(f"{self.name}: no chunk {index} into a {out.shape} buffer")
        if not self._direct:
            try:  # portable (gzip + Fletcher-32) and other layouts: HDF5 checks and decodes
                self.dataset.read_direct(out, np.s_[start : start + count], np.s_[:count])
            except OSError as exc:
                raise StoredFramesError(
                    f"{self.name}: frames {start}..{start + count - 1} damaged ({exc})"
                ) from exc
            return out[:count]
        try:
            filter_mask, compressed = self.dataset.id.read_direct_chunk((start, 0, 0, 0))
        except (OSError, KeyError, ValueError) as exc:
            raise StoredFramesError(
                f"{self.name}: chunk at frame {start} unreadable: {exc}"
            ) from exc
        expected = self.chunk_frames * _FRAME_BYTES
        target = memoryview(out).cast("B")
        if filter_mask & _FILTER_SKIPPED:
            if len(compressed) != expected:
                raise StoredFramesError(
                    f"{self.name}: unfiltered chunk at frame {start} has {len(compressed)} "
                    f"bytes, expected {expected}"
                )
            target[:] = compressed
        else:
            _decompress_into(compressed, target, f"{self.name}: chunk at frame {start}")
        return out[:count]


def _only_zstd(dataset: h5py.Dataset) -> bool:
    return filter_ids(dataset) == [ZSTD_FILTER_ID]


def _decompress_into(compressed: bytes, target: memoryview, where: str) -> None:
    """Decompress one zstd frame that must fill `target` exactly."""
    try:
        size = zstandard.frame_content_size(compressed)
    except zstandard.ZstdError as exc:
        raise StoredFramesError(f"{where}: not a zstd frame: {exc}") from exc
    if size != len(target):
        raise StoredFramesError(
            f"{where}: zstd frame holds {size} bytes (-1: not recorded), expected {len(target)}"
        )
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=False)
        filled = 0
        while filled < len(target):
            read = reader.readinto(target[filled:])
            if read == 0:
                break
            filled += read
        if filled == len(target) and reader.read(1):  # also checks the frame's checksum
            raise StoredFramesError(f"{where}: zstd frame holds more than {len(target)} bytes")
    except zstandard.ZstdError as exc:
        raise StoredFramesError(f"{where}: corrupt zstd data: {exc}") from exc
    if filled != len(target):
        raise StoredFramesError(f"{where}: zstd data ends after {filled} of {len(target)} bytes")
