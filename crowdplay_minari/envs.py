"""Gymnasium environments for evaluating agents trained on CrowdPlay data.

`CrowdPlayAtariEnv` plays the real game in the Arcade Learning Environment the way CrowdPlay
recorded it (60 Hz, no frame skip, no sticky actions, the minimal action set) and returns
observations made by `crowdplay_minari.processing.stacked_observations`, the same function the
dataset loader uses, so an agent sees at evaluation exactly the pixels it was trained on. One
`step` repeats the action for `downsample_frequency` raw frames and sums their rewards, which is
what a kept step of a downsampled dataset means.

Example::

    import gymnasium as gym
    import crowdplay_minari.envs  # registers the CrowdPlay/... ids

    env = gym.make("CrowdPlay/SpaceInvaders-v0", stack_n=1, downsample_frequency=4)
    observation, info = env.reset(seed=0)  # (84, 84, 1) uint8, the screen at raw frame 0
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["raw_reward_frames"], info["frame_number"]  # (4, 4): four raw frames were played

`eval_env_spec` gives a JSON-serialisable spec of this environment for one processing config (it
builds the env with `gym.make(spec)` in a fresh process, no registration needed);
`collection_env_spec` gives the spec of the raw 60 Hz environment CrowdPlay recorded in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, SupportsFloat

import ale_py
import gymnasium as gym
import numpy as np
from ale_py import roms
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec

from crowdplay_minari.episode import FRAME_SHAPE
from crowdplay_minari.games import GAMES, rom_for_game
from crowdplay_minari.processing import ProcessingConfig, frames_needed, stacked_observations

__all__ = [
    "COLLECTION_ENTRY_POINT",
    "EVAL_ENTRY_POINT",
    "EVAL_ENV_IDS",
    "GAME_ROMS",
    "CrowdPlayAtariEnv",
    "collection_env_spec",
    "eval_env_spec",
    "rom_for_game",
]

GAME_ROMS: dict[str, str] = {name: info.rom for name, info in GAMES.items()}
"""CrowdPlay game name -> `ale-py` ROM id (a view of the games catalogue)."""

_ROM_ENV_NAMES: dict[str, str] = {info.rom: info.env_name for info in GAMES.values()}

EVAL_ENV_IDS: dict[str, str] = {rom: f"CrowdPlay/{name}-v0" for rom, name in _ROM_ENV_NAMES.items()}
"""ROM id -> registered gymnasium id of its evaluation environment."""

EVAL_ENTRY_POINT = "crowdplay_minari.envs:CrowdPlayAtariEnv"
COLLECTION_ENTRY_POINT = "ale_py.env:AtariEnv"

_PROCESSING_FIELDS = tuple(field.name for field in dataclasses.fields(ProcessingConfig))
_MAX_ALE_SEED = 2**31 - 1  # ALE's `random_seed` is a C int


class CrowdPlayAtariEnv(gym.Env[np.ndarray, np.int64]):
    """A CrowdPlay Atari game with CrowdPlay's frame processing, for evaluating trained agents.

    The emulator runs as in CrowdPlay's recordings: `repeat_action_probability=0`, no frame skip,
    the minimal action set. One `step` plays the action for `k = processing.downsample_frequency`
    raw frames (fewer when the game ends or the frame cap is reached first) and returns the sum
    of their rewards. The observation is `stacked_observations` of the last
    `frames_needed(processing)` raw screens, black before the episode's first screen, so it equals
    the dataset observation at the same raw frame index (`ProcessedTrajectory.frame_indices`).

    Example::

        >>> env = CrowdPlayAtariEnv("breakout", ProcessingConfig.d3rlpy_preset(), seed=0)
        >>> observation, info = env.reset()
        >>> observation.shape, env.action_space
        ((1, 84, 84), Discrete(4))

    Args:
        game: a CrowdPlay game name (see `GAME_ROMS`); two-player Space Invaders games are played
            as the single-player game.
        processing: the frame processing; the default `ProcessingConfig()` when neither it nor
            `processing_options` is given.
        max_episode_frames: raw frames after which an episode is truncated (108 000 = 30 minutes).
        seed: ALE `random_seed` (0 .. 2**31 - 1) for the first episodes; random when `None`.
        render_mode: `None` or `"rgb_array"` (the raw 210 x 160 RGB screen).
        **processing_options: `ProcessingConfig` fields, instead of `processing`, so that
            `gym.make(id, stack_n=1, downsample_frequency=4)` works.

    `info` holds `lives`, `frame_number` (raw frames played this episode: the raw index of the
    current screen), `raw_reward_frames` (raw frames this step played) and `ram` (a copy of the
    128 bytes of Atari RAM, for task statistics of the agent's play).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(
        self,
        game: str = "space_invaders",
        processing: ProcessingConfig | None = None,
        *,
        max_episode_frames: int = 108_000,
        seed: int | None = None,
        render_mode: str | None = None,
        **processing_options: Any,
    ) -> None:
        rom = rom_for_game(game)
        self.processing = _resolve_processing(processing, processing_options)
        if isinstance(max_episode_frames, bool) or not isinstance(
            max_episode_frames, int | np.integer
        ):
            raise ValueError(f"max_episode_frames must be an int, got {max_episode_frames!r}")
        if max_episode_frames < 1:
            raise ValueError(f"max_episode_frames must be >= 1, got {max_episode_frames}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.game = game
        self.rom = rom
        self.max_episode_frames = int(max_episode_frames)
        self.render_mode = render_mode

        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
        self.ale = ale_py.ALEInterface()
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.setInt("frame_skip", 1)
        self._load_rom(seed)
        self._minimal_actions = list(self.ale.getMinimalActionSet())

        self.action_space = spaces.Discrete(len(self._minimal_actions))
        dtype = self.processing.observation_dtype()
        high = 1.0 if self.processing.scale else 255
        self.observation_space = spaces.Box(
            low=0, high=high, shape=self.processing.observation_shape(), dtype=dtype
        )

        # The last `history_length` raw screens, stored twice over (slot j and j + history_length)
        # so that the newest `history_length` frames in time order are always one contiguous
        # slice, `_history[_cursor : _cursor + history_length]`, without copying per frame.
        self._history_length = frames_needed(self.processing)
        self._history = np.zeros((2 * self._history_length, *FRAME_SHAPE), dtype=np.uint8)
        self._cursor = 0
        self._newest = np.array([self._history_length - 1])
        self._frame_number = 0
        self._episode_over = True

    # -- gymnasium API -----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new game; with `seed`, re-seed ALE and reload the ROM first (deterministic).

        Returns the processed observation at raw frame 0.
        """
        super().reset(seed=seed)
        if seed is not None:
            self._load_rom(seed)
        self.ale.reset_game()
        self._history[:] = 0
        self._cursor = 0
        self._frame_number = 0
        self._episode_over = False
        self._record_screen()
        return self._observation(), self._info(raw_reward_frames=0)

    def step(
        self, action: int | np.integer
    ) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Play `action` for `downsample_frequency` raw frames, or until the game ends or the
        frame cap is reached; return the summed reward."""
        if self._episode_over:
            raise gym.error.ResetNeeded(
                "CrowdPlayAtariEnv.step called before reset or after the episode ended; "
                "call reset() first"
            )
        if not self.action_space.contains(action):
            raise ValueError(
                f"action must be an int in [0, {self.action_space.n}) (an index into the "
                f"minimal action set of {self.rom}), got {action!r}"
            )
        ale_action = self._minimal_actions[int(action)]
        reward = 0
        raw_frames = 0
        for _ in range(self.processing.downsample_frequency):
            reward += self.ale.act(ale_action)
            raw_frames += 1
            self._frame_number += 1
            self._record_screen()
            if self.ale.game_over() or self._frame_number >= self.max_episode_frames:
                break
        terminated = bool(self.ale.game_over())
        truncated = not terminated and self._frame_number >= self.max_episode_frames
        self._episode_over = terminated or truncated
        return (
            self._observation(),
            float(reward),
            terminated,
            truncated,
            self._info(raw_reward_frames=raw_frames),
        )

    def render(self) -> np.ndarray | None:
        """The raw (210, 160, 3) RGB screen when `render_mode="rgb_array"`, else `None`."""
        if self.render_mode == "rgb_array":
            return self.ale.getScreenRGB()
        return None

    def get_action_meanings(self) -> list[str]:
        """Names of the minimal action set, e.g. `['NOOP', 'FIRE', 'RIGHT', ...]`."""
        return [ale_py.Action(action).name for action in self._minimal_actions]

    # -- internals ---------------------------------------------------------------------------

    def _load_rom(self, seed: int | None) -> None:
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0]) & _MAX_ALE_SEED
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not 0 <= seed <= _MAX_ALE_SEED:
            raise ValueError(f"seed must lie in [0, {_MAX_ALE_SEED}] (ALE random_seed), got {seed}")
        self.ale.setInt("random_seed", int(seed))
        self.ale.loadROM(str(roms.get_rom_path(self.rom)))

    def _record_screen(self) -> None:
        slot = self._cursor
        self.ale.getScreenRGB(self._history[slot])
        self._history[slot + self._history_length] = self._history[slot]
        self._cursor = (slot + 1) % self._history_length

    def _observation(self) -> np.ndarray:
        recent = self._history[self._cursor : self._cursor + self._history_length]
        return stacked_observations(recent, self._newest, self.processing)[0]

    def _info(self, raw_reward_frames: int) -> dict[str, Any]:
        return {
            "lives": int(self.ale.lives()),
            "frame_number": self._frame_number,
            "raw_reward_frames": raw_reward_frames,
            "ram": self.ale.getRAM().copy(),
        }


