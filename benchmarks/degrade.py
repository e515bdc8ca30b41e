#!/usr/bin/env python
"""Degradation benchmark: our pipeline vs BasicSR's, per core and as a whole job.

    .venv/bin/python benchmarks/degrade.py [--pairs N] [--basicsr-pairs M] [--out FILE.json]

One run measures, on the 15 photographs bundled with scikit-image (jobs/prepare_demo.py):
  1. ours on one core: ms per pair for decode, sampling, prepare_gt (USM), degrade_gt,
     encoding, and a stage-by-stage breakdown;
  2. the real job (pipeline.degrade.stage.run_degrade): serial, Ray 1 worker, Ray 2 workers,
     pairs/s and peak RSS per worker, plus peak RSS over N and 2N images;
  3. BasicSR 1.4.2's own pipeline (baselines/basicsr_realesrgan.py) on the same crops;
  4. output statistics: PSNR of the bicubic-upsampled LQ against the stored HQ;
  5. the headline ratios, all measured within this run.
Results: a table on stdout, JSON at --out (default bench-out/degrade.json) and Markdown
beside it. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import os

# One core means one thread everywhere: set before numpy / OpenCV / torch are imported,
# since their thread pools read these once. Ray workers inherit them.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # the project, run from a checkout (benchmarks/ is sys.path[0])

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import (  # noqa: E402
    STAGES, ForeignCpuMonitor, StageTimer, bicubic_roundtrip, busy_cores, cmdline, cpu_model, descendants,
    fmt_num, lq_psnr, mean_difference, proc_status_kb, psnr, render_table, summarize, wait_until_quiet,
)

PHOTOS = ROOT / ".cache" / "bench" / "photos"  # all 15 bundled photographs (the demo holds 2 out)
DEMO_SEED = 20261127  # manifests/demo.json
DEFAULT_OUT = ROOT / "bench-out" / "degrade.json"
TARGETS = {"speedup_vs_basicsr": 10.0, "scaling_2w_over_1w": 1.7, "worker_peak_rss_mb": 1024.0}


# ================================================================== inputs ==


def ensure_photos() -> list[Path]:
    """The 15 photographs bundled with scikit-image (the demo's 13 and its 2 held out)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        from prepare_demo import DEMO_PHOTOS, HELDOUT_PHOTOS, copy_photos
    finally:
        sys.path.pop(0)
    names = DEMO_PHOTOS + HELDOUT_PHOTOS
    if not all((PHOTOS / n).is_file() for n in names):
        copy_photos(PHOTOS, names)
    return sorted(PHOTOS / n for n in names)


def write_manifest(path: Path, crops: int, copies: int = 1, rows_per_shard: int = 8) -> Path:
    """A demo-like manifest (gt 512, scale 4). ``copies`` > 1 lists the same folder under
    several source names: more images with the same size mix, for the memory test."""
    sources = [{"name": "skimage" if i == 0 else f"skimage{i}", "root": str(PHOTOS)} for i in range(copies)]
    manifest = {
        "name": f"bench-{crops}x{copies}",
        "seed": DEMO_SEED,
        "output": str(path.parent / "out"),
        "sources": sources,
        "degrade": {"gt_size": 512, "scale": 4, "crops_per_image": crops, "rows_per_shard": rows_per_shard,
                    "max_failed_fraction": 0.0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return path


def select_rows(manifest_path: Path, n: int) -> list[Any]:
    """``n`` planned rows taken crop index first (every photo's crop 0, then crop 1, …), so
    small selections still cover all photos. Keys equal the job's, hence the same crops."""
    from pipeline.core.manifest import load_manifest
    from pipeline.core.plan import plan_rows

    rows = plan_rows(load_manifest(manifest_path))
    order = sorted(range(len(rows)), key=lambda i: (rows[i].crop, i))
    return [rows[i] for i in order[:n]]


# ============================================================= ours, 1 core ==


@dataclasses.dataclass
class OursResult:
    summary: dict[str, Any]
    pairs: dict[str, Any]  # key -> ApiPair, for the statistics and the BasicSR run


def bench_ours(rows: list[Any], decode_repeats: int = 3) -> OursResult:
    """Time our pipeline through its public API on one core, then stage by stage."""
    from ours_stages import run_api_pair, run_breakdown_pair
    from pipeline.degrade.config import DegradeConfig
    from pipeline.degrade.ops import make_pair
    from pipeline.core.image_io import load_source

    cv2.setNumThreads(1)
    cfg = DegradeConfig()  # = the manifest's degrade section: gt 512, paper defaults
    files = list(OrderedDict.fromkeys(r.file for r in rows))
    decode = StageTimer()
    sources = {}
    for f in files:
        for _ in range(decode_repeats):
            with decode("decode"):
                sources[f], _info = load_source(f, cfg.max_pixels, cfg.min_side)
    decode_per_source_ms = decode.ms_per(len(files) * decode_repeats)["decode"]

    make_pair(sources[files[0]], "warm-up", DEMO_SEED, cfg)  # lazy imports, Poisson tables
    # The breakdown replays each pair right after its API call, so both passes see the
    # same machine state and their figures can be read against each other.
    api, stages, pairs, mismatched = StageTimer(), StageTimer(), {}, []
    for r in rows:
        p = pairs[r.key] = run_api_pair(sources[r.file], r.key, DEMO_SEED, cfg, api)
        hq, lq = run_breakdown_pair(sources[r.file], p.recipe, cfg, stages)
        if not (np.array_equal(hq, p.hq) and np.array_equal(lq, p.lq)):
            mismatched.append(r.key)
    n = len(rows)
    ms = api.ms_per(n)
    # sampling and encoding are single calls: the API pass already timed them
    breakdown = {**stages.ms_per(n), "sample": ms["sample"], "encode": ms["encode"]}
    decode_amortised = decode_per_source_ms * len(files) / n
    work = ms["sample"] + ms["prepare_gt"] + ms["degrade_gt"] + ms["encode"]
    summary = {
        "pairs": n,
        "sources": len(files),
        "pairs_per_source": n / len(files),
        "ms_per_pair": {
            "decode_per_source": decode_per_source_ms,
            "decode_amortised": decode_amortised,
            "sample": ms["sample"],
            "prepare_gt": ms["prepare_gt"],
            "usm": breakdown.get("usm", 0.0),
            "degrade_gt": ms["degrade_gt"],
            "encode": ms["encode"],
        },
        "total_ms_amortised": decode_amortised + work,
        "total_ms_one_decode_per_pair": decode_per_source_ms + work,
        "pairs_per_s_amortised": 1000.0 / (decode_amortised + work),
        "pairs_per_s_one_decode_per_pair": 1000.0 / (decode_per_source_ms + work),
        "breakdown_ms_per_pair": {"decode": decode_per_source_ms, **breakdown},
        "breakdown_matches_api": not mismatched,
        "breakdown_mismatched_keys": mismatched[:10],
        "png_kb_per_pair": float(np.mean([p.png_bytes for p in pairs.values()])) / 1024,
        "source_sizes": {Path(f).name: list(sources[f].shape[:2]) for f in files},
    }
    return OursResult(summary, pairs)


# ========================================================== BasicSR, 1 core ==


def bench_basicsr(rows: list[Any], ours: OursResult, seed: int = 0) -> dict[str, Any]:
    """BasicSR's pipeline on the same crops, one core; plus its ops on our recipes."""
    from baselines.basicsr_realesrgan import BasicSRMissing, BasicSRPipeline, Geometry, basicsr_kernel

    try:
        pipe = BasicSRPipeline(seed)
    except BasicSRMissing as e:
        print(f"\n*** {e}\n", file=sys.stderr)
        return {"available": False, "reason": "BasicSR is not installed; run `.venv/bin/python -m pip install "
                                              "--no-deps basicsr==1.4.2` (or `make bench`)"}
    torch = pipe.b.torch
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    first = ours.pairs[rows[0].key]
    pipe.make_pair(rows[0].file, Geometry.from_recipe(first.recipe), StageTimer())  # warm-up

    timer, out = StageTimer(), {}
    t0 = time.perf_counter()
    for r in rows:
        out[r.key] = pipe.make_pair(r.file, Geometry.from_recipe(ours.pairs[r.key].recipe), timer)
    wall = time.perf_counter() - t0
    n = len(rows)
    ms = timer.ms_per(n)
    total = sum(ms.values())

    recipe_psnr, kernel_err = [], 0.0
    for r in rows:  # BasicSR's operations with our draws: a paired check of our implementation
        p = ours.pairs[r.key]
        recipe_psnr.append(lq_psnr(p.hq, pipe.degrade_recipe(p.hq, p.recipe)))
        kernel_err = max(kernel_err, _kernel_error(pipe.b.deg, p.recipe, basicsr_kernel))
    return {
        "available": True,
        "version": pipe.b.version,
        "pairs": n,
        "ms_per_pair": ms,
        "total_ms": total,
        "pairs_per_s": 1000.0 / total,
        "loop_wall_s": wall,
        "png_kb_per_pair": float(np.mean([p.png_bytes for p in out.values()])) / 1024,
        "kernel_max_abs_diff_vs_ours": kernel_err,
        "_pairs": out,
        "_recipe_psnr": recipe_psnr,
    }


def _kernel_error(deg: Any, recipe: dict[str, Any], basicsr_kernel: Any) -> float:
    """Largest element difference between our kernels and BasicSR's for the same draws."""
    from pipeline.degrade.kernels import kernel_from_params

    err = 0.0
    for params in (recipe["blur1"], recipe["blur2"], recipe["final"]["sinc"]):
        if params is not None:
            err = max(err, float(np.abs(kernel_from_params(params) - basicsr_kernel(deg, params)).max()))
    return err


# ============================================================== statistics ==


def output_statistics(rows: list[Any], ours: OursResult, bsr: dict[str, Any]) -> dict[str, Any]:
    """PSNR(bicubic↑ LQ, HQ) for both pipelines on the same crops, and references."""
    keys = [r.key for r in rows]
    ours_all = [lq_psnr(p.hq, p.lq) for p in ours.pairs.values()]
    stats: dict[str, Any] = {
        "ours_all": summarize(ours_all),
        "bicubic_roundtrip_all": summarize([psnr(bicubic_roundtrip(p.hq, 4), p.hq) for p in ours.pairs.values()]),
    }
    if not bsr.get("available"):
        return stats
    sub = [ours.pairs[k] for k in keys]
    ours_sub = [lq_psnr(p.hq, p.lq) for p in sub]
    bsr_pairs = [bsr["_pairs"][k] for k in keys]
    bsr_sub = [lq_psnr(p.hq, p.lq) for p in bsr_pairs]
    paired = np.asarray(ours_sub) - np.asarray(bsr["_recipe_psnr"])
    hq_diff = [np.abs(p.hq.astype(np.int16) - b.hq.astype(np.int16)) for p, b in zip(sub, bsr_pairs)]
    stats.update({
        "ours_same_crops": summarize(ours_sub),
        "basicsr_same_crops": summarize(bsr_sub),
        "bicubic_roundtrip_same_crops": summarize([psnr(bicubic_roundtrip(p.hq, 4), p.hq) for p in sub]),
        "ours_minus_basicsr": mean_difference(summarize(ours_sub), summarize(bsr_sub)),
        "basicsr_ops_on_our_recipes": summarize(bsr["_recipe_psnr"]),
        "ours_minus_basicsr_ops_paired": {"diff": float(paired.mean()), "se": summarize(paired)["se"],
                                          "abs_max": float(np.abs(paired).max())},
        "per_pair": [{"key": k, "ours": o, "basicsr_ops_same_recipe": b, "basicsr": s,
                      "recipe": recipe_digest(p.recipe)}
                     for k, o, b, s, p in zip(keys, ours_sub, bsr["_recipe_psnr"], bsr_sub, sub)],
        "hq_vs_basicsr_usm": {"max_abs": int(max(d.max() for d in hq_diff)),
                              "fraction_differing": float(np.mean([np.mean(d > 0) for d in hq_diff])),
                              "psnr_min": min(psnr(p.hq, b.hq) for p, b in zip(sub, bsr_pairs))},
    })
    return stats


def recipe_digest(r: dict[str, Any]) -> str:
    """One line per recipe for the JSON's per-pair table: enough to see which draws
    (resize mode, noise, JPEG quality…) go with a large PSNR gap."""
    def kernel(k: dict[str, Any] | None) -> str:
        return "none" if k is None else k["type"] + str(k["size"])

    def noise(n: dict[str, Any]) -> str:
        level = f"σ{n['sigma']:.0f}" if n["type"] == "gaussian" else f"s{n['scale']:.2f}"
        return f"{n['type'][:5]}{'-grey' if n['gray'] else ''} {level}"

    r1, r2, f = r["resize1"], r["resize2"], r["final"]
    return (f"blur1 {kernel(r['blur1'])}, {r1['updown']} {r1['scale']:.2f} {r1['mode']}, {noise(r['noise1'])}, "
            f"q{r['jpeg1']} | blur2 {kernel(r['blur2'])}, {r2['updown']} {r2['scale']:.2f} {r2['mode']}, "
            f"{noise(r['noise2'])} | {f['order']} {f['resize_mode']} sinc {kernel(f['sinc'])} q{r['jpeg2']}")


# ================================================================ the job ==


def run_job(manifest_path: Path, out: Path, distributor: str, workers: int | None) -> tuple[Any, float]:
    """One run_degrade on a fresh output root; returns (JobResult, wall seconds)."""
    from pipeline.degrade.stage import run_degrade
    from pipeline.core.manifest import load_manifest

    shutil.rmtree(out, ignore_errors=True)
    manifest = load_manifest(manifest_path, out=out)
    log = io.StringIO()
    t0 = time.perf_counter()
    result = run_degrade(manifest, distributor=distributor, workers=workers, show_progress=False, log=log)
    wall = time.perf_counter() - t0
    if result.exit_code != 0 or result.rows_ok != result.rows_planned:
        raise RuntimeError(f"{distributor} job failed (exit {result.exit_code}):\n{result.summary()}\n{log.getvalue()}")
    return result, wall


def sidecar_timing(out: Path) -> dict[str, float]:
    """Sum of the per-shard timings the worker records (decode / degrade / encode)."""
    totals: dict[str, float] = {}
    for side in sorted((out / "pairs").glob("shard-*.arrow.json")):
        for k, v in json.loads(side.read_text()).get("timing", {}).items():
            if isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def _warm_ray_workers(n: int) -> list[int]:
    """Start ``n`` Ray workers and import the pipeline in each, outside the timed run.

    The tasks overlap in time (each holds its CPU for a moment), so they land on distinct
    workers; Ray reuses those workers for the job's tasks.
    """
    import ray

    def warm(hold_s: float) -> int:
        import os as _os
        import time as _time

        import pipeline.degrade.stage  # noqa: F401  (cv2, scipy, pyarrow: the stage's imports)

        _time.sleep(hold_s)
        return _os.getpid()

    remote = ray.remote(num_cpus=1)(warm)
    return ray.get([remote.remote(1.0) for _ in range(n)])


def ray_worker_memory() -> list[dict[str, Any]]:
    """Peak (VmHWM) and current RSS of every Ray worker process below this driver.

    Ray retitles its worker processes ``ray::IDLE`` / ``ray::<task or actor>``; its
    per-node agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are not workers.
    """
    found = []
    for pid in descendants(os.getpid()):
        title = cmdline(pid).strip()
        if title.startswith("ray::") and not title.split()[0].endswith("Agent"):
            found.append({"pid": pid, "title": title.strip()[:40],
                          "peak_rss_mb": (proc_status_kb(pid, "VmHWM") or 0) / 1024,
                          "rss_mb": (proc_status_kb(pid, "VmRSS") or 0) / 1024})
    return found


def bench_ray(manifest_path: Path, work: Path, workers: int) -> dict[str, Any]:
    """run_degrade with the Ray distributor on a private local Ray of ``workers`` CPUs.

    Ray start-up and worker warm-up are timed separately and excluded from the rate.
    """
    import ray

    from pipeline.core.distribute import init_ray

    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    init_ray(workers)
    t1 = time.perf_counter()
    warm_pids = _warm_ray_workers(workers)
    baseline = {pid: (proc_status_kb(pid, "VmRSS") or 0) / 1024 for pid in warm_pids}
    t2 = time.perf_counter()
    settle = wait_until_quiet()  # Ray's agents finish starting up before the clock runs
    out = work / f"job-ray{workers}"
    result, wall = run_job(manifest_path, out, "tasks", workers)
    memory = ray_worker_memory()
    ray.shutdown()
    task_workers = [m for m in memory if m["pid"] in baseline]
    return {
        "distributor": "ray", "workers": workers, "pairs": result.rows_ok, "shards": result.shards,
        "wall_s": wall, "pairs_per_s": result.rows_ok / wall,
        "ray_init_s": t1 - t0, "worker_warmup_s": t2 - t1, "settle_s": settle,
        "worker_baseline_rss_mb": max(baseline.values()) if baseline else None,
        "worker_peak_rss_mb": max((m["peak_rss_mb"] for m in memory), default=None),
        "task_worker_peak_rss_mb": [m["peak_rss_mb"] for m in task_workers],
        "ray_processes": memory,
        "sidecar_timing_s": sidecar_timing(out),
    }


def bench_serial(manifest_path: Path, work: Path) -> dict[str, Any]:
    out = work / "job-serial"
    result, wall = run_job(manifest_path, out, "serial", None)
    return {"distributor": "serial", "workers": 1, "pairs": result.rows_ok, "shards": result.shards,
            "wall_s": wall, "pairs_per_s": result.rows_ok / wall, "sidecar_timing_s": sidecar_timing(out)}


def rss_child(manifest_path: str, out: str) -> int:
    """Subprocess body: one serial job, then print its peak RSS as JSON.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of this
    (large, torch-laden) benchmark process would report the parent's footprint.
    """
    result, wall = run_job(Path(manifest_path), Path(out), "serial", None)
    peak_mb = (proc_status_kb(os.getpid(), "VmHWM") or 0) / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "pairs": result.rows_ok, "wall_s": wall}))
    return 0


