"""Emulator-made sample data in the exact raw CrowdPlay format.

The real release (15 GB) cannot be downloaded everywhere, so the project plays real Atari games in
the Arcade Learning Environment, the way CrowdPlay recorded people: every game in
`multi-agent-ale-py` set up as CrowdPlay set it up (`crowdplay_minari.emulator`; ROMs from
`ale-py`), 60 Hz, no frame skip, no sticky actions, the minimal action set. Scripted
"participants" hold keys for a while, fire, move towards targets that depend on their task, start
late, and react with latency; an AI partner acts every frame. Statistics are computed from the
recorded rewards, actions and RAM the way CrowdPlay computed them.

    crowdplay-minari sample data/raw --seed 0 --episodes 8 --frames 1500
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .emulator import CrowdPlayEmulator
from .episode import (
    AI,
    FRAME_SHAPE,
    HUMAN,
    AgentTrajectory,
    Episode,
    EpisodeMetadata,
    User,
)
from .games import SHARED_REWARD_TASKS, game_info
from .raw.writer import RawDatasetWriter
from .statistics import TIMEDELTA_STATISTICS, running_statistics, space_invaders_x

AGENT_IDS = ("game_0>player_0", "game_0>player_1")
BASE_TIME = dt.datetime(2021, 6, 1, 12, 0, 0)


@dataclass(frozen=True)
class SessionSpec:
    """One participant session (a CrowdPlay `environment`): a task and who controls each agent."""

    task_id: str
    game: str
    task: str
    source: str
    ai_agents: frozenset[str] = frozenset()  # agents an AI controls throughout
    takeover_fraction: float | None = None  # player_0's human is replaced by an AI this far in


# The default sample covers every case the pipeline must handle.
DEFAULT_SESSIONS: tuple[SessionSpec, ...] = (
    SessionSpec("space_invaders_mturk", "space_invaders", "plain", "mturk"),
    SessionSpec("space_invaders_insideout", "space_invaders", "insideout", "mturk"),
    SessionSpec("space_invaders_left_email", "space_invaders", "left", "email"),
    SessionSpec("riverraid_mturk", "riverraid", "plain", "mturk"),
    SessionSpec("qbert_socialmedia", "qbert", "plain", "socialmedia"),
    SessionSpec("space_invaders_2p_cooperative_mturk", "space_invaders_2p", "cooperative", "mturk"),
    SessionSpec(
        "space_invaders_ai_competitive_mturk",
        "space_invaders_ai",
        "competitive",
        "mturk",
        ai_agents=frozenset({AGENT_IDS[1]}),
        takeover_fraction=0.5,
    ),
)


# -- scripted players --------------------------------------------------------------------------


@dataclass
class _Player:
    """A scripted participant: holds an action for a while, fires, seeks task-dependent targets."""

    rng: random.Random
    game: str
    task: str
    player_index: int
    action_names: list[str]
    is_ai: bool = False
    action: int = 0
    hold: int = 0
    first_press: int = 0
    action_step_iter: int = -1
    names: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = {name: i for i, name in enumerate(self.action_names)}
        # Humans take a moment before their first key press; AIs act at once.
        self.first_press = 0 if self.is_ai else self.rng.randint(20, 90)

    def _pick(self, ram: np.ndarray) -> int:
        rng, names = self.rng, self.names
        if self.game.startswith("space_invaders"):
            x = float(space_invaders_x(ram[None], self.player_index)[0])
            target = {
                "left": rng.uniform(0.0, 0.45),
                "right": rng.uniform(0.55, 1.0),
                "insideout": rng.uniform(0.35, 0.65),
                "outsidein": rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1)]),
            }.get(self.task, rng.uniform(0.0, 1.0))
            fire = rng.random() < 0.7
            if abs(target - x) < 0.05:
                move = ""
            else:
                move = "RIGHT" if target > x else "LEFT"
            name = (move + ("FIRE" if fire else "")) or "NOOP"
            return names.get(name, 0)
        # Other games: persistent random key combinations, firing when the game has a fire key.
        choices = [n for n in names if n != "NOOP"]
        firing = [n for n in choices if "FIRE" in n]
        pool = firing if firing and rng.random() < 0.6 else choices
        return names[rng.choice(pool)]

    def step(self, step_iter: int, ram: np.ndarray) -> tuple[int, int]:
        """(action index, action_step_iter) for the step numbered `step_iter` (1-based)."""
        if self.is_ai:
            if self.hold <= 0:
                self.action, self.hold = self._pick(ram), 4  # a frame-skip-4 agent
            self.hold -= 1
            return self.action, step_iter - 1
        if step_iter >= self.first_press and self.hold <= 0:
            self.action = self._pick(ram)
            self.hold = self.rng.randint(8, 40)
            self.action_step_iter = step_iter - self.rng.randint(1, 6)  # client latency
        self.hold -= 1
        return self.action, self.action_step_iter


# -- recording ---------------------------------------------------------------------------------


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hash(rng: random.Random) -> str:
    return hashlib.sha256(rng.getrandbits(256).to_bytes(32, "big")).hexdigest()


@dataclass
class _Recording:
    frames: np.ndarray
    actions: np.ndarray  # (N, players)
    rewards: np.ndarray  # (N, players)
    ram: np.ndarray  # (N, 128)
    lives: np.ndarray  # (N, players)
    user_types: np.ndarray  # (N, players)
    action_step_iters: np.ndarray  # (N, players)
    game_over: bool


def _play(
    emulator: CrowdPlayEmulator,
    players: list[_Player],
    max_frames: int,
    takeover_at: int | None,
    shared_reward: bool = False,
) -> _Recording:
    n_players = len(players)
    frames = np.empty((max_frames, *FRAME_SHAPE), dtype=np.uint8)
    actions = np.zeros((max_frames, n_players), dtype=np.int64)
    rewards = np.zeros((max_frames, n_players), dtype=np.int64)
    ram = np.zeros((max_frames, 128), dtype=np.uint8)
    lives = np.zeros((max_frames, n_players), dtype=np.int64)
    user_types = np.zeros((max_frames, n_players), dtype=np.int8)
    step_iters = np.zeros((max_frames, n_players), dtype=np.int64)
    current_ram = emulator.ram()
    n = 0
    over = False
    while n < max_frames:
        if takeover_at is not None and n == takeover_at:
            players[0].is_ai, players[0].hold = True, 0  # the human disconnected
        frames[n] = emulator.screen()
        for p, player in enumerate(players):
            actions[n, p], step_iters[n, p] = player.step(n + 1, current_ram)
            user_types[n, p] = AI if player.is_ai else HUMAN
        rewards[n] = emulator.act(actions[n])
        if shared_reward:  # CrowdPlay's co-op wrapper: both players get the sum
            rewards[n] = rewards[n].sum()
        current_ram = emulator.ram()
        ram[n] = current_ram
        lives[n] = emulator.lives()
        n += 1
        if emulator.game_over():
            over = True
            break
    return _Recording(
        frames[:n],
        actions[:n],
        rewards[:n],
        ram[:n],
        lives[:n],
        user_types[:n],
        step_iters[:n],
        over,
    )


def _agent_trajectories(
    spec: SessionSpec, rec: _Recording, history: list[_Recording], agent_ids: tuple[str, ...]
) -> dict[str, AgentTrajectory]:
    two_player = len(agent_ids) == 2
    result = {}
    for p, agent in enumerate(agent_ids):
        stats = running_statistics(
            spec.game,
            spec.task,
            rec.rewards[:, p],
            rec.actions[:, p],
            rec.ram,
            player_index=p,
            two_player=two_player,
        )
        # Task callables run over the whole session, across its episodes.
        session = [*history, rec]
        task_stats = running_statistics(
            spec.game,
            spec.task,
            np.concatenate([r.rewards[:, p] for r in session]),
            np.concatenate([r.actions[:, p] for r in session]),
            np.concatenate([r.ram for r in session]),
            player_index=p,
            two_player=two_player,
        )
        n = rec.actions.shape[0]
        dones = np.zeros(n, dtype=bool)
        dones[-1] = rec.game_over
        result[agent] = AgentTrajectory(
            agent_id=agent,
            frames=rec.frames,  # two-player agents share one frame array, as in CrowdPlay
            actions=rec.actions[:, p].copy(),
            rewards=rec.rewards[:, p].copy(),
            dones=dones,
            ram=rec.ram,
            lives=rec.lives[:, p].copy(),
            user_types=rec.user_types[:, p].copy(),
            action_step_iters=rec.action_step_iters[:, p].copy(),
            statistics=stats,
            task_statistics={k: v[-n:] for k, v in task_stats.items()},
            timedelta_statistics=frozenset(TIMEDELTA_STATISTICS & stats.keys()),
        )
    return result


def _keyword_data(
    trajectories: dict[str, AgentTrajectory], created_on: dt.datetime
) -> dict[str, dict]:
    data: dict[str, dict] = {"all": {"created_on": created_on}}
    for agent, traj in trajectories.items():
        values = {}
        for name, series in traj.statistics.items():
            last = float(series[-1])
            if name in traj.timedelta_statistics:
                values[name] = dt.timedelta(seconds=last)
            elif name == "Score":
                values[name] = np.int64(last)  # CrowdPlay summed numpy rewards
            else:
                values[name] = int(last) if last == 0 else last
        data[agent] = values
    return data


@dataclass(frozen=True)
class _SessionJob:
    spec: SessionSpec
    index: int
    count: int
    seed: int
    max_frames: int
    out_dir: Path
    encodings: tuple[str, ...]


def _play_session(
    job: _SessionJob,
) -> tuple[str, dict, list[User], list[tuple[EpisodeMetadata, int, bool]]]:
    """Play one session's episodes and write their trajectory files (runs in a worker process)."""
    spec = job.spec
    rng = random.Random(job.seed)
    n_players = game_info(spec.game).players
    agent_ids = AGENT_IDS[:n_players]
    environment_id = _uuid(rng)
    session_start = BASE_TIME + dt.timedelta(hours=job.index)
    env_keywords: dict[str, dict] = {
        "all": {
            "game": spec.game,
            "task": spec.task,
            "source": spec.source,
            "created_on": session_start,
        }
    }
    for agent in sorted(spec.ai_agents):
        env_keywords[agent] = {"ai_policy": "si-comp-1"}
    humans = [a for a in agent_ids if a not in spec.ai_agents]
    users = [User(_hash(rng), _hash(rng), spec.task_id, environment_id, a) for a in humans]
    writer = RawDatasetWriter(job.out_dir, encodings=job.encodings, create_db=False)
    emulator = CrowdPlayEmulator(spec.game, seed=rng.randrange(2**31))
    history: list[_Recording] = []
    episodes = []
    for e in range(job.count):
        players = [
            _Player(
                random.Random(rng.getrandbits(64)),
                spec.game,
                spec.task,
                p,
                emulator.action_names(),
                is_ai=agent in spec.ai_agents,
            )
            for p, agent in enumerate(agent_ids)
        ]
        # The last episode of a session with several is cut short: the session stopped.
        last = e == job.count - 1 and job.count > 1
        cap = max(2, job.max_frames * 2 // 3) if last else job.max_frames
        takeover = None
        if spec.takeover_fraction is not None:
            takeover = int(cap * spec.takeover_fraction)
        emulator.reset()  # every episode starts with reset_game, as in CrowdPlay
        shared = n_players == 2 and spec.task in SHARED_REWARD_TASKS
        rec = _play(emulator, players, cap, takeover, shared)
        trajectories = _agent_trajectories(spec, rec, history, agent_ids)
        history.append(rec)
        created_on = session_start + dt.timedelta(
            seconds=sum(r.actions.shape[0] for r in history[:-1]) // 60
        )
        metadata = EpisodeMetadata(
            episode_id=_uuid(rng),
            environment_id=environment_id,
            task_id=spec.task_id,
            game=spec.game,
            task=spec.task,
            source=spec.source,
            keyword_data=_keyword_data(trajectories, created_on),
            environment_keyword_data=env_keywords,
            users={},
        )
        step_iters = np.arange(1, rec.actions.shape[0] + 1, dtype=np.int64)
        writer.write_trajectory(Episode(metadata, step_iters, trajectories))
        episodes.append((metadata, rec.actions.shape[0], rec.game_over))
    return environment_id, env_keywords, users, episodes


def generate_sample(
    out_dir: str | Path,
    *,
    seed: int = 0,
    episodes: int = 8,
    max_frames: int = 1500,
    sessions: tuple[SessionSpec, ...] = DEFAULT_SESSIONS,
    encodings: tuple[str, ...] = (".pickle.bz2",),
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Play `episodes` episodes (cycling through `sessions`) and write them in raw CrowdPlay format.

    A session that gets several episodes plays them back to back, the last one cut short at
    two thirds of `max_frames` (the participant stopped). Sessions run in `workers` processes;
    the result depends only on `seed`. Returns a summary (episode ids, frames, seconds).
    """
    if episodes < 1 or max_frames < 2:
        raise ValueError("need at least 1 episode of at least 2 frames")
    out_dir = Path(out_dir)
    if (out_dir / "dataset.sqlite").exists():
        raise FileExistsError(f"{out_dir} already holds a dataset.sqlite; choose an empty dir")
    rng = random.Random(seed)
    writer = RawDatasetWriter(out_dir, encodings=encodings)
    per_session = [0] * len(sessions)
    for k in range(episodes):
        per_session[k % len(sessions)] += 1
    jobs = [
        _SessionJob(spec, s, count, rng.getrandbits(64), max_frames, out_dir, tuple(encodings))
        for s, (spec, count) in enumerate(zip(sessions, per_session, strict=True))
        if count
    ]
    started = time.perf_counter()
    total_frames = 0
    written: list[str] = []
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap(_play_session, jobs))
    else:
        results = map(_play_session, jobs)
    for job, (environment_id, env_keywords, users, session_episodes) in zip(
        jobs, results, strict=True
    ):
        writer.add_environment(environment_id, job.spec.task_id, env_keywords)
        writer.add_users(users)
        for metadata, frames, game_over in session_episodes:
            writer.add_episode_rows(metadata)
            total_frames += frames
            written.append(metadata.episode_id)
            if progress:
                end = "game over" if game_over else "cut short"
                progress(f"{job.spec.task_id}: {frames} frames, {end}")
    seconds = time.perf_counter() - started
    return {
        "episodes": written,
        "frames": total_frames,
        "seconds": seconds,
        "frames_per_second": total_frames / seconds if seconds else float("inf"),
    }
