"""The main job end to end on the embedded default: emulator sample -> Minari -> filtered,
processed load -> a short d3rlpy training run -> evaluation in the gymnasium environment.

    crowdplay-minari demo --workdir demo_run
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from crowdplay_minari import files
from crowdplay_minari.cli import positive_int


def run_demo(
    workdir: Path,
    *,
    seed: int = 0,
    episodes: int = 8,
    frames: int = 1500,
    train_steps: int = 300,
    batch_size: int = 32,
    eval_max_frames: int = 4000,
    log=print,
) -> dict:
    """Run every stage, printing what each produced; returns a summary dict."""
    import torch

    from crowdplay_minari.conversion.convert import ConversionConfig, convert
    from crowdplay_minari.d3rlpy_bridge import split_episodes, to_replay_buffer
    from crowdplay_minari.envs import CrowdPlayAtariEnv
    from crowdplay_minari.loading import load_dataset
    from crowdplay_minari.processing import ProcessingConfig
    from crowdplay_minari.sample import generate_sample

    torch.set_num_threads(1)
    workdir = Path(workdir)
    raw_dir, minari_root = workdir / "raw" / "crowdplay_atari-v0", workdir / "minari"
    os.environ.setdefault("CROWDPLAY_MINARI_CACHE", str(workdir / "cache"))
    summary: dict = {}

    started = time.perf_counter()
    if not (raw_dir / "dataset.sqlite").exists():
        log(f"[1/5] playing {episodes} episodes in the Arcade Learning Environment -> {raw_dir}")
        sample = generate_sample(
            raw_dir, seed=seed, episodes=episodes, max_frames=frames, workers=2, progress=log
        )
        summary["sample_frames"] = sample["frames"]
    else:
        log(f"[1/5] raw sample already at {raw_dir}")

    log(f"[2/5] converting to Minari datasets under {minari_root}")
    report = convert(ConversionConfig(raw_dir, root=minari_root, workers=2, progress=False))
    for dataset_id, info in sorted(report.datasets.items()):
        log(f"      {dataset_id}: {info['episodes']} episodes, {info['steps']} steps")
    summary["datasets"] = sorted(report.datasets)

    log("[3/5] loading and filtering: Space Invaders (any task), player_0, score >= 50")
    data = load_dataset("crowdplay/space_invaders", root=minari_root)
    selection = data.filter(agent="game_0>player_0", min_score=50)
    for episode in selection:
        log(f"      {episode}")
    if len(selection) == 0:
        raise RuntimeError("the filter selected no episode; the sample is too small")
    config = ProcessingConfig.d3rlpy_preset()
    train, test = split_episodes(selection.episodes, test_size=0.1, seed=seed)
    buffer = to_replay_buffer(train, config, n_frames=4)
    log(
        f"      processed with {config}: {buffer.transition_count} transitions "
        f"in {len(buffer.episodes)} episodes (test episodes: {len(test)})"
    )
    summary["train_transitions"] = buffer.transition_count

    log(f"[4/5] training DiscreteBC for {train_steps} steps (batch {batch_size}, CPU)")
    import d3rlpy

    algo = d3rlpy.algos.DiscreteBCConfig(
        batch_size=batch_size,
        learning_rate=3e-5,
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler(),
    ).create(device="cpu:0")
    d3rlpy.seed(seed)
    algo.fit(
        buffer,
        n_steps=train_steps,
        n_steps_per_epoch=train_steps,
        show_progress=False,
        save_interval=10**9,
        experiment_name="demo",
        logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=str(workdir / "d3rlpy_logs")),
    )

    log(f"[5/5] evaluating one episode in CrowdPlay/SpaceInvaders (<= {eval_max_frames} frames)")
    env = CrowdPlayAtariEnv("space_invaders", config, max_episode_frames=eval_max_frames)
    obs, _ = env.reset(seed=seed)
    stack = np.zeros((4, *obs.shape[1:]), dtype=obs.dtype)
    stack[-1] = obs[0]
    total, steps, done = 0.0, 0, False
    while not done:
        action = int(algo.predict(stack[None])[0])
        obs, reward, terminated, truncated, _ = env.step(action)
        stack = np.concatenate([stack[1:], obs])
        total += reward
        steps += 1
        done = terminated or truncated
    env.close()
    summary.update(eval_return=total, eval_agent_steps=steps, seconds=time.perf_counter() - started)
    log(
        f"      return {total:g} over {steps} agent steps ({steps * config.downsample_frequency} "
        f"frames); whole demo {summary['seconds']:.0f} s"
    )
    files.write_json(workdir / "demo_summary.json", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (`crowdplay-minari demo`)."""
    a = parser.add_argument
    a("--workdir", type=Path, default=Path("demo_run"), help="output folder (default demo_run)")
    a("--seed", type=int, default=0, help="seed of the sample, the split and training (0)")
    a("--episodes", type=positive_int, default=8, help="sample episodes to play (8)")
    a("--frames", type=positive_int, default=1500, help="frame cap per sample episode (1500)")
    a("--train-steps", type=positive_int, default=300, help="DiscreteBC gradient steps (300)")
    a(
        "--eval-max-frames",
        type=positive_int,
        default=4000,
        help="raw frames of the evaluation episode at most (4000)",
    )


def run(args: argparse.Namespace) -> int:
    run_demo(
        args.workdir,
        seed=args.seed,
        episodes=args.episodes,
        frames=args.frames,
        train_steps=args.train_steps,
        eval_max_frames=args.eval_max_frames,
    )
    return 0
