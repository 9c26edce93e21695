"""Processed-trajectory loading against CrowdPlay's own path, in one run on a bz2-only sample.

    python -m crowdplay_minari.benchmarks.bench_loading \
        --episodes 8 --frames 1500 --repeats 5

1. Plays a fresh emulator sample (`.pickle.bz2`, as CrowdPlay ships it) and converts it.
2. For two presets, `default` (`(84, 84, 4)`, every frame) and `d3rlpy`
   (`framestack_axis_first=True, downsample_frequency=4, stack_n=1`), loads the processed
   trajectory of every agent of every episode three ways, each run in a fresh child process
   (which reports its peak RSS), in interleaved rounds:
   - `crowdplay`: CrowdPlay's path, **the baseline**: bz2 + plain `pickle.load` of the file (once
     per episode, as CrowdPlay's `lru_cache` on `get_trajectory_by_id` does for the second
     player), then `preprocess_obs_in_trajectory` with CrowdPlay's per-frame ring buffer
     (`MaxAndSkipAndWarpAndScaleAndStackFrameBuffer`: one `np.take` + OpenCV call per stacked
     slot of every kept frame), ported below without gym, then `np.array` of the lists as
     CrowdPlay's d3rlpy example does;
   - `ours_cold`: `load_dataset("crowdplay")` + `get_processed_trajectory(crowdplay_compat=True)`
     of every episode with a fresh, empty processing cache (nothing else is dropped: the HDF5
     files may sit in the page cache, as do the bz2 files for the baseline);
   - `ours_warm`: the same with the cache filled;
   - `ours_store`: a ready d3rlpy buffer, `to_replay_buffer(..., memory_map=True)` over the
     processed store already built (what a second training run on the selection does): opening
     files, the arrays memory-mapped (`crowdplay_minari.processed_store`).
   Every path keeps all processed arrays in memory, like a user building a training set.
   Throughput is in raw frames per second: the frames of every processed agent trajectory
   (a two-player episode counts twice), the same number for every path.
   Targets (ours / crowdplay, on the medians): d3rlpy cold >= 40x, d3rlpy warm >= 100x,
   d3rlpy ready buffer (store) >= 1,000x, default cold >= 10x. When one fails, a cProfile of
   that case is printed.
3. Times `load_dataset` + `filter` over the converted datasets, and `filter` + `metadata_table`
   over a 10,000-episode selection made from the real episodes' metadata.
"""

from __future__ import annotations

import bz2
import contextlib
import cProfile
import io
import multiprocessing
import os
import pickle
import pstats
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from crowdplay_minari.conversion.convert import ConversionConfig, convert
from crowdplay_minari.d3rlpy_bridge import to_replay_buffer
from crowdplay_minari.loading import (
    CACHE_ENV,
    CrowdPlayDataset,
    EpisodeView,
    _atomic_save,
    load_dataset,
)
from crowdplay_minari.processing import ProcessingConfig

from ._common import (
    make_sample,
    median,
    parser,
    restored_environment,
    run_config,
    scratch_dir,
    table,
    verdict,
    write_json,
)

PRESETS: dict[str, dict] = {
    "default": {},
    "d3rlpy": {"framestack_axis_first": True, "downsample_frequency": 4, "stack_n": 1},
}
PATHS = ("crowdplay", "ours_cold", "ours_warm", "ours_store")
BASELINE = "crowdplay"
TARGETS: dict[tuple[str, str], float] = {
    ("d3rlpy", "ours_cold"): 40.0,
    ("d3rlpy", "ours_warm"): 100.0,
    ("d3rlpy", "ours_store"): 1000.0,
    ("default", "ours_cold"): 10.0,
}
SELECTION_EPISODES = 10_000
MINARI_ROOT_ENV = "MINARI_DATASETS_PATH"
STAGES = ("load_dataset", "decode_and_process", "cache_write", "assemble")


# -- CrowdPlay's path ----------------------------------------------------------------------------


