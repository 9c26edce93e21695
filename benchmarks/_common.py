"""What the reader and conversion benchmarks share: a fresh sample, interleaved timing, tables.

The benchmarks run on busy two-core machines, so absolute times say little. Every benchmark
measures its baseline in the same run, interleaves the cases (each round runs every case once, in
a rotated order, so slow spells hit all of them alike), repeats the rounds, and reports medians
and ratios against the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crowdplay_minari import files
from crowdplay_minari.sample import generate_sample

ALL_ENCODINGS = (".pickle.bz2", ".pickle.gz", ".pickle")


def parser(description: str, *, repeats: int) -> argparse.ArgumentParser:
    """The options both benchmarks take."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--episodes", type=int, default=8, help="episodes in the sample")
    p.add_argument("--frames", type=int, default=1500, help="max frames per episode")
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds per case")
    p.add_argument("--seed", type=int, default=0, help="sample seed")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)"
    )
    return p


def run_config(args: argparse.Namespace) -> dict:
    """The options `parser` took, and the CPU count, as a results' `config` entry."""
    return {
        "episodes": args.episodes,
        "frames": args.frames,
        "repeats": args.repeats,
        "seed": args.seed,
        "cpus": os.cpu_count(),
    }


@contextlib.contextmanager
def scratch_dir(path: Path | None) -> Iterator[Path]:
    """`path` (created, kept) or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="crowdplay-bench-") as tmp:
        yield Path(tmp)


def process_memory() -> dict[str, int]:
    """This process's memory fields of `/proc/self/status` (VmHWM, VmRSS, RssAnon, RssFile,
    VmData, ...), in bytes; empty where there is no /proc."""
    values = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) == 2 and fields[1] == "kB":
                values[name] = int(fields[0]) * 1024
    return values


@contextlib.contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Put these environment variables back as they were (a run points them at its work dir)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def native_output_to(path: str | os.PathLike, mode: str = "ab") -> Iterator[None]:
    """Point file descriptors 1 and 2 at `path`: the emulators and d3rlpy print from native code,
    past `sys.stdout`. Worker processes started inside inherit the redirection."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, mode) as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def quiet_native_output() -> contextlib.AbstractContextManager[None]:
    """Silence file descriptors 1 and 2 (see `native_output_to`)."""
    return native_output_to(os.devnull, "wb")


def make_sample(
    out_dir: Path, *, seed: int, episodes: int, frames: int, encodings: Sequence[str], workers: int
) -> dict:
    """Play a fresh emulator sample into `out_dir` (replaced if present); returns its summary
    (`episodes`, `frames`, `seconds`, `frames_per_second`)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with quiet_native_output():
        return generate_sample(
            out_dir,
            seed=seed,
            episodes=episodes,
            max_frames=frames,
            encodings=tuple(encodings),
            workers=workers,
        )


@dataclass
class Timings:
    """Per case, the wall seconds and the CPU seconds (this process and its finished children:
    a pool's workers count once the pool is shut down) of each round."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, log: Callable[[str], None] = print
) -> Timings:
    """Time each case over `repeats` rounds; round r runs the cases rotated by r.

    CPU seconds barely notice other users' processes (unlike wall seconds, which grow with every
    process competing for the cores), so they make a steadier ratio between single-process cases.
    """
    names = list(cases)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()  # garbage of the previous case is not this case's cost
            cpu_started, started = _cpu_seconds(), time.perf_counter()
            cases[name]()
            timings.wall[name].append(time.perf_counter() - started)
            timings.cpu[name].append(_cpu_seconds() - cpu_started)
            log(
                f"  round {r + 1}/{repeats} {name}: {timings.wall[name][-1]:.2f} s "
                f"(CPU {timings.cpu[name][-1]:.2f} s)"
            )
    return timings


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(value: float, target: float, *, at_most: bool = False) -> str:
    """PASS or FAIL of `value` against a `target` minimum (or maximum with `at_most`)."""
    ok = value <= target if at_most else value >= target
    return "PASS" if ok else "FAIL"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned with thousands separators."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(path: Path | None, results: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, results)
    print(f"\nresults written to {path}")
