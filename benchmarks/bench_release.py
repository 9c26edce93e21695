"""The converter and loader at release scale, on a synthetic slice of CrowdPlay's release.

    python -m crowdplay_minari.benchmarks.bench_release --frames 1000000 --out release.json

CrowdPlay's release is ~470 hours, ~100 million raw 60 Hz frames. A machine that cannot hold
it can still measure how the converter behaves on millions of frames and thousands of episodes:
1. **the slice**: a fresh emulator sample (short episodes of every game CrowdPlay recorded,
   single-player, two-player human+human and human+AI) is replicated under new episode,
   environment and user ids, the trajectory files hard-linked (copied where links fail) and
   the metadata rows written again through the project's raw writer, until the slice holds
   `--frames` raw frames. Each game gets the share of the frames it has in the release
   (`RELEASE_HOURS`), so the mix of one- and two-agent frames is the release's.
2. **conversion**: `conversion.convert` of a sub-slice (`--sub-frames`, a quarter of the slice
   by default) with 1 worker (the baseline) and with `--workers` workers, in interleaved rounds;
   then of the whole slice with `--workers` workers. Reported: raw frames/s per worker, the
   speed-up over 1 worker and its efficiency (speed-up / workers), the peak memory (VmHWM) of
   every pool worker and of the driver at both slice sizes, the single publishing thread's
   rate, the output's bytes per raw and per agent frame, and the peak bytes under the datasets
   root during the run (staged episodes and published datasets side by side).
3. **loading**: `load_dataset("crowdplay")` over the whole converted slice, cold (a fresh cache
   folder: the episode attributes read through h5py and the metadata index written) and warm
   (from the index), a `filter(game=..., min_score=...)` of it and its `metadata_table()`, in
   interleaved rounds.
4. **projection** to the release's 100 million raw frames on 1, 16 and 64 cores: wall time at
   the measured 1-worker rate, scaled linearly at the measured efficiency of `--workers` workers
   (a 2-core machine cannot confirm anything beyond 2), never below the time the one
   publishing thread needs at its measured rate; disk from the measured bytes per raw frame.

Caveats the numbers carry: a hard-linked slice reads the same few trajectory files again and
again, from the page cache (reading 15 GB from a disk costs on top, but at a few hundred KB/s
per worker it hardly matters); the replicated episodes are short (`--sample-frames`), so
per-episode costs weigh more than in the release, where episodes run for minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import random
import shutil
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import crowdplay_minari.conversion.convert as convert_module
from crowdplay_minari.conversion.convert import ConversionConfig, EpisodeJob, convert
from crowdplay_minari.episode import EpisodeMetadata
from crowdplay_minari.games import game_info
from crowdplay_minari.loading import CACHE_ENV, load_dataset
from crowdplay_minari.raw import RawDataset, load_steps
from crowdplay_minari.raw.writer import RawDatasetWriter
from crowdplay_minari.sample import DEFAULT_SESSIONS, SessionSpec, generate_sample

from ._common import (
    interleaved,
    median,
    process_memory,
    quiet_native_output,
    scratch_dir,
    table,
    write_json,
)
from .bench_conversion import converted_sizes

RELEASE_FRAMES = 100_000_000
"""Raw 60 Hz frames in CrowdPlay's release (~470 hours)."""
RELEASE_HOURS = {
    "space_invaders": 323.0,
    "space_invaders_2p": 7.5,  # human + human
    "space_invaders_ai": 59.0,  # human + AI partner
    "montezuma_revenge": 25.0,
    "riverraid": 25.0,
    "breakout": 10.0,  # Breakout, Q*bert and Beam Rider: 8-12 hours each
    "qbert": 10.0,
    "beam_rider": 10.0,
}
"""Hours of play per game in the release: the slice gives each game this share of its frames."""
PROJECTED_CORES = (1, 16, 64)