class CrowdPlayFrameBuffer:
    """CrowdPlay's `MaxAndSkipAndWarpAndScaleAndStackFrameBuffer` for the `image` key: a ring
    buffer of the last `(stack_n - 1) * skip_n + max_n` frames, newest at `pointer`."""

    def __init__(
        self, max_n=2, skip_n=4, stack_n=4, warp=True, scale=False, warp_width=84, warp_height=84
    ):
        self.max_n, self.skip_n, self.stack_n = max_n, skip_n, stack_n
        self.length = (stack_n - 1) * skip_n + max_n
        self.warp, self.scale = warp, scale
        self.warp_width, self.warp_height = warp_width, warp_height
        self.buffer = np.zeros((self.length, 210, 160, 3), dtype=np.uint8)
        self.pointer = 0

    def add_obs(self, image: np.ndarray) -> None:
        self.pointer = (self.pointer - 1) % self.length
        self.buffer[self.pointer] = image

    def _single(self, index: int) -> np.ndarray:
        frame = np.take(self.buffer, range(index, index + self.max_n), axis=0, mode="wrap").max(
            axis=0
        )
        if self.warp:
            frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            frame = cv2.resize(
                frame, (self.warp_width, self.warp_height), interpolation=cv2.INTER_AREA
            )[:, :, None]
        if self.scale:
            frame = np.array(frame).astype(np.float32) / 255.0
        return frame

    def get_obs(self) -> np.ndarray:
        newest = self.pointer + (self.stack_n - 1) * self.skip_n
        return np.concatenate(
            [self._single(newest - i * self.skip_n) for i in range(self.stack_n)], axis=-1
        )


def crowdplay_process(
    trajectory: list[dict],
    agent: str,
    framestack_axis_first=False,
    downsample_frequency=1,
    downsample_offset=0,
    **kwargs,
):
    """CrowdPlay's `preprocess_obs_in_trajectory` (without its broken `lru_cache`)."""
    framebuffer = CrowdPlayFrameBuffer(**kwargs)
    obs, acs, rew, term = [], [], [], []
    reward_this_obs = 0
    for i in range(len(trajectory)):
        step = trajectory[i]
        framebuffer.add_obs(step["prev_obs"][agent]["image"])
        reward_this_obs += step["reward"][agent]
        if (
            i % downsample_frequency == downsample_offset
            or i % downsample_frequency == len(trajectory) - 1
        ):
            if framestack_axis_first:
                obs.append(np.moveaxis(framebuffer.get_obs(), 2, 0))
            else:
                obs.append(framebuffer.get_obs())
            acs.append(step["action"][agent]["game"])
            rew.append(reward_this_obs)
            term.append(int(step["done"][agent]))
            reward_this_obs = 0
    return obs, acs, rew, term


def crowdplay_load(jobs: Sequence[tuple[str, Sequence[str]]], options: dict) -> list[tuple]:
    """Every agent's processed trajectory, CrowdPlay's way; `jobs` are (bz2 path, agents)."""
    loaded = []
    for path, agents in jobs:
        with bz2.open(path, "rb") as file:
            trajectory = pickle.load(file)
        for agent in agents:
            o, a, r, t = crowdplay_process(trajectory, agent, **options)
            loaded.append((np.array(o), np.array(a), np.array(r), np.array(t)))
        del trajectory
    return loaded


# -- our path ------------------------------------------------------------------------------------


def ours_load(minari_root: str, cache_dir: str, options: dict) -> list[tuple]:
    """Every agent's processed trajectory through `crowdplay_minari.loading`."""
    os.environ[MINARI_ROOT_ENV] = minari_root
    os.environ[CACHE_ENV] = cache_dir
    data = load_dataset("crowdplay")
    return [e.get_processed_trajectory(crowdplay_compat=True, **options) for e in data]


def ours_store_load(minari_root: str, store_dir: str, options: dict) -> list[tuple]:
    """A ready d3rlpy buffer of every agent's processed trajectory, over the processed store in
    `store_dir` (built when it is not there); each episode's arrays as the buffer holds them."""
    os.environ[MINARI_ROOT_ENV] = minari_root
    config = ProcessingConfig(crowdplay_compat=True, **options)
    n_frames = 4 if config.stack_n == 1 and config.framestack_axis_first else 1
    buffer = to_replay_buffer(
        load_dataset("crowdplay"),
        config,
        n_frames=n_frames,
        mixed_action_sets=True,
        memory_map=True,
        store_dir=Path(store_dir),
    )
    return [(e.observations, e.actions, e.rewards, e.terminated) for e in buffer.episodes]


