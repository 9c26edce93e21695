"""The grid: resume, run the cells that are not done in a process pool or on Ray, then write
the reports."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crowdplay_minari import files
from crowdplay_minari.executors import ExecutorConfig, TaskLost, run_tasks

from .cell import (
    cell_config,
    is_done,
    jsonable,
    now,
    read_status,
    result_row,
    run_cell,
    update_status,
    write_json,
)
from .grid import Cell, GridConfig, GridError
from .reports import write_reports

# -- 4. The grid: resume, run cells in a process pool or on Ray ----------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per cell: `workers` cells share the machine


def _cell_in_worker(task: tuple[Cell, str]) -> dict[str, Any]:
    _init_worker()  # again: Ray workers have no initializer
    cell, cells_root = task
    return run_cell(cell, cells_root)


def _record_lost(cell: Cell, cells_root: Path, why: str) -> dict[str, Any]:
    """A cell whose worker died before it could record anything itself."""
    cell_dir = cells_root / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    row = {**result_row(cell, "failed"), "error": why}
    write_json(cell_dir / "result.json", row)
    update_status(cell_dir, status="failed", finished=now(), error=why, traceback=None)
    return row


def _run_cells(
    cells: Sequence[Cell], cells_root: Path, grid: GridConfig, report: Callable[[dict], None]
) -> None:
    """Cells in a pool of `workers` spawned processes (each imports torch and d3rlpy once, about
    10 s here, then runs cell after cell) or as Ray tasks. A lost worker (killed, out of memory)
    fails the cell it had started; cells it had not started go to a new pool. On a Ray cluster,
    OUT and the datasets folder must be on a shared file system (paths are passed as they are)."""
    config = ExecutorConfig(
        kind="ray" if grid.backend == "ray" else "local",
        workers=grid.workers,
        ray_address=grid.ray_address,
        start_method="spawn",
        initializer=_init_worker,
        gpus_per_task=grid.gpus_per_cell,
        env_vars={
            key: os.environ[key]
            for key in ("MINARI_DATASETS_PATH", "CROWDPLAY_MINARI_CACHE")
            if key in os.environ
        },
    )
    queue = list(cells)
    while queue:
        runs_before = {c.name: read_status(cells_root / c.name).get("runs", 0) for c in queue}
        tasks = [(cell, str(cells_root)) for cell in queue]
        queue = []
        for (cell, _), outcome in run_tasks(_cell_in_worker, tasks, config):
            if not isinstance(outcome, TaskLost):
                report(outcome)
            elif read_status(cells_root / cell.name).get("runs", 0) > runs_before[cell.name]:
                report(_record_lost(cell, cells_root, outcome.reason))  # it may be the culprit
            else:
                queue.append(cell)
        if queue and len(queue) == len(tasks):  # no cell even started: workers cannot start
            for cell in queue:
                report(_record_lost(cell, cells_root, "worker processes fail to start"))
            queue = []


def _result_of(cell: Cell, cells_root: Path) -> dict[str, Any]:
    """The cell's result.json, or a row saying why there is none (a torn file is named)."""
    result, problem = files.read_json(cells_root / cell.name / "result.json")
    if isinstance(result, dict):
        return result
    row = result_row(cell, read_status(cells_root / cell.name).get("status", "pending"))
    if problem and not problem.endswith("missing"):
        row.update(status="failed", error=f"result unreadable: {problem}")
    return row


def _check_identity(cells: Sequence[Cell], cells_root: Path) -> None:
    """A cell directory from an earlier run must describe the same cell."""
    for cell in cells:
        path = cells_root / cell.name / "config.json"
        config, _ = files.read_json(path)
        if not isinstance(config, dict):  # none yet, or torn by a crash: written afresh
            path.unlink(missing_ok=True)
            continue
        stored = dict(config.get("cell", {}))
        stored.pop("device", None)
        stored.pop("root", None)
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
    with files.exclusive(out / ".lock", f"the grid in {out}"):
        _check_identity(cells, cells_root)
        todo = [c for c in cells if not is_done(cells_root / c.name)]
        for cell in todo:
            cell_dir = cells_root / cell.name
            cell_dir.mkdir(exist_ok=True)
            if not (cell_dir / "config.json").exists():
                write_json(cell_dir / "config.json", cell_config(cell))
            if not (cell_dir / "status.json").exists():
                update_status(cell_dir, status="pending", runs=0)
        started = time.perf_counter()
        write_json(
            out / "grid.json",
            {"grid": jsonable(_grid_dict(grid)), "started": now(), "argv": sys.argv},
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

        if todo:
            _run_cells(todo, cells_root, grid, report)
        rows = [_result_of(c, cells_root) for c in cells]
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
