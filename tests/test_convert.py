"""Converter tests: converted datasets equal the raw source through plain Minari, in a fresh
process; interrupted runs resume; bad input is reported by name and skipped."""

from __future__ import annotations

import bz2
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crowdplay_minari.cli import EXIT_SKIPPED
from crowdplay_minari.conversion.convert import STAGING_DIR, ConversionConfig, convert
from crowdplay_minari.conversion.verify import verify, verify_datasets
from crowdplay_minari.raw import RawDataset
from tests.datasets import stored_episodes

REPO = Path(__file__).resolve().parents[1]
# The console script installed beside this interpreter (the venv may not be on PATH).
MINARI_CLI = str(Path(sys.executable).with_name("minari"))


def _env(root: Path) -> dict:
    env = dict(os.environ, MINARI_DATASETS_PATH=str(root), COLUMNS="300")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def converted(converted_sample):
    return converted_sample


def test_every_episode_and_agent_becomes_a_dataset_episode(converted, raw_sample_bz2):
    root, report = converted
    raw = RawDataset(raw_sample_bz2)
    assert report.ok and report.episodes_converted == len(raw.episode_ids())
    expected = set()
    for meta in raw.metadata().values():
        players = (
            ["player_0", "player_1"] if meta.game.startswith("space_invaders_") else ["player_0"]
        )
        expected |= {f"crowdplay/{meta.game}/{meta.task}-{p}-v1" for p in players}
    assert set(report.datasets) == expected
    assert "crowdplay/space_invaders_2p/cooperative-player_1-v1" in expected
    assert not list((root / STAGING_DIR / "episodes").glob("*/*.h5"))  # staged files published


def test_verify_finds_every_frame_equal(converted, raw_sample_bz2):
    root, report = converted
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    result = verify(raw_sample_bz2, sorted(report.datasets), log=lambda s: None)
    assert result.ok, result.problems
    raw = RawDataset(raw_sample_bz2)
    episodes = [raw.read_episode(e) for e in raw.episode_ids()]
    assert result.frames_checked == sum(len(e.agents) * e.num_steps for e in episodes)


FRESH_PROCESS_SCRIPT = r"""
import json, sys, numpy as np, minari
out = {}
for dataset_id in json.loads(sys.argv[1]):
    ds = minari.load_dataset(dataset_id)
    eps = []
    for ep in ds.iterate_episodes():
        meta = next(iter(ds.storage.get_episode_metadata([ep.id])))
        np.savez(sys.argv[2] + f"/{meta['crowdplay_episode_id']}_{meta['player']}.npz",
                 obs=ep.observations, actions=ep.actions, rewards=ep.rewards,
                 terminations=ep.terminations, truncations=ep.truncations,
                 ram=ep.infos["ram"], user_type=ep.infos["user_type"],
                 recorded=ep.infos["recorded"])
        eps.append({k: (v if isinstance(v, (str, int, float, dict)) else str(v))
                    for k, v in meta.items() if k in ("crowdplay_episode_id", "agent_id",
                    "source", "keyword_data", "ended_by", "final_observation")})
    out[dataset_id] = {"episodes": eps, "total_steps": ds.total_steps,
                       "jpeg": ds.storage.metadata.get("jpeg_encoding"),
                       "ref": [ds.storage.metadata.get("ref_min_score"),
                               ds.storage.metadata.get("ref_max_score")]}
print(json.dumps(out, default=str))
"""