def ours_cold_stages(minari_root: str, cache_dir: str, options: dict) -> dict[str, float]:
    """`ours_load` cold, split into the stages of `EpisodeView.process`: reading the metadata,
    decoding and processing the frames (one threaded pass over the stored chunks), writing the
    cache entry, and assembling the stacked observations."""
    os.environ[MINARI_ROOT_ENV] = minari_root
    os.environ[CACHE_ENV] = cache_dir
    config = ProcessingConfig(crowdplay_compat=True, **options)
    stages = dict.fromkeys(STAGES, 0.0)
    started = time.perf_counter()
    data = load_dataset("crowdplay")
    stages["load_dataset"] = time.perf_counter() - started
    for episode in data:
        started = time.perf_counter()
        compact = episode.compact(config, cache=False)
        processed = time.perf_counter()
        _atomic_save(
            Path(cache_dir) / f"{episode.dataset_id.replace('/', '_')}-{episode.index}", compact
        )
        written = time.perf_counter()
        compact.assemble(config)
        assembled = time.perf_counter()
        stages["decode_and_process"] += processed - started
        stages["cache_write"] += written - processed
        stages["assemble"] += assembled - written
    return stages


# -- one measured run in a fresh process ---------------------------------------------------------


def _peak_rss() -> int:
    """Peak resident memory of this process, in bytes: `VmHWM`, which starts afresh at `exec`.

    (`ru_maxrss` does not: Linux carries the parent's peak over into an exec'd child, so every
    child would report at least the parent's peak; it is the fallback where /proc is missing.)
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure(load: Callable, arguments: tuple) -> dict:
    """Runs in the child: seconds of one `load(*arguments)`, peak RSS before and after it, and
    the number of processed steps (or the stage timings `ours_cold_stages` returns)."""
    import d3rlpy  # noqa: F401  (imports are not loading time)
    import minari  # noqa: F401  (load_dataset imports it on first use)

    before = _peak_rss()
    started = time.perf_counter()
    loaded = load(*arguments)
    seconds = time.perf_counter() - started
    summary = loaded if isinstance(loaded, dict) else {"steps": sum(len(s[1]) for s in loaded)}
    return {"seconds": seconds, "rss_before": before, "rss_peak": _peak_rss(), **summary}


def run_in_child(load: Callable, arguments: tuple) -> dict:
    """`_measure(load, arguments)` in a fresh interpreter (spawned, not forked)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure, load, arguments).result()


# -- the run -------------------------------------------------------------------------------------


def _check_same_output(data: CrowdPlayDataset, raw_dir: Path, options: dict) -> None:
    """Both paths must produce the same arrays, or the comparison means nothing."""
    episode = data[0]
    (crowdplay,) = crowdplay_load(
        [(str(raw_dir / f"{episode.episode_id}.pickle.bz2"), [episode.agent_id])], options
    )
    ours = episode.get_processed_trajectory(crowdplay_compat=True, **options)
    for name, a, b in zip(
        ("observations", "actions", "rewards", "terminals"), crowdplay, ours, strict=True
    ):
        if not (np.array_equal(a, b) and a.dtype.kind == b.dtype.kind):
            raise AssertionError(f"{episode}: {name} differ between CrowdPlay's path and ours")


def _synthetic_selection(data: CrowdPlayDataset, n: int) -> list[EpisodeView]:
    views = []
    for i in range(n):
        source = data.episodes[i % len(data)]
        metadata = dict(source.metadata)
        metadata["crowdplay_episode_id"] = f"synthetic-{i:06d}"
        metadata[f"keyword_data/{source.agent_id}/Score"] = np.int64(i % 500)
        views.append(EpisodeView(source.dataset_id, source.index, source.data_file, metadata))
    return views


def metadata_timings(minari_root: Path, repeats: int) -> dict:
    """Seconds (medians) of loading and filtering the converted datasets and a big selection."""
    os.environ[MINARI_ROOT_ENV] = str(minari_root)
    conditions = {"game": "space_invaders", "min_score": 50, "keyword": {"Time played": (10, None)}}
    seconds: dict[str, list[float]] = {
        "load_dataset": [],
        "filter": [],
        "selection_build": [],
        "selection_filter": [],
        "selection_metadata_table": [],
    }
    counts = {}
    for _ in range(repeats):
        started = time.perf_counter()
        data = load_dataset("crowdplay")
        seconds["load_dataset"].append(time.perf_counter() - started)
        started = time.perf_counter()
        counts["filter"] = len(data.filter(**conditions))
        seconds["filter"].append(time.perf_counter() - started)
        views = _synthetic_selection(data, SELECTION_EPISODES)
        started = time.perf_counter()
        selection = CrowdPlayDataset(views)
        seconds["selection_build"].append(time.perf_counter() - started)
        started = time.perf_counter()
        counts["selection_filter"] = len(selection.filter(**conditions))
        seconds["selection_filter"].append(time.perf_counter() - started)
        started = time.perf_counter()
        counts["selection_metadata_table"] = len(selection.metadata_table())
        seconds["selection_metadata_table"].append(time.perf_counter() - started)
    return {
        "episodes": len(data),
        "selection_episodes": SELECTION_EPISODES,
        "matches": counts,
        "seconds": {name: median(values) for name, values in seconds.items()},
    }


