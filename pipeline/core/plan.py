"""Deterministic shard planning (the reader): sources → sorted rows → fixed-size shards.

The same manifest over the same files must give the same shards on any machine, so
files are listed with their relative POSIX paths and sorted as strings (never in
directory order), and each row's key carries everything needed to find it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pipeline.core.image_io import IMAGE_SUFFIXES
from pipeline.core.manifest import Manifest, ManifestError, Source


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    source: str
    path: str  # relative POSIX path inside the source root
    file: str  # absolute path on the machine that planned
    crop: int


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard: int
    rows: tuple[Row, ...]
    inputs_hash: str  # keys and file sizes: a changed input redoes the shard


def list_source(source: Source) -> list[str]:
    """Relative paths of a source's images, sorted as strings."""
    root = source.root
    if source.glob:
        found = [p for p in root.glob(source.glob) if p.is_file()]
    else:
        found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    rel = sorted(p.relative_to(root).as_posix() for p in found)
    if source.limit is not None:
        rel = rel[: source.limit]
    return rel


def make_key(source: str, rel_path: str, crop: int) -> str:
    return f"{source}/{rel_path}#{crop}"


def plan_rows(manifest: Manifest) -> list[Row]:
    rows: list[Row] = []
    crops = manifest.degrade.crops_per_image
    for source in manifest.sources:
        files = list_source(source)
        if not files:
            pattern = source.glob or "image files (" + ", ".join(IMAGE_SUFFIXES) + ")"
            raise ManifestError(
                f"{manifest.path}: source {source.name!r} matches no images: {pattern} under {source.root}"
            )
        for rel in files:
            absolute = str(source.root / rel)
            for c in range(crops):
                rows.append(Row(make_key(source.name, rel, c), source.name, rel, absolute, c))
    return rows


def _inputs_hash(rows: tuple[Row, ...]) -> str:
    h = hashlib.sha256()
    sizes: dict[str, int] = {}
    for r in rows:
        if r.file not in sizes:
            try:
                sizes[r.file] = Path(r.file).stat().st_size
            except OSError:
                sizes[r.file] = -1
        h.update(json.dumps([r.key, sizes[r.file]]).encode())
    return h.hexdigest()[:16]


def plan_shards(manifest: Manifest) -> list[ShardPlan]:
    """Cut the sorted rows into shards of `rows_per_shard` (the last may be short)."""
    rows = plan_rows(manifest)
    n = manifest.degrade.rows_per_shard
    plans = []
    for i, start in enumerate(range(0, len(rows), n)):
        chunk = tuple(rows[start : start + n])
        plans.append(ShardPlan(i, chunk, _inputs_hash(chunk)))
    return plans
