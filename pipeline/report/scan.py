"""One pass over a build: each shard summarised on its own, the summaries merged.

A shard's rows are read as the record batches they were written in (only the columns
needed are kept), so a worker holds one batch at a time; what comes out of a shard is
counts, fixed-bin histograms and the few rows it offers to the galleries. Shards are
independent, so a large build is scanned by a pool of processes and merged in shard order.

Per pair the scan also measures the LQ quality: PSNR of the bicubic-upsampled LQ
against the stored HQ (all pixels and channels, peak 255, the figure BasicSR's pipeline
is usually quoted with) and, for scale, the plain bicubic round trip of the same HQ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import pyarrow as pa

from pipeline.core.shards import shard_path
from pipeline.degrade.config import DegradeConfig
from pipeline.report.accumulate import BottomK, BoundedCounter, Histogram, Moments, ParamCounts
from pipeline.report.expected import expected_params, recipe_draws

PSNR_EDGES = np.arange(0.0, 60.5, 0.5)  # dB; LQ PSNRs of Real-ESRGAN pairs sit in 10-35
WORD = re.compile(r"[a-z][a-z'-]*")
# Too common to say anything about an image; left out of the word counts.
STOPWORDS = frozenset("""a an the and or of in on at to with is are was were be been it its this that there
their they as by for from into over under near while which who has have had also very some other""".split())
CAPTION_STATUSES = ("ok", "failed", "override", "length-cut")


@dataclasses.dataclass
class ScanOptions:
    gallery: int = 8  # rows kept for the galleries (the same keys for pairs and captions)
    psnr: bool = True  # decode every pair to measure LQ quality (the slow part)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of one shape, over all pixels and channels (peak 255)."""
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def lq_quality(hq: np.ndarray, lq: np.ndarray, scale: int) -> tuple[float, float]:
    """(PSNR of bicubic-upsampled LQ vs HQ, PSNR of HQ bicubic down ×scale and back up)."""
    h, w = hq.shape[:2]
    up = cv2.resize(lq, (w, h), interpolation=cv2.INTER_CUBIC)
    down = cv2.resize(hq, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    rt = cv2.resize(down, (w, h), interpolation=cv2.INTER_CUBIC)
    return psnr(up, hq), psnr(rt, hq)


def _decode(png: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("PNG does not decode")
    return img


def iter_batches(arrow: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The shard's record batches, reduced to `columns` (those it has).

    Read through a plain file, not a memory map: a mapped shard's pages stay resident while
    it is open (a 500-row pairs shard is ~160 MB), a read batch is freed once consumed.
    """
    with pa.OSFile(str(arrow), "rb") as source:
        reader = pa.ipc.open_stream(source)
        names = [c for c in columns if c in reader.schema.names]
        for batch in reader:
            yield batch.select(names)


# ------------------------------------------------------------- per stage ---


class PairsStats:
    def __init__(self, cfg: DegradeConfig, gallery: int) -> None:
        self.params = {s.name: ParamCounts(s) for s in expected_params(cfg)}
        self.rows = 0
        self.sources: Counter[str] = Counter()
        self.unreadable: Counter[str] = Counter()  # recipes or PNGs that could not be read, by reason
        self.lq_psnr, self.roundtrip_psnr = Histogram(PSNR_EDGES), Histogram(PSNR_EDGES)
        self.lq_moments, self.roundtrip_moments = Moments(), Moments()
        self.identical = 0  # pairs whose upsampled LQ equals the HQ (PSNR infinite)
        self.sample = BottomK(gallery)

    def merge(self, o: "PairsStats") -> None:
        for k, p in self.params.items():
            p.merge(o.params[k])
        self.rows += o.rows
        self.sources.update(o.sources)
        self.unreadable.update(o.unreadable)
        self.lq_psnr.merge(o.lq_psnr)
        self.roundtrip_psnr.merge(o.roundtrip_psnr)
        self.lq_moments.merge(o.lq_moments)
        self.roundtrip_moments.merge(o.roundtrip_moments)
        self.identical += o.identical
        self.sample.merge(o.sample)


class CaptionStats:
    def __init__(self) -> None:
        self.rows = 0
        self.status: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()  # finish reasons, where the shards record them
        self.words_per_caption: Counter[int] = Counter()
        self.words = BoundedCounter()

    def merge(self, o: "CaptionStats") -> None:
        self.rows += o.rows
        self.status.update(o.status)
        self.finish.update(o.finish)
        self.words_per_caption.update(o.words_per_caption)
        self.words.merge(o.words)


class EmbedStats:
    def __init__(self) -> None:
        self.rows = 0
        self.tokens: Counter[int] = Counter()  # CLIP tokens per caption, before truncation
        self.chunks: Counter[int] = Counter()  # chunks stored per row
        self.truncated_rows = 0
        self.truncated_tokens = 0

    def merge(self, o: "EmbedStats") -> None:
        self.rows += o.rows
        self.tokens.update(o.tokens)
        self.chunks.update(o.chunks)
        self.truncated_rows += o.truncated_rows
        self.truncated_tokens += o.truncated_tokens


@dataclasses.dataclass
class ShardStats:
    """What one shard (or, merged, the whole build) contributes to the report."""

    pairs: PairsStats
    captions: CaptionStats = dataclasses.field(default_factory=CaptionStats)
    text_emb: EmbedStats = dataclasses.field(default_factory=EmbedStats)
    key_mismatches: list[str] = dataclasses.field(default_factory=list)  # "shard 3: captions"

    def merge(self, o: "ShardStats") -> None:
        self.pairs.merge(o.pairs)
        self.captions.merge(o.captions)
        self.text_emb.merge(o.text_emb)
        self.key_mismatches += o.key_mismatches


def caption_status(status: str | None, finish_reason: str | None) -> str:
    """ok / failed / override, or length-cut for an ok caption the token cap stopped
    (finish_reason ``length``, in shards whose caption stage records finish reasons)."""
    if status == "ok" and finish_reason == "length":
        return "length-cut"
    return status or "missing"


def _scan_pairs(arrow: Path, cfg: DegradeConfig, opts: ScanOptions, stats: PairsStats, shard: int) -> list[str]:
    keys: list[str] = []
    cols = ["key", "source", "recipe"] + (["hq_png", "lq_png"] if opts.psnr else [])
    for batch in iter_batches(arrow, cols):
        d = batch.to_pydict()
        values: dict[str, list[Any]] = {k: [] for k in stats.params}
        lq_vals, rt_vals = [], []
        for i, key in enumerate(d["key"]):
            keys.append(key)
            stats.rows += 1
            stats.sources[d["source"][i]] += 1
            try:
                recipe = json.loads(d["recipe"][i])
                for name, v in recipe_draws(recipe).items():
                    values[name].append(v)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                stats.unreadable[f"recipe: {type(e).__name__}"] += 1
                recipe = None
            q = None
            if opts.psnr:
                try:
                    q = lq_quality(_decode(d["hq_png"][i]), _decode(d["lq_png"][i]), cfg.scale)
                except (ValueError, cv2.error) as e:
                    stats.unreadable[f"png: {e}"] += 1
                if q is not None:
                    if math.isfinite(q[0]):
                        lq_vals.append(q[0])
                    else:
                        stats.identical += 1
                    if math.isfinite(q[1]):
                        rt_vals.append(q[1])
            if stats.sample.would_keep(key):
                row = {"key": key, "shard": shard, "source": d["source"][i], "recipe": recipe,
                       "lq_psnr": None if q is None else q[0]}
                if opts.psnr:
                    row.update(hq_png=d["hq_png"][i], lq_png=d["lq_png"][i])
                stats.sample.offer(key, row)
        for name, vs in values.items():
            stats.params[name].add_many(vs)
        stats.lq_psnr.add_many(lq_vals)
        stats.lq_moments.add_many(lq_vals)
        stats.roundtrip_psnr.add_many(rt_vals)
        stats.roundtrip_moments.add_many(rt_vals)
    return keys


def _scan_captions(arrow: Path, stats: CaptionStats) -> tuple[list[str], list[tuple[str, str]]]:
    keys, texts = [], []
    for batch in iter_batches(arrow, ["key", "caption", "status", "finish_reason"]):
        d = batch.to_pydict()
        n = len(d["key"])
        finish = d.get("finish_reason") or [None] * n  # shards from before the column have none
        for i in range(n):
            status = caption_status(d["status"][i], finish[i])
            if finish[i]:
                stats.finish[finish[i]] += 1
            text = d["caption"][i] or ""
            keys.append(d["key"][i])
            texts.append((text, status))
            stats.rows += 1
            stats.status[status] += 1
            words = WORD.findall(text.lower())
            stats.words_per_caption[len(words)] += 1
            stats.words.update(w for w in words if w not in STOPWORDS and len(w) > 1)
    return keys, texts


def _scan_text_emb(arrow: Path, stats: EmbedStats) -> list[str]:
    keys: list[str] = []
    for batch in iter_batches(arrow, ["key", "num_chunks", "num_tokens", "truncated_tokens"]):
        d = batch.to_pydict()
        keys += d["key"]
        stats.rows += len(d["key"])
        stats.chunks.update(int(c) for c in d["num_chunks"])
        if "num_tokens" in d:
            stats.tokens.update(int(t) for t in d["num_tokens"])
        if "truncated_tokens" in d:
            cut = [int(t) for t in d["truncated_tokens"]]
            stats.truncated_rows += sum(t > 0 for t in cut)
            stats.truncated_tokens += sum(cut)
    return keys


def scan_shard(build: Path, shard: int, cfg_dict: dict[str, Any], stages: Sequence[str],
               opts: ScanOptions) -> ShardStats:
    """Summarise shard `shard` of every stage in `stages` (pairs first; the others are
    joined to it row by row, as the trainer joins them, and a key mismatch is recorded)."""
    cv2.setNumThreads(1)
    cfg = DegradeConfig.from_dict(cfg_dict)
    out = ShardStats(PairsStats(cfg, opts.gallery))
    keys = _scan_pairs(shard_path(build, "pairs", shard), cfg, opts, out.pairs, shard)
    captions: dict[str, tuple[str, str]] = {}
    if "captions" in stages:
        ckeys, texts = _scan_captions(shard_path(build, "captions", shard), out.captions)
        if ckeys != keys:
            out.key_mismatches.append(f"shard {shard}: captions")
        captions = dict(zip(ckeys, texts))
    if "text_emb" in stages:
        if _scan_text_emb(shard_path(build, "text_emb", shard), out.text_emb) != keys:
            out.key_mismatches.append(f"shard {shard}: text_emb")
    for row in out.pairs.sample.rows():
        if row["key"] in captions:
            row["caption"], row["caption_status"] = captions[row["key"]]
    return out
