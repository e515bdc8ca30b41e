"""A degraded build's pairs shards → the `lq/` and `hr/` PNG folders restore and evaluate use.

For the test sets made by the training degradation (DIV2K-Val, LSDIR-Val, the demo's
held-out photographs). Writes, beside the build's `pairs/` (the manifest's "output"):

  <out>/lq/<name>.png     the LQ of every pair (128²), byte for byte the shard's PNG
  <out>/hr/<name>.png     its HQ crop (512²) under the same name
  <out>/testset.json      the listing: name ↔ key, crop box, seed; rows the build failed

`<name>` is the source image's relative path without suffix ('/' → '_') and the crop
index (`0801_07` for `DIV2K_val/0801.png#7`), prefixed with the source name when the
manifest has several sources. The same layout as `pipeline/testsets/paired.py` writes for
real pairs: both go through `pipeline/testsets/folders.py`.

The build must be complete and current for this manifest (every shard verified against
its sidecar, as the trainer does); otherwise nothing is written and the message says
which shard to rebuild. A rerun rewrites the folders and removes PNGs it did not write.

Kept apart from the command-line layer (jobs/export_testset.py) so tests run the exact
job a user runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.manifest import Manifest, ManifestError
from pipeline.testsets.folders import LISTING, PairFolderWriter
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.core.stage import ShardWork
from pipeline.degrade.stage import DegradeStage

__all__ = ["export_testset", "pair_name", "LISTING"]


def pair_name(key: str, several_sources: bool) -> str:
    """A flat, unique file stem for a pairs key `<source>/<relative path>#<crop>`."""
    source_and_path, _, crop = key.rpartition("#")
    source, _, rel = source_and_path.partition("/")
    stem = Path(rel).with_suffix("").as_posix().replace("/", "_")
    name = f"{stem}_{int(crop):02d}"
    return f"{source}_{name}" if several_sources else name


def check_build(manifest: Manifest, stage: DegradeStage, plans: list[ShardWork]) -> None:
    """Every planned shard complete and built from this manifest, else ManifestError."""
    bad = []
    for plan in plans:
        why = stage.stale_reason(plan)
        if why is not None:
            bad.append(f"{shard_path(manifest.output, stage.name, plan.shard).name}: {why}")
    if bad:
        raise ManifestError(
            f"{manifest.output}: the build is incomplete or stale for {manifest.path} ({len(bad)} of {len(plans)} "
            f"shards: {'; '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); run "
            f"`python jobs/degrade.py --manifest {manifest.path}` first")


def export_testset(manifest: Manifest) -> dict[str, Any]:
    """Write the build's pairs as PNG folders under its output root; returns the listing."""
    stage = DegradeStage(manifest)
    plans = stage.plan(None)
    check_build(manifest, stage, plans)
    several = len(manifest.sources) > 1
    writer = PairFolderWriter(manifest.output)
    for plan in plans:
        arrow = shard_path(manifest.output, stage.name, plan.shard)
        table = read_table(arrow)
        cols = {c: table.column(c).to_pylist() for c in ("key", "source", "path", "crop_box", "seed")}
        lq, hq = table.column("lq_png"), table.column("hq_png")
        for i, key in enumerate(cols["key"]):
            writer.add(pair_name(key, several), lq[i].as_py(), hq[i].as_py(), {
                "key": key, "source": cols["source"][i], "path": cols["path"][i],
                "crop_box": cols["crop_box"][i], "seed": cols["seed"][i], "shard": plan.shard,
            })
        for f in (read_sidecar(arrow) or {}).get("failed", []):
            writer.fail(f.get("key", "?"), f.get("reason", "?"))
    cfg = manifest.degrade
    return writer.finish({"name": manifest.name, "kind": "degraded", "manifest": str(manifest.path),
                          "seed": manifest.seed, "scale": cfg.scale, "lq_size": cfg.lq_size, "hr_size": cfg.gt_size,
                          "usm_gt": cfg.usm_gt})
