"""The `crowdplay-minari` command: every floor's subcommands, with one-line errors.

It lives on the top floor because it sees them all: `sample` and `download` (the base package),
`convert` and `verify` (`crowdplay_minari.conversion`), `bench` and `demo` (here).
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from crowdplay_minari import files
from crowdplay_minari.cli import (
    EXIT_BUSY,
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STATUSES,
    EXIT_USAGE,
    Parser,
    UsageError,
    add_command,
    fail,
)
from crowdplay_minari.cli import add_commands as add_base_commands
from crowdplay_minari.conversion.cli import add_commands as add_conversion_commands

PROG = "crowdplay-minari"


def _cmd_bench(args: argparse.Namespace) -> int:
    from .offline_atari import cli

    return cli.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="CrowdPlay's human Atari demonstrations as Minari datasets: make or download "
        "raw data, convert it, verify it, and run offline RL grids on it.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_base_commands(sub)
    add_conversion_commands(sub)

    from . import demo
    from .offline_atari import cli as grid_cli

    bench = add_command(
        sub,
        "bench",
        help="run an offline RL grid (algorithms x dataset selections x seeds) with d3rlpy",
        examples=[
            f"{PROG} bench --preset smoke",
            f"{PROG} bench --algorithms bc,cql --seeds 0,1 --steps 50000 "
            "--datasets crowdplay/riverraid/plain-player_0-v1:min_score=50",
        ],
        run=_cmd_bench,
    )
    grid_cli.add_arguments(bench)
    dm = add_command(
        sub,
        "demo",
        help="the main job end to end: emulator sample -> Minari -> filtered load -> d3rlpy "
        "training -> evaluation",
        examples=[f"{PROG} demo --workdir demo_run"],
        run=_cmd_demo,
    )
    demo.add_arguments(dm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see `crowdplay-minari --help`)."""
    args = build_parser().parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        return fail(prog, str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return fail(prog, "interrupted; rerun the same command to resume", EXIT_INTERRUPTED)
    except files.OutputInUse as error:
        return fail(prog, str(error), EXIT_BUSY)
    except OSError as error:
        if isinstance(error, files.DiskFull) or error.errno == errno.ENOSPC:
            return fail(prog, f"disk full: {error}", EXIT_DISK_FULL)
        return fail(prog, f"{error}", EXIT_FAILED)
    except Exception as error:  # a data error names its file; anything else is a bug to report
        from crowdplay_minari.raw import CrowdPlayDataError

        if isinstance(error, CrowdPlayDataError | ValueError):
            return fail(prog, str(error), EXIT_FAILED)
        raise


if __name__ == "__main__":
    sys.exit(main())
