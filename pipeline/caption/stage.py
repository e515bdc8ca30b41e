"""The caption stage: pairs shard N → captions shard N (same keys, same order).

Captions are the expensive step (a 7B model per image), so a rerun keeps every good row
and asks the engine only for rows that failed or are missing; overrides replace captions
without running the model at all; the engine is created only when some row needs it
(loading LLaVA takes minutes). The engines themselves are pipeline.caption.engines.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import time
from typing import Any, ClassVar, Sequence

import pyarrow as pa
from PIL import Image

from pipeline.caption.config import CaptionConfig
from pipeline.caption.engines import CUT_FINISH, EngineDied, EngineError
from pipeline.caption.overrides import OverrideError
from pipeline.core.shards import DiskFullError, ShardWriter, read_sidecar, read_table, shard_path, stage_folder, \
    verify_shard
from pipeline.core.stage import Progress, ShardOutcome, ShardWork, Stage, StageResult, run_stage

OK, FAILED, OVERRIDE = "ok", "failed", "override"
# finish_reason: how generation ended (stop | length | abort | error | repetition, or null
# for overrides, pre-generation failures and rows of shards written before the column):
# `length` marks an ok caption cut by caption.max_tokens.
CAPTIONS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("finish_reason", pa.string()),
])


@dataclasses.dataclass
class Row:
    key: str
    caption: str | None = None
    status: str | None = None
    error: str | None = None
    finish_reason: str | None = None


class CaptionStage(Stage):
    name: ClassVar[str] = "captions"
    unit: ClassVar[str] = "caption"
    batch_rows: ClassVar[int] = 1024
    input_stage: ClassVar[str] = "pairs"
    input_command: ClassVar[str] = "`python jobs/degrade.py --manifest M`"
    packages: ClassVar[tuple[str, ...]] = ("transformers", "torch", "pillow", "pyarrow", "aiohttp", "vllm")
    # An engine that cannot start, or died (vLLM's EngineDeadError), fails every later shard
    # the same way: stop the run; the shard being built is not committed (exit 3).
    fatal_errors: ClassVar[tuple[type[BaseException], ...]] = (DiskFullError, EngineError, EngineDied)

    def __init__(self, out: Any, cfg: CaptionConfig, overrides: dict[str, str] | None = None,
                 force: bool = False, index_extra: dict[str, Any] | None = None) -> None:
        super().__init__(out, index_extra)
        self.name = stage_folder("captions", cfg.variant)  # type: ignore[misc]
        self.cfg = cfg
        self.overrides = dict(overrides or {})
        self.force = force
        self.max_failed_fraction = cfg.max_failed_fraction
        self._by_shard: dict[int, dict[str, str]] = {}
        self._engine: Any = None

    def __getstate__(self) -> dict[str, Any]:  # an engine never travels to an actor: it is made there
        return {**self.__dict__, "_engine": None}

    def schema(self) -> pa.Schema:
        return CAPTIONS_SCHEMA

    def config(self) -> dict[str, Any]:
        return self.cfg.output_affecting()

    def config_hash(self) -> str:
        return self.cfg.hash()

    # --------------------------------------------------------------- plan ---

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        works = super().plan(shards)
        self._by_shard = self._route_overrides([w.shard for w in works])
        return works

    def _route_overrides(self, shards: list[int]) -> dict[int, dict[str, str]]:
        """Each override to the shard holding its key; a key in no planned shard is an error."""
        by_shard: dict[int, dict[str, str]] = {}
        left = dict(self.overrides)
        for s in shards:
            if not left:
                break
            for key in read_table(shard_path(self.out, "pairs", s)).column("key").to_pylist():
                if key in left:
                    by_shard.setdefault(s, {})[key] = left.pop(key)
        if left:
            where = f"pairs shard {shards[0]}" if len(shards) == 1 else f"any pairs shard of {self.out}"
            raise OverrideError(f"override keys not in {where}: {sorted(left)[:5]}"
                                + (f" and {len(left) - 5} more" if len(left) > 5 else ""))
        return by_shard

    def stale_reason(self, work: ShardWork) -> str | None:
        why = super().stale_reason(work)
        if why is not None:
            return why
        if self.force:
            return "--force"
        arrow = shard_path(self.out, self.name, work.shard)
        failed = len((read_sidecar(arrow) or {}).get("failed", []))
        if failed:
            return f"{failed} failed captions to retry"
        wanted = self._by_shard.get(work.shard, {})
        if wanted:
            t = read_table(arrow).select(["key", "caption", "status"]).to_pydict()
            have = {k: (c, s) for k, c, s in zip(t["key"], t["caption"], t["status"])}
            pending = sum(have.get(k) != (c, OVERRIDE) for k, c in wanted.items())
            if pending:
                return f"{pending} overrides to apply"
        return None

    # -------------------------------------------------------------- build ---

    def engine(self) -> Any:
        if self._engine is None:
            from pipeline.caption.engines import make_engine

            self._engine = make_engine(self.cfg)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def actor_resources(self, cluster_gpus: int) -> tuple[int, dict[str, float]]:
        """One actor per model replica for in-process engines (a replica spans
        `caption.vllm.tensor_parallel_size` GPUs); CPU actors for a server or a CPU cluster."""
        if self.cfg.engine != "server" and cluster_gpus:
            tp = int(self.cfg.vllm.get("tensor_parallel_size", 1)) if self.cfg.engine == "vllm" else 1
            return max(1, cluster_gpus // tp), {"num_gpus": tp}
        return 1, {"num_cpus": 1}

    def _kept_rows(self, shard: int, pairs_sha: str) -> dict[str, Row]:
        """Rows of the previous captions shard that may be kept.

        Made from other pairs bytes: nothing survives (the images changed). Made by another
        model or prompt, or `force`: only the person-written overrides survive.
        """
        arrow = shard_path(self.out, self.name, shard)
        side = read_sidecar(arrow) or {}
        if verify_shard(arrow, {"pairs_sha256": pairs_sha}) is not None:
            return {}
        same_config = not self.force and side.get("config_hash") == self.config_hash()
        t = read_table(arrow).to_pydict()
        finishes = t.get("finish_reason") or [None] * len(t["key"])  # shards from before the column
        return {key: Row(key, caption, status, error, finish)
                for key, caption, status, error, finish in zip(t["key"], t["caption"], t["status"], t["error"],
                                                               finishes)
                if status == OVERRIDE or (same_config and status == OK)}

    def build(self, work: ShardWork, writer: ShardWriter, progress: Progress) -> ShardOutcome:
        pairs = shard_path(self.out, "pairs", work.shard)
        pairs_sha = work.fingerprint["pairs_sha256"]
        keys = read_table(pairs).column("key").to_pylist()
        kept = self._kept_rows(work.shard, pairs_sha)
        rows = [kept.get(k, Row(k)) for k in keys]
        for r in rows:
            text = self._by_shard.get(work.shard, {}).get(r.key)
            if text is not None:
                r.caption, r.status, r.error, r.finish_reason = text, OVERRIDE, None, None
        todo = [i for i, r in enumerate(rows) if r.status is None]
        if progress is not None and len(rows) > len(todo):
            progress(len(rows) - len(todo))
        arrow = shard_path(self.out, self.name, work.shard)
        previous = read_sidecar(arrow) or {}
        engine_info: dict[str, Any] = {}
        caption_s = 0.0
        if todo:
            engine = self.engine()
            lq = read_table(pairs).select(["lq_png"]).column(0)
            images = [Image.open(io.BytesIO(lq[i].as_py())).convert("RGB") for i in todo]
            t0 = time.perf_counter()
            results = engine.caption(images, progress=progress)  # EngineDied propagates: nothing committed
            caption_s = time.perf_counter() - t0
            engine_info = engine.describe()  # after captioning: a server engine adds the model replies named
            if len(results) != len(todo):
                raise RuntimeError(f"engine returned {len(results)} results for {len(todo)} images")
            for i, res in zip(todo, results):
                r = rows[i]
                # abort/error finish reasons arrive as errors: failed rows, captioned again on a rerun
                r.caption, r.status, r.error = res.caption, (OK if res.ok else FAILED), res.error
                r.finish_reason = res.finish_reason
        for r in rows:
            writer.add(dataclasses.asdict(r))
        counts = {s: sum(r.status == s for r in rows) for s in (OK, FAILED, OVERRIDE)}
        finish_reasons = collections.Counter(r.finish_reason for r in rows if r.finish_reason)
        cut = [r.key for r in rows if r.status == OK and r.finish_reason in CUT_FINISH]
        # The engine that captioned rows last; earlier engines stay in `history`.
        history = previous.get("history", [])
        if engine_info and previous.get("engine") and previous["engine"] != engine_info:
            history = (history + [previous["engine"]])[-10:]
        return ShardOutcome(
            failed=[{"key": r.key, "reason": r.error or ""} for r in rows if r.status == FAILED],
            sidecar={"counts": counts, "captioned_now": len(todo), "kept": len(rows) - len(todo),
                     # ok captions that ended early (caption.max_tokens, or vLLM's repetition stop)
                     "finish_reasons": dict(sorted(finish_reasons.items())), "cut": len(cut),
                     "cut_keys": cut[:100],
                     "engine": engine_info or previous.get("engine", {}), "history": history,
                     "timing": {"caption_s": round(caption_s, 3),
                                "captions_per_s": round(len(todo) / caption_s, 3) if caption_s else None}},
            counts={"captioned": len(todo)})

    def summary_lines(self, sidecars: Sequence[dict[str, Any]]) -> list[str]:
        overrides = sum(s.get("counts", {}).get(OVERRIDE, 0) for s in sidecars)
        cut = sum(s.get("cut", 0) for s in sidecars)
        lines = [f"  {overrides} rows carry a caption written by hand (status override)"] if overrides else []
        if cut:
            lines.append(f"  {cut} ok captions ended early (finish_reason length: cut at caption.max_tokens; "
                         "the column finish_reason marks them)")
        return lines


def run_captions(out: Any, cfg: CaptionConfig, shard: int | None, overrides: dict[str, str],
                 actors: int | None = None, force: bool = False, show_progress: bool = True,
                 log: Any = None) -> StageResult:
    """The job behind jobs/caption.py: one shard in this process, or every shard on actors."""
    stage = CaptionStage(out, cfg, overrides, force)
    if shard is not None:
        return run_stage(stage, [shard], distributor="serial", show_progress=show_progress, log=log)
    return run_stage(stage, None, distributor="actors", actors=actors, show_progress=show_progress, log=log)
