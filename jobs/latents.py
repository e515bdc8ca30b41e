#!/usr/bin/env python
"""Latents stage: HQ crops of pairs shard N → latents shard N (the SD1.5 VAE's moments).

  python jobs/latents.py --manifest manifests/full.json --shard 42
  python jobs/latents.py --manifest manifests/full.json --all --actors 8 --device cuda --batch-size 32

Stores diffusers' `latent_dist.parameters` (mean ‖ log-variance, 2·C × H/8 × W/8) in
float16 for every pairs row, same keys and order, so the trainer draws z = mean + σ·ε
without running the VAE encoder. The VAE is the manifest's latents.vae, else
train.pretrained (the trainer's own). Needs only pairs: it can run beside the caption stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.cli import check_shard_args, print_manifest_if_asked, run_command, stage_parser  # noqa: E402
from pipeline.core.manifest import load_manifest  # noqa: E402
from pipeline.latents.stage import run_latents  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    if (printed := print_manifest_if_asked(argv)) is not None:
        return printed
    ap = stage_parser(__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="overrides latents.device (default: CUDA if present)")
    ap.add_argument("--batch-size", type=int, help="overrides latents.batch_size (images per VAE call)")
    ap.add_argument("--force", action="store_true", help="re-encode every row")
    args = ap.parse_args(argv)
    check_shard_args(ap, args)
    if args.batch_size is not None and args.batch_size < 1:
        ap.error("--batch-size must be at least 1")

    def job():  # type: ignore[no-untyped-def]
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        return run_latents(manifest, None if args.all else [args.shard], actors=args.actors, device=args.device,
                           batch_size=args.batch_size, force=args.force, show_progress=not args.no_progress)

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
