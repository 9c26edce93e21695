"""CrowdPlay's frame processing (max / skip / warp / scale / stack / downsample), vectorised.

This module is the one implementation of the DeepMind-style processing that CrowdPlay's
`get_processed_trajectory()` applies; the dataset loader and the gymnasium evaluation
environment both call it, so training data and evaluation observations cannot drift apart.

Per raw frame `i` of an episode (frame `i` is the screen seen *before* action `i`, frames before
the episode start count as black):

- a *processed frame* `P[t]` is the pixel-wise max of the raw frames `t - max_n + 1 .. t`, then,
  if `warp`, OpenCV RGB->gray and an `INTER_AREA` resize to `warp_width` x `warp_height`, then,
  if `scale`, `float32 / 255`;
- the observation at time `i` stacks `P[i - (stack_n - 1) * skip_n], ..., P[i - skip_n], P[i]`
  (oldest first) on the last axis: `(warp_height, warp_width, stack_n)`, or
  `(210, 160, 3 * stack_n)` without `warp`; `framestack_axis_first` moves that axis first.

Example::

    config = ProcessingConfig.d3rlpy_preset()  # (1, 84, 84) uint8, every 4th frame
    steps = process_trajectory(frames, actions, rewards, terminations, truncated=False,
                               config=config)
    steps.observations.shape  # (ceil(len(frames) / 4), 1, 84, 84)

Two modes decide which frames are kept and what their reward and flags are:

`crowdplay_compat=True` reproduces the reference bit for bit (same pixels and dtype, same kept
frames, same reward sums, same terminals), quirks included:

- frame `i` is kept iff `i % k == o or i % k == N - 1` (`k = downsample_frequency`,
  `o = downsample_offset`, `N` frames); the second clause only fires for episodes of at most
  `k` frames, so the episode's last frame (and its game-over flag) is usually dropped;
- a kept frame's reward is the sum of the rewards since the previous kept frame, itself included
  (rewards after the last kept frame are lost), i.e. mostly reward earned under the *previous*
  kept action;
- `terminals` are the raw done flags of the kept frames; `timeouts` are all zero.

The default (corrected) mode differs only in these points:

- kept frames are `o, o + k, o + 2k, ... < N`; frames before `o` are dropped, and an episode
  shorter than `o + 1` frames yields no step;
- a kept frame's action is the one repeated over the `k` frames after it, so its reward is
  `sum(rewards[i : i + k])` (cut at the episode end), like an environment with action repeat `k`;
- the last kept step carries the episode end: `terminals` is 1 there iff the episode's final
  done flag is set (even when frame `N - 1` is not on the kept phase), and `timeouts` is 1 there
  iff the episode was `truncated`; done flags in the middle of an episode are ignored.

Observations are the same in both modes: the same pixels for the same kept frame index.

How it is fast: every processed frame `P[t]` that some kept observation needs is computed once
(for `k = 4, stack_n = 1` that is a quarter of the frames), in chunks spread over threads:
the max is one `np.maximum` over strided views of the episode, the gray conversion one
`cv2.cvtColor` over a tall image of the whole chunk, and the resize one `cv2.resize` of four
tall images merged as channels. Observations are then gathered from `P` by index (`FrameStacks`;
the loader caches that form, a quarter the size of four-frame stacks). Both batching tricks are
bit-exact (checked against a per-frame reference in `tests/test_processing.py`). Frames can
come from `FrameChunks` (the loader's stored HDF5 chunks) instead of an array: each thread then
decodes one chunk into a reused buffer and processes it at once, so an episode is never held
whole in memory. OpenCV's `INTER_AREA` resize dominates the cost; CrowdPlay's loop resizes every
stacked slot of every kept frame, this module each needed frame once.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import cv2
import numpy as np

from crowdplay_minari.episode import FRAME_SHAPE
from crowdplay_minari.scratch import scratch_buffer

_SCREEN_HEIGHT, _SCREEN_WIDTH, _SCREEN_CHANNELS = FRAME_SHAPE

_CHUNK_FRAMES = 32
"""Processed frames computed per OpenCV call: big enough to amortise the calls, small enough
that a chunk's scratch buffers (about 130 KB a frame) stay in the CPU cache."""

_MAX_WORKERS = 8
"""Threads computing processed frames of one long call (one per chunk at most)."""

