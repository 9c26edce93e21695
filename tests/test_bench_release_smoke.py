"""The release-scale benchmark runs end to end on a small slice and reports consistent numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crowdplay_minari.benchmarks import bench_release
from crowdplay_minari.games import game_info
from crowdplay_minari.raw import RawDataset

FRAMES, SUB_FRAMES = 8000, 2000
QUICK = [
    "--frames", str(FRAMES), "--sub-frames", str(SUB_FRAMES),
    "--sample-frames", "60", "--sample-episodes", "10", "--workers", "2",
]  # fmt: skip


@pytest.mark.slow
def test_bench_release_converts_a_replicated_slice_and_projects_the_release(
    tmp_path: Path,
) -> None:
    json_path, work = tmp_path / "results.json", tmp_path / "work"
    results = bench_release.main([*QUICK, "--out", str(json_path), "--workdir", str(work)])
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))

    # The slice: at least the frames asked for, every game and kind of the release, new ids.
    slice_, sub = results["slice"], results["sub_slice"]
    assert slice_["frames"] >= FRAMES and sub["frames"] >= SUB_FRAMES
    assert set(slice_["games"]) == set(bench_release.RELEASE_HOURS)
    assert {g["kind"] for g in slice_["games"].values()} == {
        "1 player",
        "human + human",
        "human + AI",
    }
    shares = {game: g["frames"] for game, g in slice_["games"].items()}
    assert max(shares, key=shares.get) == "space_invaders"  # 323 of the release's 470 hours
    assert slice_["linked_files"] == slice_["episodes"] and slice_["copied_files"] == 0
    raw = RawDataset(work / "slice-full")
    metadata = raw.metadata()
    assert len(metadata) == slice_["episodes"] and not raw.rejected
    assert len({m.environment_id for m in metadata.values()}) == slice_["environments"]
    sample_ids = set(RawDataset(work / "sample").metadata())
    assert not sample_ids & set(metadata)
    assert raw.trajectory_path(next(iter(metadata))).stat().st_nlink > 1  # a hard link
    agent_frames = sum(g["frames"] * game_info(game).players for game, g in slice_["games"].items())
    assert slice_["agent_frames"] == agent_frames > slice_["frames"]

    # Conversion: every episode, every frame, at every size; workers' memory measured.
    conversion = results["sub_slice_conversion"]
    runs = [*conversion["median"].values(), results["conversion"]]
    for run, frames in zip(runs, [sub["frames"], sub["frames"], slice_["frames"]], strict=True):
        assert run["episodes_converted"] == run["episodes_total"]
        assert run["frames_converted"] == frames
        assert run["frames_per_second"] > 0 and run["staging_seconds"] <= run["seconds"]
        memory = run["worker_memory"]
        assert memory["workers"] == run["workers"] and memory["episodes"] == run["episodes_total"]
        assert memory["peak_bytes"] >= memory["start_bytes"] > 0
        assert memory["peak_by_quarter_bytes"] == sorted(memory["peak_by_quarter_bytes"])
        assert memory["peak_by_quarter_bytes"][-1] == memory["peak_bytes"]
    assert results["conversion"]["episodes_converted"] == slice_["episodes"]
    one = conversion["median"]["1_worker"]
    assert conversion["speedup"] == pytest.approx(
        conversion["median"]["2_workers"]["frames_per_second"] / one["frames_per_second"]
    )
    assert conversion["efficiency"] == pytest.approx(conversion["speedup"] / 2)
    assert conversion["episode_slowdown"] > 0
    sizes = results["sizes"]
    assert sizes["raw_frames"] == slice_["frames"] and sizes["agent_frames"] == agent_frames
    assert 0 < sizes["main_data_bytes_per_agent_frame"] < sizes["main_data_bytes_per_raw_frame"]

    # Loading sees every agent's episode; the filter keeps some Space Invaders episodes.
    loading = results["loading"]
    agent_episodes = sum(
        g["episodes"] * game_info(game).players for game, g in slice_["games"].items()
    )
    assert loading["episodes"] == loading["table_rows"] == agent_episodes
    assert 0 < loading["filter"]["kept"] <= slice_["games"]["space_invaders"]["episodes"]
    assert set(loading["seconds"]) == {
        "load_dataset (cold)",
        "load_dataset",
        "filter",
        "metadata_table",
    }
    assert all(s > 0 for s in loading["seconds"].values())
    assert (work / "caches").is_dir()  # the loader's caches went to the scratch dir

    # The projection follows from the measured rate, efficiency and sizes.
    projection = results["projection"]
    rate, efficiency = one["frames_per_second"], min(1.0, conversion["efficiency"])
    assert projection["per_worker_frames_per_second"] == rate
    assert [row["cores"] for row in projection["cores"]] == [1, 16, 64]
    for row in projection["cores"]:
        used = 1.0 if row["cores"] == 1 else efficiency
        assert row["frames_per_second"] == pytest.approx(rate * row["cores"] * used)
        linear = bench_release.RELEASE_FRAMES / row["frames_per_second"] / 3600
        assert row["linear_hours"] == pytest.approx(linear)
        assert row["hours"] == pytest.approx(max(linear, row["publish_floor_hours"]))
        assert row["hours"] > 0
    hours = [row["hours"] for row in projection["cores"]]
    assert hours == sorted(hours, reverse=True)
    assert projection["output_bytes"] == pytest.approx(
        bench_release.RELEASE_FRAMES * sizes["main_data_bytes_per_raw_frame"]
        + sizes["metadata_json_bytes"]
    )
    assert projection["peak_disk_bytes"] >= projection["output_bytes"] > 0
