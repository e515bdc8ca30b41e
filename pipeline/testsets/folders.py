"""The `lq/` + `hr/` PNG folders and their listing: the test-set layout restore and evaluate use.

Every way of making a test set writes it through `PairFolderWriter`: real LQ/HR pairs
cropped by `pipeline/testsets/paired.py` (RealSR, DRealSR), real LQ images without any
reference (RealLR200, same module: no `hr/` then), and degraded builds exported by
`pipeline/testsets/export.py` (DIV2K-Val, LSDIR-Val, the demo's held-out photographs):

  <out>/lq/<name>.png     the LQ of every pair, what model/restore.py takes
  <out>/hr/<name>.png     its HR under the same name, what model/evaluate.py compares to
  <out>/testset.json      the listing: every pair's provenance, failures, stale PNGs removed

A rerun rewrites the folders; PNGs of an earlier run that this run did not write are
removed, since evaluate pairs every PNG it finds by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.core.shards import atomic_write_json

LISTING = "testset.json"


class PairFolderWriter:
    """The `lq/` + `hr/` folders and the listing that restore and evaluate consume.

    PNGs are written through a temporary name and renamed, so a killed run never leaves a
    torn image behind; the listing is written last. `finish` removes PNGs of earlier runs
    that this run did not write: a stale image would be paired and counted by evaluate.
    """

    def __init__(self, out: Path, references: bool = True) -> None:
        self.out = Path(out)
        self.references = references  # False: LQ images only (a set without ground truth)
        self.lq_dir, self.hr_dir = self.out / "lq", self.out / "hr"
        self.lq_dir.mkdir(parents=True, exist_ok=True)
        if references:
            self.hr_dir.mkdir(parents=True, exist_ok=True)
        self.items: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self._names: set[str] = set()

    def add(self, name: str, lq_png: bytes, hr_png: bytes | None, info: dict[str, Any]) -> None:
        if name in self._names:
            raise ValueError(f"two pairs are both named {name!r}")
        if (hr_png is None) == self.references:
            raise ValueError(f"{name}: {'an HR image is required' if self.references else 'this set has no HR images'}")
        self._names.add(name)
        _write_bytes(self.lq_dir / f"{name}.png", lq_png)
        if hr_png is not None:
            _write_bytes(self.hr_dir / f"{name}.png", hr_png)
        self.items.append({"name": name, **info})

    def fail(self, what: str, reason: str) -> None:
        self.failed.append({"pair": what, "reason": reason})

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        removed = 0
        for folder, keep in ((self.lq_dir, self._names), (self.hr_dir, self._names if self.references else set())):
            for p in folder.glob("*.png"):  # without references every hr/ PNG is stale
                if p.stem not in keep:
                    p.unlink()
                    removed += 1
        listing = {**meta, "lq_dir": "lq", "hr_dir": "hr" if self.references else None,
                   "count": len(self.items), "items": self.items,
                   "failed": self.failed, "removed_stale": removed,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(self.out / LISTING, listing)
        return listing


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary(listing: dict[str, Any], out: Path) -> str:
    if listing.get("hr_dir"):
        lines = [f"{listing['name']}: {listing['count']} pairs -> {out}/lq, {out}/hr ({LISTING})"]
    else:
        lines = [f"{listing['name']}: {listing['count']} LQ images (no references) -> {out}/lq ({LISTING})"]
    if listing.get("removed_stale"):
        lines.append(f"  removed {listing['removed_stale']} PNGs of an earlier run")
    for f in listing["failed"][:20]:
        lines.append(f"  FAILED {f['pair']}: {f['reason']}")
    if len(listing["failed"]) > 20:
        lines.append(f"  … {len(listing['failed']) - 20} more failures in {out / LISTING}")
    return "\n".join(lines)
