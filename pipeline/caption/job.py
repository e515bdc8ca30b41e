"""The caption job: one shard in this process, or every shard on a pool of Ray actors.

A single `--shard N` is what a scheduler array job runs (one GPU each); `--all` is what
`ray job submit` runs on a cluster: one actor per GPU, each holding one engine and taking
shards from a queue.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from pipeline.core import distribute
from pipeline.caption.config import CaptionConfig
from pipeline.caption.worker import STAGE, StageInputError, build_caption_shard
from pipeline.core.index import rebuild_index
from pipeline.core.shards import SHARD_GLOB, build_lock, clean_tmp, read_sidecar, read_table, shard_path


@dataclasses.dataclass
class CaptionJobResult:
    shards: int
    skipped: int
    rows: int
    captioned: int
    failed: int
    errors: list[str]
    max_failed_fraction: float
    reasons: dict[str, int]

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 3
        return 1 if self.rows and self.failed / self.rows > self.max_failed_fraction else 0

    def summary(self) -> str:
        lines = [f"captions: {self.shards} shards ({self.skipped} unchanged), {self.rows} rows, "
                 f"{self.captioned} captioned now, {self.failed} failed "
                 f"(threshold {100 * self.max_failed_fraction:.2f}%)"]
        lines += [f"  {n:6d} × {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:10]]
        lines += [f"  ERROR {e}" for e in self.errors]
        if self.exit_code == 1:
            lines.append("FAILED: failed captions exceed caption.max_failed_fraction; rerun to retry only them")
        return "\n".join(lines)


class OverrideError(ValueError):
    pass


def load_overrides(path: Path) -> dict[str, str]:
    """`{"key": ..., "caption": ...}` per line; every problem names the file and line."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise OverrideError(f"{path}: cannot read overrides ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OverrideError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not isinstance(obj.get("caption"), str):
            raise OverrideError(f"{path}:{n}: expected {{\"key\": str, \"caption\": str}}")
        if obj["key"] in out and out[obj["key"]] != obj["caption"]:
            raise OverrideError(f"{path}:{n}: key {obj['key']!r} given twice with different captions")
        out[obj["key"]] = obj["caption"]
    return out


def pairs_shards(out: Path) -> list[int]:
    """Shard ids with a complete pairs shard (sidecar present), sorted."""
    return sorted(int(p.name[6:11]) for p in (Path(out) / "pairs").glob(SHARD_GLOB)
                  if read_sidecar(p) is not None)


def split_overrides(out: Path, shards: list[int], overrides: dict[str, str]) -> dict[int, dict[str, str]]:
    """Route each override to the shard holding its key; unknown keys are an error."""
    by_shard: dict[int, dict[str, str]] = {}
    left = dict(overrides)
    for s in shards:
        if not left:
            break
        for key in read_table(shard_path(out, "pairs", s)).column("key").to_pylist():
            if key in left:
                by_shard.setdefault(s, {})[key] = left.pop(key)
    if left:
        raise OverrideError(f"override keys not in any pairs shard of {out}: {sorted(left)[:5]}")
    return by_shard


class EngineHolder:
    """Creates the engine on first use and keeps it for later shards."""

    def __init__(self, cfg: CaptionConfig) -> None:
        self.cfg = cfg
        self.engine: Any = None

    def __call__(self) -> Any:
        if self.engine is None:
            from pipeline.caption.engines import make_engine

            self.engine = make_engine(self.cfg)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class CaptionShardRunner:
    """What one Ray actor holds: an engine (made lazily) and the job's settings."""

    def __init__(self, cfg: CaptionConfig, out: str, overrides: dict[int, dict[str, str]], force: bool) -> None:
        self.cfg, self.out, self.overrides, self.force = cfg, Path(out), overrides, force
        self.engine = EngineHolder(cfg)

    def run(self, shard: int, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        return build_caption_shard(shard, self.out, self.cfg, self.engine, self.overrides.get(shard),
                                   progress=progress, force=self.force)


def _actor_plan(cfg: CaptionConfig, actors: int | None) -> tuple[int, dict[str, float]]:
    """One actor per GPU for in-process engines; CPU actors for a server or a CPU cluster."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.engine != "server" and gpus:
        return actors or gpus, {"num_gpus": 1}
    return actors or 1, {"num_cpus": 1}


def run_captions(out: Path, cfg: CaptionConfig, shard: int | None, overrides: dict[str, str],
                 actors: int | None = None, force: bool = False, show_progress: bool = True,
                 log: Any = None) -> CaptionJobResult:
    log = log or sys.stderr
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    if shard is not None:
        with build_lock(out, STAGE, shard):
            clean_tmp(out, STAGE, shard)
            holder = EngineHolder(cfg)
            bar = tqdm(unit="caption", desc=f"caption {shard}", disable=not show_progress, dynamic_ncols=True)
            try:
                results.append(build_caption_shard(shard, out, cfg, holder, overrides, progress=bar.update,
                                                   force=force))
            finally:
                bar.close()
                holder.close()
    else:
        with build_lock(out, STAGE):
            clean_tmp(out, STAGE)
            shards = pairs_shards(out)
            if not shards:
                raise StageInputError(f"no pairs shards in {out}/pairs; run jobs/degrade.py first")
            by_shard = split_overrides(out, shards, overrides)
            distribute.init_ray(None)
            n_actors, resources = _actor_plan(cfg, actors)
            print(f"captions: {len(shards)} shards on {n_actors} actor(s) {resources}, engine {cfg.engine}", file=log)
            for r in distribute.run_actor_pool(shards, CaptionShardRunner,
                                               {"cfg": cfg, "out": str(out), "overrides": by_shard, "force": force},
                                               n_actors, resources, desc="caption", unit="caption",
                                               total_rows=sum((read_sidecar(shard_path(out, "pairs", s)) or {})
                                                              .get("rows", 0) for s in shards),
                                               show_progress=show_progress):
                if "error" in r:
                    errors.append(str(r["error"]))
                else:
                    results.append(r)
    rebuild_index(out)
    reasons: dict[str, int] = {}
    for r in results:
        for reason in r.get("reasons", []):
            head = reason.split(":")[0][:80]
            reasons[head] = reasons.get(head, 0) + 1
    return CaptionJobResult(
        shards=len(results) + len(errors), skipped=sum(r["skipped"] for r in results),
        rows=sum(r["rows"] for r in results), captioned=sum(r["captioned"] for r in results),
        failed=_failed_rows(out, [r["shard"] for r in results]), errors=errors,
        max_failed_fraction=cfg.max_failed_fraction, reasons=reasons)


def _failed_rows(out: Path, shards: list[int]) -> int:
    """From the sidecars, so unchanged shards' failures count too."""
    return sum(len((read_sidecar(shard_path(out, STAGE, s)) or {}).get("failed", [])) for s in shards)
