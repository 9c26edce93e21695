"""The command line's manners: help on everything, one-line usage errors, documented statuses."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from crowdplay_minari.benchmarks.cli import build_parser, main
from crowdplay_minari.benchmarks.offline_atari import cli as grid_cli
from crowdplay_minari.cli import EXIT_STATUSES, EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_and_option_has_help_and_an_example() -> None:
    commands = _subparsers(build_parser())
    assert set(commands) == {"sample", "download", "convert", "verify", "portable", "bench", "demo"}
    for name, parser in commands.items():
        assert "examples:\n  crowdplay-minari " + name in parser.epilog, name
        assert EXIT_STATUSES in parser.epilog
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "does/not/exist"],
        ["convert", "."],  # a directory without dataset.sqlite
        ["sample", "x", "--workers", "0"],
        ["sample", "x", "--episodes", "many"],
        ["bench", "--workers", "0"],
        ["bench", "--steps", "-3"],
        ["no-such-command"],
    ],
)
def test_usage_errors_are_one_line_with_status_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("crowdplay-minari") and "--help" in err


def test_sample_into_a_non_empty_directory_is_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "something").write_text("mine")
    assert main(["sample", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not an empty directory" in err
    assert (tmp_path / "something").read_text() == "mine"


def test_bench_without_datasets_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["bench", "--steps", "20", "--out", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no datasets" in err


def test_short_runs_default_to_one_epoch() -> None:
    parser = argparse.ArgumentParser()
    grid_cli.add_arguments(parser)
    grid = grid_cli.grid_from_args(parser.parse_args(["--steps", "20", "--datasets", "a/b-v0"]))
    assert (grid.steps, grid.steps_per_epoch) == (20, 20)
    grid = grid_cli.grid_from_args(parser.parse_args(["--steps", "5000", "--datasets", "a/b-v0"]))
    assert (grid.steps, grid.steps_per_epoch) == (5000, 1000)
    explicit = ["--steps", "20", "--steps-per-epoch", "10", "--datasets", "a/b-v0"]
    assert grid_cli.grid_from_args(parser.parse_args(explicit)).steps_per_epoch == 10


def test_the_console_entry_point_runs_in_a_fresh_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "crowdplay_minari.benchmarks.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0 and "exit status:" in proc.stdout
    assert "5    disk full" in proc.stdout
