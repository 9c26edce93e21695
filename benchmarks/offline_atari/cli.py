"""The grid's command line (`python -m crowdplay_minari.benchmarks.offline_atari`, also
`crowdplay-minari bench`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowdplay_minari.cli import EXIT_USAGE, Parser, positive_int

from .algorithms import ALGORITHMS
from .cell import read_status
from .grid import (
    FILTER_KEYS,
    GRID_FIELDS,
    GRIDS_DIR,
    PRESETS,
    GridConfig,
    GridError,
    coerce_grid_fields,
    load_grid_file,
)
from .scheduling import run_grid

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
    a("--steps", type=positive_int, help="gradient steps per cell (CrowdPlay: 1000000)")
    a(
        "--steps-per-epoch",
        type=positive_int,
        help="steps between checkpoints (CrowdPlay: 1000; never more than --steps)",
    )
    a("--batch-size", type=int, help="override the table's batch size (256)")
    a("--n-frames", type=int, help="stacked frames (4)")
    a("--test-size", type=float, help="held-out share of episodes (0.1)")
    a("--heldout-steps", type=int, help="held-out transitions scored per epoch (10000; 0: off)")
    a("--eval-episodes", type=int, help="evaluation episodes per cell (10)")
    a("--eval-max-frames", type=int, help="raw frames per evaluation episode (108000)")
    a("--eval-noop-max", type=int, help="most random NOOP steps at an episode start (30)")
    a("--epoch-eval-episodes", type=int, help="episodes played after every epoch (0)")
    a("--device", help="cpu:0 or cuda:0")
    a("--workers", type=positive_int, help="cells at once (1)")
    a("--backend", choices=("process", "ray"), help="process pool (default) or Ray")
    a("--ray-address", help="Ray cluster address (default: a local Ray)")
    a("--gpus-per-cell", type=float, help="Ray: GPUs reserved per cell")
    a("--root", help="Minari datasets folder (default: $MINARI_DATASETS_PATH or Minari's)")
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
        name: getattr(args, name) for name in GRID_FIELDS if getattr(args, name, None) is not None
    }
    fields.update(coerce_grid_fields(flags, source="command line"))
    steps = fields.get("steps", GridConfig.steps)
    if "steps_per_epoch" not in fields and steps < GridConfig.steps_per_epoch:
        fields["steps_per_epoch"] = steps  # a short run is one epoch, not an error
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
        print(f"crowdplay-minari bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if all(row["status"] == "done" for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog="python -m crowdplay_minari.benchmarks.offline_atari",
        description="Offline RL grid on CrowdPlay data (d3rlpy 2.8): "
        "algorithms x dataset selections x seeds, resumable.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
