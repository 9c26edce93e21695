"""The memory benchmark runs end to end on a tiny sample and reports sane numbers."""

from __future__ import annotations

import json
from pathlib import Path

from crowdplay_minari.benchmarks import bench_memory

TINY = [
    "--episodes", "1", "--frames", "240", "--copies", "1", "3",
    "--train-steps", "2", "--repeats", "2",
]  # fmt: skip


def test_bench_memory_compares_memmap_with_in_ram_buffers(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    results = bench_memory.main([*TINY, "--json", str(json_path), "--workdir", str(tmp_path)])
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))

    sample = results["sample"]
    assert sample["episodes"] == 1 and sample["steps"] == 240 // 4
    assert sample["bytes"] == sample["steps"] * (84 * 84 + 8 + 3 * 4)
    assert [row["copies"] for row in results["sizes"]] == [1, 3]
    for row in results["sizes"]:
        assert row["selection_bytes"] == row["copies"] * sample["bytes"]
        ram, build, mapped = (row[mode] for mode in bench_memory.MODES)
        assert ram["transitions"] == build["transitions"] == mapped["transitions"] > 0
        # the in-RAM buffer touched every byte of the selection; the mapped ones map the store
        assert ram["buffer_anon_bytes"] >= row["selection_bytes"]
        assert mapped["buffer_file_bytes"] > 0 and build["buffer_file_bytes"] > 0
        assert all(m["first_batch_seconds"] > 0 for m in (ram, build, mapped))
        assert ram["anon_ratio_vs_ram"] == 1.0
    training = results["training"]
    assert training["copies"] == 3
    assert [len(training["runs"][mode]) for mode in ("ram", "memmap")] == [2, 2]
    for mode in ("ram", "memmap"):
        assert training["updates_per_second"][mode] > 0
        assert training["sample_ms_per_batch"][mode] > 0
    assert training["memmap_vs_ram"] > 0
    # under a data limit of a third of the selection, the in-RAM buffer cannot be built
    limited = training["rlimit_data"]
    assert limited["limit_bytes"] == int(training["selection_bytes"] / 3)
    assert limited["ram"]["error"].startswith("MemoryError")
    assert set(results["targets"]) == {
        "memmap updates/s vs ram",
        "selection bytes / memmap training RssAnon growth",
        "under RLIMIT_DATA = selection / 3: memmap trains, ram fails",
    }
    assert all(t["verdict"] in ("PASS", "FAIL") for t in results["targets"].values())
    assert set(results["seconds"]) == {"sample", "sizes", "training_rounds", "limit_check"}
