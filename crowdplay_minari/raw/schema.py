"""The five tables of CrowdPlay's `dataset.sqlite`, as SQLAlchemy 2.x Core tables.

CrowdPlay declared `value` columns as `PickleType`; SQLAlchemy would unpickle those with a bare
`pickle.loads`. Here they are plain BLOBs, unpickled by `safe_pickle` instead.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, LargeBinary, MetaData, String, Table

metadata = MetaData()

episodes = Table(
    "episodes",
    metadata,
    Column("episode_id", String(255), primary_key=True),
    Column(
        "environment_id", String(255), ForeignKey("environments.environment_id"), nullable=False
    ),
)

episode_keyword_data = Table(
    "episodekeyworddata",
    metadata,
    Column("episode_id", String(255), ForeignKey("episodes.episode_id"), primary_key=True),
    Column("agent_id", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

environments = Table(
    "environments",
    metadata,
    Column("environment_id", String(255), primary_key=True),
    Column("task_id", String(255), nullable=False),
)

environment_keyword_data = Table(
    "environmentkeyworddata",
    metadata,
    Column(
        "environment_id", String(255), ForeignKey("environments.environment_id"), primary_key=True
    ),
    Column("agent_id", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("permanent_user_id", String(255), nullable=False),
    Column("task_id", String(255), nullable=False),
    Column(
        "environment_id", String(255), ForeignKey("environments.environment_id"), nullable=False
    ),
    Column("agent_id", String(255), nullable=False),
)

TABLES = (episodes, episode_keyword_data, environments, environment_keyword_data, users)
