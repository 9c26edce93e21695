"""The games catalogue: every fact about a CrowdPlay game, in one typed table.

CrowdPlay recorded six Atari games, Space Invaders also with two players (human + human, and
human + AI). Everything else in the package asks this table: the reader (action-set sizes), the
converter (spaces, reference scores, dataset descriptions), the environments (ROM, players, ALE
mode), the statistics and the benchmark runner (task adherence, normalised scores).

    from crowdplay_minari.games import game_info

    info = game_info("space_invaders_2p")
    info.rom, info.players, info.num_actions  # ('space_invaders', 2, 6)

Reference scores are the standard per-game references of the Atari literature (Mnih et al.,
2015, "Human-level control through deep reinforcement learning", Extended Data Table 2): `random`
is a uniform random policy, `human` a professional games tester after two hours of practice.
Two-player variants are scored per player against the single-player references.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .statistics import CORRECT_ALIENS, LEFT_SIDE, RIGHT_SIDE

AGENT_IDS = ("game_0>player_0", "game_0>player_1")
"""CrowdPlay's agent ids; single-player games have only the first."""

_ALIEN_ORDER = {
    task: CORRECT_ALIENS for task in ("insideout", "outsidein", "rowbyrow", "insideout_incentives")
}
_SIDES = {"left": LEFT_SIDE, "right": RIGHT_SIDE}


@dataclass(frozen=True)
class GameInfo:
    """One CrowdPlay game."""

    name: str
    """CrowdPlay's game name, e.g. `space_invaders_2p`."""
    rom: str
    """The `ale-py` ROM id the game runs on."""
    env_name: str
    """CamelCase name used in environment ids, e.g. `SpaceInvaders`."""
    players: int
    """Agents in one game (1, or 2 for the two-player Space Invaders games)."""
    num_actions: int
    """Size of the minimal action set of each player (checked against the emulator in tests)."""
    random_score: float
    human_score: float
    mode: int = 0
    """The ALE game mode CrowdPlay played: the ROM's first mode for this number of players in
    `multi-agent-ale-py` (1 for single-player Space Invaders, 33 for two players)."""
    task_statistics: Mapping[str, str] = field(default_factory=dict)
    """Task -> the CrowdPlay statistic that measures adherence to it."""
    ai_partner: bool = False
    """Player 1 is (or may become) an AI agent."""

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return AGENT_IDS[: self.players]

    @property
    def two_player(self) -> bool:
        return self.players == 2

    def human_normalized_score(self, score: float) -> float:
        """(score - random) / (human - random)."""
        return (score - self.random_score) / (self.human_score - self.random_score)


def _space_invaders(name: str, players: int, **extra) -> GameInfo:
    return GameInfo(
        name,
        "space_invaders",
        "SpaceInvaders",
        players,
        6,
        148.0,
        1668.7,
        mode=33 if players == 2 else 1,
        task_statistics=MappingProxyType({**_ALIEN_ORDER, **_SIDES}),
        **extra,
    )


GAMES: Mapping[str, GameInfo] = MappingProxyType(
    {
        info.name: info
        for info in (
            _space_invaders("space_invaders", 1),
            _space_invaders("space_invaders_2p", 2),
            _space_invaders("space_invaders_ai", 2, ai_partner=True),
            GameInfo(
                "riverraid",
                "riverraid",
                "Riverraid",
                1,
                18,
                1338.5,
                17118.0,
                task_statistics=MappingProxyType(dict(_SIDES)),
            ),
            GameInfo("qbert", "qbert", "Qbert", 1, 6, 163.9, 13455.0),
            GameInfo("breakout", "breakout", "Breakout", 1, 4, 1.7, 30.5),
            GameInfo("beam_rider", "beam_rider", "BeamRider", 1, 9, 363.9, 16926.5),
            GameInfo(
                "montezuma_revenge", "montezuma_revenge", "MontezumaRevenge", 1, 18, 0.0, 4753.3
            ),
        )
    }
)
"""CrowdPlay game name -> its `GameInfo`."""

SHARED_REWARD_TASKS = frozenset({"cooperative"})
"""Two-player tasks in which CrowdPlay's co-op wrapper gave both players the sum of both rewards."""

TWO_PLAYER_GAMES = frozenset(name for name, info in GAMES.items() if info.two_player)
"""CrowdPlay games with two agents (`game_0>player_0` and `game_0>player_1`)."""


class UnknownGameError(ValueError):
    """A game name CrowdPlay did not record."""


def game_info(game: str) -> GameInfo:
    """The catalogue entry of `game`; `UnknownGameError` (a `ValueError`) names the known ones."""
    try:
        return GAMES[game]
    except (KeyError, TypeError):
        raise UnknownGameError(
            f"unknown CrowdPlay game {game!r}; expected one of {', '.join(GAMES)}"
        ) from None


def rom_for_game(game: str) -> str:
    """The `ale-py` ROM id CrowdPlay's `game` runs on, e.g. `'space_invaders_2p'` ->
    `'space_invaders'`."""
    return game_info(game).rom


def num_actions(game: str) -> int:
    """Size of the game's minimal action set (per player)."""
    return game_info(game).num_actions


def task_adherence_key(game: str, task: str) -> str | None:
    """The statistic that measures adherence to `task`, or None for tasks without one."""
    info = GAMES.get(game)
    return None if info is None else info.task_statistics.get(task)


def human_normalized_score(game: str, score: float) -> float:
    """(score - random) / (human - random) for `game`."""
    return game_info(game).human_normalized_score(score)
