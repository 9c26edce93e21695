"""Conversion on a real two-node Ray cluster that shares no paths with the driver.

The cluster is two `ray start` nodes on this machine, each started from its own folder with one
CPU, so two tasks at once must run on both. The driver gives the raw folder and the datasets
root as paths *relative to its own working directory*: a worker that opened either by path would
look in its node's folder and fail. Workers get each trajectory as bytes and return the staged
files through Ray; only the driver writes datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from crowdplay_minari.conversion.convert import REPORT_NAME
from crowdplay_minari.conversion.verify import verify_datasets
from tests.datasets import stored_episodes

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_cluster_conversion_uses_no_driver_paths_on_workers(
    raw_sample_bz2: Path, converted_sample, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    # A throwaway cluster: neither a token in the user's ~/.ray nor the RAY_AUTH_MODE=token an
    # earlier in-process `ray.init` left in os.environ may put the head into token
    # authentication that the second node cannot pass.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HOME": str(tmp_path / "home"),
    }
    nodes = {name: tmp_path / name for name in ("head", "node2", "driver", "home")}
    for folder in nodes.values():
        folder.mkdir()

    def ray(*args: str, cwd: Path) -> None:
        proc = subprocess.run(
            [ray_cli, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    try:
        ray("start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
            "--include-dashboard=false", "--disable-usage-stats", cwd=nodes["head"])  # fmt: skip
        ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0",
            "--disable-usage-stats", cwd=nodes["node2"])  # fmt: skip
        shutil.copytree(raw_sample_bz2, nodes["driver"] / "raw")
        # The driver runs in its own process, as a user's would: Ray's per-process state left by
        # an earlier in-process `ray.init` (another test's) cannot reach this cluster.
        driver = subprocess.run(
            [sys.executable, "-m", "crowdplay_minari.benchmarks.cli", "convert", "raw"]
            + ["--root", "minari", "--workers", "2", "--executor", "ray", "--verify", "--quiet"]
            + ["--ray-address", f"127.0.0.1:{port}"],
            cwd=nodes["driver"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)

    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    assert "verified" in driver.stdout and "VERIFY FAILED" not in driver.stdout, driver.stdout
    report = json.loads((nodes["driver"] / "minari" / "crowdplay" / REPORT_NAME).read_text())
    assert not report["skipped"], report["skipped"]
    assert report["episodes_converted"] == report["episodes_total"] > 0
    # Nothing was written anywhere but the driver's datasets root.
    for node in ("head", "node2"):
        assert not any(p.suffix in (".h5", ".hdf5") for p in nodes[node].rglob("*"))
    assert not (nodes["driver"] / "raw" / ".crowdplay-staging").exists()
    # The --verify above compared every frame with the raw files; the datasets are also what
    # the local pool makes, byte for byte (equal digests of the stored chunks and attributes),
    # and their digests are right (verify without the raw data).
    ids = sorted(report["datasets"])
    assert verify_datasets(ids, root=nodes["driver"] / "minari", log=lambda m: None).ok
    assert stored_episodes(nodes["driver"] / "minari") == stored_episodes(converted_sample[0])