SESSIONS: tuple[SessionSpec, ...] = (
    *DEFAULT_SESSIONS,
    SessionSpec("montezuma_revenge_mturk", "montezuma_revenge", "plain", "mturk"),
    SessionSpec("breakout_mturk", "breakout", "plain", "mturk"),
    SessionSpec("beam_rider_email", "beam_rider", "plain", "email"),
)
"""The sample's sessions: the default sample's (every kind of game and control) plus the games
it leaves out, so that every game of the release is in the slice."""

GIB = 1 << 30
MIB = 1 << 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1_000_000, help="raw frames in the slice")
    p.add_argument(
        "--sub-frames",
        type=int,
        default=None,
        help="raw frames of the sub-slice converted with 1 and --workers workers "
        "(default: a quarter of --frames)",
    )
    p.add_argument("--sample-frames", type=int, default=300, help="max frames per sample episode")
    p.add_argument(
        "--sample-episodes",
        type=int,
        default=2 * len(SESSIONS),
        help=f"episodes in the sample (cycled over its {len(SESSIONS)} sessions)",
    )
    p.add_argument("--workers", type=int, default=2, help="workers compared with 1")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds on the sub-slice")
    p.add_argument("--seed", type=int, default=0, help="sample and id seed")
    p.add_argument("--out", "--json", dest="out", type=Path, default=None, help="results JSON")
    p.add_argument(
        "--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)"
    )
    args = p.parse_args(argv)
    if args.sub_frames is None:
        args.sub_frames = args.frames // 4
    if args.workers < 2:
        p.error("--workers must be at least 2 (it is compared with 1 worker)")
    if not 0 < args.sub_frames <= args.frames:
        p.error("--sub-frames must be positive and at most --frames")
    return args


# -- the slice -----------------------------------------------------------------------------------


def kind_of(game: str) -> str:
    info = game_info(game)
    if not info.two_player:
        return "1 player"
    return "human + AI" if info.ai_partner else "human + human"


@dataclasses.dataclass(frozen=True)
class SampleEpisode:
    metadata: EpisodeMetadata
    trajectory: Path
    frames: int


def read_sample(sample_dir: Path) -> dict[str, list[SampleEpisode]]:
    """The sample's episodes grouped by environment (a participant's session), with their
    trajectory files and frame counts."""
    raw = RawDataset(sample_dir)
    sessions: dict[str, list[SampleEpisode]] = defaultdict(list)
    for episode_id, meta in sorted(raw.metadata().items()):
        path = raw.trajectory_path(episode_id)
        sessions[meta.environment_id].append(SampleEpisode(meta, path, len(load_steps(path))))
    return dict(sessions)


def copies_per_game(sessions: dict[str, list[SampleEpisode]], frames: int) -> dict[str, int]:
    """How many times each game's sample sessions are replicated so that the slice holds at least
    `frames` raw frames, each game its share of the release's hours (at least once each)."""
    sample_frames: Counter[str] = Counter()
    for episodes in sessions.values():
        sample_frames[episodes[0].metadata.game] += sum(e.frames for e in episodes)
    hours = {game: RELEASE_HOURS.get(game, 0.0) for game in sample_frames}
    total_hours = sum(hours.values())
    return {
        game: max(1, math.ceil(frames * hours[game] / total_hours / sample_frames[game]))
        for game in sorted(sample_frames)
    }


