"""One cell: select, split, buffer, train (resumable from checkpoints), evaluate; its
status, config and result files."""

from __future__ import annotations

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
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from crowdplay_minari import files

from .algorithms import ALGORITHMS, make_algorithm
from .evaluation import play_episodes
from .grid import Cell, DatasetSpec, EmptySelectionError, GridError

# -- 3. One cell: select, split, buffer, train (resumable), evaluate ----------------------------


def select_episodes(spec: DatasetSpec, root: str | None = None):
    """The episodes of `spec` (metadata only); `EmptySelectionError` if none is left."""
    from crowdplay_minari.loading import load_dataset

    data = load_dataset(spec.dataset, root=root)
    selected = data.filter(**spec.filter_arguments())
    if len(selected) == 0:
        scores = sorted(e.score for e in data.episodes)
        raise EmptySelectionError(
            f"{spec}: no episode passes the filters ({len(data)} episodes in {spec.dataset}, "
            f"scores {scores[:1]}..{scores[-1:]})"
        )
    return selected.episodes


def train_and_evaluate(cell: Cell, cell_dir: Path, run_number: int) -> dict[str, Any]:
    """Train `cell` (from its latest checkpoint, if any) and evaluate it; returns its
    results row. Raises on any failure."""
    import d3rlpy

    from crowdplay_minari.d3rlpy_bridge import kept_frames, split_episodes, to_replay_buffer
    from crowdplay_minari.episode import player_index
    from crowdplay_minari.games import game_info, human_normalized_score, num_actions
    from crowdplay_minari.processing import ProcessingConfig

    d3rlpy.seed(cell.seed)
    spec = cell.spec
    processing = ProcessingConfig.d3rlpy_preset()

    # Data: the selection, a seeded 90/10 episode split, d3rlpy buffers.
    episodes = select_episodes(spec, cell.root)
    games = sorted({e.game for e in episodes})
    if len(games) != 1:
        raise GridError(f"{spec} selects several games ({', '.join(games)}); add game=...")
    game = games[0]
    tasks = sorted({e.task for e in episodes})
    task = tasks[0] if len(tasks) == 1 else None
    # Two-player data is evaluated in the two-player game, as the player the data recorded,
    # beside a partner that does nothing (named in results.csv).
    players = sorted({player_index(e.agent_id) for e in episodes})
    player = players[0] if len(players) == 1 else 0
    partner = "noop" if game_info(game).two_player else ""
    train, test = split_episodes(episodes, test_size=cell.test_size, seed=cell.seed)
    # Memory-mapped: a selection larger than RAM trains, and cells sharing it share one store.
    buffer = to_replay_buffer(
        train, processing, n_frames=cell.n_frames, action_size=num_actions(game), memory_map=True
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
            heldout,
            processing,
            n_frames=cell.n_frames,
            action_size=num_actions(game),
            memory_map=True,
        )
        evaluators["heldout_action_match"] = d3rlpy.metrics.DiscreteActionMatchEvaluator(
            episodes=heldout_buffer.episodes
        )
    n_train_steps = sum(kept_frames(e.num_steps, processing) for e in train)
    dataset_score_mean = float(np.mean([e.score for e in train]))

    # Model: fresh, or the latest checkpoint with its gradient step count.
    algo = make_algorithm(cell.algorithm, batch_size=cell.batch_size, device=cell.device)
    algo.build_with_dataset(buffer)
    write_json(
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
        player=player,
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
            files.append_jsonl(curve_path, point)
            save_checkpoint(algo, cell_dir, step)
            update_status(cell_dir, steps_done=step)
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
        "player": player,
        "partner": partner,
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
    write_json(cell_dir / "eval.json", {**summary, "episodes": played})
    return summary


# Checkpoints, status and small files ------------------------------------------------------------


def cell_config(cell: Cell) -> dict[str, Any]:
    """What config.json holds before the cell has run (it adds d3rlpy's config, game, task)."""
    return {
        "cell": dataclasses.asdict(cell),
        "name": cell.name,
        "table_row": jsonable(dataclasses.asdict(ALGORITHMS[cell.algorithm])),
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
    points, problem = files.read_jsonl(path)
    kept = [p for p in points if isinstance(p, dict) and p.get("step", steps + 1) <= steps]
    if problem or len(kept) != len(points):  # also drops a line a crash tore
        files.write_text(path, "".join(json.dumps(p) + "\n" for p in kept))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    files.write_json(path, jsonable(data))


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_status(cell_dir: Path) -> dict[str, Any]:
    """The cell's status.json; `{"status": "pending", "runs": 0}` when there is none."""
    status, _ = files.read_json(cell_dir / "status.json")
    if isinstance(status, dict):
        return status
    return {"status": "pending", "runs": 0}  # none yet, or torn: the cell runs (again)


def update_status(cell_dir: Path, **changes: Any) -> dict[str, Any]:
    status = {**read_status(cell_dir), **changes}
    write_json(cell_dir / "status.json", status)
    return status


def is_done(cell_dir: Path) -> bool:
    result, _ = files.read_json(cell_dir / "result.json")
    return read_status(cell_dir).get("status") == "done" and isinstance(result, dict)


def _output_to(path: Path) -> contextlib.AbstractContextManager[None]:
    """Send this process's stdout and stderr (file descriptors, so d3rlpy's and ALE's output
    too) to `path` while a cell runs."""
    from .._common import native_output_to

    return native_output_to(path, "a")


def run_cell(cell: Cell, cells_root: str | Path) -> dict[str, Any]:
    """Run one cell to `done` or `failed` (never raises) and return its results row."""
    cell_dir = Path(cells_root) / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(cell_dir)
    run_number = int(previous.get("runs", 0)) + 1
    status = update_status(
        cell_dir,
        status="running",
        runs=run_number,
        started=now(),
        finished=None,
        host=socket.gethostname(),
        pid=os.getpid(),
        error=None,
        traceback=None,
    )
    started = time.perf_counter()
    row = result_row(cell, "running")
    try:
        with _output_to(cell_dir / "cell.log"):
            print(f"== {now()} run {run_number} of {cell.name}", flush=True)
            row.update(train_and_evaluate(cell, cell_dir, run_number))
        row["status"] = "done"
        error = trace = None
    except Exception as exc:  # a crashing cell is recorded; the grid goes on
        row["status"] = "failed"
        error, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    seconds = time.perf_counter() - started
    wall = float(status.get("wall_seconds") or 0.0) + seconds
    row.update(wall_seconds=round(wall, 2), error=error)
    write_json(cell_dir / "result.json", row)
    update_status(
        cell_dir,
        status=row["status"],
        finished=now(),
        last_run_seconds=round(seconds, 2),
        wall_seconds=round(wall, 2),
        error=error,
        traceback=trace,
    )
    return row


RESULT_COLUMNS = (
    "algorithm", "dataset", "filter", "seed", "steps", "eval_return", "eval_return_std",
    "human_normalized", "relative_to_dataset", "task_adherence", "n_train_episodes",
    "n_train_steps", "wall_seconds", "status", "game", "task", "player", "partner",
    "dataset_score_mean",
    "n_test_episodes", "eval_episodes", "cell", "error",
)  # fmt: skip


def result_row(cell: Cell, status: str) -> dict[str, Any]:
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
