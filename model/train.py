#!/usr/bin/env python
"""Train SSP-IR on a build's shards (pairs + text_emb).

  python model/train.py --manifest manifests/full.json                   # one process (CPU or one GPU)
  accelerate launch --num_processes 8 model/train.py --manifest manifests/full.json   # DDP
  torchrun --nproc_per_node 8 model/train.py --manifest manifests/full.json
  torchrun --nproc_per_node 2 model/train.py --manifest manifests/demo.json   # no CUDA: DDP on the CPU (gloo)

Checks every shard of every stage before starting (complete, sha256, keys agree) and
refuses otherwise, naming the shard. Checkpoints go to <build>/<train.run_dir>/checkpoints
(run_dir defaults to "train"; --train-dir wins), so the ablation manifests of
manifests/paper/ train side by side on one build; --resume continues exactly where the last
checkpoint stopped.

Exit status: 0 done; 2 the run cannot start (bad manifest, incomplete build, missing
model, unwritable output, a --resume whose checkpoint was written with another trainable
layout, other models or another build, a launcher whose processes would not form one DDP
group), with a message saying which and what to do; a failure during training exits 1 with
its traceback (the last checkpoint stays valid: --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.manifest import ManifestError, load_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON with a \"train\" section")
    ap.add_argument("--out", help="the build's output root; overrides the manifest's \"output\"")
    ap.add_argument("--train-dir", help="where checkpoints, metrics and validation images go "
                                        "(default: <build>/<train.run_dir>, run_dir default train)")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: train.max_steps)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --train-dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from model.training.verify import BuildError
    from model.training.config import TrainConfig
    from model.training.trainer import TrainSetupError, run_training

    try:
        manifest = load_manifest(args.manifest, out=args.out, check_sources=False)
        cfg = manifest.settings(TrainConfig, "train")
        if not cfg.caption_variant and manifest.caption.variant:  # train on the manifest's own captions
            cfg = dataclasses.replace(cfg, caption_variant=manifest.caption.variant)
        run_dir = Path(args.train_dir) if args.train_dir else manifest.output / cfg.run_dir
        history = run_training(manifest.output, run_dir, cfg, max_steps=args.max_steps, resume=args.resume,
                               show_progress=not args.no_progress)
    except (ManifestError, BuildError, TrainSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if history:
        last = history[-1]
        wait = sum(h["data_wait"] for h in history) / len(history)
        print(f"trained to step {last['step']}: loss {last['loss']:.4f} (eps {last['eps']:.4f}, rgb {last['rgb']:.4f}, "
              f"fft {last['fft']:.2f}), {last['samples_per_s']:.1f} samples/s, data wait {100 * wait:.1f}% -> {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