_DEDUPLICATE_BACK = 2
"""How many frames back a gray frame is compared with before it is resized (see
`_resize_unique_frames`)."""

_MAX_MERGE_CHANNELS = 512
"""OpenCV's channel limit (`CV_CN_MAX`) for `cv2.merge`."""

_SCALE_TABLE = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0
"""`uint8 -> float32 / 255`, the reference's `frame.astype(np.float32) / 255.0` as a table."""


class _Pool:
    """One thread pool for the whole process, so its threads (and their `scratch_buffer`s)
    live between calls; rebuilt in a forked child, where the parent's threads do not exist."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._executor = None
        self._lock = threading.Lock()

    def run(self, jobs: list) -> None:
        """Call every zero-argument `job`, in parallel where there is more than one."""
        if len(jobs) == 1 or _available_cpus() == 1:
            for job in jobs:
                job()
            return
        with self._lock:
            if self._executor is None:
                workers = min(_MAX_WORKERS, _available_cpus())
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="crowdplay-frames")
            executor = self._executor
        for future in [executor.submit(job) for job in jobs]:
            future.result()


_POOL = _Pool()


class FrameChunks(Protocol):
    """An episode's frames stored in consecutive chunks (e.g. an HDF5 dataset), decoded one chunk
    at a time. Processing from chunks never holds the whole episode's frames in memory, and
    decodes chunks in parallel threads; `crowdplay_minari.frame_store.StoredFrames` is one."""

    chunk_frames: int
    """Frames per chunk (the last chunk may hold fewer)."""

    def __len__(self) -> int:
        """Frames in the episode."""

    def read_chunk(self, index: int, out: np.ndarray) -> np.ndarray:
        """Decode chunk `index` (frames `index * chunk_frames ...`) into `out`, a C-contiguous
        `(chunk_frames, 210, 160, 3)` uint8 buffer, and return the view of its valid frames.
        Called from several threads at once."""


@dataclass(frozen=True)
class ProcessingConfig:
    """Options of the frame processing, named as in CrowdPlay's `get_processed_trajectory()`.

    The defaults give gym/baselines-style `(84, 84, 4)` uint8 observations for every frame;
    `ProcessingConfig.d3rlpy_preset()` gives d3rlpy-style `(1, 84, 84)` observations for every
    4th frame. `crowdplay_compat=True` reproduces the reference's quirks (see the module
    docstring); the default corrects them.
    """

    framestack_axis_first: bool = False
    downsample_frequency: int = 1
    downsample_offset: int = 0
    stack_n: int = 4
    max_n: int = 2
    skip_n: int = 4
    warp: bool = True
    scale: bool = False
    warp_width: int = 84
    warp_height: int = 84
    crowdplay_compat: bool = False

    def __post_init__(self) -> None:
        for name in ("framestack_axis_first", "warp", "scale", "crowdplay_compat"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise ValueError(f"ProcessingConfig.{name} must be a bool, got {value!r}")
        minimums = {
            "downsample_frequency": 1,
            "downsample_offset": 0,
            "stack_n": 1,
            "max_n": 1,
            # The reference accepts skip_n=0: every stacked slot then shows the same frame.
            "skip_n": 0,
            "warp_width": 1,
            "warp_height": 1,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"ProcessingConfig.{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"ProcessingConfig.{name} must be >= {minimum}, got {value}")
        if self.downsample_offset >= self.downsample_frequency:
            raise ValueError(
                "ProcessingConfig.downsample_offset must be < downsample_frequency "
                f"({self.downsample_frequency}), got {self.downsample_offset}"
            )

    @classmethod
    def d3rlpy_preset(cls, **overrides: Any) -> ProcessingConfig:
        """The layout d3rlpy's Atari setups expect: one `(1, 84, 84)` frame every 4th frame.

        d3rlpy stacks frames itself, so `stack_n=1`; any field can be overridden.
        """
        options = {"framestack_axis_first": True, "downsample_frequency": 4, "stack_n": 1}
        return cls(**{**options, **overrides})

    def observation_shape(self) -> tuple[int, ...]:
        """Shape of one processed observation, e.g. `(84, 84, 4)` or `(1, 84, 84)`."""
        if self.warp:
            height, width, channels = self.warp_height, self.warp_width, self.stack_n
        else:
            height, width = _SCREEN_HEIGHT, _SCREEN_WIDTH
            channels = _SCREEN_CHANNELS * self.stack_n
        if self.framestack_axis_first:
            return (channels, height, width)
        return (height, width, channels)

    def observation_dtype(self) -> np.dtype:
        """`float32` (values in [0, 1]) when `scale`, else `uint8`."""
        return np.dtype(np.float32) if self.scale else np.dtype(np.uint8)


@dataclass(frozen=True)
class ProcessedTrajectory:
    """One agent's episode after processing: `M` kept steps, arrays aligned on the first axis."""

    observations: np.ndarray
    """`(M, *config.observation_shape())` stacked processed frames."""
    actions: np.ndarray
    """`(M,)` int64, the action taken at each kept frame."""
    rewards: np.ndarray
    """`(M,)` summed rewards: int64 for integer rewards, float64 for float rewards."""
    terminals: np.ndarray
    """`(M,)` int64, 1 where the episode ended by game over."""
    timeouts: np.ndarray
    """`(M,)` int64, 1 on the last step of a truncated episode (always 0 in compat mode)."""
    frame_indices: np.ndarray
    """`(M,)` int64, the raw frame index of each kept step."""

    def __len__(self) -> int:
        return len(self.actions)


