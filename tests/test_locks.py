"""One writer per output: a second `convert` into the same datasets root, or a second grid run
into the same directory, stops at once with exit status 6 and a line naming the holder; the
first run is not disturbed. Real processes, real `flock`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crowdplay_minari.benchmarks.cli import main
from crowdplay_minari.cli import EXIT_BUSY, EXIT_OK
from crowdplay_minari.conversion.convert import LOCK_NAME

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from pathlib import Path
from crowdplay_minari import files
with files.exclusive(Path(sys.argv[1]), "a test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crowdplay_minari.benchmarks.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(path: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip() == str(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never named pid {pid}")


@pytest.mark.slow
def test_a_second_convert_into_the_same_root_stops_and_the_first_finishes(
    raw_sample_bz2: Path, tmp_path: Path
) -> None:
    root = tmp_path / "minari"
    first = _cli("convert", str(raw_sample_bz2), "--root", str(root), "--workers", "1")
    _wait_for_lock(root / LOCK_NAME, first.pid)
    second = _cli("convert", str(raw_sample_bz2), "--root", str(root), "--workers", "1")
    out, err = second.communicate(timeout=120)
    assert second.returncode == EXIT_BUSY, (out, err)
    assert f"another run (pid {first.pid}) is writing datasets into {root}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    out, err = first.communicate(timeout=600)
    assert first.returncode == EXIT_OK, err
    # the lock died with its holder: a rerun goes ahead (and finds everything done)
    rerun = _cli("convert", str(raw_sample_bz2), "--root", str(root), "--workers", "1")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == EXIT_OK, err


def test_a_grid_run_into_a_directory_another_run_holds_stops(tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / ".lock"), "60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["bench", "--datasets", "crowdplay/breakout/plain-player_0-v1", "--out", str(out)]
        assert main([*argv, "--steps", "10", "--steps-per-epoch", "10"]) == EXIT_BUSY
        err = capsys.readouterr().err
        assert f"another run (pid {holder.pid}) is writing the grid in {out}" in err
        assert not (out / "grid.json").exists() and not list(out.glob("cells/*"))
    finally:
        holder.kill()
        holder.wait()


ORPHANING_DRIVER = """
import multiprocessing, os, sys, time
from pathlib import Path
from crowdplay_minari import files
from crowdplay_minari.executors import ExecutorConfig, run_tasks

def task(seconds):
    time.sleep(seconds)
    return os.getpid()

if __name__ == "__main__":
    with files.exclusive(Path(sys.argv[1]), "a test"):
        results = run_tasks(task, [0, 60, 60], ExecutorConfig(workers=2))
        next(results)  # the workers are up, two of them busy for a minute
        print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
        os._exit(86)  # killed mid-run: no cleanup at all
"""


def test_workers_of_a_killed_run_end_and_free_its_lock(tmp_path: Path) -> None:
    """A driver killed mid-run leaves no worker behind holding what it inherited (the lock)."""
    import subprocess
    import sys
    import time

    from crowdplay_minari import files

    script = tmp_path / "driver.py"
    script.write_text(ORPHANING_DRIVER)
    lock = tmp_path / "root.lock"
    proc = subprocess.run(
        [sys.executable, str(script), str(lock)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 86, proc.stderr
    workers = [int(pid) for pid in proc.stdout.split()]
    assert workers
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "orphaned workers live on"
    with files.exclusive(lock, "the rerun"):  # free again: OutputInUse otherwise
        pass
