"""How fast the raw reader is, against the way CrowdPlay itself loads a trajectory file.

    python -m crowdplay_minari.benchmarks.bench_reader \
        --episodes 8 --frames 1500 --repeats 3

1. Plays a fresh emulator sample written in all three encodings (.pickle.bz2, .pickle.gz,
   .pickle), once with 1 worker and once with 2, and reports sample generation frames/s.
2. For each encoding, reads every trajectory file four ways, in interleaved rounds:
   - `decompress`: the file's bytes only (bz2/gzip/open + read), no unpickling;
   - `bare`: bz2/gzip/open + plain `pickle.load`, CrowdPlay's own path: **the baseline**;
   - `load_steps`: our restricted unpickler (`crowdplay_minari.raw.load_steps`);
   - `read_episode`: `RawDataset.read_episode`, the full parse into typed per-agent arrays.
   Throughput is in raw frames (environment steps) per second; ratios are ours / bare.
3. Bytes per frame on disk of each encoding: total trajectory bytes / total frames.
"""

from __future__ import annotations

import bz2
import gzip
import pickle
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from crowdplay_minari.raw import RawDataset, load_steps

from ._common import (
    ALL_ENCODINGS,
    interleaved,
    make_sample,
    median,
    parser,
    run_config,
    scratch_dir,
    table,
    write_json,
)

OPENERS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".pickle.bz2": lambda path: bz2.open(path, "rb"),
    ".pickle.gz": lambda path: gzip.open(path, "rb"),
    ".pickle": lambda path: open(path, "rb"),
}
READERS = ("decompress", "bare", "load_steps", "read_episode")
BASELINE = "bare"


def reader_cases(raw: RawDataset, episode_ids: list[str], suffix: str) -> dict[str, Callable]:
    """One callable per reader, each reading every episode of the sample in encoding `suffix`."""
    paths = [raw.root / f"{episode_id}{suffix}" for episode_id in episode_ids]
    opener = OPENERS[suffix]

    def decompress() -> None:
        for path in paths:
            with opener(path) as file:
                while file.read(1 << 24):
                    pass

    def bare() -> None:
        for path in paths:
            with opener(path) as file:
                pickle.load(file)

    def ours_load_steps() -> None:
        for path in paths:
            load_steps(path)

    def ours_read_episode() -> None:
        for episode_id, path in zip(episode_ids, paths, strict=True):
            raw.read_episode(episode_id, path=path)

    cases = {
        "decompress": decompress,
        "bare": bare,
        "load_steps": ours_load_steps,
        "read_episode": ours_read_episode,
    }
    assert tuple(cases) == READERS
    return cases


def main(argv: Sequence[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0], repeats=3).parse_args(argv)
    results: dict = {"config": run_config(args)}
    with scratch_dir(args.workdir) as work:
        # -- 1. sample generation (one run each: a run takes about a minute at the defaults) --
        generation = {}
        for workers in (1, 2):
            print(f"generating the sample with {workers} worker(s) ...", flush=True)
            summary = make_sample(
                work / f"raw-w{workers}",
                seed=args.seed,
                episodes=args.episodes,
                frames=args.frames,
                encodings=ALL_ENCODINGS,
                workers=workers,
            )
            generation[f"workers_{workers}"] = {
                "seconds": summary["seconds"],
                "frames_per_second": summary["frames_per_second"],
            }
        generation["speedup_2_vs_1"] = (
            generation["workers_2"]["frames_per_second"]
            / generation["workers_1"]["frames_per_second"]
        )
        raw_dir = work / "raw-w1"
        shutil.rmtree(work / "raw-w2")  # the same seed made the same sample; read one
        frames = summary["frames"]
        results["sample"] = {
            "episodes": len(summary["episodes"]),
            "frames": frames,
            "generation": generation,
        }

        # -- 2. reading, per encoding -------------------------------------------------------
        raw = RawDataset(raw_dir)
        episode_ids = raw.episode_ids()
        raw.metadata()  # read the DB once, outside the timings
        encodings: dict[str, dict] = {}
        for suffix in ALL_ENCODINGS:
            print(f"reading {suffix} ({args.repeats} interleaved rounds) ...", flush=True)
            timings = interleaved(reader_cases(raw, episode_ids, suffix), args.repeats)
            fps = {name: frames / median(s) for name, s in timings.wall.items()}
            size = sum((raw_dir / f"{e}{suffix}").stat().st_size for e in episode_ids)
            encodings[suffix] = {
                "bytes": size,
                "bytes_per_frame": size / frames,
                "frames_per_second": fps,
                "ratio_vs_bare": {name: fps[name] / fps[BASELINE] for name in READERS},
                "seconds": timings.wall,
                "cpu_seconds": timings.cpu,
            }
        results["encodings"] = encodings

    _print_report(results)
    write_json(args.json, results)
    return results


def _print_report(results: dict) -> None:
    sample, generation = results["sample"], results["sample"]["generation"]
    print(f"\nsample: {sample['episodes']} episodes, {sample['frames']:,} raw frames")
    print("\nSample generation: ALE play + writing all three encodings (one run each)")
    rows = [
        [w, generation[f"workers_{w}"]["seconds"], generation[f"workers_{w}"]["frames_per_second"]]
        for w in (1, 2)
    ]
    print(table(["workers", "seconds", "frames/s"], rows))
    print(f"speedup 2 workers / 1 worker: {generation['speedup_2_vs_1']:.2f}x")

    encodings = results["encodings"]
    repeats = results["config"]["repeats"]
    print(f"\nReading every episode: raw frames/s, median of {repeats} interleaved rounds")
    rows = []
    for suffix, r in encodings.items():
        fps = r["frames_per_second"]
        rows.append([suffix, r["bytes_per_frame"], *(fps[name] for name in READERS)])
    print(table(["encoding", "bytes/frame", *READERS], rows))

    print("\nRatios against bare open + pickle.load of the same encoding (1.00 = as fast)")
    ours = [name for name in READERS if name != BASELINE]
    rows = [[s, *(r["ratio_vs_bare"][name] for name in ours)] for s, r in encodings.items()]
    print(table(["encoding", *(f"{name} / bare" for name in ours)], rows))

    bz2_fps = encodings[".pickle.bz2"]["frames_per_second"]["read_episode"]
    relative = ", ".join(
        f"{s} {r['frames_per_second']['read_episode'] / bz2_fps:.1f}x" for s, r in encodings.items()
    )
    print(f"\nread_episode throughput relative to .pickle.bz2: {relative}")


if __name__ == "__main__":
    main()
