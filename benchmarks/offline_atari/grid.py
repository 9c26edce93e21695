"""What to run: dataset selections (`DatasetSpec`), the grid (`GridConfig`) and its cells
(`Cell`), and grid files (YAML/TOML presets shipped in `grids/`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS

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
    `crowdplay/space_invaders/insideout-player_0-v1:min_score=50,min_task_adherence=0.8` or
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
    root: str | None = None  # Minari datasets folder; None: $MINARI_DATASETS_PATH or Minari's

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
                root=None if self.root is None else str(Path(self.root).resolve()),
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
    root: str | None = None  # where the datasets are read from (not part of the result)

    @property
    def spec(self) -> DatasetSpec:
        return DatasetSpec.parse(self.dataset)

    @property
    def name(self) -> str:
        dataset, filters = self.spec.slugs
        return f"{self.algorithm}__{dataset}__{filters}__seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The fields a finished cell must share with a rerun's (the device and the datasets
        folder may change)."""
        fields = dataclasses.asdict(self)
        fields.pop("device")
        fields.pop("root")
        return fields


# Grid files and presets ------------------------------------------------------------------------

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
PRESETS = ("paper", "smoke")
GRID_FIELDS = {f.name for f in dataclasses.fields(GridConfig)}


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The fields a YAML (or TOML) grid file sets, coerced and checked, as `GridConfig` kwargs."""
    path = Path(path)
    if not path.exists():
        raise GridError(f"grid file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"grid file {path} cannot be read: {exc}") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GridError(f"{path}: not valid TOML ({exc})") from None
    else:
        import yaml

        try:  # safe_load: tags such as !!python/object/apply are refused, never run
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())
            raise GridError(f"{path}: not a plain YAML grid ({problem})") from None
    if not isinstance(raw, Mapping):
        raise GridError(f"{path}: a grid file is a mapping of GridConfig fields")
    return coerce_grid_fields(raw, source=str(path))


def coerce_grid_fields(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check field names and turn lists / comma strings into the tuples `GridConfig` takes."""
    unknown = sorted(set(raw) - GRID_FIELDS)
    if unknown:
        raise GridError(
            f"{source}: unknown field(s) {', '.join(unknown)}; "
            f"fields: {', '.join(sorted(GRID_FIELDS))}"
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
        elif key in ("device", "backend", "ray_address", "out", "root"):
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
