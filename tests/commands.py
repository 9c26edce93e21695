"""The `crowdplay-minari` command line run as a user runs it: a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`crowdplay-minari ARGS...` in a new interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "crowdplay_minari.benchmarks.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
