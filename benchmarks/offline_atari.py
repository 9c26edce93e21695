"""Offline RL on CrowdPlay's human Atari data: CrowdPlay's benchmark grid, on d3rlpy 2.8.

Run::

    python -m crowdplay_minari.benchmarks.offline_atari --preset smoke          # the pipeline in minutes, on a CPU
    python -m crowdplay_minari.benchmarks.offline_atari --preset paper --device cuda:0 --workers 4
    python -m crowdplay_minari.benchmarks.offline_atari --algorithms bc,cql --seeds 0,1 --steps 50000 \\
        --datasets crowdplay/riverraid/plain-player_0-v0:min_score=50 \\
            'crowdplay/space_invaders/insideout-player_0-v0:min_score=50,min_task_adherence=0.8' \\
        --out runs/mine
    crowdplay-minari bench ...                                  # the same flags

A grid is algorithms x dataset selections x seeds. Each *cell* loads its selection of converted
episodes (`DATASET_ID[:filter,...]`, see `DatasetSpec`), splits them 90/10 by episode (the split
depends on the seed), puts the training episodes in a d3rlpy replay buffer (every 4th frame,
(1, 84, 84) gray, 4 frames stacked by d3rlpy: `crowdplay_minari.d3rlpy_bridge`), trains, and
plays the greedy policy in `CrowdPlayAtariEnv`, which processes frames with the same code as the
loader. `--preset paper` is CrowdPlay's setup (`benchmarks/grids/paper.yaml`).

Hyperparameters: CrowdPlay's `offline/offline-atari.py` (d3rlpy 0.9x/1.x) translated to d3rlpy 2.8.
Every algorithm: batch 256, gamma 0.99, Adam (betas 0.9/0.999, eps 1e-8), Nature-DQN conv encoder
(d3rlpy's default for images), `scaler="pixel"` -> `observation_scaler=PixelObservationScaler()`,
`n_frames=4` -> the buffer's `FrameStackTransitionPicker(4)`, `use_gpu` -> `create(device=...)`,
unclipped rewards (no reward scaler), `d3rlpy.seed(seed)`.

| flag  | CrowdPlay (0.x/1.x)   | d3rlpy 2.8 config   | lr          | other settings            |
|-------|-----------------------|---------------------|-------------|---------------------------|
| `bc`  | `DiscreteBC`          | `DiscreteBCConfig`  | 3e-5        | beta 0.5 (1)              |
| `bcq` | `DiscreteBCQ`         | `DiscreteBCQConfig` | 1e-4        | action_flexibility 0.5,   |
|       |                       |                     |             | beta 0.5, mean Q          |
| `cql` | `DiscreteCQL`, QR Q   | `DiscreteCQLConfig` | 6.25e-5 (2) | alpha 1.0, QR Q (32)      |
| `iqn` | `DQN`, IQN Q          | `DQNConfig`, IQN Q  | 1e-4        | 16 quantiles, 16 greedy,  |
|       |                       |                     |             | embed 512                 |
| `dqn` | `DoubleDQN`           | `DoubleDQNConfig`   | 3e-5        | mean Q                    |
| `sac` | `DiscreteSAC`         | `DiscreteSACConfig` | 3e-4 (2)    | actor, critic and temp.   |
|       |                       |                     |             | lr; temperature 1.0       |

All but `bc` (no target network): `target_update_interval=2500` (CrowdPlay's; the name is the same
in 2.x, a hard target copy every N gradient steps, 2.x default 8000), one critic (`sac`: two).
(1) CrowdPlay also passed `target_update_interval` and `q_func_factory` to BC, which ignored them.
(2) CrowdPlay left these at the d3rlpy 1.x defaults, which 2.8 shares. CrowdPlay's schedule:
`n_steps=1_000_000`, `n_steps_per_epoch=1000`; data: player 0, `Score >= 50` and, for tasks with an
adherence statistic, adherence `>= 0.8`.

Per cell, `OUT/cells/<algo>__<dataset slug>__<filter slug>__seed<k>/` holds `config.json` (the cell,
its table row, d3rlpy's serialised config), `status.json` (`pending|running|done|failed`, runs,
wall time, error and traceback), `cell.log` (everything the cell printed), `logs/run<N>/`
(d3rlpy's logger: params.json, per-epoch CSVs), `checkpoints/step_<n>.pt` (the latest epoch's
weights and optimiser state), `curve.jsonl` (per epoch: training loss, held-out action match, and
an environment return if `--epoch-eval-episodes`), `model.d3` (`d3rlpy.load_learnable`),
`eval.json` (every evaluation episode) and `result.json` (its row of the results table).
Rerunning a command skips `done` cells and resumes the others from their latest checkpoint with
the remaining steps (d3rlpy's sampling RNG restarts, so a resumed cell is not bit-identical).
`OUT/results.csv` (one row per cell), `OUT/aggregate.csv` (per algorithm and selection: mean and
95% bootstrap CI over seeds, IQM from 4 seeds), `OUT/learning_curves.png`, `OUT/bars.png` and
`OUT/summary.md` (tables to paste) are rewritten at the end of every run.

Evaluation: greedy actions (`algo.predict`) on the last 4 observations, zero-padded before the
episode start exactly like d3rlpy's `FrameStackTransitionPicker`; each episode starts with a random
number (0..`--eval-noop-max`, seeded) of NOOP steps, the usual way to make deterministic ALE
episodes differ; an episode ends at game over or after `--eval-max-frames` raw frames. Reported:
raw return (mean, std over episodes), human-normalised score (`crowdplay_minari.scores`), return
relative to the mean `Score` of the cell's training episodes (people played full sessions: with a
frame cap below their episode lengths this ratio is biased low), and, for tasks with an adherence
statistic, the agent's adherence from `statistics.running_statistics` on the RAM after each agent
step (every 4th raw frame; CrowdPlay measured on every frame, so this is an approximation).

Differences from CrowdPlay's runner: evaluation is in the ALE the data came from (60 Hz, no sticky
actions, minimal action set, CrowdPlay's frame processing) instead of d4rl-atari's wrappers with a
`FireResetEnv` that waited 1200 NOOPs; the episode split is seeded; episodes are stacked without
the one-step shift of `MDPDataset` concatenation (see `d3rlpy_bridge`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# -- 1. Hyperparameters: CrowdPlay's d3rlpy 0.x/1.x settings in d3rlpy 2.8 -----------------------

BATCH_SIZE = 256  # CrowdPlay: batch_size=256 for every algorithm
GAMMA = 0.99  # d3rlpy's default, then and now
TARGET_UPDATE_INTERVAL = 2500  # CrowdPlay's; d3rlpy's default is 8000


@dataclass(frozen=True)
class AlgorithmSpec:
    """One row of the hyperparameter table: a d3rlpy 2.8 config and its settings."""

    crowdplay: str  # CrowdPlay's `--algorithm` value and the d3rlpy 0.x class it built
    config_class: str  # the d3rlpy 2.8 config class in `d3rlpy.algos`
    settings: Mapping[str, Any]  # config fields; `q_func_factory` as (name, options)
    loss_key: str  # the d3rlpy metric plotted as the training loss


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "bc": AlgorithmSpec(
        "BC: DiscreteBC",
        "DiscreteBCConfig",
        {"learning_rate": 3e-5, "beta": 0.5, "batch_size": BATCH_SIZE},
        loss_key="loss",
    ),
    "bcq": AlgorithmSpec(
        "BCQ: DiscreteBCQ",
        "DiscreteBCQConfig",
        {
            "learning_rate": 1e-4,
            "action_flexibility": 0.5,
            "beta": 0.5,
            "q_func_factory": ("mean", {}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "cql": AlgorithmSpec(
        "CQL: DiscreteCQL",
        "DiscreteCQLConfig",
        {
            "learning_rate": 6.25e-5,
            "alpha": 1.0,
            "q_func_factory": ("qr", {"n_quantiles": 32}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "iqn": AlgorithmSpec(
        "IQN: DQN with IQNQFunctionFactory",
        "DQNConfig",
        {
            "learning_rate": 1e-4,
            "q_func_factory": (
                "iqn",
                {"n_quantiles": 16, "n_greedy_quantiles": 16, "embed_size": 512},
            ),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "dqn": AlgorithmSpec(
        "DQN: DoubleDQN",
        "DoubleDQNConfig",
        {
            "learning_rate": 3e-5,
            "q_func_factory": ("mean", {}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "sac": AlgorithmSpec(
        "SAC: DiscreteSAC",
        "DiscreteSACConfig",
        {
            "actor_learning_rate": 3e-4,
            "critic_learning_rate": 3e-4,
            "temp_learning_rate": 3e-4,
            "initial_temperature": 1.0,
            "n_critics": 2,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="critic_loss",
    ),
}


def make_algorithm(name: str, *, batch_size: int | None = None, device: str = "cpu:0"):
    """The d3rlpy 2.8 algorithm of table row `name` (`batch_size` overrides the table's)."""
    import d3rlpy

    spec = ALGORITHMS[name]
    settings = dict(spec.settings)
    if "q_func_factory" in settings:
        kind, options = settings["q_func_factory"]
        factories = {
            "mean": d3rlpy.models.MeanQFunctionFactory,
            "qr": d3rlpy.models.QRQFunctionFactory,
            "iqn": d3rlpy.models.IQNQFunctionFactory,
        }
        settings["q_func_factory"] = factories[kind](**options)
    if batch_size is not None:
        settings["batch_size"] = batch_size
    config_class = getattr(d3rlpy.algos, spec.config_class)
    config = config_class(
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler(), **settings
    )
    return config.create(device=device)


# -- 2. What to run: dataset selections, the grid, its cells ------------------------------------


class GridError(ValueError):
    """A grid, a dataset spec or an output directory that cannot be run as asked."""


class EmptySelectionError(RuntimeError):
    """A dataset selection that keeps no episode."""


_LIST_FILTERS = ("game", "task", "task_id", "source", "agent")  # value: `a|b|c` (any of)
_NUMBER_FILTERS = ("min_score", "max_score", "min_human_fraction", "min_task_adherence")
FILTER_KEYS = _LIST_FILTERS + _NUMBER_FILTERS


@dataclass(frozen=True)
class DatasetSpec:
    """A selection of episodes: a Minari dataset id or namespace and filters, written
    `DATASET[:key=value,...]`, e.g.
    `crowdplay/space_invaders/insideout-player_0-v0:min_score=50,min_task_adherence=0.8` or
    `crowdplay/space_invaders:task_id=space_invaders_left|space_invaders_right,agent=player_0`.

    Filters are those of `CrowdPlayDataset.filter` (`game`, `task`, `source`, `agent`,
    `min_score`, `max_score`, `min_human_fraction`, `min_task_adherence`) plus `task_id`
    (CrowdPlay's environment task id); text filters take alternatives separated by `|`.
    `min_task_adherence` only filters tasks that have an adherence statistic. Filters are kept
    sorted and normalised, so equal selections name the same cell.
    """

    dataset: str
    filters: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.dataset or any(c.isspace() or c == ":" for c in self.dataset):
            raise GridError(f"dataset id {self.dataset!r} must be non-empty, without ':' or spaces")
        normalised = []
        for key, value in self.filters:
            if key not in FILTER_KEYS:
                raise GridError(
                    f"{self.dataset}: unknown filter {key!r}; use one of {', '.join(FILTER_KEYS)}"
                )
            normalised.append((key, _normalise_filter(self.dataset, key, value)))
        keys = [key for key, _ in normalised]
        if len(set(keys)) != len(keys):
            raise GridError(f"{self.dataset}: a filter is given twice in {keys}")
        object.__setattr__(self, "filters", tuple(sorted(normalised)))

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """`DATASET[:key=value,...]` -> `DatasetSpec`."""
        dataset, _, filter_text = text.strip().partition(":")
        filters = []
        for item in filter_text.split(",") if filter_text.strip() else []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise GridError(f"dataset spec {text!r}: filter {item!r} is not key=value")
            filters.append((key.strip(), value.strip()))
        return cls(dataset, tuple(filters))

    @classmethod
    def from_value(cls, value: Any, source: str = "grid") -> DatasetSpec:
        """A spec string, or a mapping `{dataset: ID, filters: {key: value}}` (YAML grids)."""
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping) and set(value) <= {"dataset", "filters"}:
            filters = value.get("filters") or {}
            if not isinstance(filters, Mapping):
                raise GridError(f"{source}: filters of {value!r} must be a mapping")
            return cls(str(value.get("dataset", "")), tuple((k, v) for k, v in filters.items()))
        raise GridError(
            f"{source}: a dataset is 'ID[:key=value,...]' or {{dataset: ID, filters: {{...}}}}, "
            f"got {value!r}"
        )

    def __str__(self) -> str:
        return f"{self.dataset}:{self.filter_text}" if self.filters else self.dataset

    @property
    def filter_text(self) -> str:
        """`min_score=50,min_task_adherence=0.8`, or `""` for no filter."""
        return ",".join(f"{key}={value}" for key, value in self.filters)

    @property
    def slugs(self) -> tuple[str, str]:
        """(dataset slug, filter slug) for directory names."""
        dataset = _slug(self.dataset.replace("/", "-"))
        filters = "_".join(_slug(f"{k}{v}".replace("|", "+")) for k, v in self.filters)
        return dataset, filters or "all"

    def filter_arguments(self) -> dict[str, Any]:
        """Keyword arguments for `CrowdPlayDataset.filter`."""
        arguments: dict[str, Any] = {}
        for key, value in self.filters:
            if key == "task_id":
                task_ids = frozenset(value.split("|"))
                arguments["predicate"] = lambda e, ids=task_ids: e.metadata["task_id"] in ids
            elif key in _LIST_FILTERS:
                arguments[key] = value.split("|")
            else:
                arguments[key] = float(value)
        return arguments


