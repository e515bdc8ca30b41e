"""What every stage's settings class shares: validation at construction, JSON round
trips and a hash of the settings that change a stage's output (so a rerun can tell
whether a shard is still current)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

S = TypeVar("S", bound="Settings")


class Settings:
    """Mixin for frozen dataclasses of one manifest section."""

    # Tuple fields whose length the manifest may choose (the others have a fixed arity).
    VARIABLE_LENGTH: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Semantic checks a type check cannot make; each names the key at fault."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        """Build from a JSON mapping; lists become tuples so instances stay hashable."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - fields)  # the manifest loader names them first; this guards direct use
        if unknown:
            raise KeyError(f"unknown keys {unknown}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def output_affecting(self) -> dict[str, Any]:
        """The settings that change the stage's output bytes (default: all)."""
        return self.to_dict()

    def hash(self) -> str:
        blob = json.dumps(self.output_affecting(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
