"""Memory and speed of the memory-mapped d3rlpy buffer against the in-RAM one, in one run.

    python -m crowdplay_minari.benchmarks.bench_memory --copies 1 8 32 --train-steps 40

1. Plays a fresh emulator sample of Space Invaders (`--episodes`, `--frames`), converts it, and
   grows the selection by repeating its episodes (`--copies`): every copy is processed and
   stored again, as more episodes would be. The d3rlpy preset, `n_frames=4`, throughout.
2. For each size, three buffers, each built in a fresh child process (forked from a fork server
   that imported torch and d3rlpy, so it holds none of this process's memory):
   - `ram`: `to_replay_buffer(memory_map=False)`, **the baseline**: all frames in one array;
   - `memmap_build`: `memory_map=True` with no store yet: the child processes and writes it;
   - `memmap`: `memory_map=True` again: the store is opened from disk (the second cell of a
     grid on the same selection, or the next run).
   Each child reports its anonymous memory (`RssAnon` of /proc/self/status: the heap, numpy
   arrays, torch) and its file-backed memory (`RssFile`: mapped pages of files it touched, which
   the kernel can drop and read again), both as growth over the moment just before
   `to_replay_buffer`; the RssAnon growth is its peak, sampled every 2 ms by a thread. And the
   seconds from calling `to_replay_buffer` to holding the first mini-batch (the per-episode
   processing cache is warm for all three: the sample was processed once beforehand).
3. On the largest selection, `ram` and `memmap` children each run `--train-steps` DiscreteBC
   updates (batch 32, Nature CNN, one torch thread, CPU) after a warm-up update, then time 100
   mini-batches of sampling alone (the only work that differs), in `--repeats` interleaved
   rounds; updates/s are compared on the medians (target: memmap within 10% of in-RAM; the
   store was just written, so its pages are in the page cache). The peaks of RssAnon and
   RssFile growth while training are shown too.
4. Training out of core. Limiting a child's address space (`RLIMIT_AS`) would count the mapped
   store and measure nothing useful. Instead the memmap training child's RssAnon peak growth,
   from just before the buffer to the end of training, is what training on the store needs in
   anonymous memory; the demonstration holds when the selection's bytes are >= 3x that growth
   (an in-RAM buffer needs at least the selection's bytes). To show the limit is real, both
   children are run again under `RLIMIT_DATA` (which caps the private writable memory a
   process maps, heap and anonymous mappings, and not read-only file mappings such as the
   store) set to their starting data size plus a third of the selection's bytes: the memmap
   child must train, the in-RAM child must fail to build its buffer. RLIMIT_DATA counts
   address space reserved, not touched, so it is stricter than RssAnon.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from crowdplay_minari.conversion.convert import ConversionConfig, convert
from crowdplay_minari.loading import CACHE_ENV, load_dataset
from crowdplay_minari.processed_store import STEP_DTYPES, STORES_ENV, kept_steps
from crowdplay_minari.processing import ProcessingConfig
from crowdplay_minari.sample import DEFAULT_SESSIONS, generate_sample

from ._common import (
    median,
    process_memory,
    quiet_native_output,
    restored_environment,
    scratch_dir,
    table,
    verdict,
    write_json,
)

MINARI_ROOT_ENV = "MINARI_DATASETS_PATH"
SESSION = "space_invaders_mturk"
GAME = "space_invaders"
N_FRAMES = 4
BATCH_SIZE = 32
SAMPLING_BATCHES = 100
MODES = ("ram", "memmap_build", "memmap")
BASELINE = "ram"
SPEED_TARGET = 0.9  # memmap updates/s >= 90% of in-RAM
OUT_OF_CORE_TARGET = 3.0  # selection bytes >= 3x the memmap child's RssAnon growth


# -- what a child measures ---------------------------------------------------------------------


class _PeakAnon:
    """The highest RssAnon seen by a thread reading /proc/self/status every `interval` s."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak = process_memory()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.read()

    def read(self) -> int:
        self.peak = max(self.peak, process_memory()["RssAnon"])
        return self.peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.read()


