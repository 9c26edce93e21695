"""A straightforward per-frame re-implementation of CrowdPlay's reference frame processing.

Used only by the tests, as an independent oracle for ``crowdplay_minari.processing`` in
``crowdplay_compat`` mode. It keeps a ring buffer of the last
``(stack_n - 1) * skip_n + max_n`` raw frames (zeros before the episode starts), builds one
stacked observation per kept frame, and sums rewards since the previous kept frame, exactly as
``get_processed_trajectory()`` describes. Deliberately slow and simple: one Python iteration
per raw frame, one OpenCV call per stacked slot.
"""

import cv2
import numpy as np


def reference_process(
    frames: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    dones: np.ndarray,
    *,
    framestack_axis_first: bool = False,
    downsample_frequency: int = 1,
    downsample_offset: int = 0,
    stack_n: int = 4,
    max_n: int = 2,
    skip_n: int = 4,
    warp: bool = True,
    scale: bool = False,
    warp_width: int = 84,
    warp_height: int = 84,
) -> tuple[list[np.ndarray], list[int], list, list[int]]:
    """Return ``(observations, actions, rewards, terminals)`` lists, one entry per kept frame."""
    length = (stack_n - 1) * skip_n + max_n
    # history[0] is the newest frame, history[d] the frame d steps before it.
    history = np.zeros((length, *frames.shape[1:]), dtype=np.uint8)
    observations, kept_actions, kept_rewards, terminals = [], [], [], []
    reward_since_last_kept = 0
    n_frames = len(frames)
    for i in range(n_frames):
        history = np.roll(history, 1, axis=0)
        history[0] = frames[i]
        reward_since_last_kept += rewards[i]
        kept = (
            i % downsample_frequency == downsample_offset
            or i % downsample_frequency == n_frames - 1
        )
        if not kept:
            continue
        slots = []
        for slot in range(stack_n):
            newest = (stack_n - 1 - slot) * skip_n
            frame = history[newest : newest + max_n].max(axis=0)
            if warp:
                frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
                frame = cv2.resize(frame, (warp_width, warp_height), interpolation=cv2.INTER_AREA)[
                    :, :, None
                ]
            if scale:
                frame = frame.astype(np.float32) / 255.0
            slots.append(frame)
        observation = np.concatenate(slots, axis=-1)
        if framestack_axis_first:
            observation = np.moveaxis(observation, 2, 0)
        observations.append(observation)
        kept_actions.append(int(actions[i]))
        kept_rewards.append(reward_since_last_kept)
        terminals.append(int(dones[i]))
        reward_since_last_kept = 0
    return observations, kept_actions, kept_rewards, terminals
