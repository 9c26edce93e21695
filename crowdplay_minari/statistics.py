"""CrowdPlay's keyword statistics, computed over whole episodes with numpy.

CrowdPlay computed these online with per-step "callables" while people played; these functions
give the same running values at every step from the recorded arrays (rewards, actions, RAM). They
serve three purposes: writing sample data, checking stored statistics against the RAM they came
from, and measuring the task adherence of a trained agent's play.
"""

from __future__ import annotations

import numpy as np

FPS = 60
SCORE = "Score"
TIME_PLAYED = "Time played"
ACTIVE_PLAYTIME = "Active playtime"  # single-player spelling
ACTIVE_PLAYTIME_2P = "Active Playtime"  # two-player spelling
CORRECT_ALIENS = "Correct aliens shot (fraction)"
LEFT_SIDE = "Time spent on left side of screen (fraction)"
RIGHT_SIDE = "Time spent on right side of screen (fraction)"

TIMEDELTA_STATISTICS = frozenset({TIME_PLAYED, ACTIVE_PLAYTIME, ACTIVE_PLAYTIME_2P})

# Space Invaders RAM: six alien rows as bit masks, player x positions.
SI_ALIEN_ROWS = slice(0x12, 0x18)
SI_PLAYER_X = (0x1C, 0x1D)
SI_X_MIN, SI_X_MAX = 0x23, 0x75

ALIEN_ORDER_TASKS = ("insideout", "outsidein", "rowbyrow", "insideout_incentives")
SIDE_TASKS = {"left": (LEFT_SIDE, 0.0, 0.5), "right": (RIGHT_SIDE, 0.5, 1.0)}
# River Raid: the plane's x is RAM 0x33, the river's centre 0x4C; CrowdPlay's bounds are in pixels.
RIVERRAID_X, RIVERRAID_CENTRE = 0x33, 0x4C
RIVERRAID_SIDE_TASKS = {"left": (LEFT_SIDE, -1000.0, 5.0), "right": (RIGHT_SIDE, -5.0, 1000.0)}


def running_score(rewards: np.ndarray) -> np.ndarray:
    """`Score`: the sum of the agent's rewards so far."""
    return np.cumsum(rewards)


def running_time_played(num_steps: int) -> np.ndarray:
    """`Time played` in whole seconds (CrowdPlay floors frames // 60)."""
    return (np.arange(1, num_steps + 1) // FPS).astype(np.float64)


def _last_event_time(events: np.ndarray) -> np.ndarray:
    """At each 1-based time t, the last t' <= t with events[t'-1] true (0 when none yet)."""
    times = np.where(events, np.arange(1, events.shape[0] + 1), 0)
    return np.maximum.accumulate(times) if times.size else times


def running_active_playtime(
    rewards: np.ndarray,
    actions: np.ndarray,
    reward_timeout: int = 60 * FPS,
    action_timeout: int = 20 * FPS,
) -> np.ndarray:
    """`Active playtime` in whole seconds: frames with a reward in the last 60 s and a non-NOOP
    action in the last 20 s (both clocks start at frame 0, as in CrowdPlay)."""
    t = np.arange(1, rewards.shape[0] + 1)
    active = (_last_event_time(rewards != 0) + reward_timeout >= t) & (
        _last_event_time(actions != 0) + action_timeout >= t
    )
    return (np.cumsum(active) // FPS).astype(np.float64)


def space_invaders_x(ram: np.ndarray, player_index: int) -> np.ndarray:
    """Player x position mapped to [0, 1] (can leave that range slightly at the edges)."""
    x = ram[:, SI_PLAYER_X[player_index]].astype(np.float64)
    return (x - SI_X_MIN) / (SI_X_MAX - SI_X_MIN)


def running_side_fraction(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Share of frames so far with `low <= position <= high`."""
    inside = (position >= low) & (position <= high)
    return np.cumsum(inside) / np.arange(1, position.shape[0] + 1)


def aliens_present(ram: np.ndarray) -> np.ndarray:
    """(N, 6, 6) bool: alien at row i, column j after each step."""
    rows = ram[:, SI_ALIEN_ROWS].astype(np.uint8)
    return ((rows[:, :, None] >> np.arange(6, dtype=np.uint8)) & 1).astype(bool)


def _correct_kills(task: str, killed: np.ndarray, aliens: np.ndarray) -> tuple[int, int]:
    """(good, bad) kills in one step, judged on the aliens left after it (CrowdPlay's rules)."""
    cols_cleared = ~aliens.any(axis=0)  # (6,)
    good = bad = 0
    for i, j in zip(*np.nonzero(killed), strict=True):
        if task == "rowbyrow":
            ok = bool((~aliens[:i].any(axis=1)).all())  # every row below index i is empty
        elif task == "outsidein":
            ok = bool(cols_cleared[:j].all()) if j < 3 else bool(cols_cleared[j + 1 :].all())
        else:  # insideout (and its incentivised variant)
            if j in (2, 3):
                ok = True
            elif j < 2:
                ok = bool(cols_cleared[j + 1 : 3].all())
            else:
                ok = bool(cols_cleared[3:j].all())
        good += ok
        bad += not ok
    return good, bad


def running_alien_order_fraction(ram: np.ndarray, task: str) -> np.ndarray:
    """`Correct aliens shot (fraction)` for insideout / outsidein / rowbyrow.

    Only the steps where an alien disappears are visited, so the cost is per kill, not per frame.
    The value is the int 0 until the first kill, as in CrowdPlay.
    """
    aliens = aliens_present(ram)
    previous = np.concatenate([np.ones((1, 6, 6), dtype=bool), aliens[:-1]])
    killed = previous & ~aliens
    fraction = np.zeros(ram.shape[0])
    good = bad = 0
    last = 0.0
    kill_steps = np.flatnonzero(killed.any(axis=(1, 2)))
    for n, step in enumerate(kill_steps):
        g, b = _correct_kills(task, killed[step], aliens[step])
        good, bad = good + g, bad + b
        last = good / (good + bad) if good + bad else 0.0
        end = kill_steps[n + 1] if n + 1 < kill_steps.size else ram.shape[0]
        fraction[step:end] = last
    return fraction


def running_statistics(
    game: str,
    task: str,
    rewards: np.ndarray,
    actions: np.ndarray,
    ram: np.ndarray,
    *,
    player_index: int = 0,
    two_player: bool = False,
) -> dict[str, np.ndarray]:
    """Every statistic CrowdPlay tracked for this game and task, as running values per step."""
    stats = {
        SCORE: running_score(rewards).astype(np.float64),
        TIME_PLAYED: running_time_played(rewards.shape[0]),
        ACTIVE_PLAYTIME_2P if two_player else ACTIVE_PLAYTIME: running_active_playtime(
            rewards, actions
        ),
    }
    if game.startswith("space_invaders"):
        if task in ALIEN_ORDER_TASKS:
            stats[CORRECT_ALIENS] = running_alien_order_fraction(ram, task)
        if task in SIDE_TASKS:
            key, low, high = SIDE_TASKS[task]
            stats[key] = running_side_fraction(space_invaders_x(ram, player_index), low, high)
    elif game == "riverraid" and task in RIVERRAID_SIDE_TASKS:
        key, low, high = RIVERRAID_SIDE_TASKS[task]
        position = ram[:, RIVERRAID_X].astype(np.float64) - RIVERRAID_CENTRE
        stats[key] = running_side_fraction(position, low, high)
    return stats