def measure(job: dict) -> dict:
    """Runs in a fresh child: build one buffer of `job["copies"]` copies of the sample, sample a
    first mini-batch, optionally train; memory as growth over the moment before the buffer."""
    os.environ[MINARI_ROOT_ENV] = job["minari_root"]
    os.environ[CACHE_ENV] = job["cache_dir"]
    import d3rlpy
    import torch

    from crowdplay_minari.d3rlpy_bridge import to_replay_buffer

    torch.set_num_threads(1)
    d3rlpy.seed(job["seed"])
    episodes = list(load_dataset("crowdplay").filter(game=GAME)) * job["copies"]
    algo = d3rlpy.algos.DiscreteBCConfig(
        batch_size=BATCH_SIZE, observation_scaler=d3rlpy.preprocessing.PixelObservationScaler()
    ).create(device="cpu:0")
    memory_map = job["mode"] != BASELINE
    peak = _PeakAnon()  # its thread's stack is mapped before the limit, not counted in it
    before = process_memory()
    if job.get("data_limit"):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (before["VmData"] + job["data_limit"], hard))
    result: dict = {"mode": job["mode"], "copies": job["copies"]}
    try:
        started = time.perf_counter()
        buffer = to_replay_buffer(
            episodes,
            ProcessingConfig.d3rlpy_preset(),
            n_frames=N_FRAMES,
            memory_map=memory_map,
            store_dir=job["store_dir"] if memory_map else None,
        )
        batch = buffer.sample_transition_batch(BATCH_SIZE)
        result["first_batch_seconds"] = time.perf_counter() - started
        result["buffer_anon_bytes"] = peak.read() - before["RssAnon"]
        result["buffer_file_bytes"] = process_memory()["RssFile"] - before["RssFile"]
        result["transitions"] = buffer.transition_count
        if job["train_steps"]:
            algo.build_with_dataset(buffer)
            algo.update(batch)  # the first update allocates torch's buffers: not timed
            started = time.perf_counter()
            for _ in range(job["train_steps"]):
                algo.update(buffer.sample_transition_batch(BATCH_SIZE))
            result["updates_per_second"] = job["train_steps"] / (time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(SAMPLING_BATCHES):  # what differs between the buffers: sampling
                buffer.sample_transition_batch(BATCH_SIZE)
            result["sample_ms"] = 1000 * (time.perf_counter() - started) / SAMPLING_BATCHES
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as such
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    after = process_memory()
    result.update(
        anon_bytes=peak.stop() - before["RssAnon"],
        file_bytes=after["RssFile"] - before["RssFile"],
        data_bytes=after["VmData"] - before["VmData"],
    )
    return result


def _child(job: dict, label: str) -> dict:
    """`run_in_child(job)`, printed; an error is fatal unless the job runs under a limit."""
    measured = run_in_child(job)
    if "error" in measured and not job.get("data_limit"):
        raise RuntimeError(f"{label.strip()}: {measured['error']}")
    mib = 2**20
    line = measured.get("error") or (
        f"first batch {measured['first_batch_seconds']:6.2f} s, RssAnon "
        f"+{measured['anon_bytes'] / mib:6.1f} MiB, RssFile +{measured['file_bytes'] / mib:6.1f} "
        f"MiB, VmData +{measured['data_bytes'] / mib:6.1f} MiB"
    )
    if "updates_per_second" in measured:
        line += f", {measured['updates_per_second']:.1f} updates/s"
    print(f"  {label} {line}", flush=True)
    return measured


# Children fork from a fork server that imported these once: a fresh process without this
# one's memory, which does not pay torch's import for every measurement.
PRELOAD = ["torch", "d3rlpy", "crowdplay_minari.d3rlpy_bridge"]


def run_in_child(job: dict) -> dict:
    """`measure(job)` in a fresh child process (forked from the fork server)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server first starts
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(measure, job).result()
    except BrokenProcessPool as exc:  # killed, e.g. by an allocation failure in native code
        return {"mode": job["mode"], "copies": job["copies"], "error": f"child died ({exc})"}


# -- the run -------------------------------------------------------------------------------------


def _parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2, help="Space Invaders episodes to play")
    p.add_argument("--frames", type=int, default=1500, help="max frames per episode")
    p.add_argument("--copies", type=int, nargs="+", default=[1, 16, 192], help="selection sizes")
    p.add_argument("--train-steps", type=int, default=40, help="timed updates per training run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved training rounds")
    p.add_argument("--no-limit-check", action="store_true", help="skip the RLIMIT_DATA runs")
    p.add_argument("--seed", type=int, default=0, help="sample and training seed")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    copies = sorted(set(args.copies))
    results: dict = {
        "config": {
            "episodes": args.episodes,
            "frames": args.frames,
            "copies": copies,
            "train_steps": args.train_steps,
            "repeats": args.repeats,
            "batch_size": BATCH_SIZE,
            "n_frames": N_FRAMES,
            "seed": args.seed,
            "cpus": os.cpu_count(),
        }
    }
    with (
        scratch_dir(args.workdir) as work,
        restored_environment(MINARI_ROOT_ENV, CACHE_ENV, STORES_ENV),
    ):
        results.update(_run(args, copies, work.resolve()))
    _print_report(results)
    write_json(args.json, results)
    return results


def _run(args, copies: list[int], work: Path) -> dict:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    print("playing a Space Invaders sample and converting it ...", flush=True)
    raw = work / "raw" / "crowdplay_atari-v0"
    shutil.rmtree(work / "raw", ignore_errors=True)
    sessions = tuple(s for s in DEFAULT_SESSIONS if s.task_id == SESSION)
    with quiet_native_output():
        generate_sample(
            raw, seed=args.seed, episodes=args.episodes, max_frames=args.frames, sessions=sessions
        )
    minari_root, cache_dir = work / "minari", work / "cache"
    shutil.rmtree(minari_root, ignore_errors=True)
    report = convert(
        ConversionConfig(raw, root=minari_root, workers=1, progress=False), log=lambda _: None
    )
    if not report.ok:
        raise RuntimeError(f"conversion skipped episodes: {report.skipped}")
    os.environ[MINARI_ROOT_ENV] = str(minari_root)
    os.environ[CACHE_ENV] = str(cache_dir)
    episodes = list(load_dataset("crowdplay").filter(game=GAME))
    preset = ProcessingConfig.d3rlpy_preset()
    for episode in episodes:  # fill the per-episode processing cache (untimed), as in a grid
        episode.compact(preset)
    sample_steps = sum(kept_steps(e, preset) for e in episodes)
    step_bytes = int(np.prod(preset.observation_shape())) + sum(
        dtype.itemsize for dtype in STEP_DTYPES.values()
    )
    sample_bytes = sample_steps * step_bytes  # what a store (or an in-RAM buffer) holds per copy
    seconds["sample"] = time.perf_counter() - started

    def job(mode: str, n: int, **extra) -> dict:
        return {
            "mode": mode,
            "copies": n,
            "minari_root": str(minari_root),
            "cache_dir": str(cache_dir),
            "store_dir": str(work / "stores"),
            "seed": args.seed,
            "train_steps": 0,
            **extra,
        }

    started = time.perf_counter()
    largest = copies[-1]
    print(
        f"building buffers of {copies} copies of the sample, each in a fresh process; the "
        f"x{largest} ones train {args.train_steps} DiscreteBC updates ...",
        flush=True,
    )
    sizes: list[dict] = []
    runs: dict[str, list[dict]] = {"ram": [], "memmap": []}  # training rounds
    for n in copies:
        shutil.rmtree(work / "stores", ignore_errors=True)
        row = {"copies": n, "selection_bytes": n * sample_bytes}
        for mode in MODES:
            steps = args.train_steps if n == largest and mode in runs else 0
            row[mode] = _child(job(mode, n, train_steps=steps), f"x{n:<4d} {mode:12s}")
            if steps:
                runs[mode].append(row[mode])
        for mode in MODES:
            base = row[BASELINE]
            row[mode]["anon_ratio_vs_ram"] = row[mode]["buffer_anon_bytes"] / max(
                base["buffer_anon_bytes"], 1
            )
            row[mode]["first_batch_ratio_vs_ram"] = (
                row[mode]["first_batch_seconds"] / base["first_batch_seconds"]
            )
        sizes.append(row)

    seconds["sizes"] = time.perf_counter() - started
    started = time.perf_counter()
    selection_bytes = largest * sample_bytes
    if args.repeats > 1:
        print(f"{args.repeats - 1} more training round(s) on x{largest}, interleaved ...")
    for round_ in range(1, args.repeats):
        for mode in ("memmap", "ram") if round_ % 2 else ("ram", "memmap"):
            label = f"round {round_ + 1}/{args.repeats} {mode:7s}"
            runs[mode].append(_child(job(mode, largest, train_steps=args.train_steps), label))
    speed = {
        mode: median([m["updates_per_second"] for m in measured]) for mode, measured in runs.items()
    }
    sample_ms = {
        mode: median([m["sample_ms"] for m in measured]) for mode, measured in runs.items()
    }
    ratio = speed["memmap"] / speed["ram"]
    memmap_anon = max(m["anon_bytes"] for m in runs["memmap"])
    training = {
        "copies": largest,
        "selection_bytes": selection_bytes,
        "updates_per_second": speed,
        "sample_ms_per_batch": sample_ms,
        "memmap_vs_ram": ratio,
        "anon_bytes": {mode: max(m["anon_bytes"] for m in runs[mode]) for mode in runs},
        "file_bytes": {mode: max(m["file_bytes"] for m in runs[mode]) for mode in runs},
        "selection_vs_memmap_anon": selection_bytes / memmap_anon,
        "runs": runs,
    }
    targets = {
        "memmap updates/s vs ram": {
            "value": ratio,
            "target": f">= {SPEED_TARGET:g}",
            "verdict": verdict(ratio, SPEED_TARGET),
        },
        "selection bytes / memmap training RssAnon growth": {
            "value": training["selection_vs_memmap_anon"],
            "target": f">= {OUT_OF_CORE_TARGET:g}",
            "verdict": verdict(training["selection_vs_memmap_anon"], OUT_OF_CORE_TARGET),
        },
    }
    seconds["training_rounds"] = time.perf_counter() - started
    if not args.no_limit_check:
        started = time.perf_counter()
        limit = int(selection_bytes / OUT_OF_CORE_TARGET)
        print(f"training again under RLIMIT_DATA = start + {limit / 2**20:.0f} MiB ...")
        limited = {
            mode: _child(job(mode, largest, train_steps=2, data_limit=limit), f"limited {mode}")
            for mode in ("memmap", "ram")
        }
        training["rlimit_data"] = {"limit_bytes": limit, **limited}
        memmap_trains = "error" not in limited["memmap"]
        ram_fails = "error" in limited["ram"]
        targets["under RLIMIT_DATA = selection / 3: memmap trains, ram fails"] = {
            "value": f"memmap {'trains' if memmap_trains else 'fails'}, "
            f"ram {'fails' if ram_fails else 'trains'}",
            "target": "memmap trains, ram fails",
            "verdict": "PASS" if memmap_trains and ram_fails else "FAIL",
        }
        seconds["limit_check"] = time.perf_counter() - started
    return {
        "sample": {"episodes": len(episodes), "steps": sample_steps, "bytes": sample_bytes},
        "sizes": sizes,
        "training": training,
        "targets": targets,
        "seconds": seconds,
    }


def _print_report(results: dict) -> None:
    mib = 2**20
    sample, training = results["sample"], results["training"]
    print(
        f"\nsample: {sample['episodes']} Space Invaders episodes, {sample['steps']:,} processed "
        f"steps, {sample['bytes'] / mib:.1f} MiB per copy; {results['config']['cpus']} CPUs"
    )
    print(
        "\nMemory of a buffer and its first mini-batch (growth over the moment before "
        "to_replay_buffer; RssAnon at its peak), fresh process each"
    )
    rows = []
    for row in results["sizes"]:
        for mode in MODES:
            m = row[mode]
            rows.append(
                [
                    row["copies"],
                    row["selection_bytes"] / mib,
                    mode,
                    m["buffer_anon_bytes"] / mib,
                    m["anon_ratio_vs_ram"],
                    m["buffer_file_bytes"] / mib,
                    m["first_batch_seconds"],
                    m["first_batch_ratio_vs_ram"],
                ]
            )
    headers = [
        "copies",
        "selection MiB",
        "buffer",
        "RssAnon MiB",
        "x ram",
        "RssFile MiB",
        "first batch s",
        "x ram",
    ]
    print(table(headers, rows))
    speed = training["updates_per_second"]
    print(
        f"\nDiscreteBC training on x{training['copies']} ({training['selection_bytes'] / mib:.0f} "
        f"MiB), batch {results['config']['batch_size']}, 1 torch thread, medians of "
        f"{results['config']['repeats']} rounds"
    )
    sample_ms = training["sample_ms_per_batch"]
    rows = [
        [
            mode,
            speed[mode],
            speed[mode] / speed["ram"],
            sample_ms[mode],
            sample_ms[mode] / sample_ms["ram"],
            training["anon_bytes"][mode] / mib,
            training["file_bytes"][mode] / mib,
        ]
        for mode in speed
    ]
    headers = ["buffer", "updates/s", "x ram", "sample ms", "x ram", "RssAnon MiB", "RssFile MiB"]
    print(table(headers, rows))
    if "rlimit_data" in training:
        limited = training["rlimit_data"]
        print(f"\nUnder RLIMIT_DATA = start + {limited['limit_bytes'] / mib:.0f} MiB:")
        for mode in ("memmap", "ram"):
            outcome = limited[mode].get("error") or (
                f"trained, RssAnon +{limited[mode]['anon_bytes'] / mib:.0f} MiB, VmData "
                f"+{limited[mode]['data_bytes'] / mib:.0f} MiB"
            )
            print(f"  {mode:7s} {outcome}")
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in results["seconds"].items())
    print(f"\nWall time: {phases}")
    print("\nTargets")
    rows = [[name, t["value"], t["target"], t["verdict"]] for name, t in results["targets"].items()]
    print(table(["target", "value", "wanted", "verdict"], rows))


if __name__ == "__main__":
    main()
