#!/usr/bin/env python
"""Caption stage: LQ images of pairs shard N → captions shard N (LLaVA-1.5).

  python jobs/caption.py --manifest manifests/full.json --shard 42           # one shard, here
  ray job submit --working-dir . -- python jobs/caption.py --manifest M --all  # every shard, one actor per GPU

Engines: vllm (in-process, GPU), server (an OpenAI-compatible `vllm serve` endpoint),
transformers (CPU; small runs and tests). A rerun captions only failed or missing rows;
--overrides FILE.jsonl replaces captions by hand ({"key": ..., "caption": ...} per line).

Exit status: 0 done; 1 failed captions above caption.max_failed_fraction (rerun retries
only them); 2 bad manifest, arguments, overrides or missing input; 3 the engine could not
start or a shard task failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.caption.config import ENGINES  # noqa: E402
from pipeline.caption.job import OverrideError, load_overrides, run_captions  # noqa: E402
from pipeline.caption.worker import StageInputError  # noqa: E402
from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON (see manifests/)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--shard", type=int, help="caption this pairs shard")
    which.add_argument("--all", action="store_true", help="caption every pairs shard on a pool of Ray actors")
    ap.add_argument("--out", help="output root; overrides the manifest's \"output\"")
    ap.add_argument("--engine", choices=ENGINES, help="overrides caption.engine")
    ap.add_argument("--server", help="overrides caption.server (base URL ending in /v1)")
    ap.add_argument("--overrides", type=Path, help="JSONL of {\"key\", \"caption\"}: captions written by hand")
    ap.add_argument("--actors", type=int, help="with --all: number of actors (default: one per GPU, else 1)")
    ap.add_argument("--force", action="store_true", help="recaption every row (overrides still apply)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        cfg = manifest.caption
        changes = {k: v for k, v in (("engine", args.engine), ("server", args.server)) if v}
        cfg = dataclasses.replace(cfg, **changes)
        overrides = load_overrides(args.overrides) if args.overrides else {}
        result = run_captions(manifest.output, cfg, None if args.all else args.shard, overrides,
                              actors=args.actors, force=args.force, show_progress=not args.no_progress)
    except (ManifestError, OverrideError, StageInputError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # EngineError, lock held, engine broke mid-shard
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
