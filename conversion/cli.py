"""`crowdplay-minari convert` and `crowdplay-minari verify`."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from crowdplay_minari.cli import (
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_SKIPPED,
    UsageError,
    add_command,
    positive_int,
    raw_directory,
)
from crowdplay_minari.games import GAMES, UnknownGameError, game_info
from crowdplay_minari.storage import METADATA_FILE, dataset_dir, datasets_root, local_dataset_ids

from .layout import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from .convert import ConversionPlan

ROOT_HELP = "Minari datasets folder (default: $MINARI_DATASETS_PATH, else ~/.minari/datasets)"
AGENT_KINDS = ("human", "ai")
"""`crowdplay_minari.raw.selection.AGENT_KINDS`, spelled out so that building the command line
does not import the raw reader (and SQLAlchemy with it); a test checks the two agree."""


_SELECTION_FLAGS = {
    "episode_ids": "check the --episode values against its episodes table",
    "games": "give --game one of those",
    "tasks": "give --task one of those",
    "sources": "give --source one of those",
    "agent_kind": "give --agent-kind one of those, or leave it out",
    "min_score": "give a lower --min-score",
}
"""What to do about a selection that matches nothing, by the field that emptied it."""


def _game(text: str) -> str:
    """argparse type: a game of the catalogue."""
    try:
        return game_info(text).name
    except UnknownGameError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _score(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _cmd_convert(args: argparse.Namespace) -> int:
    from crowdplay_minari.raw.selection import EpisodeSelection, SelectionError

    from .convert import ConversionConfig, StorageFormatError, convert, plan_conversion

    if args.dry_run and args.verify:
        raise UsageError("--dry-run writes nothing for --verify to check; give one of them")
    config = ConversionConfig(
        raw_dir=args.raw_dir,
        root=args.root,
        namespace=args.namespace,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        progress=not args.quiet,
        portable=args.portable,
        selection=EpisodeSelection(
            games=args.games,
            tasks=args.tasks,
            sources=args.sources,
            agent_kind=args.agent_kind,
            min_score=args.min_score,
            episode_ids=args.episodes,
        ),
    )
    try:
        if args.dry_run:
            _print_plan(plan_conversion(config))
            return EXIT_OK
        report = convert(config)
    except SelectionError as error:
        raise UsageError(f"{error}; {_SELECTION_FLAGS[error.field]}") from None
    except StorageFormatError as error:
        raise UsageError(str(error)) from None
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


def _print_plan(plan: ConversionPlan) -> None:
    """The dry run's table: each dataset the run would write, with its counts and size."""
    from .convert import (
        CONVERTED_BYTES_PER_AGENT_FRAME,
        DATASET_METADATA_BYTES,
        RAW_BYTES_PER_FRAME,
    )

    writing = plan.writing
    print(f"dry run, nothing written; selection: {plan.selection}")
    if writing:
        width = max(len(dataset_id) for dataset_id in writing)
        print(f"would write {len(writing)} dataset(s) under {plan.root}:")
        print(f"  {'dataset':<{width}}  episodes  new  new frames  size after")
        for dataset_id, dataset in writing.items():
            frames = f"~{dataset.new_frames.estimate:,}"
            size = f"~{_size(dataset.estimated_bytes_after)}"
            print(
                f"  {dataset_id:<{width}}  {dataset.episodes_after:>8}  {len(dataset.new):>3}  "
                f"{frames:>10}  {size:>10}"
            )
    else:
        print(f"nothing to write under {plan.root}: the selected episodes are all converted")
    for entry in plan.skipped:
        print(f"would skip {entry['file']} (episode {entry['episode_id']}): {entry['error']}")
    for episode_id in plan.missing:
        print(f"would skip episode {episode_id}: no trajectory file in the raw folder")
    if plan.unscored:
        print(f"--min-score leaves out {plan.unscored} agent(s) whose metadata holds no Score")
    complete = len(plan.datasets) - len(writing)
    already = f"{plan.already_done} already converted" + (
        f"; {complete} selected dataset(s) already complete" if complete else ""
    )
    if not writing:
        print(f"would convert 0 episodes; {already}")
        return
    frames = plan.frames
    total = sum(dataset.estimated_bytes_after for dataset in writing.values())
    print(
        f"would convert {plan.episodes_to_convert} episode(s), ~{frames.estimate:,} frames "
        f"({frames.low:,} to {frames.high:,}), ~{_size(total)} in all; {already}"
    )
    basis = (
        "frames: from each agent's 'Time played' in dataset.sqlite (whole seconds: 60 s to "
        "60 s + 59 frames; ~ is the middle)"
    )
    if frames.from_file_size:
        basis += (
            f"; {frames.from_file_size} episode(s) without it by trajectory file size "
            f"({RAW_BYTES_PER_FRAME['.pickle.bz2']} B per frame of .pickle.bz2, within 2x)"
        )
    print(basis)
    print(
        f"size: {CONVERTED_BYTES_PER_AGENT_FRAME} B per new agent frame (main_data.hdf5, "
        f"measured over the sample: README 'Measured numbers') + {_size(DATASET_METADATA_BYTES)} "
        "metadata.json per new dataset; existing datasets at their size on disk"
    )


