"""The emulator CrowdPlay recorded every game in, set up the way CrowdPlay set it up.

CrowdPlay played every game, single-player ones included, in `multi-agent-ale-py` 0.1.12 (its
`MultiAgentAtariGame`): `repeat_action_probability` 0, no frame skip, the minimal action set, the
first game mode the ROM offers for the number of players, seeded by `random_seed` followed by a
reload of the ROM, and a plain `reset_game` at the start of each episode. `ale-py`'s own
interface starts in another state after reset (another frame phase; Space Invaders' sprites
flicker on the other frames), so only this set-up replays a recording frame for frame.

This is the one place that builds an emulator: the sample generator, the evaluation and
collection environments and the two-player PettingZoo environment all use `CrowdPlayEmulator`.

    emulator = CrowdPlayEmulator("space_invaders_2p", seed=0)
    emulator.reset()
    rewards = emulator.act([1, 4])        # minimal-action indices, one per player
    emulator.screen(), emulator.ram(), emulator.lives(), emulator.game_over()
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .games import game_info

__all__ = ["MAX_SEED", "CrowdPlayEmulator", "rom_path"]

MAX_SEED = 2**31 - 1
"""ALE's `random_seed` is a C int."""


def rom_path(rom: str) -> str:
    """The ROM file `ale-py` ships for `rom` (CrowdPlay's emulator loads the same files)."""
    from ale_py import roms

    return str(roms.get_rom_path(rom))


class CrowdPlayEmulator:
    """One game of `game` (a CrowdPlay game name) in `multi-agent-ale-py`, as CrowdPlay ran it.

    Actions are indices into the minimal action set, one per player. `seed` is ALE's
    `random_seed`; with repeat_action_probability 0 the game itself does not depend on it.
    """

    def __init__(self, game: str, seed: int = 0) -> None:
        import multi_agent_ale_py

        info = game_info(game)
        self.game = game
        self.players = info.players
        self._path = rom_path(info.rom)
        multi_agent_ale_py.ALEInterface.setLoggerMode("error")
        self.ale = multi_agent_ale_py.ALEInterface()
        self.ale.setFloat(b"repeat_action_probability", 0.0)
        self.ale.setInt(b"frame_skip", 1)
        self.ale.loadROM(self._path)
        modes = [int(m) for m in self.ale.getAvailableModes(self.players)]
        if modes[:1] != [info.mode]:  # the catalogue must say what CrowdPlay's set-up picks
            raise RuntimeError(
                f"{game}: the games catalogue gives mode {info.mode}, but the ROM's modes for "
                f"{self.players} player(s) start {modes[:4]} (CrowdPlay took the first)"
            )
        self.mode = info.mode
        self.seed(seed)
        self.minimal_actions = np.asarray(self.ale.getMinimalActionSet(), dtype=np.intc)
        self._actions = np.zeros(self.players, dtype=np.intc)

    def seed(self, seed: int) -> None:
        """Re-seed and reload the ROM, as CrowdPlay's `MultiAgentAtariGame.seed` does."""
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must lie in [0, {MAX_SEED}] (ALE random_seed), got {seed}")
        self.ale.setInt(b"random_seed", int(seed))
        self.ale.loadROM(self._path)
        self.ale.setMode(self.mode)

    def reset(self) -> None:
        self.ale.reset_game()

    def act(self, action_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Play one frame; `action_indices[p]` is player p's minimal-action index. Returns each
        player's reward (int64)."""
        self._actions[:] = self.minimal_actions[np.asarray(action_indices)]
        return np.asarray(self.ale.act(self._actions), dtype=np.int64)

    def screen(self, out: np.ndarray | None = None) -> np.ndarray:
        """The (210, 160, 3) RGB screen, written into `out` when given."""
        return self.ale.getScreenRGB(out)

    def ram(self) -> np.ndarray:
        """A copy of the 128 bytes of Atari RAM."""
        return self.ale.getRAM()

    def lives(self) -> list[int]:
        """Each player's lives (Space Invaders counts down to -1 at game over)."""
        return [int(x) for x in self.ale.allLives()]

    def game_over(self) -> bool:
        return bool(self.ale.game_over())

    def action_names(self) -> list[str]:
        """Names of the minimal action set, e.g. `['NOOP', 'FIRE', 'RIGHT', ...]`."""
        import ale_py

        return [ale_py.Action(int(a)).name for a in self.minimal_actions]
