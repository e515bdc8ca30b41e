"""Parameter counts of SSP-IR for a manifest, built on the meta device (no weights, no download).

    python -m model.summary --manifest manifests/full.json [--attention-layout paper|adapter] [--json]

Reads the manifest's `train` section, with `extends` followed (`pretrained`,
`image_encoder`, `attention_layout`, optional `processor`, and the ablation switches
`text_prior`, `image_prior`, `refine`, `image_attention`, `structure_attention`). It
prints the frozen and trainable parameters of each part, next to the authors' release layout
rebuilt from the same UNet config and the paper's 997.80 M. For example:
`python -m model.summary --manifest manifests/paper/no_image_attention.json`. The counting is model/networks/counting.py; docs/model.md explains the tables.
Exit status: 0, or 2 when the manifest or a model folder it names is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON with a train section")
    ap.add_argument("--attention-layout", choices=("paper", "adapter"),
                    help="count this layout instead of the manifest's train.attention_layout")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    ap.add_argument("--no-release", action="store_true", help="skip the authors' release-layout reconstruction")
    args = ap.parse_args(argv)
    from model.networks.counting import format_counts, parameter_counts, read_train_section
    from pipeline.core.manifest import ManifestError

    try:
        train = read_train_section(args.manifest)
        counts = parameter_counts(train, release=not args.no_release, attention_layout=args.attention_layout)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=1) if args.json else format_counts(counts, args.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
