"""The caption worker: pairs shard N → captions shard N (same keys, same order).

Captions are expensive (a 7B model per image), so a rerun keeps every good row and asks
the engine only for rows that failed or are missing; user overrides replace captions
without running the model at all. The engine is created only when some row needs it,
because loading LLaVA takes minutes.
"""

from __future__ import annotations

import dataclasses
import io
import platform
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from PIL import Image

import pipeline
from pipeline.caption.config import CaptionConfig
from pipeline.core.shards import (ShardWriter, atomic_write_json, read_sidecar, read_table, shard_path,
                             sidecar_path, verify_shard)

STAGE = "captions"
OK, FAILED, OVERRIDE = "ok", "failed", "override"
CAPTIONS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
])


class StageInputError(RuntimeError):
    """The stage's input is missing or incomplete; the message says which command makes it."""


@dataclasses.dataclass
class Row:
    key: str
    caption: str | None = None
    status: str | None = None
    error: str | None = None


def pairs_input(out: Path, shard: int) -> tuple[Path, dict[str, Any]]:
    """The verified pairs shard this caption shard is made from, and its sidecar."""
    pairs = shard_path(out, "pairs", shard)
    why = verify_shard(pairs)
    if why is not None:
        raise StageInputError(f"pairs shard {shard} at {pairs} is not usable ({why}); "
                              "run jobs/degrade.py for this manifest first")
    side = read_sidecar(pairs)
    assert side is not None
    return pairs, side


def _existing_rows(out: Path, shard: int, cfg: CaptionConfig, pairs_sha: str, force: bool) -> dict[str, Row]:
    """Rows of a previous captions shard that may be kept.

    Made from other pairs bytes: nothing survives (the images changed). Made by another
    model or prompt, or `force`: only the person-written overrides survive.
    """
    arrow = shard_path(out, STAGE, shard)
    if verify_shard(arrow, {"pairs_sha256": pairs_sha}) is not None:
        return {}
    same_config = not force and (read_sidecar(arrow) or {}).get("config_hash") == cfg.hash()
    t = read_table(arrow).to_pydict()
    rows = {}
    for key, caption, status, error in zip(t["key"], t["caption"], t["status"], t["error"]):
        if status == OVERRIDE or (same_config and status == OK):
            rows[key] = Row(key, caption, status, error)
    return rows


def build_caption_shard(
    shard: int,
    out: Path,
    cfg: CaptionConfig,
    get_engine: Callable[[], Any],
    overrides: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Caption what is missing or failed in shard `shard`; returns a small summary.

    `overrides` maps keys of this shard to person-written captions (status `override`).
    A shard whose rows would not change is left untouched (no rewrite, same bytes).
    """
    started = time.time()
    overrides = overrides or {}
    pairs, pairs_side = pairs_input(out, shard)
    keys = read_table(pairs).column("key").to_pylist()
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise KeyError(f"override keys not in pairs shard {shard}: {unknown[:5]}"
                       + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    kept = _existing_rows(out, shard, cfg, pairs_side["sha256"], force)
    rows = [kept.get(k, Row(k)) for k in keys]
    changed = False
    for r in rows:
        if r.key in overrides and (r.status != OVERRIDE or r.caption != overrides[r.key]):
            r.caption, r.status, r.error = overrides[r.key], OVERRIDE, None
            changed = True
    todo = [i for i, r in enumerate(rows) if r.status is None]
    arrow = shard_path(out, STAGE, shard)
    if not todo and not changed and len(kept) == len(keys):
        return {"shard": shard, "skipped": True, "rows": len(rows), "failed": 0, "captioned": 0}

    engine_info: dict[str, Any] = {}
    caption_s = 0.0
    if todo:
        engine = get_engine()
        engine_info = engine.describe()
        lq = read_table(pairs).select(["lq_png"]).column(0)
        images = [Image.open(io.BytesIO(lq[i].as_py())).convert("RGB") for i in todo]
        t0 = time.perf_counter()
        results = engine.caption(images, progress=progress)
        caption_s = time.perf_counter() - t0
        if len(results) != len(todo):
            raise RuntimeError(f"engine returned {len(results)} results for {len(todo)} images")
        for i, res in zip(todo, results):
            r = rows[i]
            if res.error is None:
                r.caption, r.status, r.error = res.caption, OK, None
            else:
                r.caption, r.status, r.error = None, FAILED, res.error

    writer = ShardWriter(arrow, CAPTIONS_SCHEMA, batch_rows=1024)
    try:
        for r in rows:
            writer.add(dataclasses.asdict(r))
        size, digest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    counts = {s: sum(r.status == s for r in rows) for s in (OK, FAILED, OVERRIDE)}
    previous = read_sidecar(arrow) or {}
    sidecar = {
        "stage": STAGE,
        "shard": shard,
        "rows": len(rows),
        "counts": counts,
        "captioned_now": len(todo),
        "kept": len(rows) - len(todo),
        "failed": [{"key": r.key, "reason": r.error} for r in rows if r.status == FAILED],
        "bytes": size,
        "sha256": digest,
        "pairs_sha256": pairs_side["sha256"],
        "config": cfg.output_affecting(),
        "config_hash": cfg.hash(),
        # The engine that captioned rows last; earlier engines stay in `history`.
        "engine": engine_info or previous.get("engine", {}),
        "history": (previous.get("history", []) + [previous["engine"]])[-10:]
        if engine_info and previous.get("engine") and previous["engine"] != engine_info
        else previous.get("history", []),
        "software": {"ssp_ir": pipeline.__version__, "python": platform.python_version()},
        "timing": {"total_s": round(time.time() - started, 3), "caption_s": round(caption_s, 3),
                   "captions_per_s": round(len(todo) / caption_s, 3) if caption_s else None,
                   "host": platform.node()},
    }
    atomic_write_json(sidecar_path(arrow), sidecar)
    return {"shard": shard, "skipped": False, "rows": len(rows), "failed": counts[FAILED],
            "captioned": len(todo), "reasons": [r.error for r in rows if r.status == FAILED]}
