#!/usr/bin/env python
"""Caption stage: LQ images of pairs shard N → captions shard N (LLaVA-1.5).

  python jobs/caption.py --manifest manifests/full.json --shard 42           # one shard, here
  ray job submit --working-dir . -- python jobs/caption.py --manifest M --all  # every shard, one actor per GPU

Engines: vllm (in-process, GPU), server (any OpenAI-compatible endpoint, e.g. `vllm serve`),
transformers (CPU; small runs and tests). A rerun captions only failed or missing rows;
--overrides FILE.jsonl replaces captions by hand ({"key": ..., "caption": ...} per line).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.caption.config import ENGINES  # noqa: E402
from pipeline.caption.overrides import load_overrides  # noqa: E402
from pipeline.caption.stage import CaptionStage  # noqa: E402
from pipeline.core.cli import check_shard_args, print_manifest_if_asked, run_command, stage_parser  # noqa: E402
from pipeline.core.manifest import load_manifest  # noqa: E402
from pipeline.core.stage import run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    if (printed := print_manifest_if_asked(argv)) is not None:
        return printed
    ap = stage_parser(__doc__)
    ap.add_argument("--engine", choices=ENGINES, help="overrides caption.engine")
    ap.add_argument("--server", help="overrides caption.server (base URL ending in /v1)")
    ap.add_argument("--overrides", type=Path, help="JSONL of {\"key\", \"caption\"}: captions written by hand")
    ap.add_argument("--force", action="store_true", help="recaption every row (overrides still apply)")
    args = ap.parse_args(argv)
    check_shard_args(ap, args)

    def job():  # type: ignore[no-untyped-def]
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        changes = {k: v for k, v in (("engine", args.engine), ("server", args.server)) if v}
        cfg = dataclasses.replace(manifest.caption, **changes)
        overrides = load_overrides(args.overrides) if args.overrides else {}
        stage = CaptionStage(manifest.output, cfg, overrides, args.force,
                             index_extra={"manifest": str(manifest.path), "name": manifest.name})
        if args.all:
            return run_stage(stage, None, distributor="actors", actors=args.actors,
                             show_progress=not args.no_progress)
        return run_stage(stage, [args.shard], show_progress=not args.no_progress)

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
