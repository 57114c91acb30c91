"""Reading the small text files of a model or adapter folder, with a typed error that names the file and field."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def read_text(path: Path, error: type[CheckpointError] = CheckpointError) -> str:
    """A UTF-8 text file; unreadable or undecodable -> ``error`` naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None


def read_json_object(path: Path, error: type[CheckpointError] = CheckpointError) -> dict:
    """A JSON file whose top level is an object."""
    try:
        raw = json.loads(read_text(path, error))
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def field(raw: dict, path: Path, name: str, kind: type | tuple[type, ...], default=None,
          error: type[CheckpointError] = CheckpointError, required: bool = False):
    """raw[name] checked against ``kind`` (bool is not accepted as a number); missing -> default or error."""
    if name not in raw or (raw[name] is None and not required):
        if required:
            raise error(f"{path}: required field {name!r} is missing")
        return default
    value = raw[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_number = any(k in (int, float) for k in kinds)
    if not isinstance(value, kinds) or (is_number and isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise error(f"{path}: field {name!r} must be {names}, got {value!r}")
    return value