def _link(source: Path, target: Path) -> bool:
    """Hard-link `source` to `target` (True), or copy it where the file system refuses (False)."""
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def build_slice(
    sessions: dict[str, list[SampleEpisode]], slice_dir: Path, frames: int, seed: int
) -> dict:
    """Replicate the sample's sessions into `slice_dir` under fresh ids: per copy a new
    environment (same task and keyword data), new user rows (new `user_id`, same permanent id)
    and new episodes (same keyword data) whose trajectory files are links to the sample's.
    The trajectory files hold no ids, so a linked file is the new episode's own."""
    if slice_dir.exists():
        shutil.rmtree(slice_dir)
    rng = random.Random(seed)

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    started = time.perf_counter()
    copies = copies_per_game(sessions, frames)
    writer = RawDatasetWriter(slice_dir)
    per_game: dict[str, Counter] = defaultdict(Counter)
    linked = copied = 0
    for environment_id in sorted(sessions):
        episodes = sessions[environment_id]
        first = episodes[0].metadata
        for _ in range(copies[first.game]):
            environment = new_id()
            writer.add_environment(environment, first.task_id, first.environment_keyword_data)
            writer.add_users(
                dataclasses.replace(
                    user,
                    user_id=hashlib.sha256(rng.getrandbits(256).to_bytes(32, "big")).hexdigest(),
                    environment_id=environment,
                )
                for user in first.users.values()
            )
            for episode in episodes:
                meta = dataclasses.replace(
                    episode.metadata, episode_id=new_id(), environment_id=environment, users={}
                )
                suffix = episode.trajectory.name[len(episode.metadata.episode_id) :]
                if _link(episode.trajectory, slice_dir / f"{meta.episode_id}{suffix}"):
                    linked += 1
                else:
                    copied += 1
                writer.add_episode_rows(meta)
                counts = per_game[meta.game]
                counts["episodes"] += 1
                counts["frames"] += episode.frames
                counts["agent_frames"] += episode.frames * game_info(meta.game).players
                counts["bz2_bytes"] += episode.trajectory.stat().st_size
    games = {
        game: {"kind": kind_of(game), "copies": copies[game], **counts}
        for game, counts in sorted(per_game.items())
    }
    return {
        "episodes": sum(g["episodes"] for g in games.values()),
        "frames": sum(g["frames"] for g in games.values()),
        "agent_frames": sum(g["agent_frames"] for g in games.values()),
        "bz2_bytes": sum(g["bz2_bytes"] for g in games.values()),
        "environments": sum(copies[e[0].metadata.game] for e in sessions.values()),
        "linked_files": linked,
        "copied_files": copied,
        "seconds": time.perf_counter() - started,
        "games": games,
    }


# -- instrumented conversion ---------------------------------------------------------------------

_stage_episode = convert_module.stage_episode  # the converter's own, before any patching


def _reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def stage_recording_memory(job: EpisodeJob):
    """`stage_episode` in a pool worker, noting the worker's peak RSS before and after."""
    before = process_memory().get("VmHWM", 0)
    result = _stage_episode(job)
    after = process_memory()
    result.worker_memory = (os.getpid(), before, after.get("VmHWM", 0), after.get("VmRSS", 0))
    return result


@dataclasses.dataclass
class RunRecord:
    """What one instrumented conversion saw."""

    staging_started: float = 0.0
    staging_seconds: float = 0.0
    episode_seconds: float = 0.0
    worker_memory: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    """(pid, VmHWM before, VmHWM after, VmRSS after) of each episode, in finishing order."""
    publishes: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    """(seconds, agent frames) of each dataset published."""
    peak_root_bytes: int = 0


@contextlib.contextmanager
def instrumented(record: RunRecord) -> Iterator[None]:
    """Patch the converter's staging phase, its workers' task and its publishing step to fill
    `record` (like `bench_conversion.staging_timer`)."""
    stage_all, publish = convert_module._stage_all, convert_module._publish

    def timed_stage_all(jobs: list[EpisodeJob], config: ConversionConfig) -> Iterator:
        record.staging_started = started = time.perf_counter()
        for result in stage_all(jobs, config):
            record.episode_seconds += result.seconds
            if hasattr(result, "worker_memory"):
                record.worker_memory.append(result.worker_memory)
            yield result
        record.staging_seconds = time.perf_counter() - started

    def timed_publish(*args, **kwargs) -> dict:
        started = time.perf_counter()
        published = publish(*args, **kwargs)
        record.publishes.append((time.perf_counter() - started, published["steps"]))
        return published

    convert_module._stage_all, convert_module._publish = timed_stage_all, timed_publish
    convert_module.stage_episode = stage_recording_memory
    try:
        yield
    finally:
        convert_module._stage_all, convert_module._publish = stage_all, publish
        convert_module.stage_episode = _stage_episode


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


