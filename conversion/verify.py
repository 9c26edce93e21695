"""Check converted Minari datasets: on their own, and against their raw CrowdPlay source.

`verify_stored` needs nothing but the datasets: every episode's digest (`storage.episode_digest`,
recorded when it was written) is recomputed from the bytes as stored, so a flipped byte anywhere
in an episode's arrays or attributes is found, and the episodes present are counted against the
dataset's metadata (a deleted or added episode is found too).

`verify_dataset` reads every episode through Minari's own storage (the path a user takes) and
compares observations, actions, rewards, termination / truncation flags, per-step infos and every
metadata attribute (decoded back to CrowdPlay's Python types) with a fresh read of the raw
trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crowdplay_minari.attributes import decode_attributes, nested_from_flat
from crowdplay_minari.raw import CrowdPlayDataError, RawDataset
from crowdplay_minari.storage import (
    DIGEST_ATTRIBUTE,
    METADATA_FILE,
    EpisodeFile,
    ForeignStorageError,
    check_self_contained,
    dataset_dir,
    episode_digest,
    main_data_path,
)


@dataclass
class VerificationReport:
    episodes_checked: int = 0
    frames_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _flat_attributes(storage, index: int) -> dict:
    with EpisodeFile(main_data_path(Path(storage.data_path))) as file:
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


def verify_stored(dataset_id: str, report: VerificationReport, root: Path | None = None) -> None:
    """Check one dataset without its raw source: digests and episode counts."""
    import json

    data_dir = dataset_dir(dataset_id, root)
    try:
        metadata = json.loads((data_dir / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        report.problems.append(f"{dataset_id}: {data_dir / METADATA_FILE} unreadable ({exc})")
        return
    path = main_data_path(data_dir)
    try:
        file = EpisodeFile(path)
    except OSError as exc:
        report.problems.append(f"{dataset_id}: {path} unreadable ({exc})")
        return
    with file:
        names = set(file.names())
        expected = int(metadata.get("total_episodes", -1))
        wanted = {f"episode_{i}" for i in range(max(expected, 0))}
        if names != wanted:
            missing = sorted(wanted - names, key=lambda n: int(n.rsplit("_", 1)[1]))
            extra = sorted(names - wanted)
            report.problems.append(
                f"{dataset_id}: {path} holds {len(names)} episodes, its metadata says "
                f"{expected}"
                + (f"; missing {', '.join(missing[:5])}" if missing else "")
                + (f"; unexpected {', '.join(extra[:5])}" if extra else "")
            )
        steps = 0
        for name in sorted(names & wanted, key=lambda n: int(n.rsplit("_", 1)[1])):
            where = f"{dataset_id} {name}"
            try:
                group = file[name]
                check_self_contained(group, f"{path} {name}")
                recorded = group.attrs.get(DIGEST_ATTRIBUTE)
                if recorded is None:
                    report.problems.append(
                        f"{where}: no digest recorded (converted before checksums); reconvert "
                        "it, or compare it with the raw data (--raw)"
                    )
                elif episode_digest(group) != recorded:
                    report.problems.append(
                        f"{where}: stored bytes differ from those written (digest mismatch): "
                        "the file was damaged or changed after conversion"
                    )
                n = int(group["actions"].shape[0])
            except ForeignStorageError as exc:
                report.problems.append(f"{where}: {exc}")
                continue
            except (OSError, KeyError, ValueError) as exc:
                report.problems.append(f"{where}: unreadable ({exc})")
                continue
            steps += n
            report.episodes_checked += 1
            report.frames_checked += n
        if "total_steps" in metadata and steps != int(metadata["total_steps"]) and names == wanted:
            report.problems.append(
                f"{dataset_id}: episodes hold {steps} steps, its metadata says "
                f"{metadata['total_steps']}"
            )


def verify_datasets(
    dataset_ids: list[str],
    *,
    root: Path | None = None,
    log: Callable[[str], None] = print,
) -> VerificationReport:
    """`verify_stored` for several datasets under `root` (default: Minari's): no raw data."""
    report = VerificationReport()
    for dataset_id in dataset_ids:
        verify_stored(dataset_id, report, root)
        log(f"checked {dataset_id}")
    return report


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
