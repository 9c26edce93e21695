"""Unit tests of CrowdPlay's keyword statistics on hand-made reward, action and RAM arrays.

The expected values follow CrowdPlay's online callables (`environment_callables.py`): time in
whole seconds of 60 frames, activity clocks that start at frame 0, and the alien-order rules
judged on the aliens left *after* each step.
"""

from __future__ import annotations

import numpy as np
import pytest

from crowdplay_minari.games import task_adherence_key
from crowdplay_minari.statistics import (
    ACTIVE_PLAYTIME,
    ACTIVE_PLAYTIME_2P,
    CORRECT_ALIENS,
    LEFT_SIDE,
    RIGHT_SIDE,
    SCORE,
    SI_ALIEN_ROWS,
    SI_PLAYER_X,
    SI_X_MAX,
    SI_X_MIN,
    TIME_PLAYED,
    aliens_present,
    running_active_playtime,
    running_alien_order_fraction,
    running_score,
    running_side_fraction,
    running_statistics,
    running_time_played,
    space_invaders_x,
)

FPS = 60

# ---------------------------------------------------------------- score and time


def test_score_is_the_running_sum_of_rewards() -> None:
    rewards = np.array([0, 5, 0, 30, 200, 0], dtype=np.int32)
    np.testing.assert_array_equal(running_score(rewards), [0, 5, 5, 35, 235, 235])


def test_time_played_counts_whole_seconds() -> None:
    played = running_time_played(3 * FPS + 1)
    assert played[FPS - 2] == 0  # frame 59
    assert played[FPS - 1] == 1  # frame 60: one full second
    assert played[2 * FPS - 1] == 2
    assert played[-1] == 3
    assert played.shape == (3 * FPS + 1,)


# ---------------------------------------------------------------- active playtime


def _active_seconds(active_frames: np.ndarray) -> np.ndarray:
    return (np.cumsum(active_frames) // FPS).astype(np.float64)


def test_active_playtime_stops_when_rewards_stop_for_60_seconds() -> None:
    n = 3600 + 1200 + 600
    rewards = np.zeros(n, dtype=np.int64)
    rewards[99] = 10  # last reward at frame t = 100 (1-based)
    actions = np.ones(n, dtype=np.int64)  # keys pressed throughout
    active = running_active_playtime(rewards, actions)
    # Active while t <= 100 + 3600, inactive after.
    t = np.arange(1, n + 1)
    np.testing.assert_array_equal(active, _active_seconds(t <= 3700))
    assert active[-1] == 3700 // FPS == 61
    assert active[3699] == active[-1]  # flat after the timeout


def test_active_playtime_reward_clock_starts_at_frame_zero() -> None:
    n = 4000
    active = running_active_playtime(np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64))
    # No reward ever: CrowdPlay's clock starts at 0, so the first 3600 frames count.
    assert active[-1] == 3600 // FPS == 60
    assert active[3599] == 60 and active[3598] == 59


def test_active_playtime_needs_a_non_noop_action_within_20_seconds() -> None:
    n = 3000
    rewards = np.ones(n, dtype=np.int64)  # rewarded every frame
    actions = np.zeros(n, dtype=np.int64)
    actions[:100] = 3  # keys until frame 100, then NOOP
    active = running_active_playtime(rewards, actions)
    t = np.arange(1, n + 1)
    np.testing.assert_array_equal(active, _active_seconds(t <= 100 + 1200))
    assert active[-1] == 1300 // FPS == 21


def test_active_playtime_resumes_after_a_pause() -> None:
    n = 6000
    rewards = np.zeros(n, dtype=np.int64)
    rewards[[0, 5000]] = 5
    actions = np.ones(n, dtype=np.int64)
    active = running_active_playtime(rewards, actions)
    t = np.arange(1, n + 1)
    expected_active = (t <= 1 + 3600) | (t >= 5001)
    np.testing.assert_array_equal(active, _active_seconds(expected_active))
    assert active[-1] == (3601 + 1000) // FPS