def bench_rss_scaling(work: Path, crops: int = 2) -> list[dict[str, Any]]:
    """Peak RSS of a serial job in a fresh process over 15, 30 and 60 images (the same size
    mix): a worker's memory must not grow with the number of images it processes."""
    runs = []
    for copies in (1, 2, 4):
        manifest = write_manifest(work / f"rss-{copies}" / "manifest.json", crops, copies)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(manifest),
               str(manifest.parent / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed:\n{proc.stderr[-2000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append({"images": 15 * copies, **info})
    return runs


def bench_jobs(work: Path, crops: int) -> dict[str, Any]:
    manifest = write_manifest(work / "job" / "manifest.json", crops)
    os.environ.pop("RAY_ADDRESS", None)  # always a private local Ray, never a user's cluster
    runs = [bench_serial(manifest, work), bench_ray(manifest, work, 1), bench_ray(manifest, work, 2)]
    return {"crops_per_image": crops, "rows_per_shard": 8, "runs": runs, "rss_scaling": bench_rss_scaling(work)}


# ================================================================== report ==


def machine_info() -> dict[str, Any]:
    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 (a missing optional package is just reported)
            return "-"

    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "opencv": cv2.__version__, "torch": version("torch"),
            "ray": version("ray"), "loadavg_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


def headlines(res: dict[str, Any]) -> dict[str, Any]:
    ours, bsr, jobs = res["ours_one_core"], res["basicsr_one_core"], res["job"]
    by = {(r["distributor"], r["workers"]): r for r in jobs["runs"]}
    peak = max(r["worker_peak_rss_mb"] or 0 for r in jobs["runs"] if r["distributor"] == "ray")
    rss = jobs["rss_scaling"]
    h = {
        "speedup_vs_basicsr": (ours["pairs_per_s_one_decode_per_pair"] / bsr["pairs_per_s"]
                               if bsr.get("available") else None),
        "speedup_vs_basicsr_amortised": (ours["pairs_per_s_amortised"] / bsr["pairs_per_s"]
                                         if bsr.get("available") else None),
        "speedup_vs_basicsr_job_1w": (by[("ray", 1)]["pairs_per_s"] / bsr["pairs_per_s"]
                                      if bsr.get("available") else None),
        "scaling_2w_over_1w": by[("ray", 2)]["pairs_per_s"] / by[("ray", 1)]["pairs_per_s"],
        "worker_peak_rss_mb": peak,
        "serial_peak_rss_growth_mb": rss[-1]["peak_rss_mb"] - rss[0]["peak_rss_mb"],
    }
    h["meets"] = {
        "speedup_vs_basicsr": h["speedup_vs_basicsr"] is not None and h["speedup_vs_basicsr"] >= TARGETS["speedup_vs_basicsr"],
        "scaling_2w_over_1w": h["scaling_2w_over_1w"] >= TARGETS["scaling_2w_over_1w"],
        "worker_peak_rss_mb": peak < TARGETS["worker_peak_rss_mb"],
    }
    return h


Section = tuple[str, str]  # (title, body)


def _section_ours(ours: dict[str, Any], md: bool) -> Section:
    m, k = ours["ms_per_pair"], ours["pairs_per_source"]
    rows = [
        ["decode (load_source), per source photo", fmt_num(m["decode_per_source"], 2)],
        [f"decode, per pair (amortised over {k:.0f} crops)", fmt_num(m["decode_amortised"], 2)],
        ["sampling (sample_seed + sample_recipe)", fmt_num(m["sample"], 2)],
        ["prepare_gt (crop, flip, USM)", fmt_num(m["prepare_gt"], 2)],
        ["  of which USM", fmt_num(m["usm"], 2)],
        ["degrade_gt (second-order degradation)", fmt_num(m["degrade_gt"], 2)],
        ["encoding (2 × encode_png)", fmt_num(m["encode"], 2)],
        [f"total, {k:.0f} crops per decode", fmt_num(ours["total_ms_amortised"], 2)],
        ["total, one decode per pair", fmt_num(ours["total_ms_one_decode_per_pair"], 2)],
        [f"pairs/s, {k:.0f} crops per decode", fmt_num(ours["pairs_per_s_amortised"], 1)],
        ["pairs/s, one decode per pair", fmt_num(ours["pairs_per_s_one_decode_per_pair"], 1)],
    ]
    return (f"1. Ours, one core ({ours['pairs']} pairs from {ours['sources']} photos, 512² GT → 128² LQ)",
            render_table(["step", "ms/pair"], rows, md))


def _section_stages(ours: dict[str, Any], bsr: dict[str, Any], md: bool) -> Section:
    ob, bm = ours["breakdown_ms_per_pair"], bsr.get("ms_per_pair", {})
    rows = []
    for name, what in STAGES:
        a, b = ob.get(name, 0.0), bm.get(name)
        ratio = fmt_num(b / a, 0) + "×" if b is not None and a > 0.005 else "–"
        rows.append([f"{name}: {what}", fmt_num(a, 2), fmt_num(b, 1), ratio])
    total = sum(ob.values())
    rows.append(["total (one decode per pair)", fmt_num(total, 1), fmt_num(bsr.get("total_ms"), 1),
                 fmt_num(bsr["total_ms"] / total, 0) + "×" if bsr.get("available") else "–"])
    rows.append(["PNG KB per pair (HQ + LQ)", fmt_num(ours["png_kb_per_pair"], 0),
                 fmt_num(bsr.get("png_kb_per_pair"), 0), "–"])
    title = (f"2. Per stage, one core, ms/pair: ours ({ours['pairs']} pairs) vs BasicSR "
             f"{bsr.get('version', '(not installed)')} ({bsr.get('pairs', 0)} pairs, same crops)")
    if not ours["breakdown_matches_api"]:
        title += "  [WARNING: ours' breakdown does not reproduce degrade_gt's bytes]"
    return title, render_table(["stage", "ours", "BasicSR", "BasicSR/ours"], rows, md)


def _section_job(jobs: dict[str, Any], md: bool) -> Section:
    rows = []
    for r in jobs["runs"]:
        if r["distributor"] == "serial":
            name, note = "serial", "in the benchmark's process"
        else:
            name = f"Ray, {r['workers']} worker{'s' * (r['workers'] > 1)}"
            note = (f"excluded: Ray init {r['ray_init_s']:.1f} s, warm-up {r['worker_warmup_s']:.1f} s, "
                    f"settle {r['settle_s']:.1f} s")
        rows.append([name, str(r["pairs"]), str(r["shards"]), fmt_num(r["wall_s"], 2), fmt_num(r["pairs_per_s"], 1),
                     fmt_num(r.get("worker_peak_rss_mb"), 0), note])
    for s in jobs["rss_scaling"]:
        rows.append([f"serial, fresh process, {s['images']} images", str(s["pairs"]), "–", fmt_num(s["wall_s"], 2),
                     fmt_num(s["pairs"] / s["wall_s"], 1), fmt_num(s["peak_rss_mb"], 0), "peak RSS = VmHWM"])
    return (f"3. The whole job (run_degrade, {jobs['crops_per_image']} crops per photo, "
            f"{jobs['rows_per_shard']} rows per shard)",
            render_table(["run", "pairs", "shards", "wall s", "pairs/s", "peak RSS MB/worker", "note"], rows, md))


def _section_psnr(st: dict[str, Any], md: bool) -> Section:
    def row(label: str, s: dict[str, float] | None) -> list[str]:
        if not s:
            return [label, "–", "–", "–"]
        return [label, str(s["n"]), fmt_num(s["mean"], 2), fmt_num(s["std"], 2)]

    rows = [row("ours, all pairs", st["ours_all"]),
            row("ours, the BasicSR crops", st.get("ours_same_crops")),
            row("BasicSR, same crops", st.get("basicsr_same_crops")),
            row("BasicSR's ops driven by our recipes (same crops)", st.get("basicsr_ops_on_our_recipes")),
            row("plain bicubic ×4 down/up (same crops)", st.get("bicubic_roundtrip_same_crops")),
            row("plain bicubic ×4 down/up (all pairs)", st["bicubic_roundtrip_all"])]
    return "4. PSNR (dB) of bicubic-upsampled LQ vs stored HQ", render_table(["pipeline", "n", "mean", "std"], rows, md)


def _section_headlines(res: dict[str, Any], md: bool) -> Section:
    bsr, st, h, jobs = res["basicsr_one_core"], res["statistics"], res["headlines"], res["job"]
    k = res["ours_one_core"]["pairs_per_source"]
    lines = []
    if bsr.get("available"):
        d, pd, u = st["ours_minus_basicsr"], st["ours_minus_basicsr_ops_paired"], st["hq_vs_basicsr_usm"]
        lines += [
            f"ours {h['speedup_vs_basicsr']:.1f}× BasicSR's pairs/s on one core (one decode per pair; "
            f"{h['speedup_vs_basicsr_amortised']:.1f}× with {k:.0f} crops per decode; the whole job on one "
            f"Ray worker {h['speedup_vs_basicsr_job_1w']:.1f}×)  target ≥ 10×",
            f"ours − BasicSR mean PSNR: {d['diff']:+.2f} dB (± {d['se']:.2f} dB standard error; different random draws)",
            f"ours − BasicSR ops on the same recipes, paired: {pd['diff']:+.2f} ± {pd['se']:.2f} dB "
            f"(largest single-pair gap {pd['abs_max']:.2f} dB)",
            f"HQ (USM) ours vs BasicSR on the same crops: max {u['max_abs']} level(s), "
            f"{100 * u['fraction_differing']:.3f}% of values differ, min PSNR {u['psnr_min']:.1f} dB",
            f"kernels ours vs BasicSR for the same draws: max |Δ| {bsr['kernel_max_abs_diff_vs_ours']:.1e}",
        ]
    else:
        lines.append(f"BasicSR comparison skipped: {bsr.get('reason')}")
    lines += [
        f"Ray 2 workers ÷ 1 worker: {h['scaling_2w_over_1w']:.2f}×  target ≥ 1.7× (2-core machine)",
        f"peak RSS per Ray worker: {h['worker_peak_rss_mb']:.0f} MB  target < 1 GB; serial peak RSS over "
        + ", ".join(f"{s['images']} images {s['peak_rss_mb']:.0f} MB" for s in jobs["rss_scaling"])
        + f" ({h['serial_peak_rss_growth_mb']:+.0f} MB from the first to the last)",
        f"CPU used by other processes during the run: {_foreign(res['machine'])} (near 0: clean timings)",
    ]
    bullet = "- " if md else "  "
    return "5. Headlines (all measured in this run)", "\n".join(bullet + ln for ln in lines)


def tables(res: dict[str, Any], md: bool) -> str:
    """Every table of the report, as plain text or Markdown."""
    ours, bsr = res["ours_one_core"], res["basicsr_one_core"]
    parts = [_section_ours(ours, md), _section_stages(ours, bsr, md), _section_job(res["job"], md),
             _section_psnr(res["statistics"], md), _section_headlines(res, md)]
    if md:
        return "\n\n".join(f"### {t}\n\n{body}" for t, body in parts)
    return "\n\n".join(f"{t}\n{body}" for t, body in parts)


def _foreign(machine: dict[str, Any]) -> str:
    return ", ".join(f"{v['cpu_s']:.1f} s ({k})" for k, v in machine.get("foreign_cpu_s", {}).items()) or "–"


def write_outputs(res: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    md = out.with_suffix(".md")
    mi = res["machine"]
    md.write_text(f"## Degradation benchmark, {mi['date']}\n\n{mi['cpu']}, {mi['cores']} cores; "
                  f"Python {mi['python']}, numpy {mi['numpy']}, OpenCV {mi['opencv']}, torch {mi['torch']}, "
                  f"Ray {mi['ray']}; {mi['busy_cores_at_start']:.2f} cores busy elsewhere when it started; other "
                  f"processes used {_foreign(mi)} of CPU during it.\n\n"
                  + tables(res, md=True) + "\n")
    return md


# ==================================================================== main ==


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=120, help="pairs for our one-core measurement (default 120)")
    ap.add_argument("--basicsr-pairs", type=int, default=24,
                    help="pairs for BasicSR (~1.5 s each on one core; default 24)")
    ap.add_argument("--crops", type=int, default=16,
                    help="crops per photo in the whole-job runs: 15 × 16 = 240 pairs, 30 shards of 8 (default 16)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result; Markdown goes beside it")
    ap.add_argument("--rss-child", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.basicsr_pairs < 0 or args.crops < 1:
        ap.error("--pairs and --crops must be at least 1, --basicsr-pairs at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    started = time.perf_counter()
    ensure_photos()
    work = args.out.parent / "work"
    n = max(args.pairs, args.basicsr_pairs)
    crops_needed = max(args.crops, math.ceil(n / 15))
    rows = select_rows(write_manifest(work / "select" / "manifest.json", crops_needed), n)
    res: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    res["machine"]["busy_cores_at_start"] = busy = busy_cores()
    if busy > 0.3:
        print(f"WARNING: {busy:.1f} cores already busy before the benchmark started; timings and the "
              "2-worker scaling will be pessimistic. Rerun on an idle machine.", file=sys.stderr)

    monitor = ForeignCpuMonitor(interval_s=2.0).start()
    print(f"[1/3] ours, one core: {len(rows)} pairs …", file=sys.stderr)
    with monitor.section("ours_one_core"):
        ours = bench_ours(rows)
    res["ours_one_core"] = ours.summary
    print(f"[2/3] BasicSR, one core: {args.basicsr_pairs} pairs …", file=sys.stderr)
    bsr_rows = rows[: args.basicsr_pairs]
    with monitor.section("basicsr_one_core"):
        bsr = bench_basicsr(bsr_rows, ours) if bsr_rows else {"available": False, "reason": "--basicsr-pairs 0"}
    res["statistics"] = output_statistics(bsr_rows, ours, bsr)
    res["basicsr_one_core"] = {k: v for k, v in bsr.items() if not k.startswith("_")}
    print("[3/3] the whole job: serial, Ray 1 worker, Ray 2 workers, memory over 15, 30, 60 images …",
          file=sys.stderr)
    with monitor.section("job"):
        res["job"] = bench_jobs(work, args.crops)
    res["machine"]["foreign_cpu_s"] = foreign = monitor.stop()
    if max(v["cpu_s"] for v in foreign.values()) > 2.0:
        print(f"WARNING: other processes used CPU during the run ({_foreign(res['machine'])}); the figures "
              "are pessimistic. Rerun on an idle machine. Top commands are in the JSON (machine.foreign_cpu_s).",
              file=sys.stderr)
    res["headlines"] = headlines(res)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["elapsed_s"] = time.perf_counter() - started
    md = write_outputs(res, args.out)
    print("\n" + tables(res, md=False))
    print(f"\n{res['elapsed_s']:.0f} s; results in {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