def test_plain_minari_in_a_fresh_process_reads_exact_data(converted, raw_sample_bz2, tmp_path):
    root, report = converted
    ids = [
        "crowdplay/space_invaders_2p/cooperative-player_0-v1",
        "crowdplay/space_invaders_2p/cooperative-player_1-v1",
        "crowdplay/space_invaders_ai/competitive-player_0-v1",
        "crowdplay/space_invaders/insideout-player_0-v1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, json.dumps(ids), str(tmp_path)],
        env=_env(root),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    raw = RawDataset(raw_sample_bz2)
    for dataset_id in ids:
        assert out[dataset_id]["jpeg"] is False
        assert out[dataset_id]["ref"] == [148.0, 1668.7]
        for ep_meta in out[dataset_id]["episodes"]:
            episode = raw.read_episode(ep_meta["crowdplay_episode_id"])
            agent = episode.agents[ep_meta["agent_id"]]
            got = np.load(tmp_path / f"{episode.episode_id}_{agent.player}.npz")
            n = agent.num_steps
            assert got["obs"].shape == (n + 1, 210, 160, 3)
            assert np.array_equal(got["obs"][:n], agent.frames)  # lossless, not JPEG
            assert np.array_equal(got["obs"][n], agent.frames[-1])
            assert np.array_equal(got["actions"], agent.actions)
            assert np.array_equal(got["rewards"], agent.rewards)
            assert bool(got["terminations"][-1]) == agent.terminated
            assert bool(got["truncations"][-1]) == agent.truncated
            # Minari's convention: infos[t] goes with observations[t]; what CrowdPlay recorded
            # with step t (the RAM after it) is entry t + 1, and entry 0 is never recorded.
            assert np.array_equal(got["ram"][1:], agent.ram)
            assert np.array_equal(got["user_type"][1:], agent.user_types)
            assert got["recorded"].tolist() == [False] + [True] * n
            assert ep_meta["source"] == episode.metadata.source
            assert ep_meta["final_observation"] == "repeat_last"
            kw = ep_meta["keyword_data"][agent.agent_id]
            assert float(kw["Score"]) == float(agent.rewards.sum())
    # both players of one game share the CrowdPlay episode id
    p0 = {e["crowdplay_episode_id"] for e in out[ids[0]]["episodes"]}
    p1 = {e["crowdplay_episode_id"] for e in out[ids[1]]["episodes"]}
    assert p0 == p1 and p0


def test_minari_cli_lists_and_shows_datasets(converted):
    root, _ = converted

    def minari_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MINARI_CLI, *args],
            env=_env(root),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )

    listing = minari_cli("list", "local")
    assert listing.returncode == 0, listing.stderr
    assert "crowdplay/space_invaders/insideout-player_0-v1" in listing.stdout
    assert "crowdplay/space_invaders_2p/cooperative-player_1-v1" in listing.stdout
    show = minari_cli("show", "crowdplay/space_invaders/insideout-player_0-v1")
    assert show.returncode == 0, show.stderr
    assert "CrowdPlay" in show.stdout


def test_namespaces_are_minaris_own(converted, monkeypatch):
    from minari.namespace import get_namespace_metadata, list_local_namespaces

    root, _ = converted
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    namespaces = set(list_local_namespaces())
    assert {"crowdplay", "crowdplay/space_invaders", "crowdplay/space_invaders_2p"} <= namespaces
    assert "CrowdPlay" in get_namespace_metadata("crowdplay/riverraid")["description"]


def test_recover_environments(converted):
    import minari

    root, _ = converted
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    ds = minari.load_dataset("crowdplay/space_invaders/insideout-player_0-v1")
    env = ds.recover_environment()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (210, 160, 3) and env.action_space.n == ds.action_space.n == 6
    env.close()
    eval_env = ds.recover_environment(eval_env=True)
    obs, _ = eval_env.reset(seed=0)
    assert obs.shape == (84, 84, 4)
    obs, reward, terminated, truncated, info = eval_env.step(1)
    assert obs.shape == (84, 84, 4) and "lives" in info
    eval_env.close()
    preset = ds.recover_environment(
        eval_env=True, stack_n=1, framestack_axis_first=True, downsample_frequency=4
    )
    assert preset.reset(seed=0)[0].shape == (1, 84, 84)


def test_episode_attributes_keep_every_metadata_value(converted, raw_sample_bz2):
    import h5py

    from crowdplay_minari.attributes import decode_attributes, nested_from_flat

    root, _ = converted
    raw = RawDataset(raw_sample_bz2)
    path = root / "crowdplay/space_invaders_ai/competitive-player_0-v1/data/main_data.hdf5"
    with h5py.File(path, "r") as f:
        flat = decode_attributes(dict(f["episode_0"].attrs))
    meta = raw.metadata()[flat["crowdplay_episode_id"]]
    assert nested_from_flat(flat, "keyword_data") == {
        a: v for a, v in meta.keyword_data.items() if a in ("game_0>player_0", "all")
    }
    assert nested_from_flat(flat, "environment_keyword_data") == meta.environment_keyword_data
    assert type(nested_from_flat(flat, "keyword_data")["all"]["created_on"]).__name__ == "datetime"
    assert flat["user_id"] == meta.users["game_0>player_0"].user_id
    assert 0.0 < flat["human_fraction"] < 1.0  # the human was replaced by the AI mid-episode
    assert flat["ended_by"] in ("game_over", "session_stopped")


