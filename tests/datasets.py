"""What tests compare converted datasets by."""

from __future__ import annotations

from pathlib import Path

from crowdplay_minari.loading import load_dataset
from crowdplay_minari.storage import DIGEST_ATTRIBUTE


def stored_episodes(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Each dataset under `root`: its (crowdplay episode id, recorded digest) in episode order.
    Equal digests are equal stored bytes and attributes (`storage.episode_digest`), which
    `verify` checks against the files."""
    episodes: dict[str, list[tuple[str, str]]] = {}
    for episode in load_dataset("crowdplay", root=root):
        episodes.setdefault(episode.dataset_id, []).append(
            (episode.episode_id, episode.metadata[DIGEST_ATTRIBUTE])
        )
    return episodes
