"""Results: the results table, aggregates with bootstrap CIs and IQM, learning-curve and bar
plots, the markdown summary."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crowdplay_minari import files

from .algorithms import ALGORITHMS
from .cell import RESULT_COLUMNS
from .grid import Cell, GridConfig

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
    """Interquartile mean: the mean of the middle half (`floor(n/4)` values cut at each end,
    `scipy.stats.trim_mean(x, 0.25)`); NaN for fewer than `min_values` finite values."""
    from scipy.stats import trim_mean

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < min_values:
        return math.nan
    return float(trim_mean(x, 0.25))


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


def read_curves(cells_root: Path, cells: Sequence[Cell], notes: list[str] | None = None) -> Any:
    """Every cell's curve.jsonl as one DataFrame (step, loss, held-out match, eval return).
    Lines a crash tore are left out and named in `notes`."""
    import pandas as pd

    frames = []
    for cell in cells:
        points, problem = files.read_jsonl(cells_root / cell.name / "curve.jsonl")
        if problem and notes is not None:
            notes.append(problem)
        points = [p for p in points if isinstance(p, dict) and "step" in p]
        if not points:
            continue
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


def summary_markdown(
    grid: GridConfig, results, table, run_seconds: float, notes: Sequence[str] = ()
) -> str:
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
    if notes:
        lines += ["", "## Damaged files", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, grid: GridConfig, cells: Sequence[Cell], rows: Sequence[dict], run_seconds: float
) -> None:
    """results.csv, aggregate.csv, learning_curves.png, bars.png, summary.md under `out`."""
    import pandas as pd

    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    files.write_text(out / "results.csv", results.to_csv(index=False))
    table = aggregate(results)
    files.write_text(out / "aggregate.csv", table.to_csv(index=False))
    notes: list[str] = []
    curves = read_curves(out / "cells", cells, notes)
    for plot, name, data in ((plot_learning_curves, "learning_curves.png", curves),
                             (plot_bars, "bars.png", table)):  # fmt: skip
        partial = out / f".{name}.part.png"
        plot(data, partial)
        os.replace(partial, out / name)
    summary = summary_markdown(grid, results, table, run_seconds, notes)
    files.write_text(out / "summary.md", summary)
