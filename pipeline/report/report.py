"""``make_report``: scan a build once, test its draws, write the page and its figures.

Everything the page states is first gathered into one JSON-ready summary (written as
``stats.json`` beside ``index.html``), and the page is rendered from that summary alone,
so the numbers on the page and in the file cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.stage import reason_class
from pipeline.report import figures
from pipeline.report.build import STAGES, BuildError, DegradeSettings, StageShards, degrade_settings, discover
from pipeline.report.describe import recipe_words
from pipeline.report.page import render_page
from pipeline.report.runs import heldout_grid, read_heldout, read_training, smooth
from pipeline.report.scan import CAPTION_STATUSES, PairsStats, ScanOptions, ShardStats, scan_shard

ALPHA = 0.01  # family-wise: a correct sampler is flagged on one build in a hundred
CHUNK_TOKENS = 75  # SD1.5's CLIP text window without BOS/EOS (the embed stage's chunk)
# The LQ quality of the pipeline SSP-IR's authors trained with, for comparison: BasicSR
# 1.4.2's Real-ESRGAN degradation with SeeSR's make_paired_data.py settings (Real-ESRGAN's
# train_realesrgan_x4plus.yml), measured the same way as here (bicubic-upsampled LQ against
# the sharpened HQ, RGB PSNR, peak 255) on 300 512² crops of the photographs bundled with
# scikit-image.
BASICSR_REFERENCE = {
    "mean": 20.86, "std": 4.40, "n": 300,
    "source": ("BasicSR 1.4.2's Real-ESRGAN second-order degradation with SeeSR's make_paired_data.py "
               "settings (Real-ESRGAN's train_realesrgan_x4plus.yml), on 300 random 512² crops of the "
               "photographs bundled with scikit-image; PSNR of the bicubic-upsampled LQ against the "
               "sharpened HQ, RGB, peak 255 (the figure quoted in this project's issue 13; "
               "benchmarks/degrade.py runs BasicSR's own functions on the same photographs)"),
}
REPORT_FILES = ("index.html", "stats.json")
LOSS_WORDS = {"loss": "total loss (ε + λ_rgb·L_rgb + λ_fft·L_fft)", "eps": "ε-prediction MSE",
              "rgb": "L_rgb: Processor RGB heads, L1 at 1/2, 1/4, 1/8", "fft": "L_fft: FFT L1 at the same scales"}
REPORT_DIRS = ("figures", "gallery")


@dataclasses.dataclass
class ReportOptions:
    heldout: Path | None = None
    train_dir: Path | None = None  # default <build>/train
    manifest: Path | None = None  # hold the build against this manifest's degrade settings
    workers: int = 1
    gallery: int = 8
    psnr: bool = True
    progress: bool = True


# ------------------------------------------------------------------- scan ---


def _jobs(stages: dict[str, StageShards]) -> list[tuple[int, list[str]]]:
    """(shard, the stages joined to its pairs) for every complete pairs shard."""
    joined = [s for s in ("captions", "text_emb") if s in stages]
    return [(shard, ["pairs"] + [s for s in joined if shard in stages[s].sidecars])
            for shard in stages["pairs"].complete]


def _scan_one(args: tuple[str, int, dict[str, Any], list[str], ScanOptions]) -> ShardStats:
    build, shard, cfg, stages, opts = args
    return scan_shard(Path(build), shard, cfg, stages, opts)


def scan_build(build: Path, stages: dict[str, StageShards], settings: DegradeSettings, opts: ReportOptions) -> ShardStats:
    """Every complete pairs shard (and the captions / text_emb shards beside it), merged
    in shard order; ``opts.workers`` processes share the shards."""
    from tqdm import tqdm

    cfg = settings.config.to_dict()
    scan_opts = ScanOptions(gallery=opts.gallery, psnr=opts.psnr)
    args = [(str(build), shard, cfg, joined, scan_opts) for shard, joined in _jobs(stages)]
    total = ShardStats(PairsStats(settings.config, opts.gallery))
    bar = tqdm(total=stages["pairs"].rows, unit="row", desc="report", disable=not opts.progress, dynamic_ncols=True)

    def results() -> Iterator[ShardStats]:
        if opts.workers <= 1 or len(args) == 1:
            yield from map(_scan_one, args)
            return
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding pyarrow's threads
        with ProcessPoolExecutor(max_workers=min(opts.workers, len(args)), mp_context=ctx) as pool:
            yield from pool.map(_scan_one, args)

    try:
        for part in results():
            total.merge(part)
            bar.update(part.pairs.rows)
    finally:
        bar.close()
    return total


# ---------------------------------------------------------------- summary ---


def _failures(side_list: list[dict[str, Any]]) -> dict[str, Any]:
    by_reason: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for side in side_list:
        for f in side.get("failed", []):
            r = reason_class(str(f.get("reason") or "")) or "?"
            by_reason[r] += 1
            by_source[str(f.get("key", "?")).split("/")[0]] += 1
            ex = examples.setdefault(r, [])
            if len(ex) < 3:
                ex.append(f"{f.get('key')}: {f.get('reason')}")
    return {"total": sum(by_reason.values()), "by_reason": dict(by_reason.most_common()),
            "by_source": dict(by_source.most_common()), "examples": examples}


def _params(pairs: PairsStats) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fits = {name: pc.fit() for name, pc in pairs.params.items()}
    tested = [n for n, f in fits.items() if f.p_value is not None]
    threshold = ALPHA / max(len(tested), 1)
    out = []
    for name, pc in pairs.params.items():
        f = fits[name]
        out.append({**pc.to_json(), "fit": f.to_json(),
                    "flagged": f.p_value is not None and f.p_value < threshold,
                    "figure": f"figures/draws/{name}.png"})
    flagged = [p["name"] for p in out if p["flagged"]]
    return out, {"alpha": ALPHA, "threshold": threshold, "tested": len(tested), "flagged": flagged,
                 "untested": [n for n in fits if n not in tested], "method": "Bonferroni over the tested draws"}


def _psnr_json(hist: Any, moments: Any) -> dict[str, Any]:
    return {"histogram": hist.to_json(), "moments": moments.to_json()}


def _sum_timing(sidecars: list[dict[str, Any]], key: str) -> float:
    return sum(float((s.get("timing") or {}).get(key) or 0.0) for s in sidecars)


def _throughput(stages: dict[str, StageShards], training: dict[str, Any] | None,
                held: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows per second of work, per stage, from the timing each stage writes."""
    rows = []
    for name, st in stages.items():
        sides = list(st.sidecars.values())
        total = _sum_timing(sides, "total_s")
        if name == "pairs":
            n = st.rows + sum(len(s.get("failed", [])) for s in sides)
            parts = {k: _sum_timing(sides, k) for k in ("decode_s", "degrade_s", "encode_s")}
            detail = ", ".join(f"{k[:-2]} {1000 * v / max(n, 1):.1f} ms" for k, v in parts.items() if v)
            rows.append({"stage": name, "rows": n, "seconds": total, "unit": "pairs", "detail": f"per pair: {detail}"})
        elif name == "captions":
            n = sum(int(s.get("captioned_now", 0)) for s in sides)
            secs = _sum_timing(sides, "caption_s")
            engine = next((s.get("engine", {}).get("engine") for s in sides if s.get("engine")), None)
            rows.append({"stage": name, "rows": n, "seconds": secs, "unit": "captions",
                         "detail": f"model time of the last run ({engine or 'engine unknown'}); "
                                   f"{total:.1f} s with reading and writing"})
        elif name == "text_emb":
            n = sum(int((s.get("counts") or {}).get("encoded", s.get("rows", 0))) for s in sides)
            secs = _sum_timing(sides, "encode_s")
            rows.append({"stage": name, "rows": n, "seconds": secs, "unit": "rows",
                         "detail": f"encoder time of the last run; {total:.1f} s with reading and writing"})
        else:
            rows.append({"stage": name, "rows": st.rows, "seconds": total, "unit": "rows", "detail": "shard wall time"})
    if training:
        rows.append({"stage": "train", "rows": training["steps"], "seconds": None, "unit": "steps",
                     "rate": training["samples_per_s"], "rate_unit": "samples/s", "per": "sample",
                     "detail": f"median over steps after the first two; data wait {100 * training['data_wait']:.2f}% of a step"})
    if held and held.get("restore", {}).get("seconds"):
        r = held["restore"]
        rows.append({"stage": "restore", "rows": r.get("images"), "seconds": r["seconds"], "unit": "images",
                     "detail": f"{r.get('steps', '?')} sampling steps, captioning included"})
    if held and held.get("eval_seconds"):
        rows.append({"stage": "evaluate", "rows": held.get("images"), "seconds": held["eval_seconds"], "unit": "images",
                     "detail": "model/evaluate.py (all metrics)"})
    for r in rows:
        if "rate" not in r:
            r["rate"] = r["rows"] / r["seconds"] if r.get("seconds") else None
            r["rate_unit"] = f"{r['unit']}/s per worker"
    return rows


