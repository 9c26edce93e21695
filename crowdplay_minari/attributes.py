"""Lossless mapping of CrowdPlay metadata values onto HDF5 episode attributes.

HDF5 attributes hold no nested dicts, None or datetimes, and Minari turns an attribute named
`a/b/c` back into nested dicts `{"a": {"b": {"c": ...}}}`. CrowdPlay metadata is nested two
levels deep (`keyword_data[agent][key]`), so each value becomes one attribute at
`<group>/<agent>/<key>`, encoded as below; the original Python type of every value is kept in the
JSON attribute `crowdplay_value_types` (path -> type name), and `decode_value` inverts it.

| CrowdPlay value                  | attribute value                  | type name          |
|----------------------------------|----------------------------------|--------------------|
| `timedelta`                      | float seconds                    | `timedelta`        |
| `datetime` (naive) / `date`      | ISO 8601 string                  | `datetime`/`date`  |
| `None`                           | empty string                     | `none`             |
| `bool` / `int` / `float` / `str` | itself                           | `bool`/`int`/...   |
| numpy scalar                     | itself (dtype kept by HDF5)      | `numpy`            |
| numpy array                      | itself (dtype kept by HDF5)      | `ndarray`          |
| list / tuple / dict              | JSON text of the encoded items   | `json`             |

A `/` inside a CrowdPlay key would split it; it is written as `∕` (U+2215) and restored on read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from .storage import SLASH_SUBSTITUTE, VALUE_TYPES_ATTRIBUTE


def encode_value(value: Any) -> tuple[Any, str]:
    """(attribute value, type name) for one CrowdPlay metadata value."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds(), "timedelta"
    if isinstance(value, dt.datetime):
        return value.isoformat(), "datetime"
    if isinstance(value, dt.date):
        return value.isoformat(), "date"
    if value is None:
        return "", "none"
    if isinstance(value, np.generic):
        return value, "numpy"
    if isinstance(value, np.ndarray):
        return value, "ndarray"
    if isinstance(value, bool):
        return value, "bool"
    if isinstance(value, int):
        return value, "int"
    if isinstance(value, float):
        return value, "float"
    if isinstance(value, str):
        return value, "str"
    if isinstance(value, list | tuple | dict):
        return json.dumps(_jsonable(value)), "json"
    raise TypeError(f"cannot store a {type(value).__name__} as an HDF5 attribute: {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def decode_value(value: Any, type_name: str) -> Any:
    """Invert `encode_value` (HDF5 hands back numpy scalars; they are turned back into the
    original Python types)."""
    if type_name == "timedelta":
        return dt.timedelta(seconds=float(value))
    if type_name == "datetime":
        return dt.datetime.fromisoformat(str(value))
    if type_name == "date":
        return dt.date.fromisoformat(str(value))
    if type_name == "none":
        return None
    if type_name == "bool":
        return bool(value)
    if type_name == "int":
        return int(value)
    if type_name == "float":
        return float(value)
    if type_name == "str":
        return value.decode() if isinstance(value, bytes) else str(value)
    if type_name == "json":
        return json.loads(value)
    return value  # numpy / ndarray come back as stored


def escape_key(key: str) -> str:
    return key.replace("/", SLASH_SUBSTITUTE)


def unescape_key(key: str) -> str:
    return key.replace(SLASH_SUBSTITUTE, "/")


def encode_nested(
    group: str, nested: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Attributes `group/agent/key` for a two-level dict, and their type names."""
    attributes: dict[str, Any] = {}
    types: dict[str, str] = {}
    for agent, values in nested.items():
        for key, value in values.items():
            path = f"{group}/{escape_key(agent)}/{escape_key(key)}"
            attributes[path], types[path] = encode_value(value)
    return attributes, types


def decode_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Flat `{path: original value}` from an episode's raw (flat) HDF5 attributes."""
    types = json.loads(attributes.get(VALUE_TYPES_ATTRIBUTE, "{}"))
    result = {}
    for path, value in attributes.items():
        if path == VALUE_TYPES_ATTRIBUTE:
            continue
        if isinstance(value, bytes):
            value = value.decode()
        result[path] = decode_value(value, types.get(path, "raw"))
    return result


def nested_from_flat(flat: Mapping[str, Any], group: str) -> dict[str, dict[str, Any]]:
    """`{agent: {key: value}}` from the decoded flat attributes under `group/`."""
    nested: dict[str, dict[str, Any]] = {}
    prefix = group + "/"
    for path, value in flat.items():
        if path.startswith(prefix):
            agent, key = path[len(prefix) :].split("/", 1)
            nested.setdefault(unescape_key(agent), {})[unescape_key(key)] = value
    return nested
