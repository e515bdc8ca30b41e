#!/usr/bin/env python
"""A build's data card: what it holds, beside what its manifest asked for.

  python jobs/report.py --build out/demo [--heldout out/demo_heldout] [--out report]

Reads the build's shards once, streaming (memory does not grow with the number of rows),
and writes <out>/index.html with its figures (PNG, matplotlib) and stats.json beside it:
a gallery of LQ | HQ pairs with each recipe in words; every degradation draw against the
distribution the degrade settings define, with a χ² or KS test per draw; the LQ quality
(PSNR of the bicubic-upsampled LQ) beside BasicSR's and the plain bicubic round trip;
failed rows; rows per source; captions, text embeddings and latents where those stages
exist; the training run (<build>/train) where there is one; the held-out evaluation
(--heldout: a folder with lq/, hr/, restored/ and results.json from model/evaluate.py);
the throughput of every stage. The folder opens offline.

Exit status: 0 written; 2 not a build (missing, or no complete pairs shards: the message
names the command that makes one), or a bad --out / --manifest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.manifest import ManifestError  # noqa: E402
from pipeline.report.build import BuildError  # noqa: E402
from pipeline.report.report import ReportOptions, make_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True, help="the build's output root (pairs/, captions/, ...)")
    ap.add_argument("--heldout", type=Path, help="a held-out folder with lq/, hr/, restored/ and results.json")
    ap.add_argument("--out", type=Path, help="where index.html and its files go (default: <build>/report)")
    ap.add_argument("--train-dir", type=Path, help="the training run (default: <build>/train)")
    ap.add_argument("--manifest", type=Path,
                    help="hold the draws against this manifest's degrade settings (default: the settings "
                         "recorded in the pairs sidecars)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="processes that read shards (default: min(4, CPUs))")
    ap.add_argument("--gallery", type=int, default=8, help="pairs in the gallery (default 8)")
    ap.add_argument("--no-psnr", action="store_true", help="skip decoding the images (no LQ-quality figure)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.gallery < 0:
        ap.error("--workers must be at least 1 and --gallery at least 0")
    opts = ReportOptions(heldout=args.heldout, train_dir=args.train_dir, manifest=args.manifest, workers=args.workers,
                         gallery=args.gallery, psnr=not args.no_psnr, progress=not args.no_progress)
    try:
        page = make_report(args.build, args.out, opts)
    except (BuildError, ManifestError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
