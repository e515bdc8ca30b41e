#!/usr/bin/env python
"""A degraded build's pairs shards → the `lq/` and `hr/` PNG folders restore and evaluate use.

  python jobs/degrade.py --manifest manifests/div2k_val.json          # build the shards first
  python jobs/export_testset.py --manifest manifests/div2k_val.json [--out DIR]

Writes <out>/lq/<name>.png (128²), <out>/hr/<name>.png (512², same names) and
<out>/testset.json beside the build's pairs/; <out> is the manifest's "output", or --out
like every job. The build must be complete and current for this manifest, else nothing
is written. Naming and checks: pipeline/testsets/export.py.

Exit status: 0 done; 2 bad manifest or arguments, or an incomplete/stale build.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402
from pipeline.testsets.folders import summary  # noqa: E402
from pipeline.testsets.export import export_testset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="the manifest the build was made from")
    ap.add_argument("--out", help="the build's output root; overrides the manifest's \"output\"")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, out=args.out)
        listing = export_testset(manifest)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(listing, manifest.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
