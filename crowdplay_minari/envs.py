"""Gymnasium environments that are the game CrowdPlay's participants played.

`CrowdPlayAtariEnv` runs `crowdplay_minari.emulator.CrowdPlayEmulator`, CrowdPlay's own emulator
set-up (`multi-agent-ale-py`, 60 Hz, no frame skip, no sticky actions, the minimal action set),
and returns observations made by `crowdplay_minari.processing.stacked_observations`, the same
function the dataset loader uses: replaying a recorded episode's actions reproduces its frames,
and the loader's processed observations, exactly. One `step` repeats the action for
`downsample_frequency` raw frames and sums their rewards, which is what a kept step of a
downsampled dataset means. Two-player games are played as one player with a partner policy.

The same class is the raw collection env of every dataset (`env_spec`: no warp, no stacking, one
frame a step, no no-op starts) and its evaluation env (`eval_env_spec`: the loader's processing
and the evaluation protocol below).

Evaluation protocol (the defaults): each episode starts with 0..`noop_max` (30) NOOP steps drawn
from the env's seeded random generator, so different `reset(seed=...)` give different starts and
one seed always the same one; `repeat_action_probability` (sticky actions, per raw frame) is 0,
as in the humans' game. Pass `noop_max=0` to replay recordings.

Example::

    import gymnasium as gym

    env = gym.make("crowdplay_minari.envs:CrowdPlay/SpaceInvaders-v0", stack_n=1,
                   downsample_frequency=4)   # the module prefix registers the ids
    observation, info = env.reset(seed=0)     # (84, 84, 1) uint8
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())

    two = gym.make("crowdplay_minari.envs:CrowdPlay/SpaceInvadersTwoPlayer-v0",
                   player=1, partner="random")   # player_1, player_0 plays randomly
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils import EzPickle

from crowdplay_minari.emulator import MAX_SEED, CrowdPlayEmulator
from crowdplay_minari.episode import FRAME_SHAPE
from crowdplay_minari.games import GAMES, SHARED_REWARD_TASKS, game_info, rom_for_game
from crowdplay_minari.processing import ProcessingConfig, frames_needed, stacked_observations

__all__ = [
    "ENTRY_POINT",
    "EVAL_ENV_IDS",
    "EVAL_PROTOCOL",
    "GAME_ROMS",
    "RAW_PROCESSING",
    "CrowdPlayAtariEnv",
    "Partner",
    "collection_env_spec",
    "eval_env_spec",
    "rom_for_game",
]

GAME_ROMS: dict[str, str] = {name: info.rom for name, info in GAMES.items()}
"""CrowdPlay game name -> `ale-py` ROM id (a view of the games catalogue)."""


def _env_name(game: str) -> str:
    info = game_info(game)
    return info.env_name + ("TwoPlayer" if info.two_player else "")


EVAL_ENV_IDS: dict[str, str] = {game: f"CrowdPlay/{_env_name(game)}-v0" for game in GAMES}
"""CrowdPlay game -> registered gymnasium id of its evaluation environment (both two-player
Space Invaders games are `CrowdPlay/SpaceInvadersTwoPlayer-v0`)."""

ENTRY_POINT = "crowdplay_minari.envs:CrowdPlayAtariEnv"
DEFAULT_MAX_EPISODE_FRAMES = 108_000

EVAL_PROTOCOL: dict[str, Any] = {"noop_max": 30, "repeat_action_probability": 0.0}
"""The default evaluation protocol: up to 30 NOOP steps at the start, no sticky actions."""

RAW_PROCESSING = ProcessingConfig(warp=False, stack_n=1, max_n=1)
"""The identity processing: the raw (210, 160, 3) RGB screen, one raw frame a step."""

_PROCESSING_FIELDS = tuple(field.name for field in dataclasses.fields(ProcessingConfig))


Partner = str | Callable[[np.ndarray, dict[str, Any]], int] | Sequence[int] | np.ndarray
"""`"noop"`, `"random"`, a callable `(observation, info) -> action index` asked once per step,
or a sequence of the partner's actions per raw frame (a recording's actions; NOOP after it)."""


class CrowdPlayAtariEnv(gym.Env[np.ndarray, np.int64], EzPickle):
    """A CrowdPlay Atari game with CrowdPlay's frame processing, as its participants played it.

    One `step` plays the action for `k = processing.downsample_frequency` raw frames (fewer when
    the game ends or the frame cap is reached first) and returns the sum of their rewards. The
    observation is `stacked_observations` of the last `frames_needed(processing)` raw screens,
    black before the episode's first screen, so it equals the dataset observation at the same
    raw frame index (`ProcessedTrajectory.frame_indices`).

    Example::

        >>> env = CrowdPlayAtariEnv("breakout", ProcessingConfig.d3rlpy_preset(), noop_max=0)
        >>> observation, info = env.reset(seed=0)
        >>> observation.shape, env.action_space
        ((1, 84, 84), Discrete(4))

    Args:
        game: a CrowdPlay game name (see `GAME_ROMS`); `space_invaders_2p` and
            `space_invaders_ai` are CrowdPlay's two-player game (ALE mode 33).
        processing: the frame processing; the default `ProcessingConfig()` when neither it nor
            `processing_options` is given.
        player: which player the agent controls (0, or 1 in two-player games).
        partner: the other player of a two-player game (see `Partner`); NOOP by default.
        task: the CrowdPlay task where it changes the rules: in `cooperative` games both players
            get the sum of both rewards, as CrowdPlay's co-op wrapper gave them.
        noop_max: at most this many NOOP steps at the start of an episode (uniform, from the
            env's random generator); 0 replays a recording.
        repeat_action_probability: sticky actions: each raw frame repeats the previous raw
            frame's action with this probability.
        max_episode_frames: raw frames after which an episode is truncated (108 000 = 30 minutes).
        seed: seeds the first `reset` (emulator and random generator) when it gets none.
        render_mode: `None` or `"rgb_array"` (the raw 210 x 160 RGB screen).
        **processing_options: `ProcessingConfig` fields, instead of `processing`, so that
            `gym.make(id, stack_n=1, downsample_frequency=4)` works.

    `info` holds `lives` (the agent's), `frame_number` (raw frames played this episode, no-op
    start included: the raw index of the current screen), `raw_reward_frames` (raw frames this
    step played), `noop_steps` (of this episode's start) and `ram` (a copy of the 128 bytes of
    Atari RAM, for task statistics of the agent's play). The env pickles (a vector env or a Ray
    actor can hold it); an unpickled copy is a fresh env that needs `reset`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(
        self,
        game: str = "space_invaders",
        processing: ProcessingConfig | None = None,
        *,
        player: int = 0,
        partner: Partner = "noop",
        task: str | None = None,
        noop_max: int = 30,
        repeat_action_probability: float = 0.0,
        max_episode_frames: int = DEFAULT_MAX_EPISODE_FRAMES,
        seed: int | None = None,
        render_mode: str | None = None,
        **processing_options: Any,
    ) -> None:
        EzPickle.__init__(
            self,
            game,
            processing,
            player=player,
            partner=partner,
            task=task,
            noop_max=noop_max,
            repeat_action_probability=repeat_action_probability,
            max_episode_frames=max_episode_frames,
            seed=seed,
            render_mode=render_mode,
            **processing_options,
        )
        info = game_info(game)
        self.processing = _resolve_processing(processing, processing_options)
        self.max_episode_frames = _int_at_least("max_episode_frames", max_episode_frames, 1)
        self.noop_max = _int_at_least("noop_max", noop_max, 0)
        self.player = _int_at_least("player", player, 0)
        if self.player >= info.players:
            raise ValueError(f"player must be < {info.players} in {game}, got {player}")
        if not (
            isinstance(repeat_action_probability, float | int)
            and 0.0 <= repeat_action_probability <= 1.0
        ):
            raise ValueError(
                f"repeat_action_probability must lie in [0, 1], got {repeat_action_probability!r}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        if seed is not None:
            _check_seed(seed)
        self.game = game
        self.rom = info.rom
        self.task = task
        self.shared_reward = info.two_player and task in SHARED_REWARD_TASKS
        self.repeat_action_probability = float(repeat_action_probability)
        self.render_mode = render_mode
        self._first_seed = seed

        self.emulator = CrowdPlayEmulator(game, seed=0 if seed is None else seed)
        self.ale = self.emulator.ale
        n_actions = len(self.emulator.minimal_actions)
        self.action_space = spaces.Discrete(n_actions)
        self.partner = _resolve_partner(partner, info.two_player, n_actions)
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
        self._noop_steps = 0
        self._actions = np.zeros(info.players, dtype=np.int64)  # the last raw frame's actions
        self.step_rewards = np.zeros(info.players, dtype=np.int64)
        """Each player's reward of the last step (the parallel env reports both)."""
        self._episode_over = True

    # -- gymnasium API -----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new game, after 0..`noop_max` NOOP steps; with `seed`, re-seed the emulator
        and the env's random generator first (the same seed gives the same episode).

        Returns the processed observation at the first screen the agent acts on.
        """
        if seed is None and self._first_seed is not None:
            seed, self._first_seed = self._first_seed, None
        super().reset(seed=seed)
        if seed is not None:
            self.emulator.seed(_check_seed(seed) & MAX_SEED)
        while True:
            self._start_game()
            self._noop_steps = int(self.np_random.integers(0, self.noop_max + 1))
            for _ in range(self._noop_steps):
                self._play(0)
                if self._episode_over:
                    break
            if not self._episode_over:
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
        reward, raw_frames = self._play(int(action))
        terminated = self.emulator.game_over()
        truncated = not terminated and self._frame_number >= self.max_episode_frames
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
            return self.emulator.screen()
        return None

    def get_action_meanings(self) -> list[str]:
        """Names of the minimal action set, e.g. `['NOOP', 'FIRE', 'RIGHT', ...]`."""
        return self.emulator.action_names()

    # -- internals ---------------------------------------------------------------------------

    def _start_game(self) -> None:
        self.emulator.reset()
        self._history[:] = 0
        self._cursor = 0
        self._frame_number = 0
        self._actions[:] = 0
        self._episode_over = False
        self._record_screen()

    def _play(self, action: int) -> tuple[int, int]:
        """Up to `downsample_frequency` raw frames of `action`; (summed reward, frames)."""
        partner_action = self._ask_partner()
        totals = np.zeros(len(self._actions), dtype=np.int64)
        raw_frames = 0
        sticky = self.repeat_action_probability
        for _ in range(self.processing.downsample_frequency):
            partner_frame_action = self._partner_frame_action(partner_action)
            for p in range(len(self._actions)):
                if not (sticky and self.np_random.random() < sticky):
                    self._actions[p] = action if p == self.player else partner_frame_action
            rewards = self.emulator.act(self._actions)
            totals += rewards.sum() if self.shared_reward else rewards
            raw_frames += 1
            self._frame_number += 1
            self._record_screen()
            if self.emulator.game_over() or self._frame_number >= self.max_episode_frames:
                self._episode_over = True
                break
        self.step_rewards = totals
        return int(totals[self.player]), raw_frames

    def _ask_partner(self) -> int:
        partner = self.partner
        if partner is None or isinstance(partner, str):
            random = partner == "random"
            return int(self.np_random.integers(0, self.action_space.n)) if random else 0
        if callable(partner):
            return int(partner(self._observation(), self._info(raw_reward_frames=0)))
        return 0  # a recording is read frame by frame

    def _partner_frame_action(self, asked: int) -> int:
        if isinstance(self.partner, np.ndarray):  # a recording, one action per raw frame
            frame = self._frame_number
            return int(self.partner[frame]) if frame < len(self.partner) else 0
        return asked

    def _record_screen(self) -> None:
        slot = self._cursor
        self.emulator.screen(self._history[slot])
        self._history[slot + self._history_length] = self._history[slot]
        self._cursor = (slot + 1) % self._history_length

    def _observation(self) -> np.ndarray:
        recent = self._history[self._cursor : self._cursor + self._history_length]
        observation = stacked_observations(recent, self._newest, self.processing)[0]
        if np.shares_memory(observation, self._history):  # raw screens: never hand out the buffer
            observation = observation.copy()
        return observation

    def _info(self, raw_reward_frames: int) -> dict[str, Any]:
        return {
            "lives": self.emulator.lives()[self.player],
            "frame_number": self._frame_number,
            "raw_reward_frames": raw_reward_frames,
            "noop_steps": self._noop_steps,
            "ram": self.emulator.ram(),
        }


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _resolve_partner(partner: Any, two_player: bool, n_actions: int) -> Any:
    if not two_player:
        if partner not in (None, "noop"):
            raise ValueError("partner is for two-player games; this game has one player")
        return None
    if isinstance(partner, str):
        if partner not in ("noop", "random"):
            raise ValueError(
                f"partner must be 'noop', 'random', a callable or a sequence of actions, "
                f"got {partner!r}"
            )
        return partner
    if callable(partner):
        return partner
    actions = np.asarray(partner)
    if actions.ndim != 1 or not np.issubdtype(actions.dtype, np.integer):
        raise ValueError("a partner recording must be a 1-D sequence of integer actions")
    if len(actions) and (actions.min() < 0 or actions.max() >= n_actions):
        raise ValueError(f"a partner recording's actions must lie in [0, {n_actions})")
    return actions.astype(np.int64)


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


def _spec(
    game: str,
    config: ProcessingConfig,
    player: int,
    task: str | None,
    env_id: str,
    **options: Any,
) -> EnvSpec:
    info = game_info(game)
    if not 0 <= player < info.players:
        raise ValueError(f"player must be in [0, {info.players}) for {game}, got {player}")
    kwargs: dict[str, Any] = {"game": game}
    if info.two_player:
        kwargs.update(player=player, task=task)
    for name in _PROCESSING_FIELDS:
        value = getattr(config, name)
        kwargs[name] = bool(value) if isinstance(value, bool | np.bool_) else int(value)
    kwargs.update(options)
    steps = math.ceil(DEFAULT_MAX_EPISODE_FRAMES / config.downsample_frequency)
    return EnvSpec(id=env_id, entry_point=ENTRY_POINT, kwargs=kwargs, max_episode_steps=steps)


def eval_env_spec(
    game: str, config: ProcessingConfig | None = None, player: int = 0, task: str | None = None
) -> EnvSpec:
    """A spec of `CrowdPlayAtariEnv` for `game` (the agent as `player`; `task` where it changes
    the rules) and `config`, under the default evaluation protocol, with plain JSON kwargs.

    `gym.make(spec)` builds it without any registration (the entry point is a string), and
    `EnvSpec.from_json(spec.to_json())` round-trips it, e.g. into a Minari dataset's metadata.
    """
    config = ProcessingConfig() if config is None else config
    env_id = EVAL_ENV_IDS[game_info(game).name]
    return _spec(game, config, player, task, env_id, **EVAL_PROTOCOL)


def collection_env_spec(game: str, player: int = 0, task: str | None = None) -> EnvSpec:
    """The spec of the raw environment CrowdPlay recorded `game` in: CrowdPlay's emulator set-up,
    RGB observations, one raw 60 Hz frame a step, no sticky actions, no no-op start, the minimal
    action set; in two-player games the agent is `player` and its partner does nothing unless
    `partner=` is given to `gym.make` (e.g. the other player's recorded actions).
    """
    env_id = f"CrowdPlay/{_env_name(game)}NoFrameskip-v0"  # a name only; gym.make(spec) works
    return _spec(game, RAW_PROCESSING, player, task, env_id, noop_max=0)


def _register_eval_envs() -> None:
    for game, env_id in EVAL_ENV_IDS.items():
        if env_id not in gym.registry:  # importlib.reload or a second import path
            gym.register(
                id=env_id,
                entry_point=ENTRY_POINT,
                kwargs={"game": game, **EVAL_PROTOCOL},
                max_episode_steps=DEFAULT_MAX_EPISODE_FRAMES,
            )


_register_eval_envs()
