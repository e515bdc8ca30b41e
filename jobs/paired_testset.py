#!/usr/bin/env python
"""Real test sets → PNG folders: LQ/HR pairs (RealSR, DRealSR) or LQ images alone (RealLR200).

  python jobs/paired_testset.py --manifest manifests/realsr_val.json [--out DIR]
  python jobs/paired_testset.py --manifest manifests/reallr200.json

Reads the images named by the manifest's "paired" section and writes <out>/lq/<name>.png
(LQ centre crops, 128²), <out>/hr/<name>.png (the matching HR regions, 512²) and
<out>/testset.json; <out> is the manifest's "output", or --out. A section without hr_root
is a set without references: only lq/ is written (whole images with "centre_crop": false).
How images are matched and cropped: pipeline/testsets/paired.py.

Exit status: 0 done; 1 some pairs could not be cropped (listed; the others are written);
2 bad manifest or arguments, or the folders do not pair.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402
from pipeline.testsets.folders import summary  # noqa: E402
from pipeline.testsets.paired import build_paired_testset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON with a \"paired\" section (hr_root optional)")
    ap.add_argument("--out", help="output root; overrides the manifest's \"output\"")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        listing = build_paired_testset(manifest, show_progress=not args.no_progress)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(listing, manifest.output))
    return 1 if listing["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
