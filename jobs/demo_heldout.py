#!/usr/bin/env python
"""The demo's held-out step: restore the held-out LQ images and score them.

  python jobs/demo_heldout.py [--build out/demo] [--heldout out/demo_heldout] [--steps 25]

Expects `make demo`'s earlier steps: a trained demo build (<build>/train) and the held-out
test set exported to <heldout>/lq and <heldout>/hr. Restores every held-out LQ image with
the newest checkpoint (captions from the tiny LLaVA) into <heldout>/restored, scores them
with model/evaluate.py into <heldout>/results.json (and results.md), and records the time
of both in <heldout>/restore.json. `jobs/report.py --build B --heldout H` then puts the
table, a LQ | restored | HQ grid and the timings on the build's page.

The models are tiny and random: they restore nothing. The step shows that restoration and
scoring run end to end on the demo's own checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTE = ("The demo's models are tiny and random (built by jobs/build_tiny_models.py, trained for a few steps): "
        "they restore nothing; this shows that restoration and scoring run end to end.")


def run(cmd: list[str]) -> float:
    """Run a project command, return its wall time (the throughput of that step)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return time.perf_counter() - t0


def check_inputs(build: Path, held: Path, caption_model: Path) -> list[str]:
    """What the earlier demo steps should have left, and is missing (names the step to run)."""
    problems = []
    if not (build / "train" / "metrics.jsonl").is_file() or not (build / "train" / "checkpoints").is_dir():
        problems.append(f"{build / 'train'} has no metrics.jsonl or checkpoints/: train first "
                        "(model/train.py --manifest manifests/demo.json)")
    if not any((held / "lq").glob("*.png")) or not (held / "hr").is_dir():
        problems.append(f"{held} has no lq/*.png and hr/: degrade and export the held-out set first "
                        "(jobs/degrade.py and jobs/export_testset.py --manifest manifests/demo_heldout.json)")
    if not (caption_model / "config.json").is_file():
        problems.append(f"{caption_model} is not a caption model folder (no config.json): "
                        "build the tiny models first (jobs/build_tiny_models.py)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("out/demo"), help="the trained demo build (train/)")
    ap.add_argument("--heldout", type=Path, default=Path("out/demo_heldout"),
                    help="the exported held-out test set (lq/, hr/); restored/ and results.json go here")
    ap.add_argument("--steps", type=int, default=25, help="DDPM steps for the restorations (restore.py defaults to 50)")
    ap.add_argument("--caption-model", type=Path, default=Path(".cache/tiny/llava"),
                    help="the LLaVA folder that captions the held-out LQ images (transformers engine)")
    ap.add_argument("--caption-max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    build, held, caption_model = args.build.resolve(), args.heldout.resolve(), args.caption_model.resolve()
    problems = check_inputs(build, held, caption_model)
    if problems:
        print("demo held-out: cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    py = sys.executable
    restored = held / "restored"
    images = len(list((held / "lq").glob("*.png")))
    t_restore = run([py, "model/restore.py", "--checkpoint", str(build / "train"), "--input", str(held / "lq"),
                     "--out", str(restored), "--caption-model", str(caption_model),
                     "--caption-max-tokens", str(args.caption_max_tokens), "--steps", str(args.steps)])
    t_eval = run([py, "model/evaluate.py", "--restored", str(restored), "--reference", str(held / "hr"),
                  "--metrics", "psnr,ssim,lpips", "--name", "SSP-IR (tiny, demo)", "--dataset", "demo held-out",
                  "--out", str(held / "results.json"), "--markdown", str(held / "results.md"), "--no-progress"])
    (held / "restore.json").write_text(json.dumps({
        "checkpoint": str(build / "train"), "images": images, "steps": args.steps, "seconds": round(t_restore, 2),
        "eval_seconds": round(t_eval, 2), "note": NOTE}, indent=1) + "\n")
    print(f"demo held-out: {images} images restored into {restored}, scores in {held / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
