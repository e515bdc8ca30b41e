"""The degradation stage: HQ source photos → pairs shards (HQ 512² + LQ 128² + recipe).

Its own work is only the per-row operation: decode a source once, then for each of its
crops draw a recipe (pipeline.degrade.recipe, pure) and apply it (pipeline.degrade.ops,
pure). A bad source never fails the shard: its rows are recorded as failed with the reason.
Planning, skipping, committing and distributing are the stage framework's.
"""

from __future__ import annotations

import time
import traceback
from itertools import groupby
from typing import Any, ClassVar, Sequence

import cv2
import pyarrow as pa

from pipeline.core.image_io import SourceError, encode_png, load_source
from pipeline.core.manifest import Manifest
from pipeline.core.plan import plan_shards
from pipeline.core.shards import ShardWriter
from pipeline.core.stage import Progress, ShardOutcome, ShardWork, Stage, StageResult, run_stage
from pipeline.degrade.config import DegradeConfig
from pipeline.degrade.ops import make_pair
from pipeline.degrade.recipe import recipe_to_json

PAIRS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("path", pa.string()),
    ("crop_box", pa.list_(pa.int32(), 4)),
    ("hq_png", pa.binary()),
    ("lq_png", pa.binary()),
    ("recipe", pa.string()),
    ("seed", pa.uint64()),
])


class DegradeStage(Stage):
    name: ClassVar[str] = "pairs"
    unit: ClassVar[str] = "pair"
    batch_rows: ClassVar[int] = 16
    packages: ClassVar[tuple[str, ...]] = ("numpy", "opencv-python-headless", "pillow", "pyarrow", "scipy")

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.output, {"manifest": str(manifest.path), "name": manifest.name})
        self.manifest = manifest
        self.cfg: DegradeConfig = manifest.degrade
        self.seed = manifest.seed
        self.max_failed_fraction = self.cfg.max_failed_fraction

    def schema(self) -> pa.Schema:
        return PAIRS_SCHEMA

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed, "degrade": self.cfg.output_affecting()}

    def config_hash(self) -> str:
        return f"{self.cfg.hash()}-s{self.seed}"

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        plans = plan_shards(self.manifest)
        works = [ShardWork(p.shard, len(p.rows), {"inputs_hash": p.inputs_hash}, p.rows) for p in plans]
        if shards is None:
            return works
        unknown = sorted(set(shards) - {w.shard for w in works})
        if unknown:
            raise ValueError(f"shard(s) {unknown} are not in this manifest's plan of {len(works)} shards")
        return [w for w in works if w.shard in set(shards)]

    def open(self) -> None:
        cv2.setNumThreads(1)  # one task per core: threads inside a task only contend

    def build(self, work: ShardWork, writer: ShardWriter, progress: Progress) -> ShardOutcome:
        timing = {"decode_s": 0.0, "degrade_s": 0.0, "encode_s": 0.0}
        failed: list[dict[str, str]] = []
        pending = 0
        for file, group in groupby(work.payload, key=lambda r: r.file):
            rows = list(group)
            t0 = time.perf_counter()
            try:
                source, info = load_source(file, self.cfg.max_pixels, self.cfg.min_side)
            except SourceError as e:
                failed.extend({"key": r.key, "reason": e.reason} for r in rows)
                pending += len(rows)
                continue
            finally:
                timing["decode_s"] += time.perf_counter() - t0
            for r in rows:
                try:
                    t0 = time.perf_counter()
                    hq, lq, recipe, seed = make_pair(source, r.key, self.seed, self.cfg)
                    recipe["source"] = info
                    t1 = time.perf_counter()
                    hq_png = encode_png(hq, self.cfg.png_compress_level)
                    lq_png = encode_png(lq, self.cfg.png_compress_level)
                    timing["encode_s"] += time.perf_counter() - t1
                    timing["degrade_s"] += t1 - t0
                except Exception as e:  # a bug or an odd image must not cost the shard
                    tb = traceback.format_exception_only(type(e), e)[-1].strip()
                    failed.append({"key": r.key, "reason": f"degradation failed: {tb}"})
                    pending += 1
                    continue
                writer.add({
                    "key": r.key, "source": r.source, "path": r.path,
                    "crop_box": list(recipe["crop"]), "hq_png": hq_png, "lq_png": lq_png,
                    "recipe": recipe_to_json(recipe), "seed": seed,
                })
                pending += 1
                if progress is not None and pending >= 8:
                    progress(pending)
                    pending = 0
            del source
        if progress is not None and pending:
            progress(pending)
        return ShardOutcome(failed=failed, sidecar={"timing": {k: round(v, 3) for k, v in timing.items()}})


def run_degrade(manifest: Manifest, distributor: str = "tasks", workers: int | None = None,
                show_progress: bool = True, log: Any = None) -> StageResult:
    """The job behind jobs/degrade.py: every planned shard that is missing or stale."""
    return run_stage(DegradeStage(manifest), distributor=distributor, workers=workers,
                     show_progress=show_progress, log=log)
