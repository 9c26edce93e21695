"""Offline RL on CrowdPlay's human Atari data: CrowdPlay's benchmark grid, on d3rlpy 2.8.

Run::

    crowdplay-minari bench --preset smoke        # the pipeline in minutes, on a CPU
    crowdplay-minari bench --preset paper --device cuda:0 --workers 4
    crowdplay-minari bench --algorithms bc,cql --seeds 0,1 --steps 50000 \\
        --datasets crowdplay/riverraid/plain-player_0-v1:min_score=50 \\
            'crowdplay/space_invaders/insideout-player_0-v1:min_score=50,min_task_adherence=0.8' \\
        --out runs/mine
    python -m crowdplay_minari.benchmarks.offline_atari ...    # the same flags

A grid is algorithms x dataset selections x seeds. Each *cell* loads its selection of converted
episodes (`DATASET_ID[:filter,...]`, see `DatasetSpec`), splits them 90/10 by episode (the split
depends on the seed), puts the training episodes in a d3rlpy replay buffer (every 4th frame,
(1, 84, 84) gray, 4 frames stacked by d3rlpy: `crowdplay_minari.d3rlpy_bridge`), trains, and
plays the greedy policy in `CrowdPlayAtariEnv`, which processes frames with the same code as the
loader. `--preset paper` is CrowdPlay's setup (`benchmarks/grids/paper.yaml`).

The package's modules follow the steps: `algorithms` (the table below), `grid` (what to run),
`cell` (one cell, resumable), `evaluation` (playing a policy), `scheduling` (cells in a process
pool or on Ray), `reports` (tables, plots, summary) and `cli`.

Hyperparameters: CrowdPlay's `offline/offline-atari.py` (d3rlpy 0.9x/1.x) translated to d3rlpy 2.8.
Every algorithm: batch 256, gamma 0.99, Adam (betas 0.9/0.999, eps 1e-8), Nature-DQN conv encoder
(d3rlpy's default for images), `scaler="pixel"` -> `observation_scaler=PixelObservationScaler()`,
`n_frames=4` -> the buffer's `FrameStackTransitionPicker(4)`, `use_gpu` -> `create(device=...)`,
unclipped rewards (no reward scaler), `d3rlpy.seed(seed)`.

| flag  | CrowdPlay (0.x/1.x)   | d3rlpy 2.8 config   | lr          | other settings            |
|-------|-----------------------|---------------------|-------------|---------------------------|
| `bc`  | `DiscreteBC`          | `DiscreteBCConfig`  | 3e-5        | beta 0.5 (1)              |
| `bcq` | `DiscreteBCQ`         | `DiscreteBCQConfig` | 1e-4        | action_flexibility 0.5,   |
|       |                       |                     |             | beta 0.5, mean Q          |
| `cql` | `DiscreteCQL`, QR Q   | `DiscreteCQLConfig` | 6.25e-5 (2) | alpha 1.0, QR Q (32)      |
| `iqn` | `DQN`, IQN Q          | `DQNConfig`, IQN Q  | 1e-4        | 16 quantiles, 16 greedy,  |
|       |                       |                     |             | embed 512                 |
| `dqn` | `DoubleDQN`           | `DoubleDQNConfig`   | 3e-5        | mean Q                    |
| `sac` | `DiscreteSAC`         | `DiscreteSACConfig` | 3e-4 (2)    | actor, critic and temp.   |
|       |                       |                     |             | lr; temperature 1.0       |

All but `bc` (no target network): `target_update_interval=2500` (CrowdPlay's; the name is the same
in 2.x, a hard target copy every N gradient steps, 2.x default 8000), one critic (`sac`: two).
(1) CrowdPlay also passed `target_update_interval` and `q_func_factory` to BC, which ignored them.
(2) CrowdPlay left these at the d3rlpy 1.x defaults, which 2.8 shares. CrowdPlay's schedule:
`n_steps=1_000_000`, `n_steps_per_epoch=1000`; data: player 0, `Score >= 50` and, for tasks with an
adherence statistic, adherence `>= 0.8`.

Per cell, `OUT/cells/<algo>__<dataset slug>__<filter slug>__seed<k>/` holds `config.json` (the cell,
its table row, d3rlpy's serialised config), `status.json` (`pending|running|done|failed`, runs,
wall time, error and traceback), `cell.log` (everything the cell printed), `logs/run<N>/`
(d3rlpy's logger: params.json, per-epoch CSVs), `checkpoints/step_<n>.pt` (the latest epoch's
weights and optimiser state), `curve.jsonl` (per epoch: training loss, held-out action match, and
an environment return if `--epoch-eval-episodes`), `model.d3` (`d3rlpy.load_learnable`),
`eval.json` (every evaluation episode) and `result.json` (its row of the results table).
Rerunning a command skips `done` cells and resumes the others from their latest checkpoint with
the remaining steps (d3rlpy's sampling RNG restarts, so a resumed cell is not bit-identical).
`OUT/results.csv` (one row per cell), `OUT/aggregate.csv` (per algorithm and selection: mean and
95% bootstrap CI over seeds, IQM from 4 seeds), `OUT/learning_curves.png`, `OUT/bars.png` and
`OUT/summary.md` (tables to paste) are rewritten at the end of every run.

Evaluation: greedy actions (`algo.predict`) on the last 4 observations, zero-padded before the
episode start exactly like d3rlpy's `FrameStackTransitionPicker`; each episode starts with a random
number (0..`--eval-noop-max`, seeded) of NOOP steps, the usual way to make deterministic ALE
episodes differ; an episode ends at game over or after `--eval-max-frames` raw frames. Reported:
raw return (mean, std over episodes), human-normalised score (`crowdplay_minari.games`), return
relative to the mean `Score` of the cell's training episodes (people played full sessions: with a
frame cap below their episode lengths this ratio is biased low), and, for tasks with an adherence
statistic, the agent's adherence from `statistics.running_statistics` on the RAM after each agent
step (every 4th raw frame; CrowdPlay measured on every frame, so this is an approximation).

Differences from CrowdPlay's runner: evaluation is in the ALE the data came from (60 Hz, no sticky
actions, minimal action set, CrowdPlay's frame processing) instead of d4rl-atari's wrappers with a
`FireResetEnv` that waited 1200 NOOPs; the episode split is seeded; episodes are stacked without
the one-step shift of `MDPDataset` concatenation (see `d3rlpy_bridge`).
"""

