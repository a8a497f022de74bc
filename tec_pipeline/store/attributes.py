"""A store's group attributes (`tec`): the caller's run identity plus what TargetStore owns, made JSON-plain,
and the line-by-line difference between two of them (why a resume is refused)."""

from __future__ import annotations

import json
from typing import Any

from tec_pipeline.config import to_plain

# written by every run but not part of what the store holds: a resume may change them
VOLATILE_ATTRS = frozenset({"package_version", "version", "created", "created_at", "hostname"})
OWNED_ATTRS = ("format_version", "codec", "spec")  # set by TargetStore itself, never by a caller


def plain_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """attrs as they will read back from JSON (tuples → lists, dataclasses → dicts)."""
    try:
        return json.loads(json.dumps(to_plain(attrs)))
    except TypeError as e:
        raise ValueError(f"store attributes must be JSON-serialisable: {e}") from e


def _short(value: Any) -> str:
    return text if len(text := repr(value)) <= 60 else text[:57] + "..."


def attr_diff(stored: Any, wanted: Any, skip: frozenset[str], path: str = "") -> list[str]:
    """Differences between two plain JSON values as 'dotted.path: stored X, requested Y' lines."""
    if not (isinstance(stored, dict) and isinstance(wanted, dict)):
        return [] if stored == wanted else [f"{path}: stored {_short(stored)}, requested {_short(wanted)}"]
    out: list[str] = []
    for key in sorted(set(stored) | set(wanted)):
        sub = f"{path}.{key}" if path else key
        if sub in skip:
            continue
        if key not in stored:
            out.append(f"{sub}: not in the store, requested {_short(wanted[key])}")
        elif key not in wanted:
            out.append(f"{sub}: stored {_short(stored[key])}, not requested")
        else:
            out += attr_diff(stored[key], wanted[key], skip, sub)
    return out
