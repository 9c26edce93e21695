"""The `crowdplay-minari` command: sample, download, convert, verify, bench, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample import generate_sample

    summary = generate_sample(
        args.out_dir,
        seed=args.seed,
        episodes=args.episodes,
        max_frames=args.frames,
        encodings=tuple(args.encodings),
        workers=args.workers,
        progress=None if args.quiet else print,
    )
    print(
        f"wrote {len(summary['episodes'])} episodes, {summary['frames']} frames to "
        f"{args.out_dir} in {summary['seconds']:.1f} s "
        f"({summary['frames_per_second']:.0f} frames/s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdplay-minari",
        description="CrowdPlay Atari demonstrations as Minari datasets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser(
        "sample", help="play Atari in the emulator and write raw CrowdPlay-format sample data"
    )
    sample.add_argument("out_dir", type=Path)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--episodes", type=int, default=8, help="number of episodes (default 8)")
    sample.add_argument("--frames", type=int, default=1500, help="frame cap per episode")
    sample.add_argument(
        "--encodings",
        nargs="+",
        default=[".pickle.bz2"],
        choices=[".pickle.bz2", ".pickle.gz", ".pickle"],
        help="trajectory file encodings to write (CrowdPlay ships .pickle.bz2)",
    )
    sample.add_argument("--workers", type=int, default=2)
    sample.add_argument("--quiet", action="store_true")
    sample.set_defaults(func=_cmd_sample)

    from . import demo, download

    dm = sub.add_parser(
        "demo", help="sample -> Minari -> filtered processed load -> d3rlpy training -> eval"
    )
    demo.add_arguments(dm)
    dm.set_defaults(func=demo.run)

    dl = sub.add_parser("download", help="download and unpack the real CrowdPlay release (15 GB)")
    download.add_arguments(dl)
    dl.set_defaults(func=download.run)

    try:
        from crowdplay_minari.conversion import cli as conversion_cli
    except ImportError:  # the converter package is not installed
        conversion_cli = None
    if conversion_cli is not None:
        conversion_cli.add_commands(sub)
    try:
        from crowdplay_minari.benchmarks import offline_atari
    except ImportError:
        offline_atari = None
    if offline_atari is not None and hasattr(offline_atari, "add_arguments"):
        bench = sub.add_parser("bench", help="run an offline RL grid (benchmarks.offline_atari)")
        offline_atari.add_arguments(bench)
        bench.set_defaults(func=offline_atari.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
