"""The degradation job's main loop: plan, skip what is done, distribute, account.

Kept apart from the command-line layer (jobs/degrade.py) so tests and benchmarks run
the exact job a user runs.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path
from typing import Any

from pipeline.core import distribute
from pipeline.core.index import rebuild_index
from pipeline.core.manifest import Manifest
from pipeline.degrade.worker import STAGE, build_pairs_shard, stage_expectations
from pipeline.core.plan import ShardPlan, plan_shards
from pipeline.core.shards import SHARD_GLOB, build_lock, clean_tmp, read_sidecar, shard_path, sidecar_path, verify_shard


@dataclasses.dataclass
class JobResult:
    shards: int
    shards_built: int
    shards_skipped: int
    rows_planned: int
    rows_ok: int
    rows_failed: int
    reasons: dict[str, int]
    errors: list[str]
    max_failed_fraction: float

    @property
    def failed_fraction(self) -> float:
        return self.rows_failed / self.rows_planned if self.rows_planned else 0.0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 3
        if self.failed_fraction > self.max_failed_fraction:
            return 1
        return 0

    def summary(self) -> str:
        lines = [
            f"pairs: {self.shards} shards ({self.shards_built} built, {self.shards_skipped} already complete), "
            f"{self.rows_ok}/{self.rows_planned} pairs, {self.rows_failed} failed "
            f"({100 * self.failed_fraction:.2f}%, threshold {100 * self.max_failed_fraction:.2f}%)",
        ]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"  {n:6d} × {reason}")
        for e in self.errors:
            lines.append(f"  ERROR {e}")
        if self.exit_code == 1:
            lines.append("FAILED: failed rows exceed degrade.max_failed_fraction; see the reasons above "
                         "(each shard's sidecar lists its failed keys)")
        return "\n".join(lines)


def _reason_class(reason: str) -> str:
    """Group reasons by their leading phrase so a summary of 10,000 failures stays short."""
    return reason.split(":")[0].split("(")[0].strip()


def remove_orphans(out: Path, planned: int) -> list[Path]:
    """Shards numbered beyond the plan belong to an older plan of this output root."""
    removed = []
    for arrow in (Path(out) / STAGE).glob(SHARD_GLOB):
        if int(arrow.name[6:11]) >= planned:
            for p in (arrow, sidecar_path(arrow)):
                p.unlink(missing_ok=True)
            removed.append(arrow)
    return removed


def todo_shards(plans: list[ShardPlan], manifest: Manifest, out: Path, log: Any = None) -> list[ShardPlan]:
    log = log or sys.stderr
    todo = []
    for plan in plans:
        arrow = shard_path(out, STAGE, plan.shard)
        why = verify_shard(arrow, stage_expectations(manifest.degrade, manifest.seed, plan))
        if why is not None:
            if arrow.exists() or read_sidecar(arrow) is not None:
                print(f"redoing {arrow.name}: {why}", file=log)
            todo.append(plan)
    return todo


def run_degrade(manifest: Manifest, distributor: str = "ray", workers: int | None = None,
                show_progress: bool = True, log: Any = None) -> JobResult:
    log = log or sys.stderr  # resolved per call: pytest and callers may swap stderr
    out = manifest.output
    with build_lock(out, STAGE):
        clean_tmp(out, STAGE)
        plans = plan_shards(manifest)
        for p in remove_orphans(out, len(plans)):
            print(f"removed {p.name}: beyond this plan's {len(plans)} shards", file=log)
        todo = todo_shards(plans, manifest, out, log)
        print(f"{manifest.name}: {sum(len(p.rows) for p in plans)} pairs planned in {len(plans)} shards, "
              f"{len(todo)} to build -> {out}", file=log)
        errors: list[str] = []
        if todo:
            run = distribute.run_ray if distributor == "ray" else distribute.run_serial
            extra = {"workers": workers} if distributor == "ray" else {}
            for result in run(todo, build_pairs_shard, rows_of=lambda p: len(p.rows), desc="degrade",
                              show_progress=show_progress, cfg=manifest.degrade,
                              manifest_seed=manifest.seed, out=out, **extra):
                if "error" in result:
                    errors.append(str(result["error"]))
        rebuild_index(out, extra={"manifest": str(manifest.path), "name": manifest.name})
        return _account(plans, out, len(todo), errors, manifest.degrade.max_failed_fraction)


def _account(plans: list[ShardPlan], out: Path, built: int, errors: list[str], threshold: float) -> JobResult:
    """Totals from the sidecars, so skipped shards' failures count as much as new ones."""
    reasons: collections.Counter[str] = collections.Counter()
    ok = failed = 0
    for plan in plans:
        side = read_sidecar(shard_path(out, STAGE, plan.shard))
        if side is None:
            continue
        ok += side["rows"]
        failed += len(side["failed"])
        reasons.update(_reason_class(f["reason"]) for f in side["failed"])
    planned = sum(len(p.rows) for p in plans)
    missing = planned - ok - failed
    if missing and not errors:
        errors.append(f"{missing} planned rows have no committed shard")
    return JobResult(len(plans), built - len(errors), len(plans) - built, planned, ok, failed,
                     dict(reasons), errors, threshold)