@contextlib.contextmanager
def watch_disk(root: Path, record: RunRecord, every: float = 1.0) -> Iterator[None]:
    """Sample the bytes under `root` every `every` seconds; the largest goes in `record`."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every):
            record.peak_root_bytes = max(record.peak_root_bytes, _tree_bytes(root))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        record.peak_root_bytes = max(record.peak_root_bytes, _tree_bytes(root))


def convert_once(raw_dir: Path, root: Path, workers: int) -> dict:
    """Convert `raw_dir` into the fresh datasets root `root`, instrumented."""
    record = RunRecord()
    driver_reset = _reset_peak_memory()
    started = time.perf_counter()
    with instrumented(record), watch_disk(root, record):
        report = convert(
            ConversionConfig(raw_dir, root=root, workers=workers, progress=False),
            log=lambda message: None,
        )
    seconds = time.perf_counter() - started
    planning = record.staging_started - started
    if not report.ok:
        raise RuntimeError(f"conversion skipped episodes: {report.skipped[:3]}")
    frames = report.frames_converted
    return {
        "workers": workers,
        "root": str(root),
        "episodes_total": report.episodes_total,
        "episodes_converted": report.episodes_converted,
        "frames_converted": frames,
        "datasets": len(report.datasets),
        "seconds": seconds,
        "frames_per_second": frames / seconds,
        "frames_per_second_per_worker": frames / seconds / workers,
        "planning_seconds": planning,
        "staging_seconds": record.staging_seconds,
        "staging_frames_per_second": frames / record.staging_seconds,
        "after_staging_seconds": seconds - record.staging_seconds - planning,
        "episode_seconds": record.episode_seconds,
        "publish": _publish_summary(record.publishes),
        "worker_memory": _worker_memory_summary(record.worker_memory),
        "driver_peak_bytes": process_memory().get("VmHWM", 0) if driver_reset else None,
        "peak_root_bytes": record.peak_root_bytes,
        "final_root_bytes": _tree_bytes(root),
    }


def _publish_summary(publishes: list[tuple[float, int]]) -> dict:
    seconds = sum(s for s, _ in publishes)
    agent_frames = sum(n for _, n in publishes)
    return {
        "datasets": len(publishes),
        "seconds": seconds,
        "agent_frames": agent_frames,
        "agent_frames_per_second": agent_frames / seconds if seconds else 0.0,
        "largest_seconds": max((s for s, _ in publishes), default=0.0),
    }


def _worker_memory_summary(records: list[tuple[int, int, int, int]]) -> dict:
    """Per pool worker (pid): its VmHWM before its first episode (a forked worker starts with
    the driver's resident pages) and after its last; the largest VmHWM after each quarter of
    the episodes (in finishing order): level when nothing accumulates from episode to episode."""
    first_before: dict[int, int] = {}
    peak: dict[int, int] = {}
    last_rss: dict[int, int] = {}
    for pid, before, after, rss in records:
        first_before.setdefault(pid, before)
        peak[pid] = max(peak.get(pid, 0), after)
        last_rss[pid] = rss
    n = len(records)
    return {
        "workers": len(peak),
        "episodes": n,
        "peak_bytes": max(peak.values()),
        "start_bytes": max(first_before.values()),
        "growth_bytes": max(peak[pid] - first_before[pid] for pid in peak),
        "peak_by_quarter_bytes": [
            max(after for _, _, after, _ in records[: max(1, n * k // 4)]) for k in (1, 2, 3, 4)
        ],
        "final_rss_bytes": max(last_rss.values()),
        "per_worker_peak_bytes": sorted(peak.values()),
    }


# -- loading -------------------------------------------------------------------------------------


@contextlib.contextmanager
def cache_dir(path: Path) -> Iterator[None]:
    """Point the loader's caches (processed trajectories, metadata index) at `path`."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous


def loading_timings(root: Path, caches: Path, repeats: int) -> dict:
    """`load_dataset` of every dataset under `root` cold (a fresh cache folder: attributes read
    through h5py, the metadata index written) and warm (from the index), a filter and the
    metadata table. The caches go under `caches`, never the user's."""
    rounds = iter(range(1 << 30))
    with cache_dir(caches / "warm" / "processed"):
        data = load_dataset("crowdplay", root=root)
    invaders = sorted(e.score for e in data if e.game == "space_invaders")
    min_score = statistics.median(invaders) if invaders else 0.0
    out: dict = {}

    def load_cold() -> None:
        with cache_dir(caches / f"cold-{next(rounds)}" / "processed"):
            out["loaded_cold"] = len(load_dataset("crowdplay", root=root))

    def load() -> None:
        with cache_dir(caches / "warm" / "processed"):
            out["loaded"] = len(load_dataset("crowdplay", root=root))

    def filter_() -> None:
        out["filtered"] = len(data.filter(game="space_invaders", min_score=min_score))

    def metadata_table() -> None:
        out["table_rows"] = len(data.metadata_table())

    cases = {
        "load_dataset (cold)": load_cold,
        "load_dataset": load,
        "filter": filter_,
        "metadata_table": metadata_table,
    }
    timings = interleaved(cases, repeats, log=lambda message: None)
    if not out["loaded_cold"] == out["loaded"] == len(data):
        raise AssertionError("cold and warm loads saw different episodes")
    seconds = {name: median(values) for name, values in timings.wall.items()}
    return {
        "episodes": len(data),
        "datasets": len({e.dataset_id for e in data}),
        "filter": {"game": "space_invaders", "min_score": min_score, "kept": out["filtered"]},
        "table_rows": out["table_rows"],
        "seconds": seconds,
        "microseconds_per_episode": {n: s / len(data) * 1e6 for n, s in seconds.items()},
        "rounds": timings.wall,
    }


# -- projection ----------------------------------------------------------------------------------


def project(
    per_worker_fps: float,
    efficiency: float,
    publish_agent_fps: float,
    agent_frames_per_raw_frame: float,
    sizes: dict,
    transient_bytes_per_raw_frame: float,
    raw_frames: int = RELEASE_FRAMES,
    cores: Sequence[int] = PROJECTED_CORES,
) -> dict:
    """Wall time and disk of converting `raw_frames`: linear in cores at `efficiency` (1 for one
    core; a measured efficiency above 1 is noise and counts as 1), never faster than one
    publishing thread at `publish_agent_fps`. Disk: the frames' bytes scale with frames, the
    datasets' metadata.json is a fixed cost (the slice's datasets are counted)."""
    efficiency = min(1.0, efficiency)
    publish_floor = raw_frames * agent_frames_per_raw_frame / publish_agent_fps
    rows = []
    for n in cores:
        used = 1.0 if n == 1 else efficiency
        fps = per_worker_fps * n * used
        staging = raw_frames / fps
        rows.append(
            {
                "cores": n,
                "efficiency": used,
                "frames_per_second": fps,
                "linear_hours": staging / 3600,
                "publish_floor_hours": publish_floor / 3600,
                "hours": max(staging, publish_floor) / 3600,
                "bound_by": "publishing" if publish_floor > staging else "workers",
            }
        )
    output = raw_frames * sizes["main_data_bytes_per_raw_frame"] + sizes["metadata_json_bytes"]
    return {
        "raw_frames": raw_frames,
        "assumption": (
            "linear scaling in cores at the efficiency measured with the compared workers "
            "(speed-up / workers; unconfirmed beyond the measured count), bounded below by "
            "the one publishing thread at its measured rate; sizes per raw frame as measured"
        ),
        "per_worker_frames_per_second": per_worker_fps,
        "efficiency": efficiency,
        "publish_agent_frames_per_second": publish_agent_fps,
        "cores": rows,
        "input_bz2_bytes": raw_frames * sizes["bz2_bytes_per_raw_frame"],
        "output_bytes": output,
        "peak_disk_bytes": output + raw_frames * transient_bytes_per_raw_frame,
    }


# -- the run -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {
        "config": {
            "frames": args.frames,
            "sub_frames": args.sub_frames,
            "sample_frames": args.sample_frames,
            "sample_episodes": args.sample_episodes,
            "workers": args.workers,
            "repeats": args.repeats,
            "seed": args.seed,
            "cpus": os.cpu_count(),
        }
    }
    seconds: dict[str, float] = {}
    with scratch_dir(args.workdir) as work:
        print(f"playing a sample of {args.sample_episodes} episodes ...", flush=True)
        started = time.perf_counter()
        sample_dir = work / "sample"
        if sample_dir.exists():
            shutil.rmtree(sample_dir)
        with quiet_native_output():
            summary = generate_sample(
                sample_dir,
                seed=args.seed,
                episodes=args.sample_episodes,
                max_frames=args.sample_frames,
                sessions=SESSIONS,
                workers=min(2, os.cpu_count() or 1),
            )
        sessions = read_sample(sample_dir)
        results["sample"] = {
            "episodes": len(summary["episodes"]),
            "frames": summary["frames"],
            "environments": len(sessions),
        }
        seconds["sample"] = time.perf_counter() - started

        print(f"building slices of {args.sub_frames:,} and {args.frames:,} raw frames ...")
        sub_dir, full_dir = work / "slice-sub", work / "slice-full"
        results["sub_slice"] = build_slice(sessions, sub_dir, args.sub_frames, args.seed + 1)
        results["slice"] = build_slice(sessions, full_dir, args.frames, args.seed + 2)
        seconds["slices"] = results["sub_slice"]["seconds"] + results["slice"]["seconds"]

        roots = work / "datasets"
        if roots.exists():
            shutil.rmtree(roots)
        # Untimed: the first conversion of a process pays for imports and per-game caches.
        workers = args.workers
        convert_once(sample_dir, roots / "warm-up", workers)
        sub_frames = results["sub_slice"]["frames"]
        print(
            f"converting the sub-slice ({sub_frames:,} frames) with 1 and {workers} workers, "
            f"{args.repeats} interleaved round(s) ...",
            flush=True,
        )
        runs: dict[str, list[dict]] = {"1_worker": [], f"{workers}_workers": []}

        def case(name: str, n: int):
            def run() -> None:
                root = roots / f"sub-{name}-run-{len(runs[name])}"
                runs[name].append(convert_once(sub_dir, root, n))

            return run

        interleaved(
            {name: case(name, n) for name, n in (("1_worker", 1), (f"{workers}_workers", workers))},
            args.repeats,
            log=lambda message: print(message, flush=True),
        )
        sub = {name: _median_run(r) for name, r in runs.items()}
        one, many = sub["1_worker"], sub[f"{workers}_workers"]
        speedup = many["frames_per_second"] / one["frames_per_second"]
        results["sub_slice_conversion"] = {
            "runs": runs,
            "median": sub,
            "speedup": speedup,
            "efficiency": speedup / workers,
            "staging_speedup": (
                many["staging_frames_per_second"] / one["staging_frames_per_second"]
            ),
            # Why n workers are not n times as fast: each episode takes longer in a worker when
            # n run at once (shared cores, other users' processes), or the workers idle.
            "episode_slowdown": _seconds_per_episode(many) / _seconds_per_episode(one),
        }

        print(
            f"converting the slice ({results['slice']['frames']:,} frames) with {workers} "
            "workers ...",
            flush=True,
        )
        full = convert_once(full_dir, roots / "full", workers)
        results["conversion"] = full
        results["sizes"] = converted_sizes(
            roots / "full", results["slice"]["frames"], results["slice"]["bz2_bytes"]
        )

        print("timing load_dataset, filter and metadata_table over the converted slice ...")
        results["loading"] = loading_timings(roots / "full", work / "caches", max(3, args.repeats))

    slice_ = results["slice"]
    results["projection"] = project(
        per_worker_fps=one["frames_per_second"],
        efficiency=results["sub_slice_conversion"]["efficiency"],
        publish_agent_fps=full["publish"]["agent_frames_per_second"],
        agent_frames_per_raw_frame=slice_["agent_frames"] / slice_["frames"],
        sizes=results["sizes"],
        transient_bytes_per_raw_frame=(
            max(0, full["peak_root_bytes"] - full["final_root_bytes"]) / slice_["frames"]
        ),
    )
    results["seconds"] = seconds
    _print_report(results)
    write_json(args.out, results)
    return results


