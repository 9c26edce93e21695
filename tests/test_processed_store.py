"""Tests for `crowdplay_minari.processed_store` and the d3rlpy buffer over it.

The converted emulator sample (every game of the default sample, one-player and two-player, a
game-over episode among them) is processed into stores; the memory-mapped buffer must give
exactly the in-memory buffer's episodes and transitions, a store must be reused rather than
rebuilt, and a damaged one must be rebuilt rather than read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from crowdplay_minari import files
from crowdplay_minari.d3rlpy_bridge import EpisodeTransitions, to_arrays, to_replay_buffer
from crowdplay_minari.loading import CACHE_ENV, CrowdPlayDataset, EpisodeView, load_dataset
from crowdplay_minari.processed_store import (
    ARRAYS,
    INDEX_FILE,
    STORES_ENV,
    DamagedStore,
    default_store_dir,
    open_store,
    read_store,
    store_key,
)
from crowdplay_minari.processing import ProcessingConfig
from crowdplay_minari.storage import DIGEST_ATTRIBUTE

d3rlpy = pytest.importorskip("d3rlpy")

N_FRAMES = 4
PRESET = ProcessingConfig.d3rlpy_preset()
CONFIGS = {
    "preset": (PRESET, N_FRAMES),
    "compat_offset_3": (
        ProcessingConfig.d3rlpy_preset(crowdplay_compat=True, downsample_offset=3),
        N_FRAMES,
    ),
    "prestacked": (ProcessingConfig(framestack_axis_first=True, downsample_frequency=4), 1),
}


@pytest.fixture
def data(
    converted_sample: tuple[Path, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CrowdPlayDataset:
    root, _ = converted_sample
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "processed"))
    monkeypatch.delenv(STORES_ENV, raising=False)
    data = load_dataset("crowdplay")
    ended = {e.metadata["ended_by"] for e in data}
    assert len(data) >= 8 and ended == {"game_over", "session_stopped"}, ended
    return data


def _buffers(data, config: ProcessingConfig, n_frames: int, store_dir: Path):
    in_memory = to_replay_buffer(data, config, n_frames=n_frames, mixed_action_sets=True)
    mapped = to_replay_buffer(
        data,
        config,
        n_frames=n_frames,
        mixed_action_sets=True,
        memory_map=True,
        store_dir=store_dir,
    )
    return in_memory, mapped


def _mapped_file(array: np.ndarray) -> Path | None:
    """The file `array` is a view of (through its chain of bases), None if it is in memory."""
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap):
            return Path(array.filename)
        array = array.base
    return None


def _assert_same_transition(a, b) -> None:
    for field in ("observation", "action", "reward", "next_observation", "next_action"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field
    assert (a.terminal, a.interval) == (b.terminal, b.interval)
    assert np.array_equal(a.rewards_to_go, b.rewards_to_go)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_memory_mapped_buffer_equals_the_in_memory_one(
    data: CrowdPlayDataset, tmp_path: Path, name: str
) -> None:
    config, n_frames = CONFIGS[name]
    in_memory, mapped = _buffers(data, config, n_frames, tmp_path / "stores")
    (store_path,) = (tmp_path / "stores").glob("[!.]*")
    observations_file = store_path / "observations.npy"

    assert mapped.dataset_info == in_memory.dataset_info
    assert mapped.transition_count == in_memory.transition_count > 0
    assert len(mapped.episodes) == len(in_memory.episodes) == len(data)
    for ours, theirs in zip(mapped.episodes, in_memory.episodes, strict=True):
        # views of the store's file, not copies
        assert _mapped_file(ours.observations) == observations_file
        assert _mapped_file(ours.actions) == store_path / "actions.npy"
        assert not ours.observations.flags.writeable
        assert _mapped_file(theirs.observations) is None
        for field in ("observations", "actions", "rewards"):
            x, y = getattr(ours, field), getattr(theirs, field)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field
        assert ours.terminated == theirs.terminated
        assert ours.transition_count == theirs.transition_count
        last = ours.transition_count - 1
        for index in sorted({0, 1, 2, 3, 4, last // 2, last - 1, last}):
            _assert_same_transition(
                mapped.transition_picker(ours, index), in_memory.transition_picker(theirs, index)
            )
    assert any(e.terminated for e in mapped.episodes)  # the game-over episode keeps its end

    # the flat transition numbering is InfiniteBuffer's, so a seed samples the same batches
    assert isinstance(mapped.buffer, EpisodeTransitions)
    positions = {id(e): i for i, e in enumerate(mapped.episodes)}
    positions_in_memory = {id(e): i for i, e in enumerate(in_memory.episodes)}
    for index in range(mapped.transition_count):
        ours, i = mapped.buffer[index]
        theirs, j = in_memory.buffer[index]
        assert (positions[id(ours)], i) == (positions_in_memory[id(theirs)], j), index
    with pytest.raises(IndexError):
        mapped.buffer[mapped.transition_count]
    for seed in (0, 1):
        np.random.seed(seed)
        ours = mapped.sample_transition_batch(64)
        np.random.seed(seed)
        theirs = in_memory.sample_transition_batch(64)
        for field in ("observations", "actions", "rewards", "next_observations", "terminals"):
            assert np.array_equal(getattr(ours, field), getattr(theirs, field)), field
        np.random.seed(seed)
        ours = mapped.sample_trajectory_batch(4, length=8)
        np.random.seed(seed)
        theirs = in_memory.sample_trajectory_batch(4, length=8)
        for field in ("observations", "actions", "rewards", "terminals", "masks"):
            assert np.array_equal(getattr(ours, field), getattr(theirs, field)), field

    # the store holds exactly what to_arrays concatenates in memory
    store = read_store(store_path)
    arrays = to_arrays(data, config)
    assert set(store.arrays) == set(arrays) == set(ARRAYS)
    for field, array in arrays.items():
        stored = store.arrays[field]
        assert isinstance(stored, np.memmap)
        assert stored.dtype == array.dtype and np.array_equal(stored, array), field
    assert store.nbytes == sum(a.nbytes for a in arrays.values())
    assert [(e.dataset_id, e.index) for e in store.episodes] == [
        (e.dataset_id, e.index) for e in data
    ]


def test_store_is_reused_not_rebuilt(
    data: CrowdPlayDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(data, PRESET)
    assert store.path.parent == default_store_dir() == tmp_path / "stores"  # beside the cache
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.path.iterdir()}
    assert set(before) == {INDEX_FILE, *(f"{name}.npy" for name in ARRAYS)}

    def no_processing(self, config, *, cache=True):
        raise AssertionError(f"{self} processed again")

    monkeypatch.setattr(EpisodeView, "compact", no_processing)
    again = open_store(data, PRESET)
    buffer = to_replay_buffer(data, PRESET, mixed_action_sets=True, memory_map=True)
    assert again.path == store.path
    assert _mapped_file(buffer.episodes[0].observations) == store.path / "observations.npy"
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.path.iterdir()}
    assert after == before
    assert [p.name for p in store.path.parent.iterdir() if not p.name.startswith(".")] == [
        store.path.name
    ]

    # another selection, another order or another config is another store
    episodes = list(data)
    keys = {
        store_key(episodes, PRESET),
        store_key(episodes[::-1], PRESET),
        store_key(episodes[1:], PRESET),
        store_key(episodes, ProcessingConfig.d3rlpy_preset(downsample_offset=1)),
    }
    assert len(keys) == 4 and store.path.name in keys
    # episodes are named by their recorded digests: a data file rewritten by a publish (new
    # mtime) holds the same episodes, one with another digest is other data
    data_file = episodes[0].data_file
    stat = data_file.stat()
    try:
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert store_key(episodes, PRESET) == store.path.name
    finally:
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = dataclasses.replace(
        episodes[0], metadata={**episodes[0].metadata, DIGEST_ATTRIBUTE: "0" * 64}
    )
    assert store_key([changed, *episodes[1:]], PRESET) != store.path.name


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated observations": ("observations.npy", _truncate, "torn"),
    "truncated actions": ("actions.npy", _truncate, "torn"),
    "flipped reward byte": ("rewards.npy", _flip_a_byte, "checksum"),
    "missing index": (INDEX_FILE, Path.unlink, "missing"),
    "torn index": (INDEX_FILE, lambda p: p.write_text('{"format": 1, "ke'), "not JSON"),
    "missing terminals": ("terminals.npy", Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_detected_and_rebuilt(
    data: CrowdPlayDataset, tmp_path: Path, damage: str
) -> None:
    episodes = list(data)[:3]
    store_dir = tmp_path / "stores"
    store = open_store(episodes, PRESET, store_dir=store_dir)
    good = {name: np.array(array) for name, array in store.arrays.items()}
    del store
    file_name, spoil, message = DAMAGE[damage]
    (path,) = store_dir.glob("[!.]*")
    spoil(path / file_name)
    with pytest.raises(DamagedStore, match=message):
        read_store(path)
    with pytest.warns(UserWarning, match=f"{message}.*rebuilding the store"):
        rebuilt = open_store(episodes, PRESET, store_dir=store_dir)
    assert rebuilt.path == path
    for name, array in good.items():
        assert np.array_equal(rebuilt.arrays[name], array), name
    assert read_store(path).nbytes == rebuilt.nbytes


def test_a_dead_builders_leftovers_are_cleared_and_builders_wait_for_each_other(
    data: CrowdPlayDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    episodes = list(data)[:3]
    store_dir = tmp_path / "stores"
    key = store_key(episodes, PRESET)
    leftover = store_dir / f".{key}.0123456789ab.part"
    leftover.mkdir(parents=True)
    (leftover / "observations.npy").write_bytes(b"half a file")

    processed: list[str] = []
    compact = EpisodeView.compact

    def counting(self, config, *, cache=True):
        processed.append(f"{self.dataset_id}#{self.index}")
        return compact(self, config, cache=cache)

    monkeypatch.setattr(EpisodeView, "compact", counting)
    results: list = []
    threads = [
        threading.Thread(
            target=lambda: results.append(open_store(episodes, PRESET, store_dir=store_dir))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len({r.path for r in results}) == 1
    assert len(processed) == len(episodes)  # built once, the others waited and opened it
    assert not leftover.exists()
    assert sorted(p.name for p in store_dir.iterdir()) == [f".{key}.lock", key]


def test_sampling_maps_only_the_rows_it_reads(data: CrowdPlayDataset, tmp_path: Path) -> None:
    """The kernel's own count of this process's resident pages of the observations file.

    The kernel maps pages around a fault (and whole large folios), so one transition shows up
    as up to a few MB; the selection (the longest episode 32 times) is far larger than that."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("needs Linux /proc/self/smaps")
    longest = max(data, key=lambda e: e.num_steps)
    buffer = to_replay_buffer(
        [longest] * 32, PRESET, mixed_action_sets=True, memory_map=True, store_dir=tmp_path / "s"
    )
    path = str(_mapped_file(buffer.episodes[0].observations))
    size = Path(path).stat().st_size
    assert size > 50_000_000

    def resident() -> int:
        total, inside = 0, False
        for line in smaps.read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
        return total

    assert resident() < 4 * 1024 * 1024  # opening the store read no frames
    np.random.seed(0)
    transition = buffer.sample_transition()
    assert transition.observation.shape == (N_FRAMES, 84, 84)
    assert transition.observation.sum() > 0
    assert resident() < size / 4
    episode = buffer.episodes[len(buffer.episodes) // 2]
    picked = buffer.transition_picker(episode, 100)
    # still a view of the map: d3rlpy's picker does not copy the rows it stacks
    assert np.shares_memory(picked.observation, episode.observations)
    for episode in buffer.episodes:  # now read everything
        assert int(np.asarray(episode.observations).sum(dtype=np.int64)) > 0
    assert resident() >= size - 4 * 1024 * 1024


def test_short_discrete_bc_training_on_the_store(data: CrowdPlayDataset, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    one_game = [e for e in data if e.game == "space_invaders"]
    buffer = to_replay_buffer(one_game, PRESET, memory_map=True, store_dir=tmp_path / "s")
    algo = d3rlpy.algos.DiscreteBCConfig(
        batch_size=16, observation_scaler=d3rlpy.preprocessing.PixelObservationScaler()
    ).create(device="cpu:0")
    history = algo.fit(
        buffer,
        n_steps=4,
        n_steps_per_epoch=2,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    assert [epoch for epoch, _ in history] == [1, 2]
    assert all(np.isfinite(metrics["loss"]) for _, metrics in history)


def test_episode_transitions_number_transitions_as_infinite_buffer() -> None:
    rng = np.random.default_rng(0)
    episodes = [
        d3rlpy.dataset.Episode(
            observations=rng.random((size, 3)),
            actions=rng.integers(0, 4, (size, 1)),
            rewards=rng.random((size, 1)).astype(np.float32),
            terminated=terminated,
        )
        for size, terminated in ((5, True), (1, False), (3, False), (1, True), (4, False))
    ]
    theirs = d3rlpy.dataset.InfiniteBuffer()
    appended = EpisodeTransitions()
    for buffer in (theirs, appended):  # d3rlpy's own appends, transition by transition
        replay_buffer = d3rlpy.dataset.ReplayBuffer(buffer, episodes=episodes[:2])
        for episode in episodes[2:]:
            replay_buffer.append_episode(episode)
    filled = EpisodeTransitions(episodes)  # what to_replay_buffer builds: no append loop
    for ours in (appended, filled):
        assert ours.transition_count == theirs.transition_count == len(ours) == 5 + 2 + 1 + 3
        assert [id(e) for e in ours.episodes] == [id(e) for e in theirs.episodes]  # no empty one
        for index in range(-len(ours), len(ours)):
            (a, i), (b, j) = ours[index], theirs[index]
            assert a is b and i == j, index
        with pytest.raises(IndexError):
            ours[len(ours)]
    with pytest.raises(ValueError, match="transition 2 appended after 0"):
        filled.append(episodes[0], 2)
    assert len(filled.episodes) == 4 and len(filled) == 11  # refused, nothing changed
    filled.append(episodes[0], 0)  # a new episode's first transition
    assert len(filled) == 12 and filled[11][0] is episodes[0] and filled[11][1] == 0


def test_refusals(data: CrowdPlayDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="memory_map=True"):
        to_replay_buffer(data, PRESET, mixed_action_sets=True, store_dir=tmp_path)
    with pytest.raises(ValueError, match="no episodes"):
        open_store([], PRESET, store_dir=tmp_path)
    short = [e for e in data if e.num_steps < 1000]
    late = ProcessingConfig.d3rlpy_preset(downsample_frequency=2000, downsample_offset=1000)
    with pytest.raises(ValueError, match="keep no step"):
        open_store(short, late, store_dir=tmp_path)

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(files.DiskFull, match="no space left writing the processed store"):
        open_store(list(data)[:1], PRESET, store_dir=tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()][0].endswith(".lock")
    assert len(list((tmp_path / "full").iterdir())) == 1