def _caption_summary(stages: dict[str, StageShards], scan: ShardStats) -> dict[str, Any] | None:
    if "captions" not in stages:
        return None
    c, e = scan.captions, scan.text_emb
    sides = list(stages["captions"].sidecars.values())
    status = {s: c.status.get(s, 0) for s in CAPTION_STATUSES}
    status.update({k: v for k, v in c.status.items() if k not in status})
    chunks_needed: Counter[int] = Counter()
    for t, n in e.tokens.items():
        chunks_needed[max(1, math.ceil(t / CHUNK_TOKENS))] += n
    cfg = next((s.get("config") for s in sides if s.get("config")), {})
    return {
        "rows": c.rows, "status": status, "failed": _failures(sides), "finish_reasons": dict(c.finish.most_common()),
        "words_per_caption": {str(k): v for k, v in sorted(c.words_per_caption.items())},
        "clip_tokens": {str(k): v for k, v in sorted(e.tokens.items())} if e.tokens else None,
        "chunks_needed": {str(k): v for k, v in sorted(chunks_needed.items())} if chunks_needed else None,
        "truncated_rows": e.truncated_rows if e.rows else None,
        "top_words": c.words.counts.most_common(30), "words_pruned": c.words.pruned,
        "model": cfg.get("model"), "max_tokens": (cfg.get("sampling") or {}).get("max_tokens"),
    }