def _normalise_filter(dataset: str, key: str, value: Any) -> str:
    if key in _NUMBER_FILTERS:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise GridError(f"{dataset}: filter {key} needs a number, got {value!r}") from None
        if not math.isfinite(number):
            raise GridError(f"{dataset}: filter {key} must be finite, got {value!r}")
        return format(number, "g")
    items = sorted({part.strip() for part in str(value).split("|") if part.strip()})
    if not items:
        raise GridError(f"{dataset}: filter {key} is empty")
    return "|".join(items)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in text)


@dataclass(frozen=True)
class GridConfig:
    """A whole grid. The defaults are CrowdPlay's settings; `datasets` must be given."""

    datasets: tuple[DatasetSpec, ...] = ()
    algorithms: tuple[str, ...] = ("bc", "bcq", "cql", "iqn", "dqn", "sac")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1_000_000  # gradient steps per cell
    steps_per_epoch: int = 1000  # checkpoint, curve point and log line every epoch
    batch_size: int | None = None  # None: the table's (256)
    n_frames: int = 4  # frames stacked by d3rlpy
    test_size: float = 0.1  # share of episodes held out (episode split seeded by the seed)
    heldout_steps: int = 10_000  # held-out transitions scored per epoch (action match); 0: none
    eval_episodes: int = 10  # environment episodes after training
    eval_max_frames: int = 108_000  # raw 60 Hz frames per evaluation episode (30 minutes)
    eval_noop_max: int = 30  # random NOOP agent steps at the start of an evaluation episode
    epoch_eval_episodes: int = 0  # environment episodes after every epoch (learning curve)
    device: str = "cpu:0"  # cpu:0 or cuda:0
    workers: int = 1  # cells at once
    backend: str = "process"  # process (a spawn pool) or ray
    ray_address: str | None = None  # None: a local Ray with `workers` CPUs
    gpus_per_cell: float = 0.0  # Ray only: GPUs a cell reserves (0.25: four cells share one)
    out: str = "runs/offline_atari"

    def __post_init__(self) -> None:
        datasets = tuple(
            DatasetSpec.from_value(d) if not isinstance(d, DatasetSpec) else d
            for d in self.datasets
        )
        if not self.seeds or any(isinstance(s, bool) or int(s) < 0 for s in self.seeds):
            raise GridError(f"seeds must be non-negative ints, got {list(self.seeds)}")
        object.__setattr__(self, "datasets", datasets)
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise GridError(
                f"algorithms {list(self.algorithms)}: use some of {', '.join(ALGORITHMS)}"
            )
        positive = ("steps", "steps_per_epoch", "n_frames", "eval_episodes", "eval_max_frames")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise GridError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("heldout_steps", "eval_noop_max", "epoch_eval_episodes"):
            if int(getattr(self, name)) < 0:
                raise GridError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps % self.steps_per_epoch:
            raise GridError(
                f"steps ({self.steps}) must be a multiple of steps_per_epoch "
                f"({self.steps_per_epoch}): cells checkpoint and resume at epoch ends"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise GridError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.test_size < 1.0:
            raise GridError(f"test_size must be in [0, 1), got {self.test_size}")
        if self.workers < 1:
            raise GridError(f"workers must be >= 1, got {self.workers}")
        if self.backend not in ("process", "ray"):
            raise GridError(f"backend must be 'process' or 'ray', got {self.backend!r}")

    def cells(self) -> list[Cell]:
        """Every (algorithm, dataset selection, seed), in that nesting order."""
        cells = [
            Cell(
                algorithm=algorithm,
                dataset=str(dataset),
                seed=int(seed),
                steps=self.steps,
                steps_per_epoch=self.steps_per_epoch,
                batch_size=self.batch_size or ALGORITHMS[algorithm].settings["batch_size"],
                n_frames=self.n_frames,
                test_size=self.test_size,
                heldout_steps=self.heldout_steps,
                eval_episodes=self.eval_episodes,
                eval_max_frames=self.eval_max_frames,
                eval_noop_max=self.eval_noop_max,
                epoch_eval_episodes=self.epoch_eval_episodes,
                device=self.device,
            )
            for algorithm in self.algorithms
            for dataset in self.datasets
            for seed in self.seeds
        ]
        names = [cell.name for cell in cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GridError(f"the grid names a cell twice: {', '.join(duplicates)}")
        return cells


@dataclass(frozen=True)
class Cell:
    """One training run: everything that decides its result (plus the device)."""

    algorithm: str
    dataset: str  # a `DatasetSpec` string
    seed: int
    steps: int
    steps_per_epoch: int
    batch_size: int
    n_frames: int
    test_size: float
    heldout_steps: int
    eval_episodes: int
    eval_max_frames: int
    eval_noop_max: int
    epoch_eval_episodes: int
    device: str

    @property
    def spec(self) -> DatasetSpec:
        return DatasetSpec.parse(self.dataset)

    @property
    def name(self) -> str:
        dataset, filters = self.spec.slugs
        return f"{self.algorithm}__{dataset}__{filters}__seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The fields a finished cell must share with a rerun's (the device may change)."""
        fields = dataclasses.asdict(self)
        fields.pop("device")
        return fields


# Grid files and presets ------------------------------------------------------------------------

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
PRESETS = ("paper", "smoke")
_GRID_FIELDS = {f.name for f in dataclasses.fields(GridConfig)}


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The fields a YAML (or TOML) grid file sets, coerced and checked, as `GridConfig` kwargs."""
    path = Path(path)
    if not path.exists():
        raise GridError(f"grid file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text) or {}
    if not isinstance(raw, Mapping):
        raise GridError(f"{path}: a grid file is a mapping of GridConfig fields")
    return coerce_grid_fields(raw, source=str(path))


def coerce_grid_fields(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check field names and turn lists / comma strings into the tuples `GridConfig` takes."""
    unknown = sorted(set(raw) - _GRID_FIELDS)
    if unknown:
        raise GridError(
            f"{source}: unknown field(s) {', '.join(unknown)}; "
            f"fields: {', '.join(sorted(_GRID_FIELDS))}"
        )
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None and key in ("batch_size", "ray_address"):
            fields[key] = None
        elif key == "datasets":
            values = [value] if isinstance(value, str | Mapping) else list(value)
            fields[key] = tuple(DatasetSpec.from_value(v, source) for v in values)
        elif key == "algorithms":
            items = value.split(",") if isinstance(value, str) else list(value)
            fields[key] = tuple(str(a).strip().lower() for a in items if str(a).strip())
        elif key == "seeds":
            items = str(value).split(",") if isinstance(value, str | int) else list(value)
            fields[key] = tuple(_as_int(s, f"{source}: seeds") for s in items if str(s).strip())
        elif key in ("test_size", "gpus_per_cell"):
            fields[key] = float(value)
        elif key in ("device", "backend", "ray_address", "out"):
            fields[key] = str(value)
        else:
            fields[key] = _as_int(value, f"{source}: {key}")
    return fields


def _as_int(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GridError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer():
        raise GridError(f"{what} must be an integer, got {value!r}")
    return int(number)


# -- 3. One cell: select, split, buffer, train (resumable), evaluate ----------------------------


def select_episodes(spec: DatasetSpec):
    """The episodes of `spec` (metadata only); `EmptySelectionError` if none is left."""
    from crowdplay_minari.loading import load_dataset

    data = load_dataset(spec.dataset)
    selected = data.filter(**spec.filter_arguments())
    if len(selected) == 0:
        scores = sorted(e.score for e in data.episodes)
        raise EmptySelectionError(
            f"{spec}: no episode passes the filters ({len(data)} episodes in {spec.dataset}, "
            f"scores {scores[:1]}..{scores[-1:]})"
        )
    return selected.episodes


class FrameStack:
    """The last `n_frames` observations, oldest first, zeros before the episode's first one:
    the input d3rlpy's `FrameStackTransitionPicker` builds from a buffer during training.

        stack = FrameStack(4, (1, 84, 84))
        x = stack.reset(observation)   # (4, 84, 84): three zero frames, then `observation`
        x = stack.push(next_observation)
    """

    def __init__(self, n_frames: int, observation_shape: tuple[int, ...], dtype=np.uint8):
        self.channels = observation_shape[0]
        self.frames = np.zeros((n_frames * self.channels, *observation_shape[1:]), dtype=dtype)

    def reset(self, observation: np.ndarray) -> np.ndarray:
        self.frames[:] = 0
        return self.push(observation)

    def push(self, observation: np.ndarray) -> np.ndarray:
        c = self.channels
        self.frames[:-c] = self.frames[c:]
        self.frames[-c:] = observation
        return self.frames


def play_episodes(
    algo,
    game: str,
    task: str | None,
    *,
    n_frames: int,
    episodes: int,
    max_frames: int,
    noop_max: int,
    seed: int,
    stream: int = 0,
) -> list[dict[str, Any]]:
    """Play `episodes` greedy episodes of `algo` in `CrowdPlayAtariEnv` (d3rlpy preset).

    Episode `i` resets ALE with a seed from `(seed, stream, i)` and starts with that many
    random NOOP steps (0..`noop_max`); `stream` separates the final evaluation (0) from the
    per-epoch ones (1), so every algorithm meets the same starts for the same seed.
    """
    from crowdplay_minari.envs import CrowdPlayAtariEnv
    from crowdplay_minari.games import task_adherence_key
    from crowdplay_minari.processing import ProcessingConfig
    from crowdplay_minari.statistics import running_statistics

    processing = ProcessingConfig.d3rlpy_preset()
    env = CrowdPlayAtariEnv(game, processing, max_episode_frames=max_frames, seed=0)
    stack = FrameStack(n_frames, processing.observation_shape())
    adherence_key = task_adherence_key(game, task) if task else None
    results = []
    for i in range(episodes):
        rng = np.random.default_rng([seed, stream, i])
        ale_seed = int(rng.integers(0, 2**31 - 1))
        noops = int(rng.integers(0, noop_max + 1))
        observation, info = env.reset(seed=ale_seed)
        x = stack.reset(observation)
        rewards, actions, ram = [], [], []
        started = time.perf_counter()
        terminated = truncated = False
        while not (terminated or truncated):
            # minimal action sets start with NOOP
            action = 0 if len(actions) < noops else int(algo.predict(x[None])[0])
            observation, reward, terminated, truncated, info = env.step(action)
            x = stack.push(observation)
            rewards.append(float(reward))
            actions.append(action)
            ram.append(info["ram"])
        adherence = None
        if adherence_key is not None:
            stats = running_statistics(
                game, task, np.asarray(rewards), np.asarray(actions), np.asarray(ram)
            )
            if adherence_key in stats:
                adherence = float(stats[adherence_key][-1])
        results.append(
            {
                "episode": i,
                "ale_seed": ale_seed,
                "noop_steps": noops,
                "return": float(np.sum(rewards)),
                "agent_steps": len(actions),
                "frames": int(info["frame_number"]),
                "terminated": bool(terminated),
                "truncated": bool(truncated),
                "task_adherence": adherence,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    env.close()
    return results


def train_and_evaluate(cell: Cell, cell_dir: Path, run_number: int) -> dict[str, Any]:
    """Train `cell` (from its latest checkpoint, if any) and evaluate it; returns its
    results row. Raises on any failure."""
    import d3rlpy

    from crowdplay_minari.d3rlpy_bridge import kept_frames, split_episodes, to_replay_buffer
    from crowdplay_minari.games import human_normalized_score, num_actions
    from crowdplay_minari.processing import ProcessingConfig

    d3rlpy.seed(cell.seed)
    spec = cell.spec
    processing = ProcessingConfig.d3rlpy_preset()

    # Data: the selection, a seeded 90/10 episode split, d3rlpy buffers.
    episodes = select_episodes(spec)
    games = sorted({e.game for e in episodes})
    if len(games) != 1:
        raise GridError(f"{spec} selects several games ({', '.join(games)}); add game=...")
    game = games[0]
    tasks = sorted({e.task for e in episodes})
    task = tasks[0] if len(tasks) == 1 else None
    train, test = split_episodes(episodes, test_size=cell.test_size, seed=cell.seed)
    buffer = to_replay_buffer(
        train, processing, n_frames=cell.n_frames, action_size=num_actions(game)
    )
    heldout, heldout_steps = [], 0
    for episode in test:
        if heldout_steps >= cell.heldout_steps:
            break
        heldout.append(episode)
        heldout_steps += kept_frames(episode.num_steps, processing)
    evaluators = {}
    if heldout:
        heldout_buffer = to_replay_buffer(
            heldout, processing, n_frames=cell.n_frames, action_size=num_actions(game)
        )
        evaluators["heldout_action_match"] = d3rlpy.metrics.DiscreteActionMatchEvaluator(
            episodes=heldout_buffer.episodes
        )
    n_train_steps = sum(kept_frames(e.num_steps, processing) for e in train)
    dataset_score_mean = float(np.mean([e.score for e in train]))

    # Model: fresh, or the latest checkpoint with its gradient step count.
    algo = make_algorithm(cell.algorithm, batch_size=cell.batch_size, device=cell.device)
    algo.build_with_dataset(buffer)
    _write_json(
        cell_dir / "config.json",
        {
            **cell_config(cell),
            "d3rlpy_config": {
                "class": type(algo.config).__name__,
                "params": json.loads(algo.config.serialize()),
            },
            "game": game,
            "task": task,
            "versions": {"d3rlpy": d3rlpy.__version__, "python": sys.version.split()[0]},
        },
    )
    done_steps, checkpoint = latest_checkpoint(cell_dir)
    if checkpoint is not None:
        algo.load_model(str(checkpoint))
        algo.set_grad_step(done_steps)
        print(f"resuming {cell.name} from {checkpoint.name} ({done_steps}/{cell.steps} steps)")
    curve_path = cell_dir / "curve.jsonl"
    _truncate_curve(curve_path, done_steps)

    evaluate = functools.partial(
        play_episodes,
        algo,
        game,
        task,
        n_frames=cell.n_frames,
        max_frames=cell.eval_max_frames,
        noop_max=cell.eval_noop_max,
        seed=cell.seed,
    )

    # Training: one checkpoint and one curve point per epoch.
    loss_key = ALGORITHMS[cell.algorithm].loss_key
    remaining = cell.steps - done_steps
    if remaining > 0:
        fitter = algo.fitter(
            buffer,
            n_steps=remaining,
            n_steps_per_epoch=cell.steps_per_epoch,
            experiment_name=f"run{run_number}",
            with_timestamp=False,
            logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=str(cell_dir / "logs")),
            show_progress=False,
            save_interval=10**12,  # checkpoints are ours: one file, replaced every epoch
            evaluators=evaluators,
        )
        for epoch, metrics in fitter:
            step = done_steps + epoch * cell.steps_per_epoch
            point = {"step": step, "loss": float(metrics[loss_key])}
            if "heldout_action_match" in metrics:
                point["heldout_action_match"] = float(metrics["heldout_action_match"])
            if cell.epoch_eval_episodes:
                played = evaluate(episodes=cell.epoch_eval_episodes, stream=1)
                point["eval_return"] = float(np.mean([e["return"] for e in played]))
            point["metrics"] = {k: float(v) for k, v in metrics.items()}
            with open(curve_path, "a") as f:
                f.write(json.dumps(point) + "\n")
            save_checkpoint(algo, cell_dir, step)
            _update_status(cell_dir, steps_done=step)
    tmp = cell_dir / "model.d3.tmp"
    algo.save(str(tmp))
    os.replace(tmp, cell_dir / "model.d3")

    # Evaluation in the environment.
    played = evaluate(episodes=cell.eval_episodes)
    returns = np.array([e["return"] for e in played])
    adherences = [e["task_adherence"] for e in played if e["task_adherence"] is not None]
    eval_return = float(returns.mean())
    summary = {
        "game": game,
        "task": task,
        "eval_return": eval_return,
        "eval_return_std": float(returns.std()),
        "human_normalized": float(human_normalized_score(game, eval_return)),
        "relative_to_dataset": eval_return / dataset_score_mean if dataset_score_mean else math.nan,
        "task_adherence": float(np.mean(adherences)) if adherences else None,
        "dataset_score_mean": dataset_score_mean,
        "n_train_episodes": len(train),
        "n_test_episodes": len(test),
        "n_train_steps": n_train_steps,
    }
    _write_json(cell_dir / "eval.json", {**summary, "episodes": played})
    return summary


# Checkpoints, status and small files ------------------------------------------------------------


def cell_config(cell: Cell) -> dict[str, Any]:
    """What config.json holds before the cell has run (it adds d3rlpy's config, game, task)."""
    return {
        "cell": dataclasses.asdict(cell),
        "name": cell.name,
        "table_row": _jsonable(dataclasses.asdict(ALGORITHMS[cell.algorithm])),
    }


def latest_checkpoint(cell_dir: Path) -> tuple[int, Path | None]:
    """(steps, path) of the newest complete checkpoint, (0, None) if there is none."""
    found = []
    for path in (cell_dir / "checkpoints").glob("step_*.pt"):
        with contextlib.suppress(ValueError):
            found.append((int(path.stem.removeprefix("step_")), path))
    return max(found) if found else (0, None)


def save_checkpoint(algo, cell_dir: Path, step: int) -> Path:
    """Weights and optimiser state after `step` gradient steps; older checkpoints removed."""
    directory = cell_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step}.pt"
    tmp = directory / f"step_{step}.pt.tmp"
    algo.save_model(str(tmp))
    os.replace(tmp, path)  # a checkpoint file is complete or absent
    for old in directory.glob("step_*.pt"):
        if old != path:
            old.unlink()
    return path


def _truncate_curve(path: Path, steps: int) -> None:
    """Drop curve points past the checkpoint a cell resumes from (written before a crash)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= steps]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_status(cell_dir: Path) -> dict[str, Any]:
    """The cell's status.json; `{"status": "pending", "runs": 0}` when there is none."""
    path = cell_dir / "status.json"
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(path.read_text())
    return {"status": "pending", "runs": 0}


def _update_status(cell_dir: Path, **changes: Any) -> dict[str, Any]:
    status = {**read_status(cell_dir), **changes}
    _write_json(cell_dir / "status.json", status)
    return status


def is_done(cell_dir: Path) -> bool:
    return read_status(cell_dir).get("status") == "done" and (cell_dir / "result.json").exists()


def _output_to(path: Path) -> contextlib.AbstractContextManager[None]:
    """Send this process's stdout and stderr (file descriptors, so d3rlpy's and ALE's output
    too) to `path` while a cell runs."""
    from ._common import native_output_to

    return native_output_to(path, "a")


def run_cell(cell: Cell, cells_root: str | Path) -> dict[str, Any]:
    """Run one cell to `done` or `failed` (never raises) and return its results row."""
    cell_dir = Path(cells_root) / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(cell_dir)
    run_number = int(previous.get("runs", 0)) + 1
    status = _update_status(
        cell_dir,
        status="running",
        runs=run_number,
        started=_now(),
        finished=None,
        host=socket.gethostname(),
        pid=os.getpid(),
        error=None,
        traceback=None,
    )
    started = time.perf_counter()
    row = _row(cell, "running")
    try:
        with _output_to(cell_dir / "cell.log"):
            print(f"== {_now()} run {run_number} of {cell.name}", flush=True)
            row.update(train_and_evaluate(cell, cell_dir, run_number))
        row["status"] = "done"
        error = trace = None
    except Exception as exc:  # a crashing cell is recorded; the grid goes on
        row["status"] = "failed"
        error, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    seconds = time.perf_counter() - started
    wall = float(status.get("wall_seconds") or 0.0) + seconds
    row.update(wall_seconds=round(wall, 2), error=error)
    _write_json(cell_dir / "result.json", row)
    _update_status(
        cell_dir,
        status=row["status"],
        finished=_now(),
        last_run_seconds=round(seconds, 2),
        wall_seconds=round(wall, 2),
        error=error,
        traceback=trace,
    )
    return row


RESULT_COLUMNS = (
    "algorithm", "dataset", "filter", "seed", "steps", "eval_return", "eval_return_std",
    "human_normalized", "relative_to_dataset", "task_adherence", "n_train_episodes",
    "n_train_steps", "wall_seconds", "status", "game", "task", "dataset_score_mean",
    "n_test_episodes", "eval_episodes", "cell", "error",
)  # fmt: skip


def _row(cell: Cell, status: str) -> dict[str, Any]:
    spec = cell.spec
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        algorithm=cell.algorithm,
        dataset=spec.dataset,
        filter=spec.filter_text,
        seed=cell.seed,
        steps=cell.steps,
        eval_episodes=cell.eval_episodes,
        status=status,
        cell=cell.name,
    )
    return row


# -- 4. The grid: resume, run cells in a process pool or on Ray ----------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per cell: `workers` cells share the machine


def _cell_in_worker(cell: Cell, cells_root: str) -> dict[str, Any]:
    _init_worker()  # again: Ray workers have no initializer
    return run_cell(cell, cells_root)


def _record_lost(cell: Cell, cells_root: Path, why: str) -> dict[str, Any]:
    """A cell whose worker died before it could record anything itself."""
    cell_dir = cells_root / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    row = {**_row(cell, "failed"), "error": why}
    _write_json(cell_dir / "result.json", row)
    _update_status(cell_dir, status="failed", finished=_now(), error=why, traceback=None)
    return row


def _run_process_pool(
    cells: Sequence[Cell], cells_root: Path, workers: int, report: Callable[[dict], None]
) -> None:
    """Cells in a pool of `workers` spawned processes (each imports torch and d3rlpy once, about
    10 s here, then runs cell after cell). A worker that dies (killed, out of memory) breaks the
    pool: the cells that had started are recorded as failed, the others go to a new pool."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    queue = list(cells)
    while queue:
        runs_before = {c.name: read_status(cells_root / c.name).get("runs", 0) for c in queue}
        with ProcessPoolExecutor(
            min(workers, len(queue)), mp_context=context, initializer=_init_worker
        ) as pool:
            futures = {pool.submit(_cell_in_worker, c, str(cells_root)): c for c in queue}
            queue = []
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    report(future.result())
                except BrokenProcessPool as exc:
                    runs = read_status(cells_root / cell.name).get("runs", 0)
                    if runs > runs_before[cell.name]:  # it had started: it may be the culprit
                        why = f"worker process died (killed or out of memory?): {exc}"
                        report(_record_lost(cell, cells_root, why))
                    else:
                        queue.append(cell)
        if queue and len(queue) == len(futures):  # no cell even started: workers cannot start
            for cell in queue:
                report(_record_lost(cell, cells_root, "worker processes fail to start"))
            queue = []


def _run_ray(
    cells: Sequence[Cell], cells_root: Path, grid: GridConfig, report: Callable[[dict], None]
) -> None:
    """Cells as Ray tasks, at most `workers` at once. On a cluster, OUT and the Minari root
    must be on a shared file system (paths are passed as they are here)."""
    import ray

    repo_root = str(Path(__file__).resolve().parent.parent)
    env_vars = {
        key: os.environ[key]
        for key in ("MINARI_DATASETS_PATH", "CROWDPLAY_MINARI_CACHE")
        if key in os.environ
    }
    env_vars["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, os.environ.get("PYTHONPATH")) if p
    )
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=grid.ray_address,
            num_cpus=None if grid.ray_address else grid.workers,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars},
        )
    remote_cell = ray.remote(num_cpus=1, num_gpus=grid.gpus_per_cell, max_retries=0)(
        _cell_in_worker
    )
    queue, running = list(cells), {}
    try:
        while queue or running:
            while queue and len(running) < grid.workers:
                cell = queue.pop(0)
                running[remote_cell.remote(cell, str(cells_root))] = cell
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                cell = running.pop(ref)
                try:
                    report(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    report(_record_lost(cell, cells_root, f"Ray task failed: {exc}"))
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One grid run per output directory at a time."""
    import fcntl

    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GridError(f"another run is using {out} (lock {out / '.lock'})") from None
        yield


def _check_identity(cells: Sequence[Cell], cells_root: Path) -> None:
    """A cell directory from an earlier run must describe the same cell."""
    for cell in cells:
        path = cells_root / cell.name / "config.json"
        if not path.exists():
            continue
        stored = json.loads(path.read_text()).get("cell", {})
        stored.pop("device", None)
        changed = {k: (stored.get(k), v) for k, v in cell.identity().items() if stored.get(k) != v}
        if changed:
            diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise GridError(
                f"{cells_root / cell.name} was run with other settings ({diff}); "
                "use another --out or delete that cell's directory"
            )


def run_grid(grid: GridConfig, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell of `grid` that is not done yet, then write the reports; returns the
    results rows (done and failed) of all cells."""
    if not grid.datasets:
        raise GridError("no datasets: give --preset, --grid or --datasets")
    out = Path(grid.out)
    cells_root = out / "cells"
    cells_root.mkdir(parents=True, exist_ok=True)
    cells = grid.cells()
    with _exclusive(out):
        _check_identity(cells, cells_root)
        todo = [c for c in cells if not is_done(cells_root / c.name)]
        for cell in todo:
            cell_dir = cells_root / cell.name
            cell_dir.mkdir(exist_ok=True)
            if not (cell_dir / "config.json").exists():
                _write_json(cell_dir / "config.json", cell_config(cell))
            if not (cell_dir / "status.json").exists():
                _update_status(cell_dir, status="pending", runs=0)
        started = time.perf_counter()
        _write_json(
            out / "grid.json",
            {"grid": _jsonable(_grid_dict(grid)), "started": _now(), "argv": sys.argv},
        )
        log(
            f"{len(cells)} cells, {len(cells) - len(todo)} done already, running {len(todo)} "
            f"with {grid.workers} worker(s) ({grid.backend}) -> {out}"
        )
        finished = 0

        def report(row: dict[str, Any]) -> None:
            nonlocal finished
            finished += 1
            outcome = (
                f"return {row['eval_return']:.1f}"
                if row["status"] == "done"
                else f"error {row['error']}"
            )
            log(
                f"[{finished}/{len(todo)}] {row['status']:6s} {row['cell']}  {outcome}  "
                f"({row.get('wall_seconds') or 0:.0f} s)"
            )

        if todo and grid.backend == "ray":
            _run_ray(todo, cells_root, grid, report)
        elif todo:
            _run_process_pool(todo, cells_root, grid.workers, report)
        rows = [
            json.loads((cells_root / c.name / "result.json").read_text())
            if (cells_root / c.name / "result.json").exists()
            else _row(c, read_status(cells_root / c.name).get("status", "pending"))
            for c in cells
        ]
        seconds = time.perf_counter() - started
        write_reports(out, grid, cells, rows, run_seconds=seconds)
    failed = sum(r["status"] != "done" for r in rows)
    log(
        f"{len(rows) - failed}/{len(rows)} cells done, {failed} failed; this run took "
        f"{seconds:.0f} s; see {out / 'summary.md'}"
    )
    return rows


def _grid_dict(grid: GridConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(grid)
    fields["datasets"] = [str(d) for d in grid.datasets]
    return fields


# -- 5. Results: tables, aggregates with bootstrap CIs, plots, summary --------------------------


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (seeded); NaNs for < 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def iqm(values: Sequence[float], *, min_values: int = 4) -> float:
    """Interquartile mean: the mean of the middle half (`floor(n/4)` values cut at each end, as
    `scipy.stats.trim_mean(x, 0.25)`); NaN for fewer than `min_values` values."""
    x = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    if x.size < min_values:
        return math.nan
    cut = x.size // 4
    return float(x[cut : x.size - cut].mean())


def aggregate(results) -> Any:
    """Per (algorithm, dataset, filter), over the seeds of done cells: mean, 95% bootstrap CI
    and IQM of the return and of the human-normalised score; means of the rest."""
    import pandas as pd

    rows = []
    keys = ["algorithm", "dataset", "filter"]
    for (algorithm, dataset, filter_text), group in results.groupby(keys, sort=False, dropna=False):
        done = group[group["status"] == "done"]
        row = {
            "algorithm": algorithm,
            "dataset": dataset,
            "filter": filter_text,
            "n_seeds": len(done),
            "n_failed": len(group) - len(done),
        }
        for column, name in (("eval_return", "return"), ("human_normalized", "hns")):
            values = pd.to_numeric(done[column], errors="coerce").to_numpy(dtype=float)
            low, high = bootstrap_ci(values)
            row[f"{name}_mean"] = float(np.nanmean(values)) if len(values) else math.nan
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
            row[f"{name}_iqm"] = iqm(values)
        for column in ("relative_to_dataset", "task_adherence", "wall_seconds"):
            values = pd.to_numeric(done[column], errors="coerce").to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{column}_mean"] = float(finite.mean()) if finite.size else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _label(dataset: str, filter_text: str) -> str:
    name = dataset.split("/", 1)[1] if dataset.count("/") >= 1 else dataset
    return f"{name} [{filter_text}]" if filter_text else name


def read_curves(cells_root: Path, cells: Sequence[Cell]) -> Any:
    """Every cell's curve.jsonl as one DataFrame (step, loss, held-out match, eval return)."""
    import pandas as pd

    frames = []
    for cell in cells:
        path = cells_root / cell.name / "curve.jsonl"
        if not path.exists():
            continue
        points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame([{k: v for k, v in p.items() if k != "metrics"} for p in points])
        spec = cell.spec
        frame = frame.assign(
            algorithm=cell.algorithm, label=_label(spec.dataset, spec.filter_text), seed=cell.seed
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_learning_curves(curves, path: Path) -> None:
    """One column per dataset selection, one row per curve metric; lines are algorithms
    (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        (m, title)
        for m, title in (
            ("loss", "training loss"),
            ("heldout_action_match", "held-out action match"),
            ("eval_return", "return (per-epoch eval)"),
        )
        if m in curves.columns and curves[m].notna().any()
    ] or [("loss", "training loss")]
    labels = list(dict.fromkeys(curves["label"])) if len(curves) else ["(no curves)"]
    fig, axes = plt.subplots(
        len(metrics), len(labels), figsize=(4.5 * len(labels), 3.2 * len(metrics)), squeeze=False
    )
    for col, label in enumerate(labels):
        for row, (metric, title) in enumerate(metrics):
            ax = axes[row][col]
            if len(curves):
                subset = curves[curves["label"] == label]
                for algorithm, group in subset.groupby("algorithm", sort=False):
                    mean = group.groupby("step")[metric].mean()
                    ax.plot(mean.index, mean.to_numpy(), marker=".", label=algorithm)
            ax.set_title(f"{label}\n{title}" if row == 0 else title, fontsize=8)
            ax.set_xlabel("gradient steps")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(table, path: Path) -> None:
    """Human-normalised score per dataset selection (groups) and algorithm (bars), 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        _label(d, f).replace(" [", "\n[")
        for d, f in zip(table["dataset"], table["filter"], strict=True)
    ]
    table = table.assign(label=labels)
    groups = list(dict.fromkeys(labels)) or ["(no results)"]
    algorithms = list(dict.fromkeys(table["algorithm"]))
    width = 0.8 / max(len(algorithms), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.5))
    for i, algorithm in enumerate(algorithms):
        rows = table[table["algorithm"] == algorithm].set_index("label").reindex(groups)
        mean = rows["hns_mean"].to_numpy(dtype=float)
        low = rows["hns_ci_low"].to_numpy(dtype=float)
        high = rows["hns_ci_high"].to_numpy(dtype=float)
        has_ci = np.isfinite(low) & np.isfinite(high)
        errors = np.vstack([np.where(has_ci, mean - low, 0.0), np.where(has_ci, high - mean, 0.0)])
        x = np.arange(len(groups)) + (i - (len(algorithms) - 1) / 2) * width
        ax.bar(x, mean, width, label=algorithm)
        if has_ci.any():
            ax.errorbar(
                x[has_ci],
                mean[has_ci],
                yerr=errors[:, has_ci],
                fmt="none",
                capsize=3,
                ecolor="black",
                linewidth=1,
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("human-normalised score")
    ax.set_title("Mean over seeds, 95% bootstrap CI (none with one seed)", fontsize=9)
    if algorithms:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value: Any, digits: int = 1) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(x) else f"{x:.{digits}f}"


def _with_ci(mean: Any, low: Any, high: Any, digits: int) -> str:
    text = _number(mean, digits)
    if _number(low) != "–":
        text += f" [{_number(low, digits)}, {_number(high, digits)}]"
    return text


def summary_markdown(grid: GridConfig, results, table, run_seconds: float) -> str:
    """The Markdown summary: setup line, aggregated results, every cell, failed cells."""
    from importlib.metadata import version

    done = results[results["status"] == "done"]
    batches = {a: grid.batch_size or ALGORITHMS[a].settings["batch_size"] for a in grid.algorithms}
    batch = (
        str(next(iter(batches.values())))
        if len(set(batches.values())) == 1
        else ", ".join(f"{a} {b}" for a, b in batches.items())
    )
    lines = [
        "# Offline RL on CrowdPlay data",
        "",
        f"Setup: {len(results)} cells = {len(grid.algorithms)} algorithms "
        f"({', '.join(grid.algorithms)}) × {len(grid.datasets)} dataset selections × "
        f"{len(grid.seeds)} seeds ({', '.join(map(str, grid.seeds))}); {grid.steps} gradient "
        f"steps (epochs of {grid.steps_per_epoch}), batch {batch}; {grid.n_frames} stacked "
        f"84×84 gray frames, every 4th frame; {1 - grid.test_size:.0%}/{grid.test_size:.0%} "
        f"episode split; evaluation: {grid.eval_episodes} greedy episodes per cell, ≤ "
        f"{grid.eval_max_frames} raw frames, 0–{grid.eval_noop_max} no-op starts; device "
        f"{grid.device}; d3rlpy {version('d3rlpy')}; this run {run_seconds:.0f} s wall "
        f"({grid.workers} workers, {grid.backend}); cells done: {len(done)}/{len(results)}.",
        "",
        "## Results (mean over seeds, 95% bootstrap CI)",
        "",
        "| Algorithm | Dataset | Seeds | Return | Human-normalised | HNS IQM | "
        "Return / dataset mean | Task adherence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['algorithm']} | {_label(r['dataset'], r['filter'])} | {r['n_seeds']}"
            + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")
            + f" | {_with_ci(r['return_mean'], r['return_ci_low'], r['return_ci_high'], 1)}"
            + f" | {_with_ci(r['hns_mean'], r['hns_ci_low'], r['hns_ci_high'], 3)}"
            + f" | {_number(r['hns_iqm'], 3)} | {_number(r['relative_to_dataset_mean'], 2)}"
            + f" | {_number(r['task_adherence_mean'], 2)} |"
        )
    lines += [
        "",
        "## Cells",
        "",
        "| Cell | Status | Return (± std) | HNS | Rel. dataset | Adherence | Train episodes / "
        "steps | Wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in results.iterrows():
        lines.append(
            f"| {r['cell']} | {r['status']} | {_number(r['eval_return'])} ± "
            f"{_number(r['eval_return_std'])} | {_number(r['human_normalized'], 3)} | "
            f"{_number(r['relative_to_dataset'], 2)} | {_number(r['task_adherence'], 2)} | "
            f"{_number(r['n_train_episodes'], 0)} / {_number(r['n_train_steps'], 0)} | "
            f"{_number(r['wall_seconds'], 0)} |"
        )
    failed = results[results["status"] != "done"]
    lines += ["", "## Failed cells", ""]
    if len(failed):
        lines += ["| Cell | Status | Error |", "|---|---|---|"]
        for _, r in failed.iterrows():
            error = str(r["error"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['cell']} | {r['status']} | {error} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, grid: GridConfig, cells: Sequence[Cell], rows: Sequence[dict], run_seconds: float
) -> None:
    """results.csv, aggregate.csv, learning_curves.png, bars.png, summary.md under `out`."""
    import pandas as pd

    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    results.to_csv(out / "results.csv", index=False)
    table = aggregate(results)
    table.to_csv(out / "aggregate.csv", index=False)
    plot_learning_curves(read_curves(out / "cells", cells), out / "learning_curves.png")
    plot_bars(table, out / "bars.png")
    (out / "summary.md").write_text(summary_markdown(grid, results, table, run_seconds))


# -- 6. Command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The grid's flags (also `crowdplay-minari bench`). Later sources override earlier ones:
    GridConfig defaults (CrowdPlay's settings) < `--preset` < `--grid` < flags."""
    a = parser.add_argument
    a("--preset", choices=PRESETS, help="paper: CrowdPlay's grid; smoke: a tiny pipeline check")
    a("--grid", type=Path, help="a YAML/TOML grid file of GridConfig fields")
    a("--algorithms", help=f"comma list of {','.join(ALGORITHMS)}")
    a(
        "--datasets",
        nargs="+",
        action="extend",
        metavar="SPEC",
        help="DATASET_ID_OR_NAMESPACE[:key=value,...] (filters: " + ", ".join(FILTER_KEYS) + ")",
    )
    a("--seeds", help="comma list of seeds, e.g. 0,1,2")
    a("--steps", type=int, help="gradient steps per cell (CrowdPlay: 1000000)")
    a("--steps-per-epoch", type=int, help="steps between checkpoints (CrowdPlay: 1000)")
    a("--batch-size", type=int, help="override the table's batch size (256)")
    a("--n-frames", type=int, help="stacked frames (4)")
    a("--test-size", type=float, help="held-out share of episodes (0.1)")
    a("--heldout-steps", type=int, help="held-out transitions scored per epoch (10000; 0: off)")
    a("--eval-episodes", type=int, help="evaluation episodes per cell (10)")
    a("--eval-max-frames", type=int, help="raw frames per evaluation episode (108000)")
    a("--eval-noop-max", type=int, help="most random NOOP steps at an episode start (30)")
    a("--epoch-eval-episodes", type=int, help="episodes played after every epoch (0)")
    a("--device", help="cpu:0 or cuda:0")
    a("--workers", type=int, help="cells at once (1)")
    a("--backend", choices=("process", "ray"), help="process pool (default) or Ray")
    a("--ray-address", help="Ray cluster address (default: a local Ray)")
    a("--gpus-per-cell", type=float, help="Ray: GPUs reserved per cell")
    a("--out", help="output directory (default runs/offline_atari[/<preset>])")
    a("--list", action="store_true", help="print the cells and their status, run nothing")


def grid_from_args(args: argparse.Namespace) -> GridConfig:
    """GridConfig defaults < preset < grid file < flags."""
    fields: dict[str, Any] = {}
    if args.preset:
        fields.update(load_grid_file(GRIDS_DIR / f"{args.preset}.yaml"))
    if args.grid:
        fields.update(load_grid_file(args.grid))
    flags = {
        name: getattr(args, name) for name in _GRID_FIELDS if getattr(args, name, None) is not None
    }
    fields.update(coerce_grid_fields(flags, source="command line"))
    return GridConfig(**fields)


def run(args: argparse.Namespace) -> int:
    """Run the grid the arguments describe; 0 if every cell is done, 1 otherwise."""
    try:
        grid = grid_from_args(args)
        if args.list:
            cells_root = Path(grid.out) / "cells"
            for cell in grid.cells():
                status = read_status(cells_root / cell.name)
                state, runs = status.get("status", "pending"), status.get("runs", 0)
                print(f"{state:8s} runs={runs}  {cell.name}")
            return 0
        rows = run_grid(grid)
    except GridError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(row["status"] == "done" for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crowdplay_minari.benchmarks.offline_atari",
        description="Offline RL grid on CrowdPlay data (d3rlpy 2.8): "
        "algorithms x dataset selections x seeds, resumable.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # Run from the importable module, so that spawned workers unpickle the same classes.
    from crowdplay_minari.benchmarks.offline_atari import main as _main

    sys.exit(_main())
