#!/usr/bin/env python
"""Training benchmark: how much of a tiny CPU training step waits for data, and memory.

    .venv/bin/python benchmarks/train.py [--build out/demo] [--steps 12] [--workers 2]

Runs the real trainer (model/training/trainer.py) on a complete build — out/demo by default
(`make demo` makes it: 512² pairs, tiny models) — for a few steps, twice in the same run:
with `--workers` loader processes and with the loader in the training process
(num_workers 0, the baseline a peer's `num_workers=0` loader gives). Reports samples/s,
the fraction of step time spent waiting for the next batch (target < 5%) and the peak
RSS of the trainer. Loader throughput on its own is benchmarks/train_loader.py.

Real SD1.5-size step times and memory need a GPU (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(build: Path, manifest: Path, steps: int, workers: int) -> dict:
    from model.training.config import TrainConfig
    from model.training.trainer import run_training
    from pipeline.core.manifest import load_manifest

    cfg = load_manifest(manifest, out=build, check_sources=False).settings(TrainConfig, "train")
    cfg = dataclasses.replace(cfg, num_workers=workers, validation_pairs=0, checkpoint_every=10**9,
                              check_hashes=False)
    with tempfile.TemporaryDirectory() as d:
        hist = run_training(build, Path(d), cfg, max_steps=steps, show_progress=False)
    steady = hist[2:] or hist  # the first steps include worker start-up and lazy allocations
    return {
        "workers": workers, "steps": len(hist), "micro_batch_size": cfg.micro_batch_size,
        "batch_size": cfg.batch_size,
        "samples_per_s": round(sum(h["samples_per_s"] for h in steady) / len(steady), 3),
        "data_wait_fraction": round(sum(h["data_wait"] for h in steady) / len(steady), 4),
        "data_wait_first_step": hist[0]["data_wait"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--manifest", type=Path, default=ROOT / "manifests" / "demo.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "train.json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.build, args.manifest, args.steps, args.child)))
        return 0
    if not (args.build / "text_emb").is_dir():
        print(f"{args.build} has no text embeddings: run `make demo` first (or pass --build)", file=sys.stderr)
        return 2
    rows = []
    for workers in (args.workers, 0):  # each in a fresh process: peak RSS is per run
        r = subprocess.run([sys.executable, __file__, "--child", str(workers), "--build", str(args.build),
                            "--manifest", str(args.manifest), "--steps", str(args.steps)],
                           capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print("| loader workers | steps | samples/s | data wait (steady) | data wait (step 1) | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['steps']} | {r['samples_per_s']} | {100 * r['data_wait_fraction']:.2f}% | "
              f"{100 * r['data_wait_first_step']:.1f}% | {r['peak_rss_mb']} |")
    base = rows[1]
    print(f"\nsamples/s with {args.workers} workers ÷ in-process loader: "
          f"{rows[0]['samples_per_s'] / base['samples_per_s']:.2f}×; target data wait < 5%: "
          f"{'met' if rows[0]['data_wait_fraction'] < 0.05 else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
