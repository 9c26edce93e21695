"""Reading (and, for sample data, writing) the raw CrowdPlay dataset format."""

from .errors import (
    CorruptTrajectoryError,
    CrowdPlayDataError,
    SchemaError,
    TrajectoryNotFoundError,
    UnsafePickleError,
)
from .reader import RawDataset, load_steps, parse_steps, trajectory_files

__all__ = [
    "CorruptTrajectoryError",
    "CrowdPlayDataError",
    "RawDataset",
    "SchemaError",
    "TrajectoryNotFoundError",
    "UnsafePickleError",
    "load_steps",
    "parse_steps",
    "trajectory_files",
]