def _size(n: int) -> str:
    """Bytes in decimal units, two or three significant figures."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _dataset_ids(args: argparse.Namespace, required: bool = True) -> list[str]:
    """The command's dataset ids: those given, else every dataset of its namespace."""
    ids = args.datasets or local_dataset_ids(args.root, prefix=args.namespace.rstrip("/") + "/")
    if not ids and required:
        raise UsageError(
            f"no datasets under {datasets_root(args.root)}/{args.namespace}; give --root, "
            "or convert first"
        )
    return ids


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify, verify_datasets

    for name in args.datasets:
        if Path(name).is_dir() and (Path(name) / "dataset.sqlite").is_file():
            raise UsageError(f"{name} is a raw CrowdPlay folder: give it as --raw {name}")
    ids = _dataset_ids(args, required=not args.cache)
    unknown = [i for i in ids if not (dataset_dir(i, args.root) / METADATA_FILE).is_file()]
    if unknown:
        raise UsageError(f"no dataset {unknown[0]} under {datasets_root(args.root)}")
    result = verify_datasets(ids, root=args.root, log=lambda s: None)
    problems = list(result.problems)
    checked = f"{result.episodes_checked} episodes, {result.frames_checked} steps by digest"
    if args.raw is not None:
        from crowdplay_minari.download import MANIFEST_NAME, DownloadError, check_unpacked

        if (args.raw / MANIFEST_NAME).exists():
            try:
                problems += check_unpacked(args.raw)
            except DownloadError as exc:
                problems.append(str(exc))
        else:
            print(f"note: {args.raw} has no download manifest (not unpacked by `download`)")
        against_raw = verify(args.raw, ids, root=args.root)
        problems += against_raw.problems
        checked += f"; {against_raw.frames_checked} frames against {args.raw}"
    if args.cache:
        from crowdplay_minari.loading import check_cache, default_cache_dir
        from crowdplay_minari.processed_store import check_stores, default_store_dir

        problems += check_cache() + check_stores()
        checked += f"; the processed cache {default_cache_dir()} and stores {default_store_dir()}"
    for problem in problems:
        print(f"MISMATCH: {problem}")
    print(
        f"checked {checked}: " + ("all intact" if not problems else f"{len(problems)} problem(s)")
    )
    return EXIT_OK if not problems else EXIT_MISMATCH


