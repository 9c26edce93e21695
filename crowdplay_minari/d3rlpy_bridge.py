"""Processed CrowdPlay episodes -> a d3rlpy 2.8 `ReplayBuffer` with correct episode boundaries.

`d3rlpy.datasets.get_minari` concatenates Minari's N+1 observations against N actions, which
shifts every episode after the first by one step per episode. Here each episode contributes
exactly its M processed steps (M observations, M actions), its last step carries `terminals=1`
(game over) or `timeouts=1` (session stopped), and frame stacking is d3rlpy's own
(`FrameStackTransitionPicker`), so one `(1, 84, 84)` frame per step is stored once.

    train, test = split_episodes(data.episodes, test_size=0.1, seed=0)
    buffer = to_replay_buffer(train, ProcessingConfig.d3rlpy_preset(), n_frames=4)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from .games import num_actions, rom_for_game
from .loading import CrowdPlayDataset, EpisodeView
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
    still marked here so that episodes never run together in the buffer).
    """
    episodes = list(episodes)
    lengths = [kept_frames(e.num_steps, config) for e in episodes]
    total = sum(lengths)
    observations = np.empty((total, *config.observation_shape()), config.observation_dtype())
    actions = np.empty(total, dtype=np.int64)
    rewards = np.empty(total, dtype=np.float32)
    terminals = np.zeros(total, dtype=np.float32)
    timeouts = np.zeros(total, dtype=np.float32)
    start = 0
    for episode, length in zip(episodes, lengths, strict=True):
        if length == 0:
            continue
        steps = episode.compact(config)
        if len(steps.actions) != length:
            raise RuntimeError(
                f"{episode}: expected {length} processed steps, got {len(steps.actions)}"
            )
        end = start + length
        steps.stacks.observations(config, out=observations[start:end])  # stacked in place
        actions[start:end] = steps.actions
        rewards[start:end] = steps.rewards
        terminals[start:end] = steps.terminals
        timeouts[start:end] = steps.timeouts
        # one episode, one boundary: only the last step may end it
        terminals[start : end - 1] = 0
        timeouts[start : end - 1] = 0
        if not terminals[end - 1] and not timeouts[end - 1]:
            timeouts[end - 1] = 1
        start = end
    keep = slice(0, start)
    return {
        "observations": observations[keep],
        "actions": actions[keep],
        "rewards": rewards[keep],
        "terminals": terminals[keep],
        "timeouts": timeouts[keep],
    }


def to_replay_buffer(
    episodes: Sequence[EpisodeView] | CrowdPlayDataset,
    config: ProcessingConfig | None = None,
    *,
    n_frames: int = 4,
    action_size: int | None = None,
    mixed_action_sets: bool = False,
):
    """A d3rlpy `ReplayBuffer` (an `MDPDataset`) of the processed episodes.

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
    if action_size is None:
        action_size = max(num_actions(e.game) for e in episodes)
    arrays = to_arrays(episodes, config)
    kwargs = {}
    if n_frames > 1:
        kwargs = {
            "transition_picker": d3rlpy.dataset.FrameStackTransitionPicker(n_frames),
            "trajectory_slicer": d3rlpy.dataset.FrameStackTrajectorySlicer(n_frames),
        }
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
