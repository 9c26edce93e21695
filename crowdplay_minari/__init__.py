"""crowdplay-minari: CrowdPlay's human Atari demonstrations as Minari datasets.

Pipeline: raw CrowdPlay files (`crowdplay_minari.raw`) -> Minari datasets (`conversion`) ->
CrowdPlay-style loading, filtering and frame processing (`crowdplay_minari.loading`,
`crowdplay_minari.processing`) -> d3rlpy buffers and a gymnasium evaluation env
(`crowdplay_minari.d3rlpy_bridge`, `crowdplay_minari.envs`) -> offline RL grids (`benchmarks`).

    from crowdplay_minari import load_dataset, ProcessingConfig
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_dataset": "loading",
    "CrowdPlayDataset": "loading",
    "EpisodeView": "loading",
    "ProcessingConfig": "processing",
    "process_trajectory": "processing",
    "to_replay_buffer": "d3rlpy_bridge",
    "split_episodes": "d3rlpy_bridge",
    "CrowdPlayAtariEnv": "envs",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:  # imported lazily: the CLI should start fast
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'crowdplay_minari' has no attribute {name!r}")
