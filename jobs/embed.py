#!/usr/bin/env python
"""Text-embedding stage: captions shard N → text_emb shard N (SD1.5 CLIP, 75-token chunks).

  python jobs/embed.py --manifest manifests/full.json --shard 42
  python jobs/embed.py --manifest manifests/full.json --all     # every shard missing or stale

Each caption is split into chunks of 75 tokens, each encoded as BOS + tokens + EOS
(EOS-padded to 77), and the last hidden states stored as float16 (77·k, D), k ≤
text_embed.max_chunks. A failed caption is embedded as the empty prompt and marked.
A rerun re-encodes only rows whose caption text changed (e.g. after
`jobs/caption.py --overrides`), and leaves an unchanged shard untouched. The empty-prompt
embedding for null-text dropout and CFG goes to <out>/text_emb/empty_prompt.safetensors.

Exit status: 0 done; 2 bad arguments or manifest, missing model, missing or incomplete
captions shard, or another job holds the lock; 3 a shard failed while encoding or writing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.embed.worker import run_embed  # noqa: E402
from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402
from pipeline.core.shards import DiskFullError  # noqa: E402
from pipeline.embed.encoder import EmbedInputError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON (see manifests/)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--shard", type=int, help="embed this captions shard")
    which.add_argument("--all", action="store_true",
                       help="embed every captions shard whose text_emb is missing or stale")
    ap.add_argument("--out", help="output root; overrides the manifest's \"output\"")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    help="overrides text_embed.device (default: CUDA if present)")
    ap.add_argument("--force", action="store_true", help="re-encode every row")
    ap.add_argument("--actors", type=int,
                    help="with --all: fan shards out to this many Ray actors (one per GPU on a cluster); "
                         "default: this process")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.shard is not None and args.shard < 0:
        ap.error("--shard must be 0 or more")
    try:
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        cfg = manifest.text_embed
        if args.device:
            cfg = dataclasses.replace(cfg, device=args.device)
        result = run_embed(manifest.output, cfg, None if args.all else [args.shard],
                           show_progress=not args.no_progress, force=args.force, actors=args.actors,
                           index_extra={"manifest": str(manifest.path), "name": manifest.name})
    except (ManifestError, EmbedInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # the shards committed so far stay valid; rerun after freeing space
        print(f"error: {e.strerror}", file=sys.stderr)
        return 3
    except Exception as e:  # encoder or I/O failure: report it plainly, not as a bare traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
