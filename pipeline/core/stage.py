"""The shard lifecycle, written once for every stage.

A stage (degrade, caption, embed, latents) supplies only what is its own: its name and
schema, the settings that change its output, where a shard's inputs come from, and the one
operation that turns those inputs into rows. Everything a user relies on for trust and
resume is done here, the same way for all of them:

plan → lock → remove torn temporaries → skip shards whose sidecar is current → build (rows
streamed into ``*.tmp``, fsync, ``os.replace``) → sidecar last → index → accounting →
summary and exit code.

Why one place: every stage must survive the same kills and reruns, and a rule fixed in
one copy (say, a sidecar that must also match the input shard's sha256) used to be missing
from the other two.
"""

from __future__ import annotations

import collections
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import pyarrow as pa

from pipeline.core.index import rebuild_index
from pipeline.core.shards import (
    DiskFullError, ShardWriter, atomic_write_json, build_lock, clean_tmp, complete_shards, read_sidecar,
    shard_files, shard_path, sidecar_path, stage_kind, verify_shard,
)
from pipeline.core.versions import software_versions

Progress = Callable[[int], None] | None


class StageInputError(RuntimeError):
    """A stage's input is missing or incomplete; the message names the command that makes it."""


@dataclasses.dataclass(frozen=True)
class ShardWork:
    """One shard to build. Small, because it travels to a Ray task or actor.

    `fingerprint` names what the shard is made from (the input shard's sha256, or the
    source files' keys and sizes); it is written into the sidecar and must match on a
    rerun for the shard to be kept.
    """

    shard: int
    rows: int
    fingerprint: dict[str, Any]
    payload: Any = None


@dataclasses.dataclass
class ShardOutcome:
    """What a stage's build reports besides the rows it wrote.

    `failed`: {"key", "reason"} for planned rows that have no usable output (they may or
    may not be present in the file, by stage: a captions shard keeps a row per key).
    `sidecar`: stage-specific sidecar fields. `counts`: small numbers for the summary.
    """

    failed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    sidecar: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


