"""Scratch buffers of one thread, kept between calls: fresh memory costs page faults, which would
dominate an evaluation environment's one-observation calls and the converter's chunk after chunk.
"""

from __future__ import annotations

import math
import threading

import numpy as np


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}


_WORKSPACE = _Workspace()


def scratch_buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A contiguous uint8 array of `shape` (contents undefined) for this thread, reusing the
    memory of the last buffer called `name`."""
    size = math.prod(shape)
    flat = _WORKSPACE.buffers.get(name)
    if flat is None or flat.size < size:
        flat = _WORKSPACE.buffers[name] = np.empty(size, dtype=np.uint8)
    return flat[:size].reshape(shape)
