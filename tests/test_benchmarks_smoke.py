"""The reader and conversion benchmarks run end to end on a tiny sample and report sane numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crowdplay_minari.benchmarks import bench_conversion, bench_reader
from crowdplay_minari.episode import FRAME_SHAPE

TINY = ["--episodes", "2", "--frames", "150", "--repeats", "1"]
PUBLISHING = ["--publish-sizes", "2,4", "--publish-added", "2", "--publish-rounds", "2"]
FRAME_BYTES = int(np.prod(FRAME_SHAPE))


def _run(main, tmp_path: Path, extra: list[str] = ()) -> tuple[dict, dict]:
    json_path = tmp_path / "results.json"
    work = ["--json", str(json_path), "--workdir", str(tmp_path / "work")]
    results = main([*TINY, *extra, *work])
    return results, json.loads(json_path.read_text())


def test_bench_reader_reports_throughput_and_sizes_per_encoding(tmp_path: Path) -> None:
    results, saved = _run(bench_reader.main, tmp_path)
    assert saved == json.loads(json.dumps(results))

    frames = results["sample"]["frames"]
    assert results["sample"]["episodes"] == 2
    assert 2 <= frames <= 2 * 150
    for workers in ("workers_1", "workers_2"):
        assert results["sample"]["generation"][workers]["frames_per_second"] > 0
    assert results["sample"]["generation"]["speedup_2_vs_1"] > 0

    encodings = results["encodings"]
    assert list(encodings) == [".pickle.bz2", ".pickle.gz", ".pickle"]
    for encoding in encodings.values():
        assert set(encoding["frames_per_second"]) == set(bench_reader.READERS)
        assert all(fps > 0 for fps in encoding["frames_per_second"].values())
        assert encoding["ratio_vs_bare"]["bare"] == 1.0
        assert all(ratio > 0 for ratio in encoding["ratio_vs_bare"].values())
        assert all(len(s) == 1 for s in encoding["seconds"].values())
        assert all(len(s) == 1 for s in encoding["cpu_seconds"].values())
    # An uncompressed pickle holds every frame in full; the compressed encodings far less.
    per_frame = {suffix: e["bytes_per_frame"] for suffix, e in encodings.items()}
    assert per_frame[".pickle"] > FRAME_BYTES
    assert 0 < per_frame[".pickle.bz2"] < per_frame[".pickle.gz"] < per_frame[".pickle"] / 10


def test_bench_conversion_reports_targets_sizes_memory_and_layouts(tmp_path: Path) -> None:
    results, saved = _run(bench_conversion.main, tmp_path, PUBLISHING)
    assert saved == json.loads(json.dumps(results))

    raw_frames = results["sample"]["frames"]
    fps = results["throughput"]["frames_per_second"]
    assert set(fps) == {
        "bare",
        "bare_2_workers",
        "convert_1_worker",
        "convert_2_workers",
        "staging_1_worker",
        "staging_2_workers",
    }
    assert all(value > 0 for value in fps.values())
    assert all(value > 0 for value in results["throughput"]["frames_per_second_best"].values())
    assert results["throughput"]["ratios_cpu"]["convert_1_worker_vs_bare"] > 0
    assert results["throughput"]["ratios"]["bare_speedup_2_vs_1"] > 0
    assert all(cores > 0 for cores in results["throughput"]["cores_busy"].values())
    # Staging is part of a conversion, so it cannot take longer than the conversion around it.
    assert fps["staging_1_worker"] >= fps["convert_1_worker"]
    for target in results["targets"].values():
        assert target["value"] > 0
        assert target["verdict"] in ("PASS", "FAIL")

    sizes = results["sizes"]
    assert sizes["raw_frames"] == raw_frames
    assert sizes["agent_frames"] == raw_frames  # the tiny sample has single-player games only
    assert sizes["datasets"] == 2
    assert 0 < sizes["main_data_bytes_per_agent_frame"] < FRAME_BYTES / 100
    # Minari writes the Box's low/high arrays in full: a fixed ~1 MB per dataset.
    assert sizes["metadata_json_bytes_per_dataset"] > 2 * FRAME_BYTES * 4

    memory = results["memory"]
    assert memory["frames"] == 150
    assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
    assert memory["episode_frames_bytes"] == 150 * FRAME_BYTES

    layouts = results["layouts"]
    assert [row["layout"] for row in layouts] == [
        *(name for name, _, _ in bench_conversion.LAYOUTS),
        bench_conversion.CURRENT_LAYOUT,
        bench_conversion.PORTABLE_LAYOUT,
    ]
    for row in layouts:
        assert row["bytes_per_frame"] > 0
        assert row["write_frames_per_second"] > 0
        assert row["read_frames_per_second"] > 0
    smallest = min(layouts, key=lambda row: row["bytes_per_frame"])
    assert smallest["layout"].startswith("zstd")

    publishing = results["publishing"]
    rows = {(row["episodes_before"], row["case"]): row for row in publishing["rows"]}
    assert set(rows) == {(n, c) for n in (2, 4) for c in ("incremental", "full rewrite")}
    for (size, case), row in rows.items():
        assert row["seconds"] > 0 and row["bytes_written"] > 0
        # incremental: the added episodes only, in every round; a full rewrite: every episode
        # the dataset holds (in the second round: the size, and two rounds of each adding 2)
        assert row["episodes_copied"] == (2 if case == "incremental" else size + 4 * 2)
    full, incremental = rows[(4, "full rewrite")], rows[(4, "incremental")]
    assert full["bytes_written"] > 2 * incremental["bytes_written"]