def _seconds_per_episode(run: dict) -> float:
    """Seconds a worker spent on one episode, on average over the run."""
    return run["episode_seconds"] / run["episodes_converted"]


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def _print_report(results: dict) -> None:
    config, slice_, sub = results["config"], results["slice"], results["sub_slice"]
    workers = config["workers"]
    print(
        f"\nsample: {results['sample']['episodes']} emulator episodes "
        f"({results['sample']['frames']:,} frames, {results['sample']['environments']} sessions); "
        f"{config['cpus']} CPUs"
    )
    print(
        f"slice: {slice_['episodes']:,} episodes, {slice_['frames']:,} raw frames "
        f"({slice_['frames'] / 60 / 3600:.1f} h of play), {slice_['agent_frames']:,} agent "
        f"frames, {slice_['bz2_bytes'] / MIB:,.0f} MiB of .pickle.bz2 "
        f"({slice_['linked_files']:,} hard links, {slice_['copied_files']:,} copies); "
        f"sub-slice {sub['episodes']:,} episodes, {sub['frames']:,} raw frames; playing the "
        f"sample took {results['seconds']['sample']:.0f} s, building both slices "
        f"{results['seconds']['slices']:.1f} s"
    )
    rows = [
        [game, g["kind"], g["copies"], g["episodes"], g["frames"], g["frames"] / slice_["frames"]]
        for game, g in slice_["games"].items()
    ]
    print(table(["game", "kind", "copies", "episodes", "raw frames", "share"], rows))

    conversion = results["sub_slice_conversion"]
    full, one_worker = results["conversion"], conversion["median"]["1_worker"]
    print(f"\nConversion (median of {config['repeats']} interleaved round(s) on the sub-slice)")
    rows = []
    for label, run in (
        ("sub-slice, 1 worker", conversion["median"]["1_worker"]),
        (f"sub-slice, {workers} workers", conversion["median"][f"{workers}_workers"]),
        (f"slice, {workers} workers", full),
    ):
        memory = run["worker_memory"]
        rows.append(
            [
                label,
                run["frames_converted"],
                run["seconds"],
                run["frames_per_second"],
                run["frames_per_second_per_worker"],
                run["staging_frames_per_second"],
                _seconds_per_episode(run),
                run["publish"]["seconds"],
                memory["peak_bytes"] / MIB,
                memory["growth_bytes"] / MIB,
                (run["driver_peak_bytes"] or 0) / MIB,
            ]
        )
    headers = ["run", "raw frames", "wall s", "frames/s", "per worker", "staging f/s"]
    headers += ["s/episode", "publish s", "worker MiB", "growth MiB", "driver MiB"]
    print(table(headers, rows))
    print(
        f"{workers} workers vs 1: {conversion['speedup']:.2f}x "
        f"(efficiency {conversion['efficiency']:.2f}; staging alone "
        f"{conversion['staging_speedup']:.2f}x); each episode took "
        f"{conversion['episode_slowdown']:.2f}x as long in a worker as with 1 worker (on the "
        f"slice {_seconds_per_episode(full) / _seconds_per_episode(one_worker):.2f}x). "
        "Every episode converted: "
        f"{full['episodes_converted']:,} of {full['episodes_total']:,}"
    )
    sub_memory = conversion["median"][f"{workers}_workers"]["worker_memory"]
    memory = full["worker_memory"]
    print(
        f"worker peak (VmHWM) with {workers} workers: {sub_memory['peak_bytes'] / MIB:,.0f} MiB "
        f"on {sub['frames']:,} frames, {memory['peak_bytes'] / MIB:,.0f} MiB on "
        f"{slice_['frames']:,} ({memory['peak_bytes'] / sub_memory['peak_bytes']:.2f}x for "
        f"{slice_['frames'] / sub['frames']:.1f}x the frames); over the slice's run, after "
        "each quarter of its episodes: "
        + ", ".join(f"{b / MIB:,.0f}" for b in memory["peak_by_quarter_bytes"])
        + f" MiB (RSS at the end {memory['final_rss_bytes'] / MIB:,.0f} MiB)"
    )
    publish = full["publish"]
    print(
        f"publishing ({publish['datasets']} datasets, one thread in the driver): "
        f"{publish['agent_frames_per_second']:,.0f} agent frames/s; planning (reading the "
        f"metadata DB) {full['planning_seconds']:.2f} s for {slice_['episodes']:,} episodes"
    )

    sizes = results["sizes"]
    peak_per_frame = full["peak_root_bytes"] / slice_["frames"]
    print(f"\nOutput ({sizes['datasets']} datasets)")
    rows = [
        ["bz2 input, per raw frame", sizes["bz2_bytes_per_raw_frame"]],
        ["main_data.hdf5, per agent frame", sizes["main_data_bytes_per_agent_frame"]],
        ["main_data.hdf5, per raw frame", sizes["main_data_bytes_per_raw_frame"]],
        ["with metadata.json, per raw frame", sizes["with_metadata_bytes_per_raw_frame"]],
        ["peak under the root during the run, per raw frame", peak_per_frame],
    ]
    print(table(["bytes", "bytes/frame"], rows))

    loading = results["loading"]
    print(
        f"\nLoading {loading['episodes']:,} agent episodes from {loading['datasets']} datasets "
        "(medians)"
    )
    rows = [
        [name, s * 1000, loading["microseconds_per_episode"][name]]
        for name, s in loading["seconds"].items()
    ]
    print(table(["call", "ms", "us/episode"], rows))
    kept = loading["filter"]
    print(
        f"filter(game='space_invaders', min_score={kept['min_score']:g}) kept {kept['kept']:,}; "
        f"metadata_table() has {loading['table_rows']:,} rows"
    )

    projection = results["projection"]
    print(
        f"\nProjection to the release: {projection['raw_frames']:,} raw frames\n"
        f"  assumption: {projection['assumption']}\n"
        f"  1-worker rate {projection['per_worker_frames_per_second']:,.0f} raw frames/s, "
        f"efficiency {projection['efficiency']:.2f}, publishing "
        f"{projection['publish_agent_frames_per_second']:,.0f} agent frames/s"
    )
    rows = [
        [
            row["cores"],
            row["efficiency"],
            row["frames_per_second"],
            row["linear_hours"],
            row["publish_floor_hours"],
            row["hours"],
            row["bound_by"],
        ]
        for row in projection["cores"]
    ]
    print(
        table(
            ["cores", "efficiency", "frames/s", "linear h", "publish floor h", "hours", "bound by"],
            rows,
        )
    )
    print(
        f"  disk: input {projection['input_bz2_bytes'] / GIB:,.1f} GiB of .pickle.bz2, output "
        f"{projection['output_bytes'] / GIB:,.1f} GiB, peak during conversion "
        f"{projection['peak_disk_bytes'] / GIB:,.1f} GiB"
    )


if __name__ == "__main__":
    main()