@dataclass(frozen=True)
class FrameStacks:
    """Stacked observations before they are assembled: each processed frame once, and for each
    observation and stack slot which one it shows. With `stack_n=4` that is a quarter of the
    bytes of the observations, which is why the loader caches this form."""

    frames: np.ndarray
    """`(K, warp_height, warp_width)` or, without `warp`, `(K, 210, 160, 3)` uint8: processed
    frames, unscaled."""
    rows: np.ndarray
    """`(M, stack_n)` int32: slot `s` (oldest first) of observation `m` is `frames[rows[m, s]]`,
    or black where it is -1 (before the episode start)."""

    def observations(self, config: ProcessingConfig, out: np.ndarray | None = None) -> np.ndarray:
        """`(M, *config.observation_shape())` observations of `config.observation_dtype()`,
        written into `out` when given (e.g. a slice of a whole selection's array)."""
        shape = (len(self.rows), *config.observation_shape())
        if out is None:
            if self._frames_are_the_observations(config):
                return self.frames.reshape(shape)
            out = np.empty(shape, dtype=config.observation_dtype())
        elif (
            out.shape != shape
            or out.dtype != config.observation_dtype()
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a C-contiguous {config.observation_dtype()} array of shape {shape}, "
                f"got {out.dtype} {out.shape}"
            )
        if len(self.rows) == 0:
            return out
        if self._frames_are_the_observations(config):
            out[...] = self.frames.reshape(shape)
            return out
        table = _SCALE_TABLE[self.frames] if config.scale else self.frames
        black = self.rows < 0
        _gather_stacks(table, np.where(black, 0, self.rows), black, config, out)
        return out

    def _frames_are_the_observations(self, config: ProcessingConfig) -> bool:
        """True when observation `m` is exactly `frames[m]` in the output layout (one slot, in
        order, nothing black, no scaling, one channel or channels last): no copy needed."""
        if config.scale or self.rows.shape[1] != 1 or len(self.frames) != len(self.rows):
            return False
        if not config.warp and config.framestack_axis_first:
            return False
        return bool(np.array_equal(self.rows[:, 0], np.arange(len(self.rows))))


@dataclass(frozen=True)
class CompactTrajectory:
    """A `ProcessedTrajectory` whose observations are still `FrameStacks`."""

    stacks: FrameStacks
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    frame_indices: np.ndarray

    def assemble(self, config: ProcessingConfig) -> ProcessedTrajectory:
        """The processed trajectory, observations stacked as `config` says."""
        return ProcessedTrajectory(
            observations=self.stacks.observations(config),
            actions=self.actions,
            rewards=self.rewards,
            terminals=self.terminals,
            timeouts=self.timeouts,
            frame_indices=self.frame_indices,
        )


def frames_needed(config: ProcessingConfig) -> int:
    """How many recent raw frames one observation depends on: `(stack_n-1) * skip_n + max_n`.

    An environment that keeps this many frames of history can call `stacked_observations`.
    """
    return (config.stack_n - 1) * config.skip_n + config.max_n