def profile_ours_cold(minari_root: Path, work: Path, options: dict, top: int = 15) -> str:
    """cProfile of one cold load in this process (tottime order)."""
    cache = work / "cache-profile"
    shutil.rmtree(cache, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    ours_load(str(minari_root), str(cache), options)
    profiler.disable()
    shutil.rmtree(cache, ignore_errors=True)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0], repeats=5).parse_args(argv)
    results: dict = {"config": run_config(args)}
    with scratch_dir(args.workdir) as work, restored_environment(CACHE_ENV, MINARI_ROOT_ENV):
        work = work.resolve()
        print("generating a bz2-only sample and converting it ...", flush=True)
        raw_dir = work / "raw"
        make_sample(
            raw_dir,
            seed=args.seed,
            episodes=args.episodes,
            frames=args.frames,
            encodings=(".pickle.bz2",),
            workers=2,
        )
        minari_root = work / "minari"
        shutil.rmtree(minari_root, ignore_errors=True)
        report = convert(
            ConversionConfig(raw_dir, root=minari_root, workers=2, progress=False),
            log=lambda message: None,
        )
        if not report.ok:
            raise RuntimeError(f"conversion skipped episodes: {report.skipped}")
        os.environ[MINARI_ROOT_ENV] = str(minari_root)
        os.environ[CACHE_ENV] = str(work / "cache-check")
        data = load_dataset("crowdplay")
        agents_of: dict[str, list[str]] = {}
        for episode in data:
            agents_of.setdefault(episode.episode_id, []).append(episode.agent_id)
        jobs = [(str(raw_dir / f"{eid}.pickle.bz2"), agents) for eid, agents in agents_of.items()]
        frames = sum(e.num_steps for e in data)
        results["sample"] = {
            "episodes": len(agents_of),
            "agent_trajectories": len(data),
            "frames": frames,
            "bz2_bytes": sum(Path(path).stat().st_size for path, _ in jobs),
            "conversion_seconds": report.seconds,
        }
        for options in PRESETS.values():
            _check_same_output(data, raw_dir, options)

        print(
            f"timing {len(PATHS)} paths x {len(PRESETS)} presets, {args.repeats} interleaved "
            "rounds, each run in a fresh process ...",
            flush=True,
        )
        warm = {name: work / f"cache-warm-{name}" for name in PRESETS}
        stores = {name: work / f"stores-{name}" for name in PRESETS}
        for name, options in PRESETS.items():  # fill the warm caches and stores (untimed)
            shutil.rmtree(warm[name], ignore_errors=True)
            run_in_child(ours_load, (str(minari_root), str(warm[name]), options))
            shutil.rmtree(stores[name], ignore_errors=True)
            run_in_child(ours_store_load, (str(minari_root), str(stores[name]), options))
        runs: dict[tuple[str, str], list[dict]] = {
            (name, path): [] for name in PRESETS for path in PATHS
        }
        cases = list(runs)
        for round_ in range(args.repeats):
            k = round_ % len(cases)
            for name, path in cases[k:] + cases[:k]:
                options = PRESETS[name]
                if path == BASELINE:
                    arguments: tuple = (jobs, options)
                elif path == "ours_warm":
                    arguments = (str(minari_root), str(warm[name]), options)
                elif path == "ours_store":
                    arguments = (str(minari_root), str(stores[name]), options)
                else:
                    cold = work / f"cache-cold-{name}-{round_}"
                    shutil.rmtree(cold, ignore_errors=True)
                    arguments = (str(minari_root), str(cold), options)
                load = {BASELINE: crowdplay_load, "ours_store": ours_store_load}.get(
                    path, ours_load
                )
                measured = run_in_child(load, arguments)
                runs[(name, path)].append(measured)
                print(
                    f"  round {round_ + 1}/{args.repeats} {name:8s} {path:10s} "
                    f"{measured['seconds']:7.2f} s",
                    flush=True,
                )
                if path == "ours_cold":
                    shutil.rmtree(arguments[1], ignore_errors=True)

        throughput: dict = {}
        for name in PRESETS:
            throughput[name] = {}
            for path in PATHS:
                measured = runs[(name, path)]
                seconds = median([m["seconds"] for m in measured])
                throughput[name][path] = {
                    "seconds": [m["seconds"] for m in measured],
                    "median_seconds": seconds,
                    "frames_per_second": frames / seconds,
                    "steps": measured[0]["steps"],
                    "peak_rss_bytes": max(m["rss_peak"] for m in measured),
                    "rss_before_bytes": median([m["rss_before"] for m in measured]),
                }
            base = throughput[name][BASELINE]["frames_per_second"]
            for path in PATHS:
                throughput[name][path]["ratio_vs_crowdplay"] = (
                    throughput[name][path]["frames_per_second"] / base
                )
        results["throughput"] = throughput
        results["targets"] = {
            f"{name} {path}": {
                "value": throughput[name][path]["ratio_vs_crowdplay"],
                "target": f">= {target:g}x",
                "verdict": verdict(throughput[name][path]["ratio_vs_crowdplay"], target),
            }
            for (name, path), target in TARGETS.items()
        }

        print("timing the stages of ours_cold ...", flush=True)
        stages: dict = {}
        for name, options in PRESETS.items():
            measured = []
            for round_ in range(args.repeats):
                cache = work / f"cache-stages-{name}-{round_}"
                cache.mkdir(parents=True, exist_ok=True)
                measured.append(
                    run_in_child(ours_cold_stages, (str(minari_root), str(cache), options))
                )
                shutil.rmtree(cache, ignore_errors=True)
            stages[name] = {stage: median([m[stage] for m in measured]) for stage in STAGES}
        results["ours_cold_stages"] = stages

        print("timing metadata loading and filtering ...", flush=True)
        results["metadata"] = metadata_timings(minari_root, args.repeats)

        failed = [key for key, t in results["targets"].items() if t["verdict"] == "FAIL"]
        profiles = {}
        for key in failed:
            name, path = key.split()
            if path == "ours_cold" and name not in profiles:
                profiles[name] = profile_ours_cold(minari_root, work, PRESETS[name])
        results["profiles"] = profiles

    _print_report(results)
    write_json(args.json, results)
    return results


