"""The build's ``index.json``: a derived listing of every complete shard of every stage.

It is never the source of truth — the sidecars are — so it can be rebuilt at any time
(after a crash, after another stage ran) by scanning them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.core.shards import SHARD_GLOB, STAGES, atomic_write_json, read_sidecar


def stage_folders(out: Path) -> list[str]:
    """The known stages first, in pipeline order, then any other folder holding shards."""
    found = sorted(p.name for p in Path(out).iterdir() if p.is_dir() and next(p.glob(SHARD_GLOB), None)) \
        if Path(out).is_dir() else []
    return [s for s in STAGES if s in found] + [s for s in found if s not in STAGES]


def collect(out: Path) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for stage in stage_folders(out):
        folder = Path(out) / stage
        shards = []
        for arrow in sorted(folder.glob(SHARD_GLOB)):
            side = read_sidecar(arrow)
            if side is None:
                continue
            shards.append({
                "shard": side["shard"],
                "file": f"{stage}/{arrow.name}",
                "rows": side["rows"],
                "failed": len(side.get("failed", [])),
                "bytes": side["bytes"],
                "sha256": side["sha256"],
                "config_hash": side.get("config_hash"),
            })
        if shards:
            stages[stage] = {
                "shards": shards,
                "rows": sum(s["rows"] for s in shards),
                "failed": sum(s["failed"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
            }
    return {"version": 1, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": stages}


def rebuild_index(out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    index = collect(out)
    if extra:
        index.update(extra)
    atomic_write_json(Path(out) / "index.json", index)
    return index
