"""Reference scores for Atari games: random and human play.

The standard per-game references of the Atari literature (Mnih et al., 2015, "Human-level
control through deep reinforcement learning", Extended Data Table 2; reused by every later
paper's human-normalised score): `random` is a uniform random policy, `human` a professional
games tester after two hours of practice. Normalised score = (score - random) / (human - random).
They are used as Minari's `ref_min_score` / `ref_max_score` and by the benchmark runner.
"""

from __future__ import annotations

REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    # game: (random, human)
    "space_invaders": (148.0, 1668.7),
    "riverraid": (1338.5, 17118.0),
    "qbert": (163.9, 13455.0),
    "breakout": (1.7, 30.5),
    "beam_rider": (363.9, 16926.5),
    "montezuma_revenge": (0.0, 4753.3),
}
# Two-player variants are scored per player against the single-player references.
REFERENCE_SCORES["space_invaders_2p"] = REFERENCE_SCORES["space_invaders"]
REFERENCE_SCORES["space_invaders_ai"] = REFERENCE_SCORES["space_invaders"]


def human_normalized_score(game: str, score: float) -> float:
    """(score - random) / (human - random) for `game`."""
    random_score, human_score = REFERENCE_SCORES[game]
    return (score - random_score) / (human_score - random_score)