def stacked_observations(
    frames: np.ndarray | FrameChunks, times: np.ndarray, config: ProcessingConfig
) -> np.ndarray:
    """Processed, stacked observations at the raw-frame indices `times`.

    `frames` is `(T, 210, 160, 3)` uint8 (or `FrameChunks` decoding them): a whole episode, or
    just the last `frames_needed(config)` frames of one (then `times=[T - 1]` gives the current
    observation). Frames before index 0 count as black, as at the start of an episode. Returns
    `(len(times), *config.observation_shape())` of `config.observation_dtype()`.
    """
    return frame_stacks(frames, times, config).observations(config)


def frame_stacks(
    frames: np.ndarray | FrameChunks, times: np.ndarray, config: ProcessingConfig
) -> FrameStacks:
    """`stacked_observations(frames, times, config)`, not yet assembled."""
    frames = _check_frames(frames)
    times = np.asarray(times)
    if times.ndim != 1 or (times.size and not np.issubdtype(times.dtype, np.integer)):
        raise ValueError(f"times must be a 1-D integer array, got {times.dtype} {times.shape}")
    times = times.astype(np.intp, copy=False)
    if times.size and (times.min() < 0 or times.max() >= len(frames)):
        raise ValueError(
            f"times must lie in [0, {len(frames)}) for {len(frames)} frames, "
            f"got [{times.min()}, {times.max()}]"
        )

    # Slot s (oldest first) of the observation at time i shows P[i - offsets[s]].
    offsets = (config.stack_n - 1 - np.arange(config.stack_n)) * config.skip_n
    slot_times = times[:, None] - offsets[None, :]
    black = slot_times < 0

    if not config.warp and config.max_n == 1 and isinstance(frames, np.ndarray):
        table, rows = frames, slot_times  # P is the raw frames: nothing to compute
    else:
        needed = np.zeros(len(frames), dtype=bool)
        needed[slot_times[~black]] = True
        needed_times = np.flatnonzero(needed)
        table = _processed_frames(frames, needed_times, config)
        row_of_time = np.zeros(len(frames), dtype=np.intp)
        row_of_time[needed_times] = np.arange(len(needed_times))
        rows = row_of_time[np.maximum(slot_times, 0)]
    return FrameStacks(table, np.where(black, -1, rows).astype(np.int32))


def process_trajectory(
    frames: np.ndarray | FrameChunks,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminations: np.ndarray,
    truncated: bool,
    config: ProcessingConfig,
) -> ProcessedTrajectory:
    """Process one agent's episode into kept steps (observations, actions, rewards, flags).

    `frames` is `(N, 210, 160, 3)` uint8 (or `FrameChunks` decoding them) with `frames[i]` seen
    before `actions[i]`; `actions`, `rewards` and `terminations` (the raw per-frame done flags)
    are `(N,)`. `truncated` says the episode stopped without a game over (only used by the
    corrected mode). See the module docstring for what `config.crowdplay_compat` changes.
    """
    compact = compact_trajectory(frames, actions, rewards, terminations, truncated, config)
    return compact.assemble(config)


def kept_frame_indices(n_frames: int, config: ProcessingConfig) -> np.ndarray:
    """The raw frame indices an episode of `n_frames` frames keeps (see the module docstring):
    `i % k == o or i % k == N - 1` in compat mode, `o, o + k, ...` otherwise."""
    k, o = config.downsample_frequency, config.downsample_offset
    if config.crowdplay_compat:
        index = np.arange(n_frames)
        return np.flatnonzero((index % k == o) | (index % k == n_frames - 1))
    return np.arange(o, n_frames, k)


