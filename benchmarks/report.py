#!/usr/bin/env python
"""Time and peak memory of jobs/report.py on a real build and on synthetic builds of N rows.

  python benchmarks/report.py [--source out/demo] [--rows 2000,20000] [--workers 1,2]
                              [--work /tmp/report-bench] [--out bench-out/report.json] [--keep]

A synthetic build is made cheaply from a real one: its pairs, captions and text_emb rows
are replicated under new keys (`<key>~<copy>`) into shards of 500 rows with sidecars
(rows, bytes, sha256, the source's recorded settings), so every shard is complete and the
report reads it exactly as it reads a built one. Replicated draws repeat, so the fit tests
on a synthetic build mean nothing; time and memory are what is measured.

Each report runs in a fresh process (`python jobs/report.py`, the user's command). Peak
memory is read from /proc while it runs (every 0.1 s): VmHWM (the kernel's lifetime peak
resident set) of the report process and of its largest worker, and the largest sum of
current RSS over the whole process tree. Memory that does not grow with rows shows as the
same peak at 2,000 and 20,000 rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import cpu_model, descendants, fmt_num, proc_status_kb, render_table  # noqa: E402

STAGES = ("pairs", "captions", "text_emb")
ROWS_PER_SHARD = 500


def _read(arrow: Path) -> pa.Table:
    with pa.memory_map(str(arrow)) as src:
        return pa.ipc.open_stream(src).read_all()


def _write_shard(arrow: Path, table: pa.Table, side: dict[str, Any], shard: int) -> None:
    arrow.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=16):
            writer.write_batch(batch)
    h = hashlib.sha256()
    with open(arrow, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    side = {**side, "shard": shard, "rows": table.num_rows, "planned_rows": table.num_rows, "failed": [],
            "bytes": arrow.stat().st_size, "sha256": h.hexdigest()}
    Path(str(arrow) + ".json").write_text(json.dumps(side, indent=1))


def synthetic_build(source: Path, rows: int, out: Path) -> Path:
    """`rows` rows replicated from `source`'s complete shards, in shards of 500."""
    stages = [s for s in STAGES if list((source / s).glob("shard-*.arrow.json"))]
    tables = {s: pa.concat_tables([_read(p) for p in sorted((source / s).glob("shard-*.arrow"))
                                   if Path(str(p) + ".json").exists()]) for s in stages}
    sides = {s: json.loads(next(iter(sorted((source / s).glob("shard-*.arrow.json")))).read_text()) for s in stages}
    n_src = tables["pairs"].num_rows
    for shard, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        idx = [i % n_src for i in range(start, min(start + ROWS_PER_SHARD, rows))]
        for s in stages:
            t = tables[s].take(pa.array(idx))
            keys = [f"{k}~{(start + j) // n_src}" for j, k in enumerate(t.column("key").to_pylist())]
            t = t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))
            _write_shard(out / s / f"shard-{shard:05d}.arrow", t, sides[s], shard)
    return out


def run_report(build: Path, out: Path, workers: int) -> dict[str, Any]:
    """Wall time and peak memory of one `python jobs/report.py` run."""
    cmd = [sys.executable, str(ROOT / "jobs" / "report.py"), "--build", str(build), "--out", str(out),
           "--workers", str(workers), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm: dict[int, int] = {}
    tree_peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal tree_peak
        while not done.is_set():
            total = 0
            for pid in [proc.pid] + descendants(proc.pid):
                peak, rss = proc_status_kb(pid, "VmHWM"), proc_status_kb(pid, "VmRSS")
                if peak:
                    hwm[pid] = max(hwm.get(pid, 0), peak)
                total += rss or 0
            tree_peak = max(tree_peak, total)
            done.wait(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout}{stderr}")
    stats = json.loads((out / "stats.json").read_text())
    workers_hwm = [v for k, v in hwm.items() if k != proc.pid]
    return {"rows": stats["pairs"]["rows"], "shards": stats["stages"]["pairs"]["shards"], "workers": workers,
            "wall_s": round(wall, 2), "rows_per_s": round(stats["pairs"]["rows"] / wall, 1),
            "main_peak_mb": round(hwm.get(proc.pid, 0) / 1024, 1),
            "worker_peak_mb": round(max(workers_hwm) / 1024, 1) if workers_hwm else None,
            "tree_peak_mb": round(tree_peak / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("out/demo"), help="a real build (make demo makes out/demo)")
    ap.add_argument("--rows", default="2000,20000", help="sizes of the synthetic builds, comma-separated")
    ap.add_argument("--workers", default="1", help="--workers values for jobs/report.py, comma-separated")
    ap.add_argument("--work", type=Path, help="where the synthetic builds go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/report.json"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic builds")
    args = ap.parse_args(argv)
    source = args.source.resolve()
    if not list((source / "pairs").glob("shard-*.arrow.json")):
        print(f"{source} has no complete pairs shards: run `make demo` (or pass --source BUILD)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="report-bench-"))
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    try:
        for w in workers:
            results.append({"build": f"{source.name} (real)", **run_report(source, work / "report-source", w)})
        for n in (int(r) for r in args.rows.split(",")):
            t0 = time.perf_counter()
            build = synthetic_build(source, n, work / f"synthetic-{n}")
            made = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in build.rglob("shard-*.arrow"))
            for w in workers:
                r = run_report(build, work / f"report-{n}-{w}", w)
                results.append({"build": f"synthetic {n:,}", "make_s": round(made, 1),
                                "build_gb": round(size / 1e9, 2), **r})
            if not args.keep:
                shutil.rmtree(build)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    cpu = cpu_model()
    head = ("build", "rows", "shards", "workers", "wall s", "rows/s", "main peak MB", "worker peak MB", "tree peak MB")
    rows = [(r["build"], f"{r['rows']:,}", str(r["shards"]), str(r["workers"]), fmt_num(r["wall_s"]),
             fmt_num(r["rows_per_s"]), fmt_num(r["main_peak_mb"]), fmt_num(r["worker_peak_mb"]),
             fmt_num(r["tree_peak_mb"])) for r in results]
    print(render_table(head, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"CPU: {cpu}, {os.cpu_count()} cores\n\n"
                                           + render_table(head, rows, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