def _embed_summary(stages: dict[str, StageShards], scan: ShardStats) -> dict[str, Any] | None:
    if "text_emb" not in stages:
        return None
    st, e = stages["text_emb"], scan.text_emb
    sides = list(st.sidecars.values())
    cfg = next((s.get("config", {}).get("text_embed") for s in sides if s.get("config")), {}) or {}
    rows = e.rows
    return {"rows": rows, "shards": len(sides), "bytes": st.bytes, "bytes_per_row": st.bytes / rows if rows else None,
            "chunks": {str(k): v for k, v in sorted(e.chunks.items())},
            "mean_chunks": sum(k * v for k, v in e.chunks.items()) / rows if rows else None,
            "truncated_rows": e.truncated_rows, "truncated_tokens": e.truncated_tokens,
            "hidden_size": next((s.get("hidden_size") for s in sides if s.get("hidden_size")), None),
            "max_chunks": cfg.get("max_chunks"), "model": cfg.get("model"),
            "padding_waste": (sum(float(s.get("padding_waste", 0)) * int(s.get("rows", 0)) for s in sides) / st.rows
                              if st.rows else None)}


def _latents_summary(stages: dict[str, StageShards]) -> dict[str, Any] | None:
    if "latents" not in stages:
        return None
    st = stages["latents"]
    sides = list(st.sidecars.values())
    first = sides[0] if sides else {}
    moments, vae = first.get("moments") or {}, first.get("vae") or {}
    shown = {"moments shape": moments.get("shape"), "stored dtype": moments.get("dtype"),
             "layout": moments.get("layout"), "VAE": vae.get("ref"), "VAE class": vae.get("class"),
             "scaling factor": vae.get("scaling_factor")}
    shown = {k: v for k, v in shown.items() if v is not None}
    return {"rows": st.rows, "shards": len(sides), "bytes": st.bytes,
            "bytes_per_row": st.bytes / st.rows if st.rows else None, "details": shown}


