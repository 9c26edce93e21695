"""`crowdplay-minari convert` and `crowdplay-minari verify`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crowdplay_minari.cli import (
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_SKIPPED,
    add_command,
    positive_int,
    raw_directory,
)
from crowdplay_minari.storage import local_dataset_ids

from .layout import DEFAULT_NAMESPACE

ROOT_HELP = "Minari datasets folder (default: $MINARI_DATASETS_PATH, else ~/.minari/datasets)"


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionConfig, convert

    report = convert(
        ConversionConfig(
            raw_dir=args.raw_dir,
            root=args.root,
            namespace=args.namespace,
            workers=args.workers,
            executor=args.executor,
            ray_address=args.ray_address,
            progress=not args.quiet,
        )
    )
    for dataset, info in sorted(report.datasets.items()):
        print(f"{dataset}  ({info['episodes']} episodes, {info['steps']} steps)")
    print(
        f"converted {report.episodes_converted} episode(s), {report.frames_converted} frames in "
        f"{report.seconds:.1f} s; {report.episodes_already_done} already done; "
        f"{len(report.skipped)} skipped"
    )
    if args.verify:
        from .verify import verify

        result = verify(args.raw_dir, sorted(report.datasets), root=args.root, log=lambda s: None)
        for problem in result.problems:
            print(f"VERIFY FAILED: {problem}")
        print(f"verified {result.episodes_checked} episodes, {result.frames_checked} frames")
        if not result.ok:
            return EXIT_MISMATCH
    return EXIT_OK if report.ok else EXIT_SKIPPED


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    ids = args.datasets or local_dataset_ids(args.root, prefix=args.namespace.rstrip("/") + "/")
    result = verify(args.raw_dir, ids, root=args.root)
    for problem in result.problems:
        print(f"MISMATCH: {problem}")
    print(
        f"checked {result.episodes_checked} episodes, {result.frames_checked} frames: "
        + ("all equal to the raw source" if result.ok else f"{len(result.problems)} problem(s)")
    )
    return EXIT_OK if result.ok else EXIT_MISMATCH


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`convert` and `verify`."""
    convert = add_command(
        sub,
        "convert",
        help="convert a raw CrowdPlay folder into per-agent Minari datasets (resumable)",
        examples=[
            "crowdplay-minari convert data/raw/crowdplay_atari-v0 --root data/minari",
            "crowdplay-minari convert data/raw/crowdplay_atari-v0 --executor ray --workers 16",
        ],
        run=_cmd_convert,
    )
    convert.add_argument("raw_dir", type=raw_directory, help="the crowdplay_atari-v0 folder")
    convert.add_argument("--root", type=Path, default=None, help=ROOT_HELP)
    convert.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="dataset id prefix (default %(default)s)"
    )
    convert.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="episodes converted at once (default: the number of CPUs)",
    )
    convert.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local process pool (default) or a Ray cluster",
    )
    convert.add_argument(
        "--ray-address", default=None, help="Ray cluster address (with --executor ray)"
    )
    convert.add_argument(
        "--verify", action="store_true", help="afterwards, compare every array with the raw source"
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = add_command(
        sub,
        "verify",
        help="check converted datasets against the raw source, array by array",
        examples=[
            "crowdplay-minari verify data/raw/crowdplay_atari-v0 --root data/minari",
            "crowdplay-minari verify data/raw/crowdplay_atari-v0 crowdplay/qbert/plain-player_0-v1",
        ],
        run=_cmd_verify,
    )
    verify.add_argument("raw_dir", type=raw_directory, help="the crowdplay_atari-v0 folder")
    verify.add_argument("datasets", nargs="*", help="dataset ids (default: the whole namespace)")
    verify.add_argument("--root", type=Path, default=None, help=ROOT_HELP)
    verify.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="namespace to verify (default %(default)s)"
    )