def _cmd_portable(args: argparse.Namespace) -> int:
    from .portable import PortableCopyError, portable_copy

    ids = _dataset_ids(args)
    try:
        done = portable_copy(ids, root=args.root, to_root=args.to)
    except PortableCopyError as exc:
        raise UsageError(str(exc)) from None
    total = sum(info["bytes"] for info in done.values())
    print(f"copied {len(done)} dataset(s), {total / 1e6:.1f} MB, into {datasets_root(args.to)}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`convert` and `verify`."""
    convert = add_command(
        sub,
        "convert",
        help="convert a raw CrowdPlay folder into per-agent Minari datasets (resumable)",
        examples=[
            "crowdplay-minari convert data/raw/crowdplay_atari-v0 --root data/minari",
            "crowdplay-minari convert data/raw/crowdplay_atari-v0 --executor ray --workers 16",
            "crowdplay-minari convert data/raw/crowdplay_atari-v0 --game space_invaders "
            "--agent-kind human --min-score 50 --dry-run",
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
    convert.add_argument(
        "--portable",
        action="store_true",
        help="store with HDF5's built-in filters only (deflate, Fletcher-32): stock "
        "minari[hdf5] reads them without hdf5plugin; about 8x the bytes",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    select = convert.add_argument_group(
        "selection",
        "convert only some episodes, chosen from dataset.sqlite before any trajectory is\n"
        "read; repeat a flag for several values. Episodes already converted stay in their\n"
        "datasets, and a wider run later converts only what is new",
    )
    select.add_argument(
        "--game",
        dest="games",
        action="append",
        type=_game,
        metavar="GAME",
        help=f"only this game (one of {', '.join(GAMES)})",
    )
    select.add_argument(
        "--task", dest="tasks", action="append", metavar="TASK", help="only this task, e.g. plain"
    )
    select.add_argument(
        "--source",
        dest="sources",
        action="append",
        metavar="SOURCE",
        help="only this recruitment source, e.g. mturk",
    )
    select.add_argument(
        "--agent-kind",
        choices=AGENT_KINDS,
        default=None,
        help="only the datasets of agents a human played (a users row names them; a human an "
        "AI replaced mid-episode counts) or of AI agents",
    )
    select.add_argument(
        "--min-score",
        type=_score,
        default=None,
        metavar="SCORE",
        help="only agents whose episode Score (the metadata's statistic, as the loader's "
        "filter(min_score=) reads it) is at least this",
    )
    select.add_argument(
        "--episode",
        dest="episodes",
        action="append",
        metavar="ID",
        help="only this CrowdPlay episode id",
    )
    convert.add_argument(
        "--dry-run",
        action="store_true",
        help="print the datasets the run would write, with episode and frame counts and an "
        "estimated size, and write nothing",
    )

    verify = add_command(
        sub,
        "verify",
        help="check converted datasets: their checksums, and with --raw every array against "
        "the raw source",
        examples=[
            "crowdplay-minari verify --root data/minari",
            "crowdplay-minari verify crowdplay/qbert/plain-player_0-v1 --root data/minari",
            "crowdplay-minari verify --raw data/raw/crowdplay_atari-v0 --root data/minari",
        ],
        run=_cmd_verify,
    )
    verify.add_argument("datasets", nargs="*", help="dataset ids (default: the whole namespace)")
    verify.add_argument(
        "--raw",
        type=raw_directory,
        default=None,
        help="also check the raw folder against its download manifest, and compare every "
        "array with it (slow: decodes the raw files)",
    )
    verify.add_argument(
        "--cache",
        action="store_true",
        help="also check every processed-cache entry and processed store (their checksums)",
    )
    verify.add_argument("--root", type=Path, default=None, help=ROOT_HELP)
    verify.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="namespace to verify (default %(default)s)"
    )

    portable = add_command(
        sub,
        "portable",
        help="copy converted datasets re-encoded with HDF5's built-in filters, so stock "
        "minari[hdf5] reads them with no plugin",
        examples=[
            "crowdplay-minari portable --root data/minari --to data/minari-portable",
            "crowdplay-minari portable crowdplay/qbert/plain-player_0-v1 --root data/minari "
            "--to portable",
        ],
        run=_cmd_portable,
    )
    portable.add_argument("datasets", nargs="*", help="dataset ids (default: the whole namespace)")
    portable.add_argument("--root", type=Path, default=None, help=ROOT_HELP)
    portable.add_argument(
        "--to", type=Path, required=True, help="datasets folder to write the copies into"
    )
    portable.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="namespace to copy (default %(default)s)"
    )
