"""Captions written by hand: the explicit prior is editable.

A user who disagrees with the MLLM writes `{"key": ..., "caption": ...}` lines; those rows
get status `override`, survive any recaptioning, and only they are re-embedded.
"""

from __future__ import annotations

import json
from pathlib import Path


class OverrideError(ValueError):
    """The overrides file cannot be used; the message names the file and line."""


def load_overrides(path: Path) -> dict[str, str]:
    """`{"key": ..., "caption": ...}` per line; every problem names the file and line."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise OverrideError(f"{path}: cannot read overrides ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OverrideError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not isinstance(obj.get("caption"), str):
            raise OverrideError(f"{path}:{n}: expected {{\"key\": str, \"caption\": str}}")
        if obj["key"] in out and out[obj["key"]] != obj["caption"]:
            raise OverrideError(f"{path}:{n}: key {obj['key']!r} given twice with different captions")
        out[obj["key"]] = obj["caption"]
    return out
