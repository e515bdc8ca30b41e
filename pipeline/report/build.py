"""What a build folder holds: the complete shards of each stage and their sidecars.

A shard counts when its sidecar exists (written last, so the shard finished) and the
file has the size the sidecar records; anything else is listed as incomplete and left
out of every figure. The degrade settings the draws are tested against come from the
pairs sidecars (the manifest's ``degrade`` section as it was when the shard was built),
unless the report is given a manifest to hold the build against.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.shards import read_sidecar, shard_files
from pipeline.degrade.config import DegradeConfig

STAGES = ("pairs", "captions", "text_emb", "latents")
MAKE = {
    "pairs": "python jobs/degrade.py --manifest M",
    "captions": "python jobs/caption.py --manifest M --all",
    "text_emb": "python jobs/embed.py --manifest M --all",
    "latents": "python jobs/latents.py --manifest M --all",
}


class BuildError(ValueError):
    """The folder is not a build the report can describe; the message says what to run."""


@dataclasses.dataclass
class StageShards:
    name: str
    sidecars: dict[int, dict[str, Any]]  # complete shards only
    incomplete: list[str]  # "shard-00003.arrow: no sidecar (never finished)"

    @property
    def complete(self) -> list[int]:
        return sorted(self.sidecars)

    @property
    def rows(self) -> int:
        return sum(int(s.get("rows", 0)) for s in self.sidecars.values())

    @property
    def bytes(self) -> int:
        return sum(int(s.get("bytes", 0)) for s in self.sidecars.values())


def stage_shards(build: Path, stage: str) -> StageShards | None:
    files = shard_files(Path(build), stage)
    if not files:
        return None
    sidecars, incomplete = {}, []
    for shard, arrow in files:
        side = read_sidecar(arrow)
        if side is None:
            incomplete.append(f"{arrow.name}: no sidecar (never finished)")
        elif arrow.stat().st_size != side.get("bytes"):
            incomplete.append(f"{arrow.name}: {arrow.stat().st_size} bytes, sidecar says {side.get('bytes')}")
        else:
            sidecars[shard] = side
    return StageShards(stage, sidecars, incomplete)


def discover(build: Path) -> dict[str, StageShards]:
    """Every stage with shard files in `build`; refuses a folder with no complete pairs."""
    build = Path(build)
    hint = f"`{MAKE['pairs']} --out {build}` (any manifest; --out names this folder)"
    if not build.is_dir():
        raise BuildError(f"build folder {build} does not exist; build one first: {hint}")
    stages = {s: found for s in STAGES if (found := stage_shards(build, s)) is not None}
    pairs = stages.get("pairs")
    if pairs is None or not pairs.sidecars:
        what = "no pairs shards" if pairs is None else f"no complete pairs shards ({len(pairs.incomplete)} unfinished)"
        raise BuildError(f"{build} has {what}: nothing to report; run {hint}")
    return stages


@dataclasses.dataclass
class DegradeSettings:
    """The settings the draws are held against, and where they came from."""

    config: DegradeConfig
    source: str  # "pairs sidecars" or the manifest's path
    seed: int | None
    variants: int  # how many different degrade settings the pairs shards were built with
    unknown_keys: list[str]


def _config_from(d: dict[str, Any]) -> tuple[DegradeConfig, list[str]]:
    known = {f.name for f in dataclasses.fields(DegradeConfig)}
    return DegradeConfig.from_dict({k: v for k, v in d.items() if k in known}), sorted(set(d) - known)


def degrade_settings(pairs: StageShards, manifest: Path | None = None) -> DegradeSettings:
    """The recorded settings (the most common among the shards), or a manifest's."""
    blobs = Counter(json.dumps(s.get("config", {}).get("degrade", {}), sort_keys=True) for s in pairs.sidecars.values())
    seeds = {s.get("config", {}).get("seed") for s in pairs.sidecars.values()}
    if manifest is not None:
        from pipeline.core.manifest import load_manifest

        m = load_manifest(manifest, check_sources=False)
        return DegradeSettings(m.degrade, str(manifest), m.seed, len(blobs), [])
    blob, _ = blobs.most_common(1)[0]
    cfg, unknown = _config_from(json.loads(blob))
    return DegradeSettings(cfg, "pairs sidecars", next(iter(seeds)) if len(seeds) == 1 else None, len(blobs), unknown)