from .algorithms import ALGORITHMS, AlgorithmSpec, make_algorithm
from .cell import RESULT_COLUMNS, read_status, run_cell, select_episodes, train_and_evaluate
from .cli import add_arguments, grid_from_args, main, run
from .evaluation import FrameStack, play_episodes
from .grid import (
    FILTER_KEYS,
    GRIDS_DIR,
    PRESETS,
    Cell,
    DatasetSpec,
    EmptySelectionError,
    GridConfig,
    GridError,
    load_grid_file,
)
from .reports import aggregate, bootstrap_ci, iqm, read_curves, write_reports
from .scheduling import run_grid

__all__ = [
    "ALGORITHMS",
    "FILTER_KEYS",
    "GRIDS_DIR",
    "PRESETS",
    "RESULT_COLUMNS",
    "AlgorithmSpec",
    "Cell",
    "DatasetSpec",
    "EmptySelectionError",
    "FrameStack",
    "GridConfig",
    "GridError",
    "add_arguments",
    "aggregate",
    "bootstrap_ci",
    "grid_from_args",
    "iqm",
    "load_grid_file",
    "main",
    "make_algorithm",
    "play_episodes",
    "read_curves",
    "read_status",
    "run",
    "run_cell",
    "run_grid",
    "select_episodes",
    "train_and_evaluate",
    "write_reports",
]
