"""Processed CrowdPlay episodes -> a d3rlpy 2.8 `ReplayBuffer` with correct episode boundaries.

`d3rlpy.datasets.get_minari` concatenates Minari's N+1 observations against N actions, which
shifts every episode after the first by one step per episode. Here each episode contributes
exactly its M processed steps (M observations, M actions), its last step carries `terminals=1`
(game over) or `timeouts=1` (session stopped), and frame stacking is d3rlpy's own
(`FrameStackTransitionPicker`), so one `(1, 84, 84)` frame per step is stored once.

    train, test = split_episodes(data.episodes, test_size=0.1, seed=0)
    buffer = to_replay_buffer(train, ProcessingConfig.d3rlpy_preset(), n_frames=4)

A selection larger than memory goes through a processed store (`processed_store`): processed
once into `.npy` files, then every d3rlpy episode's arrays are views of those files mapped
read-only, and a mini-batch reads only the rows it stacks.

    buffer = to_replay_buffer(train, ProcessingConfig.d3rlpy_preset(), memory_map=True)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .games import num_actions, rom_for_game
from .loading import CrowdPlayDataset, EpisodeView
from .processed_store import STEP_DTYPES, ProcessedStore, open_store, selection_steps
from .processing import ProcessingConfig, kept_frame_indices


def kept_frames(num_steps: int, config: ProcessingConfig) -> int:
    """How many steps processing keeps from an episode of `num_steps` raw frames."""
    return len(kept_frame_indices(num_steps, config))


def split_episodes(
    episodes: Sequence[EpisodeView] | CrowdPlayDataset, test_size: float = 0.1, seed: int = 0
) -> tuple[list[EpisodeView], list[EpisodeView]]:
    """Episode-level train/test split (CrowdPlay's 90/10); at least one episode in each part
    when there are two or more."""
    episodes = list(episodes)
    order = list(range(len(episodes)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(episodes) * test_size))
    if len(episodes) >= 2:
        n_test = min(max(n_test, 1), len(episodes) - 1)
    test = [episodes[i] for i in sorted(order[:n_test])]
    train = [episodes[i] for i in sorted(order[n_test:])]
    return train, test


def to_arrays(
    episodes: Sequence[EpisodeView] | CrowdPlayDataset, config: ProcessingConfig
) -> dict[str, np.ndarray]:
    """Concatenated processed arrays of all episodes, each array allocated once.

    The last step of every episode is marked: `terminals` for game over, `timeouts` otherwise
    (in `crowdplay_compat` mode the reference may drop an episode's last frame; the boundary is
    still marked here so that episodes never run together in the buffer). A processed store
    (`to_replay_buffer(..., memory_map=True)`) holds the same arrays on disk.
    """
    episodes = list(episodes)
    total = sum(kept_frames(e.num_steps, config) for e in episodes)
    observations = np.empty((total, *config.observation_shape()), config.observation_dtype())
    arrays = {name: np.empty(total, dtype=dtype) for name, dtype in STEP_DTYPES.items()}
    start = 0
    for steps in selection_steps(episodes, config):
        end = start + len(steps)
        steps.stacks.observations(config, out=observations[start:end])  # stacked in place
        for name, array in arrays.items():
            array[start:end] = getattr(steps, name)
        start = end
    return {"observations": observations, **arrays}


class EpisodeTransitions:
    """d3rlpy's `InfiniteBuffer` without its list of one `(episode, index)` tuple per transition
    (about 90 bytes each, 1.5 GB for all of Space Invaders): transition `i` is found by bisecting
    the episodes' cumulative transition counts, so the buffer costs memory per episode only.

    Transitions are numbered as `InfiniteBuffer` numbers them (episode by episode, in order), so
    the same seed samples the same transitions from either.
    """

    def __init__(self, episodes: Sequence = ()) -> None:
        self._episodes: list = []
        self._counts: list[int] = []
        self._ends: np.ndarray | None = None
        for episode in episodes:
            if episode.transition_count > 0:
                self._episodes.append(episode)
                self._counts.append(episode.transition_count)
        self._total = sum(self._counts)  # read once per sampled transition: kept, not summed

    def append(self, episode, index: int) -> None:
        """Add transition `index` of `episode` (d3rlpy appends an episode's in order)."""
        new = not self._episodes or episode is not self._episodes[-1]
        done = 0 if new else self._counts[-1]
        if index != done:
            raise ValueError(f"transition {index} appended after {done} of {episode}")
        if new:
            self._episodes.append(episode)
            self._counts.append(0)
        self._counts[-1] += 1
        self._total += 1
        self._ends = None

    @property
    def episodes(self) -> Sequence:
        return self._episodes

    @property
    def transition_count(self) -> int:
        return self._total

    def __len__(self) -> int:
        return self.transition_count

    def __getitem__(self, index: int) -> tuple:
        if self._ends is None:
            self._ends = np.cumsum(self._counts, dtype=np.int64)
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError(f"transition {index} of {self._total}")
        position = int(np.searchsorted(self._ends, index, side="right"))
        first = int(self._ends[position - 1]) if position else 0
        return self._episodes[position], index - first


def to_replay_buffer(
    episodes: Sequence[EpisodeView] | CrowdPlayDataset,
    config: ProcessingConfig | None = None,
    *,
    n_frames: int = 4,
    action_size: int | None = None,
    mixed_action_sets: bool = False,
    memory_map: bool = False,
    store_dir: Path | str | None = None,
):
    """A d3rlpy `ReplayBuffer` (an `MDPDataset`) of the processed episodes.

    With `memory_map=True` the processed steps go to a processed store on disk (built once per
    selection and config, under `store_dir`, default `processed_store.default_store_dir()`) and
    the buffer's episodes' arrays are views of its read-only memory maps: the same transitions
    (and the same sampled batches for a seed), with almost no anonymous memory, for selections
    larger than RAM.

    Episodes of games with different minimal action sets (different ROMs: an action index means
    another key in each) are refused unless `mixed_action_sets=True` says that is meant.

    With `n_frames > 1` (and `stack_n=1` processing, as in the d3rlpy preset) observations are
    stacked by d3rlpy's frame-stack picker and slicer: `(n_frames, 84, 84)` at sampling time.
    """
    import d3rlpy

    config = config or ProcessingConfig.d3rlpy_preset()
    if n_frames > 1 and (config.stack_n != 1 or not config.framestack_axis_first):
        raise ValueError(
            "d3rlpy frame stacking needs stack_n=1 and framestack_axis_first=True processing; "
            "use n_frames=1 for pre-stacked observations"
        )
    episodes = list(episodes)
    if not episodes:
        raise ValueError("no episodes to put in a replay buffer")
    roms = sorted({rom_for_game(e.game) for e in episodes})
    if len(roms) > 1 and not mixed_action_sets:
        raise ValueError(
            f"the episodes come from games with different action sets ({', '.join(roms)}): "
            "action i is another key in each; select one game (e.g. filter(game=...)), or pass "
            "mixed_action_sets=True if that is meant"
        )
    if store_dir is not None and not memory_map:
        raise ValueError("store_dir is where memory_map=True keeps its store; pass memory_map=True")
    if action_size is None:
        action_size = max(num_actions(e.game) for e in episodes)
    kwargs = {}
    if n_frames > 1:
        kwargs = {
            "transition_picker": d3rlpy.dataset.FrameStackTransitionPicker(n_frames),
            "trajectory_slicer": d3rlpy.dataset.FrameStackTrajectorySlicer(n_frames),
        }
    if memory_map:
        return _replay_buffer_over(
            open_store(episodes, config, store_dir=store_dir), action_size, kwargs
        )
    arrays = to_arrays(episodes, config)
    return d3rlpy.dataset.MDPDataset(
        observations=arrays["observations"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        terminals=arrays["terminals"],
        timeouts=arrays["timeouts"],
        action_space=d3rlpy.constants.ActionSpace.DISCRETE,
        action_size=action_size,
        **kwargs,
    )


def _replay_buffer_over(store: ProcessedStore, action_size: int, pickers: dict):
    """A `ReplayBuffer` whose episodes are views of `store`'s memory maps: d3rlpy's `Episode`
    keeps the arrays it is given, and its pickers and slicers read only the rows they stack."""
    import d3rlpy

    # Plain ndarray views of the maps (their `.base` is the np.memmap): every slice of an
    # np.memmap goes through the subclass's Python hooks, which made sampling twice as slow.
    observations = store.arrays["observations"].view(np.ndarray)
    actions = store.arrays["actions"].view(np.ndarray).reshape(-1, 1)  # d3rlpy's (N, 1)
    rewards = store.arrays["rewards"].view(np.ndarray).reshape(-1, 1)
    episodes = [
        d3rlpy.dataset.Episode(
            observations=observations[e.start : e.stop],
            actions=actions[e.start : e.stop],
            rewards=rewards[e.start : e.stop],
            terminated=e.terminated,
        )
        for e in store.episodes
    ]
    first = episodes[0]
    return d3rlpy.dataset.ReplayBuffer(
        EpisodeTransitions(episodes),  # filled already: no per-transition append loop
        observation_signature=first.observation_signature,
        action_signature=first.action_signature,
        reward_signature=first.reward_signature,
        action_space=d3rlpy.constants.ActionSpace.DISCRETE,
        action_size=action_size,
        **pickers,
    )
