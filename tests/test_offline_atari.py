"""The offline RL grid: spec and grid parsing, statistics, frame stacking, and (slow) real grids
on an emulator-made sample: training, evaluation in ALE, resume, failed cells, reports."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from crowdplay_minari.benchmarks import offline_atari
from crowdplay_minari.benchmarks.offline_atari import (
    ALGORITHMS,
    DatasetSpec,
    FrameStack,
    GridConfig,
    GridError,
    aggregate,
    bootstrap_ci,
    iqm,
    load_grid_file,
)
from crowdplay_minari.games import game_info

INSIDEOUT = "crowdplay/space_invaders/insideout-player_0-v1"
RIVERRAID = "crowdplay/riverraid/plain-player_0-v1"


# -- dataset specs ---------------------------------------------------------------------------


def test_dataset_spec_parses_sorts_and_normalises_filters() -> None:
    spec = DatasetSpec.parse(f"{INSIDEOUT}:min_task_adherence=0.80, min_score=50")
    assert spec.dataset == INSIDEOUT
    assert spec.filters == (("min_score", "50"), ("min_task_adherence", "0.8"))
    assert str(spec) == f"{INSIDEOUT}:min_score=50,min_task_adherence=0.8"
    assert DatasetSpec.parse(str(spec)) == spec
    assert spec == DatasetSpec.parse(f"{INSIDEOUT}:min_score=50.0,min_task_adherence=.8")
    assert spec.filter_arguments() == {"min_score": 50.0, "min_task_adherence": 0.8}
    assert spec.slugs == (
        "crowdplay-space_invaders-insideout-player_0-v1",
        "min_score50_min_task_adherence0.8",
    )
    plain = DatasetSpec.parse(RIVERRAID)
    assert plain.filters == () and plain.filter_text == "" and plain.slugs[1] == "all"


def test_dataset_spec_namespace_with_task_source_and_task_id_filters() -> None:
    spec = DatasetSpec.parse(
        "crowdplay/space_invaders:task=right|left,source=mturk,task_id=si_left|si_right"
    )
    assert spec.filters == (
        ("source", "mturk"),
        ("task", "left|right"),
        ("task_id", "si_left|si_right"),
    )
    arguments = spec.filter_arguments()
    assert arguments["task"] == ["left", "right"] and arguments["source"] == ["mturk"]
    keep = arguments["predicate"]
    assert keep(SimpleNamespace(metadata={"task_id": "si_right"}))
    assert not keep(SimpleNamespace(metadata={"task_id": "si_rowbyrow"}))
    assert spec.slugs[1] == "sourcemturk_taskleft+right_task_idsi_left+si_right"


def test_dataset_spec_from_yaml_mapping_equals_the_string_form() -> None:
    mapping = {"dataset": INSIDEOUT, "filters": {"min_score": 50, "min_task_adherence": 0.8}}
    assert DatasetSpec.from_value(mapping) == DatasetSpec.parse(
        f"{INSIDEOUT}:min_score=50,min_task_adherence=0.8"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{INSIDEOUT}:min_score=lots", "needs a number"),
        (f"{INSIDEOUT}:bogus=1", "unknown filter 'bogus'"),
        (f"{INSIDEOUT}:min_score", "is not key=value"),
        (":min_score=1", "must be non-empty"),
        (f"{INSIDEOUT}:min_score=1,min_score=2", "given twice"),
        (f"{INSIDEOUT}:task=|", "is empty"),
        (f"{INSIDEOUT}:min_score=nan", "must be finite"),
    ],
)
def test_dataset_spec_rejects_bad_specs_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(GridError, match=message):
        DatasetSpec.parse(text)


# -- grid files, presets, command line -------------------------------------------------------


def test_yaml_grid_file_gives_a_grid_config(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "algorithms: bc, iqn\n"
        "datasets:\n"
        f"  - {RIVERRAID}:min_score=50\n"
        f"  - dataset: {INSIDEOUT}\n"
        "    filters: {min_score: 50, min_task_adherence: 0.8}\n"
        "seeds: [3, 1]\n"
        "steps: 400\n"
        "steps_per_epoch: 100\n"
        "batch_size: 64\n"
        "eval_max_frames: 1200\n"
        "device: cuda:0\n"
        "out: somewhere\n"
    )
    grid = GridConfig(**load_grid_file(path))
    assert grid.algorithms == ("bc", "iqn")
    assert [str(d) for d in grid.datasets] == [
        f"{RIVERRAID}:min_score=50",
        f"{INSIDEOUT}:min_score=50,min_task_adherence=0.8",
    ]
    assert grid.seeds == (3, 1) and grid.steps == 400 and grid.batch_size == 64
    assert grid.device == "cuda:0" and grid.out == "somewhere"
    assert grid.eval_episodes == 10  # not in the file: CrowdPlay's default
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 2
    assert cells[0].name == "bc__crowdplay-riverraid-plain-player_0-v1__min_score50__seed3"
    assert {c.batch_size for c in cells} == {64}


def test_grid_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"datasets: [{RIVERRAID}]\nstep: 10\n")
    with pytest.raises(GridError, match=r"bad\.yaml: unknown field\(s\) step"):
        load_grid_file(path)
    path.write_text(f"datasets: [{RIVERRAID}]\nsteps: 10.5\n")
    with pytest.raises(GridError, match="steps must be an integer"):
        load_grid_file(path)
    # a tag that would run code under yaml.load is refused by name, never run
    path.write_text('datasets: !!python/object/apply:os.system ["touch pwned"]\n')
    with pytest.raises(GridError, match=r"bad\.yaml: not a plain YAML grid .*python/object"):
        load_grid_file(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    path.write_text("datasets: [unclosed\n")
    with pytest.raises(GridError, match=r"bad\.yaml: not a plain YAML grid"):
        load_grid_file(path)
    with pytest.raises(GridError, match="multiple of steps_per_epoch"):
        GridConfig(datasets=(RIVERRAID,), steps=150, steps_per_epoch=100)
    with pytest.raises(GridError, match="algorithms"):
        GridConfig(datasets=(RIVERRAID,), algorithms=("bc", "ppo"))


def test_paper_preset_is_crowdplays_grid() -> None:
    grid = GridConfig(**load_grid_file(offline_atari.GRIDS_DIR / "paper.yaml"))
    assert grid.algorithms == ("bc", "bcq", "cql", "iqn", "dqn", "sac")
    assert grid.seeds == (0, 1, 2)
    assert (grid.steps, grid.steps_per_epoch, grid.batch_size) == (1_000_000, 1000, 256)
    assert (grid.n_frames, grid.test_size) == (4, 0.1)
    assert len(grid.datasets) == 11
    assert len(grid.cells()) == 6 * 11 * 3
    for spec in grid.datasets:
        filters = dict(spec.filters)
        assert filters["min_score"] == "50"
        task = spec.dataset.split("/")[2].split("-")[0]
        if task == "plain":
            assert filters["source"] == "mturk" and "min_task_adherence" not in filters
        else:
            assert filters["min_task_adherence"] == "0.8"


def test_smoke_preset_and_command_line_overrides() -> None:
    parser = argparse.ArgumentParser()
    offline_atari.add_arguments(parser)
    grid = offline_atari.grid_from_args(parser.parse_args(["--preset", "smoke"]))
    assert grid.algorithms == ("bc", "cql") and grid.batch_size == 32
    assert grid.steps < 100 and grid.eval_episodes == 1 and grid.eval_max_frames <= 600
    args = parser.parse_args(
        ["--preset", "smoke", "--steps", "40", "--seeds", "3,4", "--algorithms", "sac"]
        + ["--datasets", f"{RIVERRAID}:source=mturk", "--out", "elsewhere"]
    )
    grid = offline_atari.grid_from_args(args)
    assert (grid.steps, grid.seeds, grid.algorithms, grid.out) == (
        40,
        (3, 4),
        ("sac",),
        "elsewhere",
    )
    assert [str(d) for d in grid.datasets] == [f"{RIVERRAID}:source=mturk"]
    assert grid.batch_size == 32  # from the preset


def test_every_table_row_builds_the_d3rlpy_config_crowdplay_used() -> None:
    import d3rlpy

    expected_class = {
        "bc": d3rlpy.algos.DiscreteBC,
        "bcq": d3rlpy.algos.DiscreteBCQ,
        "cql": d3rlpy.algos.DiscreteCQL,
        "iqn": d3rlpy.algos.DQN,
        "dqn": d3rlpy.algos.DoubleDQN,
        "sac": d3rlpy.algos.DiscreteSAC,
    }
    for name in ALGORITHMS:
        algo = offline_atari.make_algorithm(name)
        config = algo.config
        assert type(algo) is expected_class[name]
        assert config.batch_size == 256
        assert isinstance(config.observation_scaler, d3rlpy.preprocessing.PixelObservationScaler)
        if name != "bc":
            assert config.target_update_interval == 2500 and config.gamma == 0.99
    assert offline_atari.make_algorithm("bc").config.learning_rate == 3e-5
    assert offline_atari.make_algorithm("dqn").config.learning_rate == 3e-5
    bcq = offline_atari.make_algorithm("bcq").config
    assert (bcq.learning_rate, bcq.action_flexibility) == (1e-4, 0.5)
    cql = offline_atari.make_algorithm("cql").config
    assert isinstance(cql.q_func_factory, d3rlpy.models.QRQFunctionFactory)
    iqn = offline_atari.make_algorithm("iqn", batch_size=8).config
    assert iqn.batch_size == 8 and iqn.learning_rate == 1e-4
    factory = iqn.q_func_factory
    assert isinstance(factory, d3rlpy.models.IQNQFunctionFactory)
    assert (factory.n_quantiles, factory.n_greedy_quantiles, factory.embed_size) == (16, 16, 512)
    assert offline_atari.make_algorithm("sac").config.n_critics == 2


# -- statistics ------------------------------------------------------------------------------


def test_bootstrap_ci_on_fixed_numbers() -> None:
    values = list(range(1, 11))  # mean 5.5, sd/sqrt(n) = 0.91
    low, high = bootstrap_ci(values)
    assert (low, high) == pytest.approx((3.7, 7.3), abs=0.15)
    assert bootstrap_ci(values) == (low, high)  # seeded
    assert bootstrap_ci([4.0, 4.0, 4.0]) == (4.0, 4.0)
    assert all(math.isnan(x) for x in bootstrap_ci([4.0]))
    # Many values: the percentile interval approaches mean +- 1.96 standard errors.
    sample = np.random.default_rng(1).normal(10.0, 2.0, 400)
    half = 1.96 * sample.std() / np.sqrt(sample.size)
    assert bootstrap_ci(sample) == pytest.approx(
        (sample.mean() - half, sample.mean() + half), abs=0.02
    )
    assert bootstrap_ci(sample, seed=1) != bootstrap_ci(sample)
    narrow = bootstrap_ci(values, confidence=0.5)
    assert low < narrow[0] < 5.5 < narrow[1] < high


def test_iqm_trims_a_quarter_at_each_end() -> None:
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == 4.5  # mean of 3, 4, 5, 6
    assert iqm([1000, 2, 3, 4, 1]) == 3.0  # 1 cut at each end of 5
    assert iqm([5, 1, 3, 2]) == 2.5
    assert iqm([30, 0, 1, 20, 2, 10, 0]) == pytest.approx(6.6)  # 1 cut at each end of 7
    assert math.isnan(iqm([1, 2, 3]))


def test_aggregate_over_seeds_of_done_cells_only() -> None:
    rows = []
    for seed, hns in enumerate([0.1, 0.2, 0.3, 0.4, 9.0]):
        status = "failed" if seed == 4 else "done"
        rows.append(
            {"algorithm": "bc", "dataset": "d", "filter": "", "seed": seed, "status": status,
             "eval_return": 100.0 * hns, "human_normalized": hns, "relative_to_dataset": 1.0,
             "task_adherence": None, "wall_seconds": 10.0}
        )  # fmt: skip
    for seed, hns in enumerate([1.0, 2.0, 3.0]):
        rows.append(
            {"algorithm": "cql", "dataset": "d", "filter": "", "seed": seed, "status": "done",
             "eval_return": hns, "human_normalized": hns, "relative_to_dataset": None,
             "task_adherence": 0.5, "wall_seconds": 5.0}
        )  # fmt: skip
    table = aggregate(pd.DataFrame(rows)).set_index("algorithm")
    bc, cql = table.loc["bc"], table.loc["cql"]
    assert (bc["n_seeds"], bc["n_failed"]) == (4, 1)
    assert bc["hns_mean"] == pytest.approx(0.25)
    assert bc["hns_iqm"] == pytest.approx(0.25)  # mean of 0.2, 0.3
    assert bc["return_mean"] == pytest.approx(25.0)
    assert 0.1 <= bc["hns_ci_low"] < 0.25 < bc["hns_ci_high"] <= 0.4
    assert math.isnan(bc["task_adherence_mean"])
    assert cql["n_seeds"] == 3 and math.isnan(cql["hns_iqm"])  # IQM needs 4 seeds
    assert cql["hns_mean"] == pytest.approx(2.0) and cql["task_adherence_mean"] == 0.5
    assert math.isnan(cql["relative_to_dataset_mean"])


# -- evaluation input ------------------------------------------------------------------------


def test_frame_stack_matches_d3rlpys_training_stack() -> None:
    from d3rlpy.dataset.utils import stack_recent_observations

    frames = np.random.default_rng(0).integers(0, 256, (9, 1, 84, 84), dtype=np.uint8)
    stack = FrameStack(4, (1, 84, 84))
    for t, frame in enumerate(frames):
        stacked = stack.reset(frame) if t == 0 else stack.push(frame)
        np.testing.assert_array_equal(stacked, stack_recent_observations(frames, t, 4))
    assert stack.reset(frames[5])[:3].max() == 0  # a new episode starts from zeros


# -- end to end (slow): a real sample, real training, real ALE episodes -------------------------

SMOKE_FLAGS = [
    "--algorithms", "bc,cql",
    "--datasets", INSIDEOUT, f"{RIVERRAID}:min_score=50",
    "--seeds", "0",
    "--steps", "20", "--steps-per-epoch", "10", "--batch-size", "32",
    "--eval-episodes", "1", "--eval-max-frames", "300",
    "--workers", "2",
]  # fmt: skip


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted datasets of an emulator-made sample: Space Invaders insideout and Riverraid,
    two episodes each (600 frames, the second cut at 400), so the 90/10 split holds one out."""
    from crowdplay_minari.conversion.convert import ConversionConfig, convert
    from crowdplay_minari.sample import DEFAULT_SESSIONS, generate_sample

    root = tmp_path_factory.mktemp("offline_atari")
    raw = root / "raw" / "crowdplay_atari-v0"
    sessions = tuple(
        s for s in DEFAULT_SESSIONS if s.task_id in ("space_invaders_insideout", "riverraid_mturk")
    )
    generate_sample(raw, seed=0, episodes=4, max_frames=600, sessions=sessions, workers=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        convert(
            ConversionConfig(raw, root=root / "minari", workers=2, progress=False),
            log=lambda _: None,
        )
    return root


def bench(sample_root: Path, *flags: str) -> int:
    """`python -m crowdplay_minari.benchmarks.offline_atari FLAGS` against the sample (workers
    inherit the env)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(sample_root / "minari"))
        patch.setenv("CROWDPLAY_MINARI_CACHE", str(sample_root / "cache"))
        return offline_atari.main(list(flags))


@pytest.fixture(scope="session")
def smoke_run(sample_root: Path) -> tuple[Path, float]:
    out = sample_root / "smoke"
    started = time.perf_counter()
    assert bench(sample_root, *SMOKE_FLAGS, "--out", str(out)) == 0
    return out, time.perf_counter() - started


def _statuses(out: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "status.json").read_text()) for d in (out / "cells").iterdir()}


@pytest.mark.slow
def test_smoke_grid_trains_evaluates_and_reports(smoke_run: tuple[Path, float]) -> None:
    out, _ = smoke_run
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"done"}
    assert set(results["algorithm"]) == {"bc", "cql"}
    assert set(results["dataset"]) == {INSIDEOUT, RIVERRAID}
    for _, row in results.iterrows():
        cell = out / "cells" / row["cell"]
        evaluation = json.loads((cell / "eval.json").read_text())
        episodes = evaluation["episodes"]
        assert len(episodes) == 1
        for episode in episodes:  # a real ALE episode, cut at the frame cap or game over
            assert episode["agent_steps"] > episode["noop_steps"] >= 0
            assert 0 < episode["frames"] <= 300
            assert episode["frames"] > 4 * (episode["agent_steps"] - 1)
            assert episode["truncated"] or episode["terminated"]
        returns = [e["return"] for e in episodes]
        assert np.isfinite(row["eval_return"])
        assert row["eval_return"] == pytest.approx(np.mean(returns))
        assert row["human_normalized"] == pytest.approx(evaluation["human_normalized"])
        assert row["n_train_episodes"] == 1 and row["n_train_steps"] > 0
        game = "space_invaders" if row["dataset"] == INSIDEOUT else "riverraid"
        random_score, human_score = game_info(game).random_score, game_info(game).human_score
        assert row["human_normalized"] == pytest.approx(
            (row["eval_return"] - random_score) / (human_score - random_score)
        )
        assert row["relative_to_dataset"] == pytest.approx(
            row["eval_return"] / evaluation["dataset_score_mean"]
        )
        if game == "space_invaders":  # insideout has an adherence statistic
            assert 0.0 <= row["task_adherence"] <= 1.0
        else:
            assert np.isnan(row["task_adherence"])
        curve = [json.loads(line) for line in (cell / "curve.jsonl").read_text().splitlines()]
        assert [p["step"] for p in curve] == [10, 20]
        assert all(np.isfinite(p["loss"]) and 0 <= p["heldout_action_match"] <= 1 for p in curve)
        assert [p.name for p in (cell / "checkpoints").iterdir()] == ["step_20.pt"]
        assert (cell / "model.d3").stat().st_size > 0
        assert (cell / "logs" / "run1" / "params.json").exists()
        config = json.loads((cell / "config.json").read_text())
        assert config["d3rlpy_config"]["params"]["batch_size"] == 32
        status = json.loads((cell / "status.json").read_text())
        assert (status["status"], status["runs"], status["steps_done"]) == ("done", 1, 20)
        assert status["wall_seconds"] > 0
    aggregate_table = pd.read_csv(out / "aggregate.csv")
    assert len(aggregate_table) == 4 and set(aggregate_table["n_seeds"]) == {1}
    summary = (out / "summary.md").read_text()
    assert "| bc | space_invaders/insideout-player_0-v1 | 1 |" in summary
    assert "riverraid/plain-player_0-v1 [min_score=50]" in summary
    assert "## Failed cells\n\nNone." in summary
    for name in ("learning_curves.png", "bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_done_cells_and_resumes_broken_ones(
    sample_root: Path, smoke_run: tuple[Path, float]
) -> None:
    out, first_seconds = smoke_run
    before = _statuses(out)

    started = time.perf_counter()
    assert bench(sample_root, *SMOKE_FLAGS, "--out", str(out)) == 0
    rerun_seconds = time.perf_counter() - started
    assert _statuses(out) == before  # nothing ran: same runs, start times, wall times
    assert rerun_seconds < first_seconds / 2

    # A crash after the first epoch: status left `running`, the checkpoint of step 10, the
    # curve point of step 20 never written. Another cell lost its status file altogether.
    crashed, lost, *untouched = sorted(before)
    cell = out / "cells" / crashed
    status = json.loads((cell / "status.json").read_text())
    (cell / "status.json").write_text(json.dumps({**status, "status": "running"}))
    (cell / "checkpoints" / "step_20.pt").rename(cell / "checkpoints" / "step_10.pt")
    first_point = (cell / "curve.jsonl").read_text().splitlines()[0]
    (cell / "curve.jsonl").write_text(first_point + "\n")
    (out / "cells" / lost / "status.json").unlink()

    assert bench(sample_root, *SMOKE_FLAGS, "--out", str(out)) == 0
    after = _statuses(out)
    assert after[crashed]["runs"] == 2 and after[crashed]["status"] == "done"
    assert after[lost]["runs"] == 1 and after[lost]["started"] >= before[lost]["started"]
    assert after[lost]["status"] == "done"
    for name in untouched:
        assert after[name] == before[name]
    # The crashed cell trained the remaining 10 steps only, in a second d3rlpy log.
    curve = [json.loads(line) for line in (cell / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [10, 20]
    assert sorted(p.name for p in (cell / "logs").iterdir()) == ["run1", "run2"]
    assert len((cell / "logs" / "run2" / "loss.csv").read_text().splitlines()) == 1  # one epoch
    assert [p.name for p in (cell / "checkpoints").iterdir()] == ["step_20.pt"]
    assert f"resuming {crashed} from step_10.pt (10/20 steps)" in (cell / "cell.log").read_text()
    assert "resuming" in (out / "cells" / lost / "cell.log").read_text()  # from step 20: eval only
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"done"}


@pytest.mark.slow
def test_torn_files_are_named_and_every_other_cell_still_reports(
    sample_root: Path, smoke_run: tuple[Path, float], tmp_path: Path
) -> None:
    """A crash mid-write tears a file: the rerun names it, redoes what it must and still writes
    results.csv, summary.md and the plots for every cell."""
    source, _ = smoke_run
    out = tmp_path / "torn"
    shutil.copytree(source, out)
    torn_curve, empty_status, garbage_result, _ = sorted(_statuses(out))
    with open(out / "cells" / torn_curve / "curve.jsonl", "a") as f:
        f.write('{"step": 30, "lo')  # a line cut short by the crash
    (out / "cells" / empty_status / "status.json").write_text("")
    (out / "cells" / garbage_result / "result.json").write_text('{"cell": ')

    assert bench(sample_root, *SMOKE_FLAGS, "--out", str(out)) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"done"}
    after = _statuses(out)
    assert after[empty_status]["status"] == "done"
    assert json.loads((out / "cells" / garbage_result / "result.json").read_text())["cell"]
    summary = (out / "summary.md").read_text()
    damaged = summary.split("## Damaged files", 1)[1]
    assert f"{torn_curve}/curve.jsonl: skipped unreadable line(s) 3" in damaged
    for name in ("learning_curves.png", "bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.part*"))


@pytest.mark.slow
def test_a_full_disk_writing_the_reports_is_one_line_and_keeps_the_last_ones(
    sample_root: Path, smoke_run: tuple[Path, float], tmp_path: Path, monkeypatch, capsys
) -> None:
    """ENOSPC while writing results.csv (raised by the real fsync of the real atomic writer):
    one line, exit status 5, the previous results.csv whole, no partial file; a rerun with
    space writes the reports."""
    import errno

    from crowdplay_minari import files
    from crowdplay_minari.benchmarks.cli import main as cli_main
    from crowdplay_minari.cli import EXIT_DISK_FULL

    source, _ = smoke_run
    out = tmp_path / "full"
    shutil.copytree(source, out)
    before = (out / "results.csv").read_text()
    (out / "results.csv").write_text(before + "# a marker the rerun must not lose\n")
    marked = (out / "results.csv").read_text()

    class FullDisk:
        """`os` for files.py, whose fsync of a results.csv finds the disk full."""

        def __getattr__(self, name: str):
            return getattr(os, name)

        def fsync(self, fd: int) -> None:
            if "results.csv" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(sample_root / "minari"))
    monkeypatch.setenv("CROWDPLAY_MINARI_CACHE", str(sample_root / "cache"))
    with monkeypatch.context() as patch:
        patch.setattr(files, "os", FullDisk())
        status = cli_main(["bench", *SMOKE_FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == EXIT_DISK_FULL, err
    assert err.count("\n") == 1 and "disk full" in err and "Traceback" not in err
    assert (out / "results.csv").read_text() == marked  # the last complete reports stay
    assert not list(out.glob(".results.csv.*.part"))

    assert cli_main(["bench", *SMOKE_FLAGS, "--out", str(out)]) == 0
    assert (out / "results.csv").read_text() == before


@pytest.mark.slow
def test_a_crashing_cell_is_recorded_and_the_grid_goes_on(sample_root: Path) -> None:
    out = sample_root / "with_failure"
    flags = [
        "--algorithms", "bc",
        "--datasets", f"{RIVERRAID}:min_score=1e9", INSIDEOUT,
        "--seeds", "0", "--steps", "10", "--steps-per-epoch", "10", "--batch-size", "16",
        "--eval-episodes", "1", "--eval-max-frames", "120", "--workers", "2", "--out", str(out),
    ]  # fmt: skip
    assert bench(sample_root, *flags) == 1
    results = pd.read_csv(out / "results.csv").set_index("dataset")
    failed, done = results.loc[RIVERRAID], results.loc[INSIDEOUT]
    assert failed["status"] == "failed" and done["status"] == "done"
    assert failed["error"].startswith("EmptySelectionError: ")
    assert "no episode passes the filters" in failed["error"]
    assert np.isnan(failed["eval_return"]) and np.isfinite(done["eval_return"])
    status = json.loads((out / "cells" / failed["cell"] / "status.json").read_text())
    assert status["status"] == "failed" and "EmptySelectionError" in status["traceback"]
    summary = (out / "summary.md").read_text()
    failed_section = summary.split("## Failed cells", 1)[1]
    assert failed["cell"] in failed_section and "EmptySelectionError" in failed_section
    aggregate_table = pd.read_csv(out / "aggregate.csv").set_index("dataset")
    assert aggregate_table.loc[RIVERRAID, "n_failed"] == 1
    assert aggregate_table.loc[RIVERRAID, "n_seeds"] == 0
    # A changed grid must not silently reuse these cells: refused before anything runs.
    assert bench(sample_root, *flags, "--steps", "20") == 2
    assert json.loads((out / "cells" / done["cell"] / "status.json").read_text())["runs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["bcq", "iqn", "dqn", "sac"])
def test_the_other_algorithms_train_and_play(
    sample_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    """Two gradient steps and one short episode each, in this process (the grid's code path
    for one cell, minus the pool)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(sample_root / "minari"))
    monkeypatch.setenv("CROWDPLAY_MINARI_CACHE", str(sample_root / "cache"))
    grid = GridConfig(
        datasets=(INSIDEOUT,), algorithms=(algorithm,), seeds=(0,), steps=2, steps_per_epoch=2,
        batch_size=8, eval_episodes=1, eval_max_frames=60, eval_noop_max=0,
    )  # fmt: skip
    (cell,) = grid.cells()
    summary = offline_atari.train_and_evaluate(cell, tmp_path, run_number=1)
    assert summary["game"] == "space_invaders" and np.isfinite(summary["eval_return"])
    played = json.loads((tmp_path / "eval.json").read_text())["episodes"]
    assert played[0]["agent_steps"] == 15 and played[0]["frames"] == 60
    (point,) = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert point["step"] == 2 and np.isfinite(point["loss"])
    assert point["loss"] == point["metrics"][ALGORITHMS[algorithm].loss_key]


@pytest.mark.slow
def test_ray_backend_runs_a_cell(sample_root: Path) -> None:
    pytest.importorskip("ray")
    out = sample_root / "ray"
    flags = [
        "--algorithms", "bc", "--datasets", INSIDEOUT, "--seeds", "0",
        "--steps", "10", "--steps-per-epoch", "10", "--batch-size", "16",
        "--eval-episodes", "1", "--eval-max-frames", "120",
        "--backend", "ray", "--workers", "1", "--out", str(out),
    ]  # fmt: skip
    assert bench(sample_root, *flags) == 0
    (row,) = pd.read_csv(out / "results.csv").to_dict("records")
    assert row["status"] == "done" and np.isfinite(row["eval_return"])
    status = json.loads((out / "cells" / row["cell"] / "status.json").read_text())
    assert status["pid"] != os.getpid()  # ran in a Ray worker
