"""Check converted Minari datasets against their raw CrowdPlay source, frame for frame.

Reads every episode through Minari's own storage (the path a user takes) and compares
observations, actions, rewards, termination / truncation flags, per-step infos and every metadata
attribute (decoded back to CrowdPlay's Python types) with a fresh read of the raw trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crowdplay_minari.attributes import decode_attributes, nested_from_flat
from crowdplay_minari.raw import CrowdPlayDataError, RawDataset
from crowdplay_minari.storage import dataset_dir, main_data_path


@dataclass
class VerificationReport:
    episodes_checked: int = 0
    frames_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _flat_attributes(storage, index: int) -> dict:
    import h5py

    with h5py.File(main_data_path(Path(storage.data_path)), "r") as file:
        return dict(file[f"episode_{index}"].attrs)


def verify_dataset(
    dataset_id: str, raw: RawDataset, report: VerificationReport, root: Path | None = None
) -> None:
    """Compare every episode of one converted dataset (under the datasets folder `root`) with
    the raw source."""
    import minari

    dataset = minari.MinariDataset(dataset_dir(dataset_id, root))
    storage = dataset.storage
    all_meta = raw.metadata()
    for ep in dataset.iterate_episodes():
        where = f"{dataset_id} episode {ep.id}"
        flat = decode_attributes(_flat_attributes(storage, ep.id))
        episode_id = flat["crowdplay_episode_id"]
        agent_id = flat["agent_id"]
        try:
            source = raw.read_episode(episode_id, agents=[agent_id])
        except CrowdPlayDataError as exc:
            report.problems.append(f"{where}: cannot read raw source: {exc}")
            continue
        agent = source.agents[agent_id]
        meta = all_meta[episode_id]
        n = agent.num_steps
        checks = {
            "observations[:N]": np.array_equal(ep.observations[:n], agent.frames),
            "observations[N] (repeat of last)": np.array_equal(
                ep.observations[n], agent.frames[-1]
            ),
            "actions": np.array_equal(ep.actions, agent.actions),
            "rewards": np.array_equal(ep.rewards, agent.rewards),
            "terminations": bool(ep.terminations[-1]) == agent.terminated
            and not ep.terminations[:-1].any(),
            "truncations": bool(ep.truncations[-1]) == agent.truncated
            and not ep.truncations[:-1].any(),
            "infos.ram": np.array_equal(ep.infos["ram"][1:], agent.ram),
            "infos.lives": np.array_equal(ep.infos["lives"][1:], agent.lives),
            "infos.user_type": np.array_equal(ep.infos["user_type"][1:], agent.user_types),
            "infos.action_step_iter": np.array_equal(
                ep.infos["action_step_iter"][1:], agent.action_step_iters
            ),
            "infos.step_iter": np.array_equal(ep.infos["step_iter"][1:], source.step_iters),
            "game/task/source": (flat["game"], flat["task"], flat["source"])
            == (meta.game, meta.task, meta.source),
            "environment_id/task_id": (flat["environment_id"], flat["task_id"])
            == (meta.environment_id, meta.task_id),
            "keyword_data": nested_from_flat(flat, "keyword_data")
            == {a: v for a, v in meta.keyword_data.items() if a in (agent_id, "all")},
            "environment_keyword_data": nested_from_flat(flat, "environment_keyword_data")
            == meta.environment_keyword_data,
        }
        for name, values in agent.statistics.items():
            stored = ep.infos["statistics"].get(name.replace("/", "\u2215"))
            checks[f"infos.statistics[{name}]"] = stored is not None and np.array_equal(
                stored[1:], values, equal_nan=True
            )
        user = meta.users.get(agent_id)
        checks["user_id"] = flat["user_id"] == (user.user_id if user else None)
        for name, ok in checks.items():
            if not ok:
                report.problems.append(
                    f"{where} (CrowdPlay {episode_id}, {agent_id}): {name} differs"
                )
        report.episodes_checked += 1
        report.frames_checked += n


def verify(
    raw_dir: Path,
    dataset_ids: list[str],
    *,
    root: Path | None = None,
    log: Callable[[str], None] = print,
) -> VerificationReport:
    """Verify several datasets under the datasets folder `root` (default: Minari's); problems
    are listed in the returned report."""
    raw = RawDataset(raw_dir)
    report = VerificationReport()
    for dataset_id in dataset_ids:
        verify_dataset(dataset_id, raw, report, root)
        log(f"verified {dataset_id}")
    return report