def _training_summary(train_dir: Path, out: Path) -> dict[str, Any] | None:
    run = read_training(train_dir)
    if run is None or not run.steps.size:
        return None
    panels = [(LOSS_WORDS.get(name, name), run.series[name], smooth(run.series[name]), "loss") for name in run.losses]
    extra = (("lr", "learning rate", "lr"), ("grad_norm", "gradient norm (before clipping)", "norm"),
             ("samples_per_s", "samples / s", "samples/s"), ("data_wait", "data-wait fraction of a step", "fraction"))
    panels += [(title, run.series[k], None, unit) for k, title, unit in extra if k in run.series]
    figures.training_figure(run.steps, panels, out / "figures" / "training.png")
    grid = None
    if run.validation is not None:
        grid = "figures/validation.png"
        shutil.copyfile(run.validation, out / grid)
    steady = slice(2, None) if run.steps.size > 2 else slice(None)

    def median(k: str) -> float | None:
        v = run.series.get(k)
        if v is None:
            return None
        v = v[steady]
        v = v[~np.isnan(v)]
        return float(np.median(v)) if v.size else None

    cfg = run.state.get("config", {})
    return {"dir": str(train_dir), "steps": run.last_step, "logged_steps": int(run.steps.size),
            "losses": {k: {"last": float(run.series[k][-1]), "smoothed": float(smooth(run.series[k])[-1])}
                       for k in run.losses},
            "samples_per_s": median("samples_per_s"), "data_wait": median("data_wait") or 0.0,
            "lr": float(run.series["lr"][-1]) if "lr" in run.series else None,
            "figure": "figures/training.png", "validation": grid,
            "validation_step": int(run.validation.stem.split("-")[-1]) if run.validation else None,
            "pretrained": cfg.get("pretrained"), "bad_lines": run.bad_lines}


def _evaluation_summary(heldout: Path, out: Path) -> dict[str, Any]:
    held = read_heldout(heldout)
    grid = heldout_grid(held, out / "figures" / "heldout.png")
    table = held.table or {}
    datasets = []
    secs = 0.0
    for name, d in (table.get("datasets") or {}).items():
        rows = d.get("rows", [])
        secs += sum(float(r.get("seconds") or 0) for r in rows)
        datasets.append({"name": name, "rows": rows})
    return {"dir": str(heldout), "metrics": table.get("metrics", {}), "datasets": datasets,
            "grid": "figures/heldout.png" if grid else None, "grid_images": grid, "images": len(held.images),
            "restore": held.restore, "problems": held.problems, "prompts": held.prompts,
            "eval_seconds": secs or held.restore.get("eval_seconds")}


def _gallery(pairs: PairsStats, out: Path) -> list[dict[str, Any]]:
    items = []
    folder = out / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(pairs.sample.rows()):
        item = {"key": row["key"], "shard": row["shard"], "source": row["source"], "lq_psnr": row.get("lq_psnr"),
                "words": recipe_words(row["recipe"]) if row.get("recipe") else ["(recipe unreadable)"],
                "caption": row.get("caption"), "caption_status": row.get("caption_status")}
        for kind in ("lq", "hq"):
            if row.get(f"{kind}_png"):
                name = f"gallery/{i:02d}-{kind}.png"
                (out / name).write_bytes(row[f"{kind}_png"])  # the stored bytes, as the trainer reads them
                item[kind] = name
        items.append(item)
    return items