# ---------------------------------------------------------------- player position and sides


def _ram_with_x(xs: list[int], player_index: int = 0) -> np.ndarray:
    ram = np.zeros((len(xs), 128), dtype=np.uint8)
    ram[:, SI_PLAYER_X[player_index]] = xs
    return ram


def test_space_invaders_x_maps_ram_to_unit_interval() -> None:
    ram = _ram_with_x([SI_X_MIN, SI_X_MAX, (SI_X_MIN + SI_X_MAX) // 2, 0x20])
    x = space_invaders_x(ram, 0)
    np.testing.assert_allclose(x, [0.0, 1.0, 0.5, (0x20 - 0x23) / (0x75 - 0x23)])
    assert x[3] < 0  # the left edge can leave [0, 1]
    # Player 1's position lives in its own byte; player 0's byte is ignored for it.
    ram1 = _ram_with_x([SI_X_MAX, SI_X_MIN], player_index=1)
    np.testing.assert_allclose(space_invaders_x(ram1, 1), [1.0, 0.0])
    np.testing.assert_allclose(space_invaders_x(ram1, 0), [-SI_X_MIN / 82] * 2)


def test_side_fraction_counts_frames_inside_the_half_inclusive() -> None:
    position = np.array([0.1, 0.6, 0.5, -0.1, 1.2, 0.0])
    left = running_side_fraction(position, 0.0, 0.5)
    np.testing.assert_allclose(left, [1 / 1, 1 / 2, 2 / 3, 2 / 4, 2 / 5, 3 / 6])
    right = running_side_fraction(position, 0.5, 1.0)
    np.testing.assert_allclose(right, [0 / 1, 1 / 2, 2 / 3, 2 / 4, 2 / 5, 2 / 6])


def test_running_statistics_pick_the_side_statistic_of_the_task() -> None:
    xs = [SI_X_MIN, SI_X_MIN + 10, SI_X_MAX, SI_X_MAX]  # left, left, right, right
    ram = _ram_with_x(xs)
    zeros = np.zeros(len(xs), dtype=np.int64)
    left = running_statistics("space_invaders", "left", zeros, zeros, ram)
    right = running_statistics("space_invaders", "right", zeros, zeros, ram)
    assert LEFT_SIDE in left and RIGHT_SIDE not in left
    assert RIGHT_SIDE in right and LEFT_SIDE not in right
    np.testing.assert_allclose(left[LEFT_SIDE], [1, 1, 2 / 3, 2 / 4])
    np.testing.assert_allclose(right[RIGHT_SIDE], [0, 0, 1 / 3, 2 / 4])
    # Player 1 reads its own byte (0x1D), here far right throughout, not player 0's.
    ram[:, SI_PLAYER_X[1]] = SI_X_MAX
    p1 = running_statistics(
        "space_invaders_2p", "left", zeros, zeros, ram, player_index=1, two_player=True
    )
    np.testing.assert_allclose(p1[LEFT_SIDE], [0, 0, 0, 0])


# ---------------------------------------------------------------- alien order


def _alien_ram(grids: list[np.ndarray]) -> np.ndarray:
    """RAM rows whose bytes 0x12..0x17 hold the given 6x6 alien grids (row i, bit j)."""
    ram = np.zeros((len(grids), 128), dtype=np.uint8)
    for n, grid in enumerate(grids):
        ram[n, SI_ALIEN_ROWS] = [sum(1 << j for j in range(6) if grid[i, j]) for i in range(6)]
    return ram


def _kill_sequence(kills_per_step: list[list[tuple[int, int]]]) -> np.ndarray:
    """Start from a full wave and remove the (row, column) aliens listed for each step."""
    grid = np.ones((6, 6), dtype=bool)
    grids = []
    for kills in kills_per_step:
        grid = grid.copy()
        for i, j in kills:
            grid[i, j] = False
        grids.append(grid)
    return _alien_ram(grids)


def test_alien_ram_layout_round_trips() -> None:
    grid = np.zeros((6, 6), dtype=bool)
    grid[0, 0] = grid[2, 5] = grid[5, 3] = True
    ram = _alien_ram([grid])
    assert list(ram[0, 0x12:0x18]) == [0b000001, 0, 0b100000, 0, 0, 0b001000]
    np.testing.assert_array_equal(aliens_present(ram)[0], grid)


def test_insideout_inner_first_is_good_outer_first_is_bad() -> None:
    column = [(i, 2) for i in range(6)]
    ram = _kill_sequence(
        [
            [],  # full wave, nothing shot
            [(3, 2)],  # inner column 2: always good            -> 1/1
            [(0, 5)],  # outer column 5 while 3, 4 stand: bad  -> 1/2
            [],
            column[:3] + column[4:],  # rest of column 2 (5 good) -> 6/7
            [(1, 1)],  # column 1 once column 2 is clear: good -> 7/8
            [(1, 0)],  # column 0 while column 1 stands: bad   -> 7/9
        ]
    )
    fraction = running_alien_order_fraction(ram, "insideout")
    np.testing.assert_allclose(fraction, [0, 1, 1 / 2, 1 / 2, 6 / 7, 7 / 8, 7 / 9])


def test_insideout_outer_column_after_inner_ones_are_cleared_is_good() -> None:
    cols_3_4 = [(i, j) for i in range(6) for j in (3, 4)]
    ram = _kill_sequence([cols_3_4, [(0, 5)]])
    fraction = running_alien_order_fraction(ram, "insideout")
    # 12 inner kills in step 0 (column 4 is judged after the step, when column 3 is clear).
    np.testing.assert_allclose(fraction, [1.0, 1.0])


def test_outsidein_outer_first_is_good_inner_first_is_bad() -> None:
    ram = _kill_sequence(
        [
            [(2, 0)],  # outermost left column: good          -> 1/1
            [(2, 2)],  # column 2 while 0, 1 stand: bad       -> 1/2
            [(4, 5)],  # outermost right column: good         -> 2/3
            [(4, 3)],  # column 3 while 4, 5 stand: bad       -> 2/4
            [(0, 4), (5, 1)],  # two kills in one step, both bad -> 2/6
        ]
    )
    fraction = running_alien_order_fraction(ram, "outsidein")
    np.testing.assert_allclose(fraction, [1, 1 / 2, 2 / 3, 2 / 4, 2 / 6])


def test_outsidein_inner_column_after_outer_ones_are_cleared_is_good() -> None:
    outer = [(i, j) for i in range(6) for j in (0, 1)]
    ram = _kill_sequence([outer, [(3, 2)]])
    fraction = running_alien_order_fraction(ram, "outsidein")
    # Column 1 is judged after the step: column 0 is clear by then, so all 12 are good.
    np.testing.assert_allclose(fraction, [1.0, 1.0])


def test_rowbyrow_lower_rows_first() -> None:
    row0 = [(0, j) for j in range(6)]
    ram = _kill_sequence(
        [
            [(0, 3)],  # row 0 is always fine                -> 1/1
            [(2, 3)],  # row 2 while rows 0, 1 stand: bad    -> 1/2
            row0[:3] + row0[4:] + [(1, j) for j in range(6)],  # rows 0 and 1: 11 good -> 12/13
            [(2, 0)],  # row 2 once rows 0, 1 are empty      -> 13/14
            [(4, 0)],  # row 4 while rows 2, 3 stand: bad    -> 13/15
        ]
    )
    fraction = running_alien_order_fraction(ram, "rowbyrow")
    np.testing.assert_allclose(fraction, [1, 1 / 2, 12 / 13, 13 / 14, 13 / 15])


def test_alien_fraction_is_zero_until_the_first_kill() -> None:
    full = np.ones((6, 6), dtype=bool)
    shot = full.copy()
    shot[0, 0] = False  # an outer alien: bad for insideout
    ram = _alien_ram([full] * 5 + [shot] * 3)
    fraction = running_alien_order_fraction(ram, "insideout")
    np.testing.assert_array_equal(fraction, [0, 0, 0, 0, 0, 0, 0, 0])
    # A good first kill changes the value exactly at the kill step, not before.
    shot[0, 0], shot[0, 2] = True, False
    ram = _alien_ram([full] * 5 + [shot] * 3)
    fraction = running_alien_order_fraction(ram, "insideout")
    np.testing.assert_array_equal(fraction, [0, 0, 0, 0, 0, 1, 1, 1])


def test_first_step_is_compared_with_a_full_wave() -> None:
    """CrowdPlay starts from all 36 aliens present, so aliens missing at step 0 count as kills."""
    grid = np.ones((6, 6), dtype=bool)
    grid[0, 2] = grid[0, 0] = False  # inner (good) and outer (bad) gone at step 0
    fraction = running_alien_order_fraction(_alien_ram([grid, grid]), "insideout")
    np.testing.assert_allclose(fraction, [0.5, 0.5])


def test_a_new_wave_is_not_a_kill() -> None:
    full = np.ones((6, 6), dtype=bool)
    empty = np.zeros((6, 6), dtype=bool)
    ram = _alien_ram([full, empty, full, full])  # all killed (rowbyrow-good), wave respawns
    fraction = running_alien_order_fraction(ram, "rowbyrow")
    np.testing.assert_allclose(fraction, [0, 1, 1, 1])


def test_running_statistics_keys_per_game_and_task() -> None:
    n = 10
    zeros = np.zeros(n, dtype=np.int64)
    ram = np.zeros((n, 128), dtype=np.uint8)
    base = {SCORE, TIME_PLAYED, ACTIVE_PLAYTIME}
    assert set(running_statistics("qbert", "plain", zeros, zeros, ram)) == base
    assert set(running_statistics("space_invaders", "insideout", zeros, zeros, ram)) == {
        *base,
        CORRECT_ALIENS,
    }
    # Two-player tasks spell it "Active Playtime".
    two = running_statistics("space_invaders_2p", "cooperative", zeros, zeros, ram, two_player=True)
    assert set(two) == {SCORE, TIME_PLAYED, ACTIVE_PLAYTIME_2P}


@pytest.mark.parametrize(
    ("game", "task", "key"),
    [
        ("space_invaders", "insideout", CORRECT_ALIENS),
        ("space_invaders", "rowbyrow", CORRECT_ALIENS),
        ("space_invaders", "left", LEFT_SIDE),
        ("riverraid", "right", RIGHT_SIDE),
        ("space_invaders", "plain", None),
        ("qbert", "insideout", None),
    ],
)
def test_task_adherence_key(game: str, task: str, key: str | None) -> None:
    assert task_adherence_key(game, task) == key


def test_riverraid_side_fraction_uses_the_plane_offset_from_the_river_centre() -> None:
    from crowdplay_minari.statistics import LEFT_SIDE, RIGHT_SIDE, running_statistics

    ram = np.zeros((4, 128), dtype=np.uint8)
    ram[:, 0x33] = [0x4C - 20, 0x4C + 5, 0x4C + 6, 0x4C - 6]  # offsets -20, 5, 6, -6
    zeros = np.zeros(4, dtype=np.int64)
    left = running_statistics("riverraid", "left", zeros, zeros, ram)[LEFT_SIDE]
    right = running_statistics("riverraid", "right", zeros, zeros, ram)[RIGHT_SIDE]
    np.testing.assert_allclose(left, [1, 1, 2 / 3, 3 / 4])
    np.testing.assert_allclose(right, [0, 1 / 2, 2 / 3, 2 / 4])
    assert LEFT_SIDE not in running_statistics("riverraid", "plain", zeros, zeros, ram)