def _print_report(results: dict) -> None:
    sample, throughput = results["sample"], results["throughput"]
    print(
        f"\nsample: {sample['episodes']} episodes, {sample['agent_trajectories']} agent "
        f"trajectories, {sample['frames']:,} raw frames, {sample['bz2_bytes']:,} bytes of "
        f".pickle.bz2; {results['config']['cpus']} CPUs; "
        f"converted in {sample['conversion_seconds']:.1f} s"
    )
    print(
        f"\nProcessed loading, raw frames/s (medians of {results['config']['repeats']} rounds, "
        "each in a fresh process)"
    )
    rows = []
    for name, paths in throughput.items():
        for path, m in paths.items():
            rows.append(
                [
                    name,
                    path,
                    m["steps"],
                    m["median_seconds"],
                    m["frames_per_second"],
                    m["ratio_vs_crowdplay"],
                    m["peak_rss_bytes"] / 2**20,
                    (m["peak_rss_bytes"] - m["rss_before_bytes"]) / 2**20,
                ]
            )
    print(
        table(
            [
                "preset",
                "path",
                "steps",
                "median s",
                "frames/s",
                "x crowdplay",
                "peak RSS MiB",
                "RSS growth MiB",
            ],
            rows,
        )
    )
    print("\nWhere ours_cold spends its time (fresh process, median seconds)")
    rows = []
    for name, stages in results["ours_cold_stages"].items():
        total = sum(stages.values())
        rows.append([name, *(stages[s] for s in STAGES), total])
        rows.append([f"{name} %", *(100 * stages[s] / total for s in STAGES), 100.0])
    print(table(["preset", *STAGES, "total"], rows))
    print("\nTargets (ours / crowdplay, medians)")
    rows = [[key, t["value"], t["target"], t["verdict"]] for key, t in results["targets"].items()]
    print(table(["case", "ratio", "target", "verdict"], rows))
    meta = results["metadata"]
    print(
        f"\nMetadata ({meta['episodes']} converted episodes; a selection of "
        f"{meta['selection_episodes']:,} episodes), median seconds"
    )
    rows = [[name, seconds * 1000] for name, seconds in meta["seconds"].items()]
    print(table(["step", "ms"], rows))
    for name, text in results["profiles"].items():
        print(f"\ncProfile of ours_cold, preset {name} (a target failed):\n{text}")


if __name__ == "__main__":
    main()
