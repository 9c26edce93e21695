"""crowdplay-minari: CrowdPlay's human Atari demonstrations as Minari datasets.

Pipeline, each floor importing only the ones below it: raw CrowdPlay files
(`crowdplay_minari.raw`) -> the on-disk layout (`crowdplay_minari.storage`) -> CrowdPlay-style
loading, filtering and frame processing, d3rlpy buffers and gymnasium / PettingZoo environments
(`crowdplay_minari.loading`, `.processing`, `.d3rlpy_bridge`, `.envs`) -> conversion into Minari
datasets (`crowdplay_minari.conversion`, the repository's `conversion/` folder) -> offline RL grids
and the command line (`crowdplay_minari.benchmarks`, the repository's `benchmarks/` folder).

    from crowdplay_minari import load_dataset, ProcessingConfig
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def _checkout_floors() -> None:
    """In a source checkout, `crowdplay_minari.conversion` and `crowdplay_minari.benchmarks` are
    the top-level `conversion/` and `benchmarks/` folders, as the wheel installs them."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (package / "conversion").exists() or not (checkout / "pyproject.toml").is_file():
        return  # an installed wheel: the floors are subpackages already
    if all((checkout / floor / "__init__.py").is_file() for floor in ("conversion", "benchmarks")):
        __path__.append(str(checkout))  # noqa: F821  (the package's own search path)


_checkout_floors()

_EXPORTS = {
    "load_dataset": "loading",
    "CrowdPlayDataset": "loading",
    "EpisodeView": "loading",
    "ProcessingConfig": "processing",
    "process_trajectory": "processing",
    "to_replay_buffer": "d3rlpy_bridge",
    "split_episodes": "d3rlpy_bridge",
    "CrowdPlayAtariEnv": "envs",
    "parallel_env": "parallel",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:  # imported lazily: the CLI should start fast
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'crowdplay_minari' has no attribute {name!r}")