def _resolve_processing(
    processing: ProcessingConfig | None, options: dict[str, Any]
) -> ProcessingConfig:
    unknown = sorted(set(options) - set(_PROCESSING_FIELDS))
    if unknown:
        raise TypeError(
            f"CrowdPlayAtariEnv got unknown option(s) {', '.join(unknown)}; processing options "
            f"are the ProcessingConfig fields: {', '.join(_PROCESSING_FIELDS)}"
        )
    if processing is None:
        return ProcessingConfig(**options)
    if options:
        raise TypeError(
            "pass either processing=ProcessingConfig(...) or its fields as keyword arguments "
            f"({', '.join(sorted(options))}), not both"
        )
    if not isinstance(processing, ProcessingConfig):
        raise TypeError(f"processing must be a ProcessingConfig, got {type(processing).__name__}")
    return processing


def eval_env_spec(game: str, config: ProcessingConfig | None = None) -> EnvSpec:
    """A spec of `CrowdPlayAtariEnv` for `game` and `config`, with plain JSON kwargs.

    `gym.make(spec)` builds it without any registration (the entry point is a string), and
    `EnvSpec.from_json(spec.to_json())` round-trips it, e.g. into a Minari dataset's metadata.
    """
    rom = rom_for_game(game)
    config = ProcessingConfig() if config is None else config
    kwargs: dict[str, Any] = {"game": game}
    for name in _PROCESSING_FIELDS:
        value = getattr(config, name)
        kwargs[name] = bool(value) if isinstance(value, bool | np.bool_) else int(value)
    return EnvSpec(id=EVAL_ENV_IDS[rom], entry_point=EVAL_ENTRY_POINT, kwargs=kwargs)


def collection_env_spec(game: str) -> EnvSpec:
    """The spec of the raw environment CrowdPlay recorded `game` in: `ale_py`'s `AtariEnv` with
    RGB observations, no frame skip, no sticky actions and the minimal action set.

    Two-player Space Invaders games map to the single-player game, whose action and observation
    spaces match one agent's (their two-player dynamics need `multi-agent-ale-py`). The spec's id
    (`CrowdPlay/<Game>NoFrameskip-v0`) is a name only, not registered; `gym.make(spec)` works.
    """
    rom = rom_for_game(game)
    return EnvSpec(
        id=f"CrowdPlay/{_ROM_ENV_NAMES[rom]}NoFrameskip-v0",
        entry_point=COLLECTION_ENTRY_POINT,
        kwargs={
            "game": rom,
            "obs_type": "rgb",
            "frameskip": 1,
            "repeat_action_probability": 0.0,
            "full_action_space": False,
        },
    )


def _register_eval_envs() -> None:
    for rom, env_id in EVAL_ENV_IDS.items():
        if env_id not in gym.registry:  # importlib.reload or a second import path
            gym.register(id=env_id, entry_point=EVAL_ENTRY_POINT, kwargs={"game": rom})


_register_eval_envs()
