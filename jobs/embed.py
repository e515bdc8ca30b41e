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
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.cli import check_shard_args, print_manifest_if_asked, run_command, stage_parser  # noqa: E402
from pipeline.core.manifest import load_manifest  # noqa: E402
from pipeline.embed.stage import run_embed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    if (printed := print_manifest_if_asked(argv)) is not None:
        return printed
    ap = stage_parser(__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    help="overrides text_embed.device (default: CUDA if present)")
    ap.add_argument("--force", action="store_true", help="re-encode every row")
    args = ap.parse_args(argv)
    check_shard_args(ap, args)

    def job():  # type: ignore[no-untyped-def]
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        cfg = manifest.text_embed
        if args.device:
            cfg = dataclasses.replace(cfg, device=args.device)
        return run_embed(manifest.output, cfg, None if args.all else [args.shard],
                         show_progress=not args.no_progress, force=args.force, actors=args.actors,
                         variant=manifest.caption.variant,
                         index_extra={"manifest": str(manifest.path), "name": manifest.name})

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
