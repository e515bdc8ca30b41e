#!/usr/bin/env python
"""Degradation stage: HQ photos → pairs shards (HQ 512² + LQ 128² + recipe).

On a cluster:  ray job submit --working-dir . -- python jobs/degrade.py --manifest manifests/full.json
On one machine: python jobs/degrade.py --manifest manifests/demo.json   (starts a local Ray)

Exit status: 0 done; 1 failed rows above degrade.max_failed_fraction; 2 bad manifest
or arguments; 3 a shard task failed (disk full, worker lost past its retries).
A rerun builds only the shards that are missing, partial or out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.degrade.job import run_degrade  # noqa: E402
from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402
from pipeline.core.shards import DiskFullError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON (see manifests/)")
    ap.add_argument("--out", help="output root; overrides the manifest's \"output\"")
    ap.add_argument("--workers", type=int, default=None,
                    help="CPUs of the local Ray started when not inside a cluster (default: all)")
    ap.add_argument("--serial", action="store_true", help="no Ray: build shards one by one in this process")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, out=args.out)
        result = run_degrade(manifest, distributor="serial" if args.serial else "ray",
                             workers=args.workers, show_progress=not args.no_progress)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. another job holds the output's lock
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # the shards committed so far stay valid; rerun after freeing space
        print(f"error: {e.strerror}", file=sys.stderr)
        print(f"ERROR {e.strerror}")
        return 3
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
