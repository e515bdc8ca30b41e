"""The degradation worker: turns one planned shard into one committed pairs shard.

It is a plain function of (plan, settings, output root) so the same code runs inside
a Ray task, in a serial loop, or in a test. A bad source never fails the shard: its
rows are recorded as failed with the reason, and every planned row is accounted for
in the sidecar (rows written + rows failed = rows planned).
"""

from __future__ import annotations

import platform
import time
import traceback
from itertools import groupby
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pyarrow as pa

import pipeline
from pipeline.degrade.config import DegradeConfig
from pipeline.degrade.ops import make_pair
from pipeline.core.image_io import SourceError, encode_png, load_source
from pipeline.core.plan import ShardPlan
from pipeline.degrade.recipe import recipe_to_json
from pipeline.core.shards import ShardWriter, atomic_write_json, shard_path, sidecar_path

STAGE = "pairs"
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


def software_versions() -> dict[str, str]:
    """Recorded in every sidecar: bit-exact reruns are promised for the same stack."""
    import PIL

    return {
        "ssp_ir": pipeline.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "pyarrow": pa.__version__,
    }


def stage_expectations(cfg: DegradeConfig, manifest_seed: int, plan: ShardPlan) -> dict[str, Any]:
    """Sidecar fields that must equal the current run for a shard to be kept."""
    return {"stage": STAGE, "shard": plan.shard, "config_hash": config_hash(cfg, manifest_seed),
            "inputs_hash": plan.inputs_hash}


def config_hash(cfg: DegradeConfig, manifest_seed: int) -> str:
    return f"{cfg.hash()}-s{manifest_seed}"


def build_pairs_shard(
    plan: ShardPlan,
    cfg: DegradeConfig,
    manifest_seed: int,
    out: Path,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Degrade every row of `plan`, commit the shard and its sidecar, return a summary."""
    cv2.setNumThreads(1)  # one task per core: threads inside a task only contend
    started = time.time()
    timing = {"decode_s": 0.0, "degrade_s": 0.0, "encode_s": 0.0}
    failed: list[dict[str, str]] = []
    arrow = shard_path(out, STAGE, plan.shard)
    writer = ShardWriter(arrow, PAIRS_SCHEMA)
    pending = 0
    try:
        for file, group in groupby(plan.rows, key=lambda r: r.file):
            rows = list(group)
            t0 = time.perf_counter()
            try:
                source, info = load_source(file, cfg.max_pixels, cfg.min_side)
            except SourceError as e:
                failed.extend({"key": r.key, "reason": e.reason} for r in rows)
                pending += len(rows)
                continue
            finally:
                timing["decode_s"] += time.perf_counter() - t0
            for r in rows:
                try:
                    t0 = time.perf_counter()
                    hq, lq, recipe, seed = make_pair(source, r.key, manifest_seed, cfg)
                    recipe["source"] = info
                    t1 = time.perf_counter()
                    hq_png = encode_png(hq, cfg.png_compress_level)
                    lq_png = encode_png(lq, cfg.png_compress_level)
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
        size, digest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if progress is not None and pending:
        progress(pending)
    rows_ok = len(plan.rows) - len(failed)
    sidecar = {
        **stage_expectations(cfg, manifest_seed, plan),
        "rows": rows_ok,
        "planned_rows": len(plan.rows),
        "failed": failed,
        "bytes": size,
        "sha256": digest,
        "config": {"seed": manifest_seed, "degrade": cfg.output_affecting()},
        "software": software_versions(),
        "timing": {**{k: round(v, 3) for k, v in timing.items()},
                   "total_s": round(time.time() - started, 3), "host": platform.node()},
    }
    atomic_write_json(sidecar_path(arrow), sidecar)
    return {"shard": plan.shard, "rows": rows_ok, "failed": failed, "bytes": size,
            "seconds": round(time.time() - started, 3)}