def summarise(build: Path, out: Path, stages: dict[str, StageShards], settings: DegradeSettings, scan: ShardStats,
              opts: ReportOptions) -> dict[str, Any]:
    """Everything the page states, JSON-ready; writes the figures it refers to."""
    pairs = scan.pairs
    params, fit = _params(pairs)
    for p in params:
        figures.param_figure(pairs.params[p["name"]], pairs.params[p["name"]].fit(), p["flagged"], out / p["figure"])
    figures.fit_overview([p["name"] for p in params], [p["fit"]["p_value"] for p in params], fit["threshold"],
                         out / "figures" / "fit_overview.png")
    psnr = {"lq": _psnr_json(pairs.lq_psnr, pairs.lq_moments),
            "roundtrip": _psnr_json(pairs.roundtrip_psnr, pairs.roundtrip_moments),
            "reference": BASICSR_REFERENCE, "identical": pairs.identical, "measured": opts.psnr}
    if opts.psnr and pairs.lq_moments.n:
        figures.psnr_figure(psnr["lq"], psnr["roundtrip"], BASICSR_REFERENCE, out / "figures" / "lq_psnr.png")
    sides = list(stages["pairs"].sidecars.values())
    failures = _failures(sides)
    planned = sum(int(s.get("planned_rows", s.get("rows", 0))) for s in sides)
    if failures["by_reason"]:
        figures.bar_figure("Failed rows by reason", list(failures["by_reason"]), list(failures["by_reason"].values()),
                           out / "figures" / "failed.png")
    sources = dict(pairs.sources.most_common())
    figures.bar_figure("Rows per source", list(sources), list(sources.values()), out / "figures" / "sources.png")
    captions = _caption_summary(stages, scan)
    if captions:
        _caption_figures(captions, out)
    training = _training_summary(opts.train_dir or build / "train", out)
    evaluation = _evaluation_summary(opts.heldout, out) if opts.heldout else None
    return {
        "version": 1, "build": str(build), "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"source": settings.source, "seed": settings.seed, "variants": settings.variants,
                     "unknown_keys": settings.unknown_keys, "degrade": settings.config.to_dict()},
        "stages": {name: {"shards": len(st.sidecars), "rows": st.rows, "bytes": st.bytes, "incomplete": st.incomplete}
                   for name, st in stages.items()},
        "missing_stages": [s for s in STAGES if s not in stages],
        "key_mismatches": scan.key_mismatches,
        "pairs": {"rows": pairs.rows, "planned": planned, "failed": failures, "sources": sources,
                  "unreadable": dict(pairs.unreadable), "fit": fit, "params": params, "psnr": psnr,
                  "gallery": _gallery(pairs, out)},
        "captions": captions, "text_emb": _embed_summary(stages, scan), "latents": _latents_summary(stages),
        "training": training, "evaluation": evaluation,
        "throughput": _throughput(stages, training, evaluation),
    }


def _caption_figures(c: dict[str, Any], out: Path) -> None:
    figures.bar_figure("Caption status", list(c["status"]), list(c["status"].values()), out / "figures" / "caption_status.png")
    figures.count_histogram("Words per caption", {int(k): v for k, v in c["words_per_caption"].items()}, "words",
                            out / "figures" / "caption_words.png")
    if c["clip_tokens"]:
        marks = [(CHUNK_TOKENS * i + 0.5, f"{i} chunk{'s' if i > 1 else ''}") for i in range(1, 5)
                 if CHUNK_TOKENS * i <= max(int(k) for k in c["clip_tokens"]) + CHUNK_TOKENS]
        figures.count_histogram("CLIP tokens per caption (before truncation)",
                                {int(k): v for k, v in c["clip_tokens"].items()}, "tokens",
                                out / "figures" / "caption_tokens.png", marks=marks)
    if c["top_words"]:
        words = c["top_words"][:25]
        figures.bar_figure("Most frequent words (stop words left out)", [w for w, _ in words], [n for _, n in words],
                           out / "figures" / "caption_top_words.png", xlabel="occurrences")


# ------------------------------------------------------------------ entry ---


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder that holds something other than a report."""
    if out.exists():
        if not out.is_dir():
            raise BuildError(f"--out {out} is a file; give a folder for the report")
        others = [p.name for p in out.iterdir() if p.name not in REPORT_FILES + REPORT_DIRS]
        earlier = (out / "stats.json").exists() or (out / "index.html").exists()  # a previous report
        if others and not earlier:
            raise BuildError(f"--out {out} is not empty and holds no report (found {others[:3]}); "
                             "choose a new or empty folder")
    for d in REPORT_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "figures" / "draws").mkdir(parents=True, exist_ok=True)


def make_report(build: Path, out: Path | None = None, opts: ReportOptions | None = None) -> Path:
    """Write ``<out>/index.html`` (default ``<build>/report``) and return its path.

    Raises BuildError for a folder that is not a build (naming the command that makes one).
    """
    opts = opts or ReportOptions()
    build = Path(build).resolve()
    stages = discover(build)
    out = Path(out).resolve() if out is not None else build / "report"
    settings = degrade_settings(stages["pairs"], opts.manifest)
    _prepare_out(out)
    scan = scan_build(build, stages, settings, opts)
    summary = _finite(summarise(build, out, stages, settings, scan, opts))
    (out / "stats.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(render_page(summary))
    tmp.replace(page)
    return page


def _finite(v: Any) -> Any:
    """Strict JSON: numpy scalars become numbers, inf and nan the strings "inf" / "nan"."""
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Path):
        return str(v)
    return v
