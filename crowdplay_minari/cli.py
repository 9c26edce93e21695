"""Command-line manners shared by every floor, and the base floor's commands (`sample`,
`download`).

Each floor registers its own subcommands (`add_commands`); the `crowdplay-minari` entry point,
which sees every floor, lives at the top (`crowdplay_minari.benchmarks.cli`). A user's mistake
ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
"""Something went wrong that is not the user's doing (corrupt input, a bug); the message says
what."""
EXIT_USAGE = 2
EXIT_MISMATCH = 3
"""`verify` (or `convert --verify`) found stored data that differs from its source or checksum."""
EXIT_SKIPPED = 4
"""Done, but some inputs were skipped (named in the output and the conversion report)."""
EXIT_DISK_FULL = 5
"""The disk filled up; what was published before stays intact, rerun with space to finish."""
EXIT_BUSY = 6
"""Another run is writing the same output (datasets root, grid directory); nothing was touched."""
EXIT_INTERRUPTED = 130

EXIT_STATUSES = """exit status:
  0    done
  1    failed (the message names the file and what is wrong)
  2    usage error: the command line asks for something impossible
  3    verification mismatch (verify, convert --verify)
  4    done, but some inputs were skipped (listed in the output)
  5    disk full (published datasets are intact; rerun with more space)
  6    another run is writing the same output (wait for it, or choose another)
  130  interrupted (rerun the same command to resume)"""


class UsageError(Exception):
    """A user's mistake: the message says what to do instead."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: ... (see 'prog --help')`, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    examples: list[str],
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows `help`, `examples` and the exit statuses."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) + "\n\n" + EXIT_STATUSES
    parser = sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def raw_directory(text: str) -> Path:
    """argparse type: a raw CrowdPlay folder (one that holds `dataset.sqlite`)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is not a directory; give the raw CrowdPlay folder (crowdplay_atari-v0) that "
            "`crowdplay-minari sample DIR` or `crowdplay-minari download DEST` made"
        )
    if not (path / "dataset.sqlite").is_file():
        raise argparse.ArgumentTypeError(
            f"{path} holds no dataset.sqlite; give the crowdplay_atari-v0 folder itself"
        )
    return path


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample import generate_sample

    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        raise UsageError(
            f"{args.out_dir} exists and is not an empty directory; give a new or empty directory"
        )
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
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    from . import download

    return download.run(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`sample` and `download`."""
    sample = add_command(
        sub,
        "sample",
        help="play Atari in the emulator and write raw CrowdPlay-format sample data",
        examples=["crowdplay-minari sample data/raw/crowdplay_atari-v0 --episodes 8 --seed 0"],
        run=_cmd_sample,
    )
    sample.add_argument(
        "out_dir", type=Path, help="new or empty folder for dataset.sqlite and trajectories"
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument(
        "--episodes", type=positive_int, default=8, help="number of episodes (default 8)"
    )
    sample.add_argument(
        "--frames", type=positive_int, default=1500, help="frame cap per episode (default 1500)"
    )
    sample.add_argument(
        "--encodings",
        nargs="+",
        default=[".pickle.bz2"],
        choices=[".pickle.bz2", ".pickle.gz", ".pickle"],
        help="trajectory file encodings to write (CrowdPlay ships .pickle.bz2)",
    )
    sample.add_argument(
        "--workers", type=positive_int, default=2, help="emulator processes (default 2)"
    )
    sample.add_argument("--quiet", action="store_true", help="no per-episode progress lines")

    from . import download

    dl = add_command(
        sub,
        "download",
        help="download and unpack the real CrowdPlay release (15 GB, resumable, checked)",
        examples=["crowdplay-minari download data/raw"],
        run=_cmd_download,
    )
    download.add_arguments(dl)


def fail(prog: str, message: str, status: int) -> int:
    """Print `prog: error: message` on stderr; returns `status`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