def compact_trajectory(
    frames: np.ndarray | FrameChunks,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminations: np.ndarray,
    truncated: bool,
    config: ProcessingConfig,
) -> CompactTrajectory:
    """`process_trajectory`, with the observations left as `FrameStacks`."""
    frames = _check_frames(frames)
    n_frames = len(frames)
    actions = _check_per_frame("actions", actions, n_frames)
    rewards = _check_per_frame("rewards", rewards, n_frames)
    terminations = _check_per_frame("terminations", terminations, n_frames).astype(bool)
    if not (
        rewards.dtype == bool
        or np.issubdtype(rewards.dtype, np.integer)
        or np.issubdtype(rewards.dtype, np.floating)
    ):
        raise ValueError(f"rewards must be numeric, got dtype {rewards.dtype}")
    k = config.downsample_frequency
    kept = kept_frame_indices(n_frames, config)

    if config.crowdplay_compat:
        starts = np.concatenate(([0], kept + 1))[: len(kept)]
        kept_rewards = _segment_sums(rewards, starts, kept + 1)
        terminals = terminations[kept].astype(np.int64)
        timeouts = np.zeros(len(kept), dtype=np.int64)
    else:
        kept_rewards = _segment_sums(rewards, kept, np.minimum(kept + k, n_frames))
        terminals = np.zeros(len(kept), dtype=np.int64)
        timeouts = np.zeros(len(kept), dtype=np.int64)
        if len(kept):
            terminals[-1] = int(terminations[-1])
            timeouts[-1] = int(bool(truncated))

    return CompactTrajectory(
        stacks=frame_stacks(frames, kept, config),
        actions=actions[kept].astype(np.int64),
        rewards=kept_rewards,
        terminals=terminals,
        timeouts=timeouts,
        frame_indices=kept.astype(np.int64),
    )


def _check_frames(frames: np.ndarray | FrameChunks) -> np.ndarray | FrameChunks:
    """`frames` as a checked `(N, 210, 160, 3)` uint8 array; `FrameChunks` pass as they are."""
    if hasattr(frames, "read_chunk") and not isinstance(frames, np.ndarray):
        return frames
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != FRAME_SHAPE or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be (N, {', '.join(map(str, FRAME_SHAPE))}) uint8 RGB screens, "
            f"got {frames.dtype} {frames.shape}"
        )
    return frames


def _check_per_frame(name: str, values: np.ndarray, n_frames: int) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n_frames,):
        raise ValueError(f"{name} must have shape ({n_frames},) like frames, got {values.shape}")
    return values


