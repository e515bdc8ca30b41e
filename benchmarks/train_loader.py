#!/usr/bin/env python
"""Training-loader benchmark: samples/s of model.training.data's loader alone at 512², per worker.

    .venv/bin/python benchmarks/train_loader.py                  # workers 0 (in process), 1, 2
    .venv/bin/python benchmarks/train_loader.py --build out/demo --workers 1 2 4 --seconds 20

The build read: `--build DIR`, else out/demo when it is complete (`make demo`), else a
small real build made here in bench-out/train_loader/build (kept for the next run):
the demo photographs (.cache/demo/photos) degraded at 512² by `jobs/degrade.py --serial`,
captioned by `jobs/caption.py --shard N` (the tiny random LLaVA for a quarter of the rows,
person-written captions of LLaVA-1.5's lengths through `--overrides` for the rest, so rows
have 1-4 text chunks as real captions do), embedded by `jobs/embed.py --all` with a tiny
text encoder of SD1.5's width (D = 768, one layer), so every sample carries as many text
bytes as with the real encoder. Building it takes a minute or two, once.

Measured, in one run:
* per-stage cost of one item in this process (one thread): PNG decode of the 512² HQ and
  the 128² LQ, bicubic ×4, uint8 → float32 conversion (ours: cv2.split + cv2.LUT; torch's
  permute/float/div/sub chain shown for comparison), the text view, collate;
* the DataLoader from `model.training.data.make_loader` with 0 (in process), 1 and 2 workers:
  samples/s over a timed window after a warm-up, per worker, per worker-CPU-second (what
  one core delivers, robust to other load on the machine), and peak RSS of the main
  process and each worker (anonymous memory vs pages of the memory-mapped shards, which
  are the OS page cache and shared by every worker and rank).

Results go to a table on stdout and to --out (default bench-out/train_loader.json).
CPU time taken by other processes during each section is recorded: on a shared 2-core
machine a contaminated figure can then be recognised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))

from bench_common import (  # noqa: E402
    ForeignCpuMonitor, busy_cores, fmt_num, proc_status_kb, render_table, wait_until_quiet,
)

DEFAULT_OUT = ROOT / "bench-out" / "train_loader.json"
WORK = ROOT / "bench-out" / "train_loader"
TARGET_PER_CORE = 100.0  # samples/s per worker process (one core each)
# (share of rows, words low, words high) of person-written captions: LLaVA-1.5's "very
# detailed" descriptions are mostly 80-250 words (see benchmarks/embed.py)
LENGTH_MIX = ((0.15, 10, 50), (0.40, 50, 110), (0.35, 110, 220), (0.10, 230, 320))
WORDS = ("the image shows a large fluffy orange cat lying on a wooden windowsill in warm sunlight with "
         "a potted plant white curtains a blurry street outside a red roofed house soft shadows and a "
         "small table holding a cup of coffee a book and a pair of glasses near the glass").split()


# ----------------------------------------------------------------------- build ---


def _run(*args: str) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    print(f"  {' '.join(Path(a).name if a.endswith('.py') else a for a in args)}  "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def prepare(work: Path, rows: int, hidden: int) -> Path:
    """A small real build at 512² through the real jobs (run in a subprocess of the benchmark,
    so the measuring process imports neither transformers nor Ray)."""
    from pipeline.core.shards import read_table, shard_files, shard_path
    from demo_fixtures.tiny_llava import build_tiny_llava
    from demo_fixtures.tiny_sd import build_tiny_sd

    sys.path.insert(0, str(ROOT / "jobs"))
    from prepare_demo import copy_photos

    photos = ROOT / ".cache" / "demo" / "photos"
    if not photos.is_dir() or not any(photos.iterdir()):
        copy_photos(photos)
    n_photos = len([p for p in photos.iterdir() if p.is_file()])
    tiny = work / "tiny"
    if not (tiny / "llava" / "config.json").is_file():
        build_tiny_llava(tiny / "llava")
    sd = tiny / f"sd15-h{hidden}"
    if not (sd / "text_encoder" / "config.json").is_file():
        build_tiny_sd(sd, hidden=hidden, layers=1)
    out = work / "build"
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({
        "name": "train-loader-bench", "seed": 20261127, "output": str(out),
        "sources": [{"name": "skimage", "root": str(photos)}],
        "degrade": {"gt_size": 512, "scale": 4, "crops_per_image": max(1, math.ceil(rows / n_photos)),
                    "rows_per_shard": 32, "usm_gt": True, "max_failed_fraction": 0.0},
        "caption": {"engine": "transformers", "model": str(tiny / "llava"), "max_tokens": 24, "batch_size": 16,
                    "max_failed_fraction": 0.0},
        "text_embed": {"model": str(sd), "max_chunks": 4, "batch_size": 64},
    }, indent=1))
    m = str(manifest)
    _run("jobs/degrade.py", "--manifest", m, "--serial", "--no-progress")
    rng = random.Random(0)
    shares = [s for s, _, _ in LENGTH_MIX]
    for shard, _ in shard_files(out, "pairs"):
        ov = work / f"overrides-{shard:05d}.jsonl"
        with ov.open("w") as f:
            for key in read_table(shard_path(out, "pairs", shard)).column("key").to_pylist():
                if rng.random() < 0.25:
                    continue  # captioned by the tiny LLaVA (short: one chunk)
                _, lo, hi = rng.choices(LENGTH_MIX, weights=shares)[0]
                words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
                f.write(json.dumps({"key": key, "caption": " ".join(words)}) + "\n")
        _run("jobs/caption.py", "--manifest", m, "--shard", str(shard), "--overrides", str(ov), "--no-progress")
    _run("jobs/embed.py", "--manifest", m, "--all", "--no-progress")
    return out


def choose_build(arg: str | None, rows: int, hidden: int) -> tuple[Path, str]:
    from model.training.verify import BuildError, verify_build

    candidates = [Path(arg)] if arg else [ROOT / "out" / "demo", WORK / "build"]
    for c in candidates:
        try:
            verify_build(c, check_hash=False, show_progress=False)
            return c, "given" if arg else ("out/demo" if c == candidates[0] else "kept from an earlier run")
        except BuildError as e:
            if arg:
                raise SystemExit(str(e))
            print(f"{c}: not usable ({e.problems[0]})", file=sys.stderr)
    print(f"building a small 512² build in {WORK / 'build'} (once) ...", file=sys.stderr)
    r = subprocess.run([sys.executable, __file__, "--prepare", "--rows", str(rows), "--hidden", str(hidden)], cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit("building the benchmark's build failed")
    verify_build(WORK / "build", show_progress=False)
    return WORK / "build", "built now"


# --------------------------------------------------------------------- measure ---


def profile_item(build: Path, n: int, batch: int) -> dict[str, float]:
    """Milliseconds per sample of each step of an item, and of whole batches, one thread."""
    import cv2
    import torch

    from model.training import data as D

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    ds = D.ShardedPairs(build, null_text_ratio=0.0)
    n = min(n, len(ds)) // batch * batch
    for i in range(n):  # first touches: page cache, pyarrow's one-time float16 set-up
        ds[i]
    steps = ("read row", "decode HQ 512²", "decode LQ 128²", "bicubic ×4", "to float (cv2 LUT, 3 images)",
             "to float (torch chain, 3 images)", "to uint8 CHW (cv2.split, 3 images)", "text view")
    t = dict.fromkeys(steps, 0.0)
    for i in range(n):
        shard, row = ds.locate(i)
        t0 = time.perf_counter()
        key, hq_png, lq_png, hidden = ds._shard(shard).row(row)
        t1 = time.perf_counter()
        hq = D._decode(hq_png, key)
        t2 = time.perf_counter()
        lq = D._decode(lq_png, key)
        t3 = time.perf_counter()
        up = cv2.resize(lq, (hq.shape[1], hq.shape[0]), interpolation=cv2.INTER_CUBIC)
        t4 = time.perf_counter()
        D._to_chw(hq, D._LUT_SIGNED), D._to_chw(lq, D._LUT_UNIT), D._to_chw(up, D._LUT_SIGNED)
        t5 = time.perf_counter()
        torch.from_numpy(hq).permute(2, 0, 1).float().div(127.5).sub(1).contiguous()
        torch.from_numpy(lq).permute(2, 0, 1).float().div(255).contiguous()
        torch.from_numpy(up).permute(2, 0, 1).float().div(127.5).sub(1).contiguous()
        t6 = time.perf_counter()
        D._to_chw(hq, None), D._to_chw(lq, None), D._to_chw(up, None)
        t6b = time.perf_counter()
        D._readonly_tensor(hidden)
        t7 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6b - t6, t7 - t6b)):
            t[k] += v
    ms = {k: 1000 * v / n for k, v in t.items()}
    groups = [list(range(i, i + batch)) for i in range(0, n, batch)]
    t0 = time.perf_counter()
    for g in groups:
        D.collate([ds[i] for i in g], ds.empty_prompt)
    t1 = time.perf_counter()
    for g in groups:
        D.collate(ds.__getitems__(g), ds.empty_prompt)
    t2 = time.perf_counter()
    u8 = D.ShardedPairs(build, null_text_ratio=0.0, image_dtype=torch.uint8)
    t3 = time.perf_counter()
    for g in groups:
        D.collate(u8.__getitems__(g), u8.empty_prompt)
    t4 = time.perf_counter()
    ms[f"batch {batch} per sample: __getitem__ ×{batch} + collate (stack)"] = 1000 * (t1 - t0) / n
    ms[f"batch {batch} per sample: __getitems__ + collate (float32)"] = 1000 * (t2 - t1) / n
    ms[f"batch {batch} per sample: __getitems__ + collate (uint8)"] = 1000 * (t4 - t3) / n
    return ms


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _mem(pid: int) -> dict[str, float | None]:
    mb = lambda f: (lambda v: None if v is None else round(v / 1024, 1))(proc_status_kb(pid, f))  # noqa: E731
    return {"peak_rss_mb": mb("VmHWM"), "rss_anon_mb": mb("RssAnon"), "rss_file_mb": mb("RssFile"),
            "rss_shmem_mb": mb("RssShmem")}


def run_loader(build: Path, workers: int, batch: int, seconds: float, warmup: float, dtype: str) -> dict[str, Any]:
    import torch

    from model.training.data import make_loader

    loader = make_loader(build, batch, seed=0, num_workers=workers, pin_memory=False, prefetch_factor=4,
                         image_dtype=getattr(torch, dtype))
    it = iter(loader)
    t0 = time.perf_counter()
    warm = 0
    while time.perf_counter() - t0 < warmup or warm < 2 * max(1, workers) * 4:
        next(it)
        warm += 1
    inner = loader._iterator if workers else None
    pids = [w.pid for w in inner._workers] if inner is not None else []
    tick = os.sysconf("SC_CLK_TCK")
    cpu0 = {p: _ticks(p) for p in [os.getpid(), *pids]}
    n = batches = 0
    t1 = time.perf_counter()
    while (dt := time.perf_counter() - t1) < seconds:
        b = next(it)
        n += len(b["keys"])
        batches += 1
    dt = time.perf_counter() - t1
    cpu = {p: (_ticks(p) - c) / tick for p, c in cpu0.items()}
    worker_cpu = sum(cpu[p] for p in pids) if pids else cpu[os.getpid()]
    mem = {"main": _mem(os.getpid()), "workers": [_mem(p) for p in pids]}
    del it
    if inner is not None:
        inner._shutdown_workers()
    rate = n / dt
    return {
        "workers": workers, "image_dtype": dtype, "batch_size": batch, "samples": n, "batches": batches,
        "seconds": round(dt, 2),
        "samples_per_s": round(rate, 1),
        "per_worker_samples_per_s": round(rate / max(1, workers), 1),
        "worker_cpu_s": round(worker_cpu, 2), "main_cpu_s": round(cpu[os.getpid()], 2),
        "samples_per_worker_cpu_s": round(n / worker_cpu, 1) if worker_cpu else None,
        "memory": mem,
    }


def build_info(build: Path) -> dict[str, Any]:
    from collections import Counter

    from pipeline.core.shards import read_sidecar, read_table, shard_files, shard_path

    ids = [s for s, _ in shard_files(build, "pairs")]
    chunks: Counter = Counter()
    width = None
    png = []
    for s in ids:
        emb = read_table(shard_path(build, "text_emb", s))
        chunks.update(emb.column("num_chunks").to_pylist())
        width = read_sidecar(shard_path(build, "text_emb", s)).get("hidden_size")
        pairs = read_table(shard_path(build, "pairs", s))
        png += [len(pairs.column("hq_png")[i].as_buffer()) for i in range(min(16, pairs.num_rows))]
    return {"path": str(build), "shards": len(ids), "rows": sum(chunks.values()), "hidden_size": width,
            "rows_by_chunks": {str(k): v for k, v in sorted(chunks.items())},
            "hq_png_kb_mean": round(sum(png) / len(png) / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", help="a complete build to read (default: out/demo if complete, else our own)")
    ap.add_argument("--rows", type=int, default=64, help="rows of the build made here (rounded up to whole photos)")
    ap.add_argument("--hidden", type=int, default=768, help="text width D of the build made here")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-dtype", nargs="+", choices=("float32", "uint8"), default=["float32", "uint8"],
                    help="image tensors the workers hand over (uint8: converted on the GPU by images_to_float)")
    ap.add_argument("--seconds", type=float, default=12.0, help="timed window per run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each section, wait up to this long for other load on the machine to stop")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # internal: build only
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one loader run with N workers
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(WORK, args.rows, args.hidden)
        return 0
    if args.child is not None:
        print(json.dumps(run_loader(Path(args.build), args.child, args.batch_size, args.seconds, args.warmup,
                                    args.image_dtype[0])))
        return 0

    build, origin = choose_build(args.build, args.rows, args.hidden)
    info = {**build_info(build), "origin": origin}
    print(f"build: {info['path']} ({origin}): {info['rows']} rows in {info['shards']} shards, D={info['hidden_size']}, "
          f"chunks {info['rows_by_chunks']}, HQ PNG {info['hq_png_kb_mean']} KB", file=sys.stderr)
    idle = busy_cores(1.0)
    monitor = ForeignCpuMonitor().start()
    wait_until_quiet(0.3, args.quiet_wait)
    with monitor.section("profile"):
        prof = profile_item(build, 64, args.batch_size)
    runs = []
    for dtype in args.image_dtype:
        for w in args.workers:  # each in a fresh process, so peak RSS is that run's own
            if dtype != "float32" and w == 0:
                continue
            waited = wait_until_quiet(0.3, args.quiet_wait)
            with monitor.section(f"{dtype} workers={w}"):
                r = subprocess.run([sys.executable, __file__, "--child", str(w), "--build", str(build),
                                    "--batch-size", str(args.batch_size), "--seconds", str(args.seconds),
                                    "--warmup", str(args.warmup), "--image-dtype", dtype],
                                   cwd=ROOT, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"loader run with {w} workers ({dtype}) failed:\n{r.stderr}")
                runs.append({**json.loads(r.stdout.strip().splitlines()[-1]), "waited_for_quiet_s": round(waited, 1)})
    foreign = monitor.stop()

    print("\nper item, one thread (ms/sample):")
    print(render_table(["step", "ms", "samples/s if alone"],
                       [[k, fmt_num(v, 3), fmt_num(1000 / v if v else None, 0)] for k, v in prof.items()]))
    rows = []
    for r in runs:
        w = r["workers"]
        mem = r["memory"]
        wpeak = max((m["peak_rss_mb"] or 0 for m in mem["workers"]), default=None)
        wanon = max((m["rss_anon_mb"] or 0 for m in mem["workers"]), default=None)
        rows.append([f"{r['image_dtype']}, {w} worker{'s' if w != 1 else ''}" + (" (in process)" if w == 0 else ""),
                     fmt_num(r["samples_per_s"]), fmt_num(r["per_worker_samples_per_s"]),
                     fmt_num(r["samples_per_worker_cpu_s"]), fmt_num(r["main_cpu_s"] / r["seconds"], 2),
                     fmt_num(mem["main"]["peak_rss_mb"], 0), fmt_num(wpeak, 0), fmt_num(wanon, 0),
                     fmt_num(foreign.get(f"{r['image_dtype']} workers={w}", {}).get("cpu_s"), 1)])
    print(f"\nloader at 512², batch {args.batch_size}, {args.seconds:.0f} s per run "
          f"(target ≥ {TARGET_PER_CORE:.0f} samples/s per worker core):")
    print(render_table(["loader", "samples/s", "per worker", "per worker CPU-s", "main cores", "main peak MB",
                        "worker peak MB", "worker anon MB", "foreign CPU-s"], rows))
    best = {d: max([r["samples_per_worker_cpu_s"] or 0 for r in runs if r["workers"] > 0 and r["image_dtype"] == d],
                   default=None) for d in args.image_dtype}
    result = {
        "benchmark": "train_loader",
        "command": "python benchmarks/train_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "busy_cores_before": round(idle, 2)},
        "build": info,
        "item_profile_ms": {k: round(v, 4) for k, v in prof.items()},
        "runs": runs,
        "target_samples_per_s_per_core": TARGET_PER_CORE,
        "target_met": {d: b is not None and b >= TARGET_PER_CORE for d, b in best.items()},
        "foreign_cpu": foreign,
        "notes": ("per worker CPU-s = samples per CPU-second of the worker processes: what one core delivers; "
                  "samples/s with 2 workers on this 2-core machine shares the cores with the main process. "
                  "rss_file_mb counts pages of the memory-mapped shards (page cache, shared by all workers)."),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
