"""Reading (and, for sample data, writing) the raw CrowdPlay dataset format."""

from .errors import (
    CorruptTrajectoryError,
    CrowdPlayDataError,
    InvalidMetadataError,
    SchemaError,
    TrajectoryNotFoundError,
    UnsafePathError,
    UnsafePickleError,
)
from .reader import RawDataset, load_steps, parse_steps, trajectory_files

__all__ = [
    "CorruptTrajectoryError",
    "CrowdPlayDataError",
    "InvalidMetadataError",
    "UnsafePathError",
    "RawDataset",
    "SchemaError",
    "TrajectoryNotFoundError",
    "UnsafePickleError",
    "load_steps",
    "parse_steps",
    "trajectory_files",
]