def _segment_sums(values: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """`[values[a:b].sum() for a, b in zip(starts, stops)]`, summed left to right.

    Integers (and bools) sum exactly in int64. Floats are added one position at a time across
    all segments (segments are at most `downsample_frequency` long), in their own dtype, so the
    sums round exactly like the reference's running Python sum; returned as float64.
    """
    if values.dtype == bool or np.issubdtype(values.dtype, np.integer):
        running = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
        return running[stops] - running[starts]
    lengths = stops - starts
    sums = np.zeros(len(starts), dtype=values.dtype)
    for position in range(int(lengths.max(initial=0))):
        active = lengths > position
        sums[active] += values[starts[active] + position]
    return sums.astype(np.float64)


def _gather_stacks(
    table: np.ndarray,
    rows: np.ndarray,
    black: np.ndarray,
    config: ProcessingConfig,
    out: np.ndarray,
) -> None:
    """Assemble observations into `out`: slot `s` of observation `m` is `table[rows[m, s]]`
    (black where `black[m, s]`), laid out like the reference's per-slot
    `np.concatenate(..., axis=-1)`.

    One thread: the output is usually fresh memory, and splitting its writes between threads
    made them several times slower here (page faults and TLB shootdowns across CPUs)."""
    n_obs, stack_n = rows.shape
    frame_shape = table.shape[1:]
    if table.ndim == 3 and (config.framestack_axis_first or stack_n == 1):
        # (M, stack, h, w) is exactly the order of the slots: one gather, no temporary.
        stacked = out.reshape(n_obs, stack_n, *frame_shape)
        # mode="clip" (rows are valid anyway) lets numpy write into `out` without a buffer.
        np.take(table, rows.reshape(-1), axis=0, out=stacked.reshape(-1, *frame_shape), mode="clip")
        stacked[black] = 0
        return

    # Slots interleave as channels: gather a cache-sized block of each slot, then interleave
    # it into `out` with one cv2.merge (channels-last) or a numpy transpose (axis first).
    height, width = frame_shape[:2]
    channels = 1 if table.ndim == 3 else frame_shape[2]
    block = max(1, (1 << 20) // (table[0].nbytes * stack_n))
    slots_shape = (stack_n, min(block, n_obs), *frame_shape)
    if table.dtype == np.uint8:
        slots = scratch_buffer("slots", slots_shape)
    else:
        slots = np.empty(slots_shape, dtype=table.dtype)
    for start in range(0, n_obs, block):
        stop = min(start + block, n_obs)
        count = stop - start
        for slot in range(stack_n):
            np.take(table, rows[start:stop, slot], axis=0, out=slots[slot, :count], mode="clip")
            slots[slot, :count][black[start:stop, slot]] = 0
        if config.framestack_axis_first or channels * stack_n > _MAX_MERGE_CHANNELS:
            # out[m, s * channels + c, y, x] (axis first) or out[m, y, x, s * channels + c]
            # is slot s of observation m at (y, x, c).
            if config.framestack_axis_first:
                target = out[start:stop].reshape(count, stack_n, channels, height, width)
                axes = (1, 0, 4, 2, 3)
            else:
                target = out[start:stop].reshape(count, height, width, stack_n, channels)
                axes = (1, 2, 3, 0, 4)
            target[...] = (
                slots[:, :count].reshape(stack_n, count, height, width, channels).transpose(axes)
            )
        else:
            # Channels last: OpenCV interleaves the slots far faster than a numpy transpose.
            target = out[start:stop].reshape(count * height, width, channels * stack_n)
            merged = cv2.merge(
                [
                    slots[slot, :count].reshape(count * height, width, channels)
                    for slot in range(stack_n)
                ],
                dst=target,
            )
            _written(merged, target)


def _processed_frames(
    frames: np.ndarray | FrameChunks, times: np.ndarray, config: ProcessingConfig
) -> np.ndarray:
    """`P[t]` for each (sorted, non-negative) `t` in `times`: max, then warp, as uint8."""
    if config.warp:
        table = np.empty((len(times), config.warp_height, config.warp_width), dtype=np.uint8)
    else:
        table = np.empty((len(times), *FRAME_SHAPE), dtype=np.uint8)
    if len(times) == 0:
        return table
    if not isinstance(frames, np.ndarray):
        _fill_from_chunks(frames, times, table, config)
        return table
    # Contiguous shares of the times, one per thread, each reusing its own scratch buffers;
    # numpy and OpenCV release the GIL, so the shares run in parallel.
    n_chunks = -(-len(times) // _CHUNK_FRAMES)
    workers = min(n_chunks, _MAX_WORKERS, _available_cpus())
    bounds = np.linspace(0, n_chunks, workers + 1).astype(int) * _CHUNK_FRAMES
    _POOL.run(
        [
            functools.partial(_fill_processed_frames, frames, times[a:b], table[a:b], config)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )
    return table


def read_all_frames(source: FrameChunks) -> np.ndarray:
    """All of `source`'s frames as one `(N, 210, 160, 3)` array, decoded chunk by chunk."""
    size = source.chunk_frames
    frames = np.empty((len(source), *FRAME_SHAPE), dtype=np.uint8)
    buffer = np.empty((size, *FRAME_SHAPE), dtype=np.uint8)
    for index in range(-(-len(source) // size)):
        chunk = source.read_chunk(index, buffer)
        frames[index * size : index * size + len(chunk)] = chunk
    return frames


def _fill_from_chunks(
    source: FrameChunks, times: np.ndarray, table: np.ndarray, config: ProcessingConfig
) -> None:
    """`_fill_processed_frames` over frames decoded chunk by chunk, one chunk per thread job.

    A job decodes its chunk into its thread's reused buffer and computes every `P[t]` whose
    max window lies inside the chunk. The few windows that straddle a chunk boundary (`t` in
    the first `max_n - 1` frames of a chunk) are computed afterwards from copies of the frames
    either side of the boundary, so no job waits for another and no chunk is decoded twice.
    """
    size = source.chunk_frames
    back = config.max_n - 1
    n_frames = len(source)
    n_chunks = -(-n_frames // size)
    if back > size:  # windows reach past the previous chunk: decode the episode whole
        _fill_processed_frames(read_all_frames(source), times, table, config)
        return

    starts = np.arange(n_chunks + 1) * size
    first_row = np.searchsorted(times, starts)  # chunk k's times: rows first_row[k]:first_row[k+1]
    inside_row = np.searchsorted(times, starts[:-1] + back)  # from here on, windows are inside
    inside_row[0] = first_row[0]  # chunk 0: windows are cut at frame 0, not by a boundary
    straddling = [k for k in range(1, n_chunks) if inside_row[k] > first_row[k]]
    tail_needed = {k - 1 for k in straddling}
    edges: dict[tuple[str, int], np.ndarray] = {}

    def decode_and_fill(k: int) -> None:
        chunk = source.read_chunk(k, scratch_buffer("chunk", (size, *FRAME_SHAPE)))
        a, b = inside_row[k], first_row[k + 1]
        if b > a:
            _fill_processed_frames(chunk, times[a:b] - starts[k], table[a:b], config)
        if inside_row[k] > first_row[k]:
            edges["head", k] = chunk[:back].copy()
        if k in tail_needed:
            edges["tail", k] = chunk[len(chunk) - back :].copy()

    jobs = [k for k in range(n_chunks) if first_row[k + 1] > first_row[k] or k in tail_needed]
    _POOL.run([functools.partial(decode_and_fill, k) for k in jobs])
    for k in straddling:
        window = np.concatenate([edges["tail", k - 1], edges["head", k]])
        a, b = first_row[k], inside_row[k]
        _fill_processed_frames(window, times[a:b] - (starts[k] - back), table[a:b], config)


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _fill_processed_frames(
    frames: np.ndarray, times: np.ndarray, table: np.ndarray, config: ProcessingConfig
) -> None:
    """Compute `table[j] = P[times[j]]`, one chunk of frames per OpenCV call."""
    for start in range(0, len(times), _CHUNK_FRAMES):
        chunk_times = times[start : start + _CHUNK_FRAMES]
        n = len(chunk_times)
        maxed = scratch_buffer("maxed", (n, *FRAME_SHAPE))
        rgb = _max_over_window(frames, chunk_times, config.max_n, maxed)
        if not config.warp:
            table[start : start + n] = rgb
            continue
        gray = scratch_buffer("gray", (n * _SCREEN_HEIGHT, _SCREEN_WIDTH))
        converted = cv2.cvtColor(
            rgb.reshape(n * _SCREEN_HEIGHT, _SCREEN_WIDTH, 3), cv2.COLOR_RGB2GRAY, dst=gray
        )
        _written(converted, gray)
        _resize_unique_frames(gray, n, config, table[start : start + n])


def _resize_unique_frames(
    gray: np.ndarray, n: int, config: ProcessingConfig, out: np.ndarray
) -> None:
    """`_resize_frames`, resizing each distinct gray frame once.

    Atari screens repeat: on emulator play about a third of the gray frames equal the one or
    two before them (static scenes, sprites drawn on alternate frames). Equal inputs resize to
    equal outputs, so this is exact, and the comparison costs a tenth of a resize.
    """
    if n < 2:
        _resize_frames(gray, n, config, out)
        return
    words = gray.reshape(n, -1).view(np.uint64)
    same = [np.zeros(n, dtype=bool) for _ in range(_DEDUPLICATE_BACK + 1)]
    for back in range(1, min(_DEDUPLICATE_BACK, n - 1) + 1):
        same[back][back:] = (words[back:] == words[:-back]).all(axis=1)
    source = np.arange(n)
    for i in range(1, n):
        for back in range(1, min(_DEDUPLICATE_BACK, i) + 1):
            if same[back][i]:
                source[i] = source[i - back]
                break
    unique = np.flatnonzero(source == np.arange(n))
    if len(unique) == n:
        _resize_frames(gray, n, config, out)
        return
    frames = gray.reshape(n, _SCREEN_HEIGHT, _SCREEN_WIDTH)
    distinct = scratch_buffer("distinct", (len(unique), _SCREEN_HEIGHT, _SCREEN_WIDTH))
    np.take(frames, unique, axis=0, out=distinct)
    resized = scratch_buffer("resized_distinct", (len(unique), *out.shape[1:]))
    _resize_frames(distinct.reshape(-1, _SCREEN_WIDTH), len(unique), config, resized)
    position = np.zeros(n, dtype=np.intp)
    position[unique] = np.arange(len(unique))
    np.take(resized, position[source], axis=0, out=out)


def _max_over_window(
    frames: np.ndarray, times: np.ndarray, max_n: int, out: np.ndarray
) -> np.ndarray:
    """Pixel-wise max of `frames[t - max_n + 1 .. t]` for each `t` (frames before 0 skipped:
    a black frame never wins a max of uint8 pixels)."""
    n = len(times)
    first, last = int(times[0]), int(times[-1])
    step = int(times[1] - times[0]) if n > 1 else 1
    regular = step > 0 and last == first + step * (n - 1) and bool(np.all(np.diff(times) == step))
    if regular and step == 1 and max_n == 1 and frames.flags.c_contiguous:
        return frames[first : last + 1]  # already contiguous: no copy
    if regular and max_n > 1 and first - (max_n - 1) >= 0:
        # Strided views of the episode, no gather copies: the common case (every frame, or
        # every k-th frame) costs one read of each window frame.
        np.maximum(frames[first : last + 1 : step], frames[first - 1 : last : step], out=out)
        for back in range(2, max_n):
            np.maximum(out, frames[first - back : last + 1 - back : step], out=out)
        return out
    np.take(frames, times, axis=0, out=out, mode="clip")
    if max_n > 1:
        earlier = scratch_buffer("earlier", out.shape)
        for back in range(1, max_n):
            np.take(frames, np.maximum(times - back, 0), axis=0, out=earlier, mode="clip")
            np.maximum(out, earlier, out=out)
    return out


def _resize_frames(gray: np.ndarray, n: int, config: ProcessingConfig, out: np.ndarray) -> None:
    """`cv2.resize(..., INTER_AREA)` of `n` gray frames stacked as a tall `(n * 210, 160)` image,
    into `out` `(n, warp_height, warp_width)`, bit-identical to resizing frame by frame.

    Two batching tricks, both exact: OpenCV resizes each channel with the same arithmetic, so
    four frames can travel as the four channels of one image (the most `INTER_AREA` takes);
    and when `_tall_resize_is_exact`, OpenCV's area tables for a tall stack of frames are the
    per-frame tables repeated, so each channel can hold a whole stack of frames.
    """
    width, height = config.warp_width, config.warp_height
    tall = _tall_resize_is_exact(width, height)
    per_channel = n // 4 if tall else 1
    start = 0
    while per_channel and start + 4 * per_channel <= n:
        rows = per_channel * _SCREEN_HEIGHT
        block = gray[start * _SCREEN_HEIGHT : start * _SCREEN_HEIGHT + 4 * rows]
        merged = cv2.merge(
            [block[c * rows : (c + 1) * rows] for c in range(4)],
            dst=scratch_buffer("merged", (rows, _SCREEN_WIDTH, 4)),
        )
        resized = cv2.resize(
            merged,
            (width, per_channel * height),
            dst=scratch_buffer("resized", (per_channel * height, width, 4)),
            interpolation=cv2.INTER_AREA,
        )
        # Channel c holds frames start + c * per_channel ... of this block.
        out[start : start + 4 * per_channel].reshape(4, per_channel, height, width)[...] = (
            resized.reshape(per_channel, height, width, 4).transpose(3, 0, 1, 2)
        )
        start += 4 * per_channel
    per_image = max(1, n - start) if tall else 1
    for first in range(start, n, per_image):
        target = out[first : first + per_image].reshape(per_image * height, width)
        resized = cv2.resize(
            gray[first * _SCREEN_HEIGHT : (first + per_image) * _SCREEN_HEIGHT],
            (width, per_image * height),
            dst=target,
            interpolation=cv2.INTER_AREA,
        )
        _written(resized, target)


def _written(result: np.ndarray, target: np.ndarray) -> None:
    """Make sure an OpenCV call given `dst=target` wrote there (it returns a new array instead
    when it cannot use `target`)."""
    if result is not target:
        target[...] = result.reshape(target.shape)


@functools.cache
def _tall_resize_is_exact(width: int, height: int) -> bool:
    """Whether resizing a stack of frames as one tall image equals resizing each frame.

    OpenCV's `INTER_AREA` downscale places source row boundaries at `dy * scale` with
    `scale = 1 / (height / 210)` in double precision. When that double is exactly `210 / height`,
    every boundary of frame `c` in the stack is exactly `210 * c` plus the per-frame boundary,
    so the weights are identical. Upscaling (another algorithm, reading across frame edges) and
    inexact scales are resized with frames kept apart.
    """
    if width > _SCREEN_WIDTH or height > _SCREEN_HEIGHT:
        return False
    return Fraction(1.0 / (height / _SCREEN_HEIGHT)) == Fraction(_SCREEN_HEIGHT, height)
