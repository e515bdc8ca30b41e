#!/usr/bin/env python
"""Degradation stage: HQ photos → pairs shards (HQ 512² + LQ 128² + recipe).

On a cluster:  ray job submit --working-dir . -- python jobs/degrade.py --manifest manifests/full.json
On one machine: python jobs/degrade.py --manifest manifests/demo.json   (starts a local Ray)

One Ray task per shard (--serial: one by one in this process; --shard N: that shard here).
A rerun builds only the shards that are missing, partial or out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.cli import check_shard_args, print_manifest_if_asked, run_command, stage_parser  # noqa: E402
from pipeline.core.manifest import load_manifest  # noqa: E402
from pipeline.core.stage import run_stage  # noqa: E402
from pipeline.degrade.stage import DegradeStage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    if (printed := print_manifest_if_asked(argv)) is not None:
        return printed
    ap = stage_parser(__doc__, shard_required=False, actors=False)
    ap.add_argument("--workers", type=int, default=None,
                    help="CPUs of the local Ray started when not inside a cluster (default: all)")
    ap.add_argument("--serial", action="store_true", help="no Ray: build shards one by one in this process")
    args = ap.parse_args(argv)
    check_shard_args(ap, args)

    def job():  # type: ignore[no-untyped-def]
        stage = DegradeStage(load_manifest(args.manifest, out=args.out))
        one = args.shard is not None
        return run_stage(stage, [args.shard] if one else None,
                         distributor="serial" if (args.serial or one) else "tasks",
                         workers=args.workers, show_progress=not args.no_progress)

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