class Stage:
    """What one stage declares; `run_stage` does the rest.

    Subclasses set the class attributes and implement `schema`, `config`, `build`, and
    `plan` unless the stage is derived shard for shard from `input_stage`.
    """

    name: ClassVar[str]
    # Bumped when the stage's algorithm or format changes: shards of another version are redone.
    version: ClassVar[int] = 1
    unit: ClassVar[str] = "row"
    batch_rows: ClassVar[int] = 16  # rows per Arrow record batch (it shapes the file's bytes)
    input_stage: ClassVar[str | None] = None
    input_command: ClassVar[str] = ""  # how a user makes the input stage
    packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions the sidecar records
    # Errors after which no further shard can succeed (the run stops, committing nothing half-done).
    fatal_errors: ClassVar[tuple[type[BaseException], ...]] = (DiskFullError,)
    max_failed_fraction: float = 0.0

    def __init__(self, out: Path, index_extra: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.index_extra = dict(index_extra or {})
        self.waiting: list[int] = []  # input shards still being written: left for a later run

    # ------------------------------------------------------------ declared ---

    def schema(self) -> pa.Schema:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that change this stage's output bytes (recorded in every sidecar)."""
        raise NotImplementedError

    def config_hash(self) -> str:
        raise NotImplementedError

    def build(self, work: ShardWork, writer: ShardWriter, progress: Progress) -> ShardOutcome:
        """Write the shard's rows into `writer`; failed rows are reported, never raised."""
        raise NotImplementedError

    # --------------------------------------------------------------- hooks ---

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        """Derived stages: one shard per complete input shard (or the ones asked for).

        With `--all` an input shard still being written is left for a later run; a shard
        asked for by number must exist.
        """
        assert self.input_stage is not None, f"{self.name} must plan its own shards"
        explicit = shards is not None
        files = dict(shard_files(self.out, self.input_stage))
        if explicit:
            ids = list(shards)  # type: ignore[arg-type]
            self.waiting = []
        else:
            ids = [s for s, p in files.items() if read_sidecar(p) is not None]
            self.waiting = sorted(set(files) - set(ids))
            if not ids:
                raise StageInputError(f"no complete {self.input_stage} shards in {self.out / self.input_stage}; "
                                      f"run {self.input_command.format(shard='N')} first")
        works = []
        for s in ids:
            arrow = shard_path(self.out, self.input_stage, s)
            side = read_sidecar(arrow)
            if side is None:
                state = "is not complete (no sidecar)" if arrow.exists() else f"does not exist ({arrow})"
                raise StageInputError(f"{self.input_stage} shard {s} {state}; "
                                      f"run {self.input_command.format(shard=s)} first")
            works.append(ShardWork(s, int(side.get("rows", 0)),
                                   {f"{stage_kind(self.input_stage)}_sha256": side["sha256"]}))
        return works

    def expectations(self, work: ShardWork) -> dict[str, Any]:
        """Sidecar fields that must equal the current run's for a shard to be kept."""
        return {"stage": self.name, "shard": work.shard, "config_hash": self.config_hash(),
                "stage_version": self.version, **work.fingerprint}

    def stale_reason(self, work: ShardWork) -> str | None:
        """Why shard `work` must be (re)built, or None when it is complete and current."""
        return verify_shard(shard_path(self.out, self.name, work.shard), self.expectations(work),
                            legacy={"stage_version": 1})

    def prepare(self, todo: Sequence[ShardWork]) -> None:
        """Runs once in the driver after planning, before any shard is built, even when none
        is to be built (e.g. a per-build file that must exist)."""

    def open(self) -> None:
        """Load what building needs (a model) in the process that builds; called once there."""

    def close(self) -> None:
        """Free what `open` loaded."""

    def actor_resources(self, cluster_gpus: int) -> tuple[int, dict[str, float]]:
        """(default actor count, resources per actor) for the actor distributor."""
        return 1, {"num_cpus": 1}

    def summary_lines(self, sidecars: Sequence[dict[str, Any]]) -> list[str]:
        """Stage-specific lines for the summary, from the planned shards' sidecars."""
        return []

    def check_input(self, work: ShardWork) -> Path | None:
        """The verified input shard of a derived stage (full sha256), or an error naming the fix."""
        if self.input_stage is None:
            return None
        arrow = shard_path(self.out, self.input_stage, work.shard)
        why = verify_shard(arrow, work.fingerprint and {"sha256": next(iter(work.fingerprint.values()))})
        if why is not None:
            raise StageInputError(f"{self.input_stage} shard {work.shard} at {arrow} is not complete ({why}); "
                                  f"run {self.input_command.format(shard=work.shard)} first")
        return arrow


# ------------------------------------------------------------------ build ---


def build_shard(stage: Stage, work: ShardWork, progress: Progress = None) -> dict[str, Any]:
    """Build one shard and commit it with its sidecar; returns a small summary.

    The same function runs in this process, in a Ray task and in a Ray actor.
    """
    started = time.time()
    t0 = time.perf_counter()
    stage.check_input(work)
    arrow = shard_path(stage.out, stage.name, work.shard)
    writer = ShardWriter(arrow, stage.schema(), batch_rows=stage.batch_rows)
    try:
        outcome = stage.build(work, writer, progress)
        size, digest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - t0
    sidecar = {
        **stage.expectations(work),
        "rows": writer.rows_written,
        "planned_rows": work.rows,
        "failed": outcome.failed,
        "bytes": size,
        "sha256": digest,
        "config": stage.config(),
        **outcome.sidecar,
        "software": software_versions(stage.packages),
    }
    timing = dict(sidecar.get("timing", {}))
    timing.update({"total_s": round(seconds, 3), "host": platform.node(),
                   "rows_per_s": round(work.rows / seconds, 3) if seconds > 0 else None})
    sidecar["timing"] = timing
    atomic_write_json(sidecar_path(arrow), sidecar)
    return {"shard": work.shard, "rows": writer.rows_written, "failed": len(outcome.failed),
            "counts": outcome.counts, "bytes": size, "seconds": round(time.time() - started, 3)}


# ----------------------------------------------------------------- result ---


def reason_class(reason: str) -> str:
    """Group reasons by their leading phrase so a summary of 10,000 failures stays short."""
    return reason.split(":")[0].split("(")[0].strip()[:80]


@dataclasses.dataclass
class StageResult:
    stage: str
    unit: str
    shards: int
    shards_built: int
    shards_skipped: int
    rows_planned: int
    rows_ok: int
    rows_failed: int
    reasons: dict[str, int]
    errors: list[str]
    max_failed_fraction: float
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # summed from the shards built now
    extra_lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def failed_fraction(self) -> float:
        return self.rows_failed / self.rows_planned if self.rows_planned else 0.0

    @property
    def exit_code(self) -> int:
        """0 done; 1 failed rows above the manifest's threshold; 3 a shard could not be built."""
        if self.errors:
            return 3
        return 1 if self.failed_fraction > self.max_failed_fraction else 0

    def summary(self) -> str:
        lines = [f"{self.stage}: {self.shards} shards ({self.shards_built} built, {self.shards_skipped} already "
                 f"complete), {self.rows_ok}/{self.rows_planned} {self.unit}s, {self.rows_failed} failed "
                 f"({100 * self.failed_fraction:.2f}%, threshold {100 * self.max_failed_fraction:.2f}%)"]
        lines += [f"  {n:6d} × {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:20]]
        lines += self.extra_lines
        lines += [f"  ERROR {e}" for e in self.errors]
        if self.exit_code == 1:
            lines.append(f"FAILED: failed rows exceed {self.stage}'s max_failed_fraction; see the reasons above "
                         "(each shard's sidecar lists its failed keys); a rerun retries what can be retried")
        return "\n".join(lines)


def _account(stage: Stage, works: Sequence[ShardWork], todo: int, built: int, errors: list[str],
             counts: dict[str, int]) -> StageResult:
    """Totals from the sidecars, so skipped shards' failures count as much as new ones."""
    reasons: collections.Counter[str] = collections.Counter()
    ok = failed = 0
    sidecars = []
    for w in works:
        side = read_sidecar(shard_path(stage.out, stage.name, w.shard))
        if side is None:
            continue
        sidecars.append(side)
        n_failed = len(side.get("failed", []))
        ok += int(side.get("planned_rows", side["rows"])) - n_failed
        failed += n_failed
        reasons.update(reason_class(f["reason"] or "") for f in side.get("failed", []))
    planned = sum(w.rows for w in works)
    missing = planned - ok - failed
    if missing > 0 and not errors:
        errors.append(f"{missing} planned {stage.unit}s have no committed shard")
    lines = stage.summary_lines(sidecars)
    if stage.waiting:
        lines.append(f"  {len(stage.waiting)} {stage.input_stage} shards not complete, not built: "
                     f"{stage.waiting[:20]} (finish them, then rerun)")
    return StageResult(stage.name, stage.unit, len(works), built, len(works) - todo, planned, ok, failed,
                       dict(reasons), errors, stage.max_failed_fraction, counts, lines)


def remove_orphans(stage: Stage, planned: Sequence[int]) -> list[Path]:
    """Shards numbered beyond the plan belong to an older plan of this output root."""
    keep = set(planned)
    limit = max(keep) + 1 if keep else 0
    removed = []
    for s, arrow in shard_files(stage.out, stage.name):
        if s >= limit and s not in keep:
            for p in (arrow, sidecar_path(arrow)):
                p.unlink(missing_ok=True)
            removed.append(arrow)
    return removed


# -------------------------------------------------------------------- run ---


DISTRIBUTORS = ("serial", "tasks", "actors")


def run_stage(stage: Stage, shards: Sequence[int] | None = None, *, distributor: str = "serial",
              actors: int | None = None, workers: int | None = None, show_progress: bool = True,
              log: Any = None) -> StageResult:
    """Build every shard of `stage` that is missing or stale (or only `shards`).

    distributor: "serial" (this process), "tasks" (one Ray task per shard, for stateless
    stages) or "actors" (a pool of Ray actors each holding the stage's model, one per GPU
    where there are GPUs).
    """
    from pipeline.core import distribute

    if distributor not in DISTRIBUTORS:
        raise ValueError(f"distributor {distributor!r} must be one of {DISTRIBUTORS}")
    log = log if log is not None else sys.stderr  # looked up per call: callers may redirect stderr
    single = shards is not None and len(shards) == 1
    lock_shard = shards[0] if single else None  # type: ignore[index]
    with build_lock(stage.out, stage.name, lock_shard):
        clean_tmp(stage.out, stage.name, lock_shard)
        works = stage.plan(shards)
        for s in stage.waiting:
            print(f"skipping {stage.input_stage}/shard-{s:05d}.arrow: not finished (no sidecar)", file=log)
        if shards is None and stage.input_stage is None:
            for p in remove_orphans(stage, [w.shard for w in works]):
                print(f"removed {stage.name}/{p.name}: beyond this plan's {len(works)} shards", file=log)
        todo = []
        for w in works:
            why = stage.stale_reason(w)
            if why is not None:
                arrow = shard_path(stage.out, stage.name, w.shard)
                if arrow.exists() or read_sidecar(arrow) is not None:
                    print(f"redoing {stage.name}/{arrow.name}: {why}", file=log)
                todo.append(w)
        rows = sum(w.rows for w in todo)
        where = ""
        if todo and distributor == "actors":
            distribute.init_ray(workers)
            default_n, resources = stage.actor_resources(distribute.cluster_gpus())
            n_actors = max(1, min(actors or default_n, len(todo)))
            where = f" on {n_actors} actor(s) {resources}"
        print(f"{stage.name}: {sum(w.rows for w in works)} {stage.unit}s planned in {len(works)} shards, "
              f"{len(todo)} to build ({rows} {stage.unit}s){where} -> {stage.out / stage.name}", file=log)
        errors: list[str] = []
        counts: collections.Counter[str] = collections.Counter()
        built = 0
        stage.prepare(todo)
        if todo:
            if distributor == "serial":
                results: Iterable[dict[str, Any]] = distribute.run_serial(stage, todo, show_progress)
            elif distributor == "tasks":
                results = distribute.run_tasks(stage, todo, show_progress, workers=workers)
            else:
                results = distribute.run_actors(stage, todo, n_actors, resources, show_progress)
            for r in results:
                if "error" in r:
                    errors.append(str(r["error"]))
                else:
                    built += 1
                    counts.update(r.get("counts", {}))
        rebuild_index(stage.out, extra=stage.index_extra)
        return _account(stage, works, len(todo), built, errors, dict(counts))
