"""`crowdplay-minari convert` and `crowdplay-minari verify`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .layout import DEFAULT_NAMESPACE


def _set_root(root: Path | None) -> None:
    if root is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(root)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionConfig, convert

    _set_root(args.root)
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

        result = verify(args.raw_dir, sorted(report.datasets), log=lambda s: None)
        for problem in result.problems:
            print(f"VERIFY FAILED: {problem}")
        print(f"verified {result.episodes_checked} episodes, {result.frames_checked} frames")
        if not result.ok:
            return 3
    return 0 if report.ok else 2


def _cmd_verify(args: argparse.Namespace) -> int:
    import minari

    from .verify import verify

    _set_root(args.root)
    ids = args.datasets or sorted(minari.list_local_datasets(prefix=args.namespace))
    result = verify(args.raw_dir, ids)
    for problem in result.problems:
        print(f"MISMATCH: {problem}")
    print(
        f"checked {result.episodes_checked} episodes, {result.frames_checked} frames: "
        + ("all equal to the raw source" if result.ok else f"{len(result.problems)} problem(s)")
    )
    return 0 if result.ok else 3


def add_commands(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert", help="convert a raw CrowdPlay directory into per-agent Minari datasets"
    )
    convert.add_argument("raw_dir", type=Path)
    convert.add_argument(
        "--root",
        type=Path,
        default=None,
        help="Minari datasets root (default: $MINARI_DATASETS_PATH or Minari's default)",
    )
    convert.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    convert.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    convert.add_argument("--executor", choices=["local", "ray"], default="local")
    convert.add_argument("--ray-address", default=None, help="Ray cluster address (executor ray)")
    convert.add_argument("--verify", action="store_true", help="verify against the raw source")
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(func=_cmd_convert)

    verify = sub.add_parser("verify", help="check converted datasets against the raw source")
    verify.add_argument("raw_dir", type=Path)
    verify.add_argument("datasets", nargs="*", help="dataset ids (default: the whole namespace)")
    verify.add_argument("--root", type=Path, default=None)
    verify.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    verify.set_defaults(func=_cmd_verify)