def _corrupt_copy(src: Path, dst: Path) -> dict[str, str]:
    shutil.copytree(src, dst)
    ids = RawDataset(dst).episode_ids()
    truncated, malicious, missing = ids[0], ids[1], ids[2]
    data = (dst / f"{truncated}.pickle.bz2").read_bytes()
    (dst / f"{truncated}.pickle.bz2").write_bytes(data[: len(data) // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {dst}/pwned",))

    (dst / f"{malicious}.pickle.bz2").write_bytes(bz2.compress(pickle.dumps([{"x": Evil()}])))
    (dst / f"{missing}.pickle.bz2").unlink()
    return {"truncated": truncated, "malicious": malicious, "missing": missing}


def test_bad_input_is_reported_by_name_and_the_rest_converts(raw_sample_bz2, tmp_path):
    raw_dir = tmp_path / "raw"
    bad = _corrupt_copy(raw_sample_bz2, raw_dir)
    root = tmp_path / "minari"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crowdplay_minari.benchmarks.cli",
            "convert",
            str(raw_dir),
            "--root",
            str(root),
            "--workers",
            "2",
            "--quiet",
        ],
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == EXIT_SKIPPED, proc.stdout + proc.stderr
    assert not (raw_dir / "pwned").exists()
    report = json.loads((root / "crowdplay" / "conversion_report.json").read_text())
    skipped = {s["episode_id"]: s for s in report["skipped"]}
    assert set(skipped) == set(bad.values())
    for episode_id in bad.values():
        assert episode_id in skipped[episode_id]["file"]
        assert f"SKIPPED {skipped[episode_id]['file']}" in proc.stdout
    assert "truncated" in skipped[bad["truncated"]]["error"]
    assert (
        "os.system" in skipped[bad["malicious"]]["error"]
        or "posix.system" in skipped[bad["malicious"]]["error"]
    )
    n_good = len(RawDataset(raw_dir).episode_ids()) - 3
    assert report["episodes_converted"] == n_good
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    assert verify(raw_dir, sorted(report["datasets"]), log=lambda s: None).ok


def _loadable_datasets_are_whole(root: Path) -> int:
    """Every dataset Minari would load opens and has all its episodes; returns how many."""
    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    count = 0
    for dataset_id, meta in minari.list_local_datasets().items():
        ds = minari.load_dataset(dataset_id)
        assert ds.total_episodes == meta["total_episodes"] == len(list(ds.episode_indices))
        for ep in ds.iterate_episodes():
            assert ep.observations.shape[0] == ep.actions.shape[0] + 1
        count += 1
    return count


def test_killed_conversion_resumes_without_redoing_work(raw_sample_bz2, tmp_path):
    root = tmp_path / "minari"
    cmd = [
        sys.executable,
        "-m",
        "crowdplay_minari.benchmarks.cli",
        "convert",
        str(raw_sample_bz2),
        "--root",
        str(root),
        "--workers",
        "1",
        "--quiet",
    ]
    staged = root / STAGING_DIR / "episodes"

    def staged_files() -> int:
        return len(list(staged.glob("*/*.h5")))

    def published_datasets() -> int:
        return len(list(root.glob("crowdplay/*/*/data/metadata.json")))

    # Kill the run at two points: while staging its first episode, and once datasets are
    # being published (each is published as soon as its episodes are staged, during staging).
    for ready in (lambda: staged_files() >= 1, lambda: published_datasets() >= 1):
        proc = subprocess.Popen(
            cmd,
            env=_env(root),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the conversion finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _loadable_datasets_are_whole(root)  # never a half-written dataset
    assert staged_files() + published_datasets() >= 1
    final = subprocess.run(
        cmd, env=_env(root), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stdout + final.stderr
    report = json.loads((root / "crowdplay" / "conversion_report.json").read_text())
    assert report["episodes_already_done"] >= 1
    assert report["episodes_converted"] + report["episodes_already_done"] == len(
        RawDataset(raw_sample_bz2).episode_ids()
    )
    assert _loadable_datasets_are_whole(root) == len(report["datasets"])
    assert verify(raw_sample_bz2, sorted(report["datasets"]), log=lambda s: None).ok
    # A rerun with nothing new does no work at all.
    again = convert(ConversionConfig(raw_sample_bz2, root=root, progress=False), log=lambda s: None)
    assert again.episodes_converted == 0
    assert again.episodes_already_done == len(RawDataset(raw_sample_bz2).episode_ids())


def test_new_episodes_are_added_to_published_datasets(raw_sample_bz2, tmp_path, converted):
    root = tmp_path / "minari"
    ids = RawDataset(raw_sample_bz2).episode_ids()
    first = convert(
        ConversionConfig(raw_sample_bz2, root=root, episode_ids=tuple(ids[:4]), progress=False),
        log=lambda s: None,
    )
    second = convert(
        ConversionConfig(raw_sample_bz2, root=root, progress=False), log=lambda s: None
    )
    assert first.episodes_converted == 4
    assert second.episodes_already_done == 4
    assert second.episodes_converted == len(ids) - 4
    # the same datasets, byte for byte and in the same order, as one run makes
    assert stored_episodes(root) == stored_episodes(converted[0])
    assert verify_datasets(sorted(second.datasets), root=root, log=lambda s: None).ok


@pytest.mark.slow
def test_ray_executor_converts_the_same(raw_sample_bz2, tmp_path, converted):
    pytest.importorskip("ray")
    root = tmp_path / "minari"
    environ = dict(os.environ)
    report = convert(
        ConversionConfig(raw_sample_bz2, root=root, workers=2, executor="ray", progress=False),
        log=lambda s: None,
    )
    assert dict(os.environ) == environ  # Ray's own variables (RAY_AUTH_MODE ...) are undone
    assert report.ok and report.datasets == converted[1].datasets
    # what the local pool made, byte for byte (the local conversion is verified frame for frame
    # against the raw data in test_verify_finds_every_frame_equal)
    assert stored_episodes(root) == stored_episodes(converted[0])


def test_a_worker_holds_an_episode_about_once(raw_sample_bz2, tmp_path):
    """Staging streams the trajectory and compresses frames from the steps' own arrays: the
    peak is the unpickled episode plus a chunk buffer, not several copies of its frames."""
    from crowdplay_minari.benchmarks.bench_conversion import worker_memory

    largest = max(raw_sample_bz2.glob("*.pickle.bz2"), key=lambda path: path.stat().st_size)
    memory = worker_memory(raw_sample_bz2, largest.name.split(".")[0], tmp_path / "staging")
    assert memory["frames"] >= 500
    assert memory["staging_bytes"] < 2 * memory["episode_frames_bytes"]  # 1.5x; 3.3x before


@pytest.mark.parametrize("n", [1, 7, 8, 9, 20])
def test_frame_chunks_hold_the_frames_a_repeat_and_black(raw_sample_bz2, n):
    """Chunks of N+1 frames, from one stacked array or from the steps' own arrays (what the
    converter passes), through one reused chunk buffer: whatever an earlier, longer episode
    left in it never shows up in a later one's padding."""
    import zstandard

    from crowdplay_minari.conversion.episode_writer import FrameChunkCompressor
    from crowdplay_minari.episode import StepFrames

    raw = RawDataset(raw_sample_bz2)
    frames = raw.read_episode(raw.episode_ids()[0]).agents["game_0>player_0"].frames[100:]
    chunk = 8
    FrameChunkCompressor().chunks(StepFrames(list(255 - frames[: chunk + 3])), chunk)
    expected = np.zeros((-(-(n + 1) // chunk) * chunk, *frames.shape[1:]), np.uint8)
    expected[:n] = frames[:n]
    expected[n] = frames[n - 1]
    for given in (frames[:n], StepFrames(list(frames[:n]))):
        compressed = FrameChunkCompressor().chunks(given, chunk)
        decoded = b"".join(zstandard.ZstdDecompressor().decompress(c) for c in compressed)
        assert np.frombuffer(decoded, np.uint8).reshape(expected.shape).tobytes() == (
            expected.tobytes()
        )
