"""Choosing episodes and agents of a raw CrowdPlay dataset by their metadata alone.

Everything here reads `dataset.sqlite`'s rows (`EpisodeMetadata`), never a trajectory file, so a
selection over the 15 GB release is decided in the time it takes to read the database:

    from crowdplay_minari.raw import RawDataset
    from crowdplay_minari.raw.selection import EpisodeSelection

    raw = RawDataset("crowdplay_atari-v0")
    selection = EpisodeSelection(games=("space_invaders",), agent_kind="human", min_score=50)
    chosen = selection.resolve(raw.metadata(), lambda meta: ["game_0>player_0"])
    chosen.agents  # {episode_id: ("game_0>player_0",), ...}

What the metadata says about an agent:
- its kind: `"human"` when the `users` table has a row for it in its environment (CrowdPlay
  wrote rows for human participants only), else `"ai"` (e.g. the AI partner of
  `space_invaders_ai`). A human replaced by an AI mid-episode stays `"human"`: who controlled
  which frame is recorded per frame (`user_type`), in the trajectory, not in the database.
- its score: the `Score` statistic of its keyword data, as the loader's `EpisodeView.score` reads
  it. The loader falls back to the summed rewards where `Score` is missing; those are only known
  from the trajectory, so here such an agent fails any `min_score`.
- its length: `Time played`, which CrowdPlay counted in frames and stored as whole seconds
  (frames // 60), so it bounds the frame count to a range of 60.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..episode import EpisodeMetadata
from ..games import game_info
from ..statistics import FPS, SCORE, TIME_PLAYED

AGENT_KINDS = ("human", "ai")
"""Values of `EpisodeSelection.agent_kind`."""


def agent_kind(meta: EpisodeMetadata, agent_id: str) -> str:
    """`"human"` if a participant row in `users` names this agent of the episode, else `"ai"`."""
    return "human" if agent_id in meta.users else "ai"


def metadata_score(meta: EpisodeMetadata, agent_id: str) -> float | None:
    """The agent's `Score` statistic as a float, None when the metadata has none (or a value that
    is not a finite number)."""
    value = meta.keyword_data.get(agent_id, {}).get(SCORE)
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metadata_frames(meta: EpisodeMetadata, agent_id: str) -> tuple[int, int] | None:
    """`(low, high)` bounds on the agent's number of frames from its `Time played` statistic, or
    None when the metadata lacks it. Whole seconds (CrowdPlay floored frames // 60) leave 60
    possible counts; a fractional value gives the count exactly."""
    value = meta.keyword_data.get(agent_id, {}).get(TIME_PLAYED)
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    ):
        seconds = float(value)
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    if seconds != int(seconds):
        exact = round(seconds * FPS)
        return exact, exact
    return int(seconds) * FPS, int(seconds) * FPS + FPS - 1


class SelectionError(ValueError):
    """A selection that names an episode the database does not hold, or matches nothing in it.

    `field` is the selection field that emptied it (`"episode_ids"`, `"games"`, `"tasks"`,
    `"sources"`, `"agent_kind"` or `"min_score"`), `present` the values the episodes left at that
    point do have (for `min_score`: the best score among them)."""

    def __init__(self, message: str, *, field: str, present: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.present = present


@dataclass(frozen=True)
class SelectedEpisodes:
    """What a selection picked: the agents to take of each episode, in episode id order."""

    agents: dict[str, tuple[str, ...]]
    unscored: tuple[tuple[str, str], ...] = ()
    """(episode id, agent id) of agents left out by `min_score` because the metadata holds no
    `Score` for them."""


def _names(value: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"EpisodeSelection {what}: expected non-empty strings, got {name!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class EpisodeSelection:
    """Which episodes, and which of their agents, to take; None everywhere takes everything.

    An episode is taken when its game, task, source and id are among the given ones; of its
    agents, those of `agent_kind` whose `Score` is at least `min_score`. Each field accepts one
    name or several; unknown games are refused here (`UnknownGameError`, a `ValueError`).

    >>> print(EpisodeSelection(games="qbert", agent_kind="human", min_score=100))
    game qbert; agent kind human; Score >= 100
    """

    games: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    agent_kind: str | None = None
    """`"human"` or `"ai"` (see `agent_kind()`); None: both."""
    min_score: float | None = None
    episode_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("games", "tasks", "sources", "episode_ids"):
            object.__setattr__(self, name, _names(getattr(self, name), name))
        for game in self.games or ():
            game_info(game)  # UnknownGameError names the catalogue's games
        if self.agent_kind is not None and self.agent_kind not in AGENT_KINDS:
            raise ValueError(
                f"EpisodeSelection agent_kind: expected one of {', '.join(AGENT_KINDS)}, "
                f"got {self.agent_kind!r}"
            )
        if self.min_score is not None:
            if isinstance(self.min_score, bool) or not isinstance(
                self.min_score, int | float | np.integer | np.floating
            ):
                raise ValueError(
                    f"EpisodeSelection min_score: expected a number, got {self.min_score!r}"
                )
            if not math.isfinite(self.min_score):
                raise ValueError(
                    f"EpisodeSelection min_score: must be finite, got {self.min_score}"
                )
            object.__setattr__(self, "min_score", float(self.min_score))

    @property
    def restricts(self) -> bool:
        """False when the selection takes everything."""
        return any(getattr(self, f.name) is not None for f in _FIELDS)

    def __str__(self) -> str:
        parts = []
        for f in _FIELDS:
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "min_score":
                parts.append(f"Score >= {value:g}")
            elif f.name == "episode_ids":
                parts.append(f"{len(value)} episode id(s)")
            else:
                label = f.name.replace("_", " ").rstrip("s")
                parts.append(f"{label} {', '.join(value) if isinstance(value, tuple) else value}")
        return "; ".join(parts) or "everything"

    def takes_episode(self, meta: EpisodeMetadata) -> bool:
        """Whether the episode's id, game, task and source are selected."""
        return all(
            wanted is None or value in wanted
            for wanted, value in (
                (self.episode_ids, meta.episode_id),
                (self.games, meta.game),
                (self.tasks, meta.task),
                (self.sources, meta.source),
            )
        )

    def takes_agent(self, meta: EpisodeMetadata, agent_id: str) -> bool:
        """Whether this agent of a selected episode is of the selected kind and score."""
        if self.agent_kind is not None and agent_kind(meta, agent_id) != self.agent_kind:
            return False
        if self.min_score is not None:
            score = metadata_score(meta, agent_id)
            return score is not None and score >= self.min_score
        return True

    def resolve(
        self,
        metadata: Mapping[str, EpisodeMetadata],
        agents_of: Callable[[EpisodeMetadata], Iterable[str]],
        *,
        rejected: Iterable[str] = (),
        where: Any = "the database",
    ) -> SelectedEpisodes:
        """The selected agents of each episode in `metadata` (`agents_of` lists an episode's
        agents). `SelectionError` when an episode id is neither in `metadata` nor among the
        `rejected` rows (invalid metadata, reported elsewhere), or when a restricting selection
        matches nothing. `where` names the database in messages."""
        if self.episode_ids is not None:
            known = set(metadata) | set(rejected)
            unknown = [e for e in self.episode_ids if e not in known]
            if unknown:
                raise SelectionError(
                    f"episode {unknown[0]!r}"
                    + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                    + f" is not in {where}",
                    field="episode_ids",
                )
        agents: dict[str, tuple[str, ...]] = {}
        unscored = []
        for episode_id in sorted(metadata):
            meta = metadata[episode_id]
            if not self.takes_episode(meta):
                continue
            taken = []
            for agent_id in agents_of(meta):
                if self.takes_agent(meta, agent_id):
                    taken.append(agent_id)
                elif self.min_score is not None and metadata_score(meta, agent_id) is None:
                    if self.agent_kind in (None, agent_kind(meta, agent_id)):
                        unscored.append((episode_id, agent_id))
            if taken:
                agents[episode_id] = tuple(taken)
        named_rejected = set(self.episode_ids or ()) & set(rejected)
        if not agents and self.restricts and not named_rejected:
            raise self._nothing_matches(metadata, agents_of, where)
        return SelectedEpisodes(agents, tuple(unscored))

    def _nothing_matches(
        self,
        metadata: Mapping[str, EpisodeMetadata],
        agents_of: Callable[[EpisodeMetadata], Iterable[str]],
        where: Any,
    ) -> SelectionError:
        """The error naming the first selection field that leaves nothing, and what is there."""
        candidates = [(meta, a) for meta in metadata.values() for a in agents_of(meta)]
        steps: list[tuple[str, str, tuple | None, Callable[[EpisodeMetadata, str], str]]] = [
            ("episode_ids", "episode id", self.episode_ids, lambda m, a: m.episode_id),
            ("games", "game", self.games, lambda m, a: m.game),
            ("tasks", "task", self.tasks, lambda m, a: m.task),
            ("sources", "source", self.sources, lambda m, a: m.source),
            (
                "agent_kind",
                "an agent of kind",
                None if self.agent_kind is None else (self.agent_kind,),
                agent_kind,
            ),
        ]
        kept_so_far: list[str] = []
        for name, label, wanted, value_of in steps:
            if wanted is None:
                continue
            kept = [(m, a) for m, a in candidates if value_of(m, a) in wanted]
            if not kept:
                present = tuple(sorted({value_of(m, a) for m, a in candidates}))
                among = f" among the episodes of {'; '.join(kept_so_far)}" if kept_so_far else ""
                return SelectionError(
                    f"no episode in {where} has {label} {', '.join(wanted)}{among}; "
                    f"{label.split()[-1]}s there: {', '.join(present) or 'none'}",
                    field=name,
                    present=present,
                )
            candidates = kept
            if name != "episode_ids":
                kept_so_far.append(f"{label.split()[-1]} {', '.join(wanted)}")
        scores = [s for m, a in candidates if (s := metadata_score(m, a)) is not None]
        among = f" among the episodes of {'; '.join(kept_so_far)}" if kept_so_far else ""
        best = f"the best Score there is {max(scores):g}" if scores else "none has a Score"
        return SelectionError(
            f"no agent in {where} has a Score of {self.min_score:g} or more{among}; {best}",
            field="min_score",
            present=(f"{max(scores):g}",) if scores else (),
        )


_FIELDS = fields(EpisodeSelection)
