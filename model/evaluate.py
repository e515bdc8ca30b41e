#!/usr/bin/env python
"""Score restored images: the paper's Tables I–II, one row per method and dataset.

  python model/evaluate.py --restored out/sspir/div2k_val --reference $DATA_ROOT/ssp-ir/div2k_val/hr \\
      --name SSP-IR --dataset DIV2K-Val --out results.json --append --markdown results.md
  python model/evaluate.py --restored out/sspir/reallr200 --name SSP-IR --dataset RealLR200 \\
      --out results.json --append          # no references: the no-reference metrics only

Files pair by their path relative to each folder, without the suffix; a file without a
counterpart is an error that lists examples. Every restored image must have its
reference's size. Without --reference the full-reference columns are "not applicable".

Metrics (the paper's column order; ↑ higher is better, ↓ lower is better):
  psnr ↑, ssim ↑   on the Y channel of YCbCr (BT.601), exactly as BasicSR computes them
  lpips ↓, dists ↓ pyiqa, full-reference
  clip_i ↑         cosine similarity of CLIP image embeddings (timm, OpenAI ViT-L/14 by default)
  niqe ↓, maniqa ↑, musiq ↑, clipiqa ↑   pyiqa, no-reference
  fid ↓            pyiqa, restored folder against reference folder

The learned metrics load their weights from the libraries' cache folders (TORCH_HOME,
HF_HUB_CACHE; docs/evaluation.md lists every file). Nothing is downloaded unless
--download is given: a metric whose package or file is missing is reported as *not
computed*, naming the path to put the file in and where it comes from; the run still succeeds.

Exit status: 0 done (some metrics may be not computed); 1 PSNR/SSIM could not be computed
(unreadable image, size mismatch); 2 bad arguments or the folders do not pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.evaluation.folders import EvaluationError, PairingError  # noqa: E402
from model.evaluation.iqa import DEFAULT_CLIP_MODEL  # noqa: E402
from model.evaluation.metrics import DEFAULT_METRICS, METRICS, parse_metrics  # noqa: E402
from model.evaluation.runner import evaluate  # noqa: E402
from model.evaluation.tables import (  # noqa: E402
    add_row, atomic_write, load_table, new_table, render_dataset, render_markdown, write_per_image,
)


def parse_pyiqa_names(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, name = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in METRICS or METRICS[key].backend != "pyiqa" or not name.strip():
            pyiqa_keys = [k for k, s in METRICS.items() if s.backend == "pyiqa"]
            raise ValueError(f"--pyiqa {item!r}: expected METRIC=PYIQA_NAME with METRIC one of {pyiqa_keys}")
        out[key] = name.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restored", required=True, type=Path, help="folder of restored images")
    ap.add_argument("--reference", type=Path,
                    help="folder of reference (HR) images; without it only the no-reference metrics are computed")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help=f"comma-separated, default all: {','.join(DEFAULT_METRICS)}")
    ap.add_argument("--out", type=Path, help="JSON table to write (see --append)")
    ap.add_argument("--append", action="store_true",
                    help="add this row to the existing --out table (same method and dataset: replaced)")
    ap.add_argument("--markdown", type=Path, help="write the whole table (every dataset) as Markdown")
    ap.add_argument("--name", help="method name, the row label (default: the restored folder's name)")
    ap.add_argument("--dataset", help="dataset name, one table each (default: the reference folder's name, or its "
                                      "parent's when it is called hr; without --reference the restored folder's)")
    ap.add_argument("--crop-border", type=int, default=0, help="pixels dropped on each side for PSNR/SSIM")
    ap.add_argument("--device", help="torch device for the learned metrics (default: cuda if present)")
    ap.add_argument("--download", action="store_true",
                    help="let pyiqa/timm download missing weights into their caches (default: never; missing "
                         "ones are reported with their path and source)")
    ap.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                    help="CLIP-I image tower: a timm model name (weights from the Hugging Face cache) or a local "
                         "timm folder")
    ap.add_argument("--pyiqa", action="append", default=[], metavar="METRIC=NAME",
                    help="use another pyiqa variant, e.g. maniqa=maniqa-pipal (repeatable)")
    ap.add_argument("--per-image", type=Path, help="also write every image's scores as CSV")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.append and args.out is None:
        ap.error("--append needs --out")
    if args.crop_border < 0:
        ap.error("--crop-border must be 0 or more")
    try:
        metrics = parse_metrics(args.metrics)
        pyiqa_names = parse_pyiqa_names(args.pyiqa)
        table = load_table(args.out) if args.append and args.out.exists() else new_table()
        result = evaluate(args.restored, args.reference, metrics, method=args.name, dataset=args.dataset,
                          crop_border=args.crop_border, device=args.device, download=args.download,
                          clip_model=args.clip_model, pyiqa_names=pyiqa_names,
                          show_progress=not args.no_progress)
    except (ValueError, PairingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EvaluationError as e:
        print(f"error: PSNR/SSIM cannot be computed: {e}", file=sys.stderr)
        return 1
    for key, reason in result.not_computed.items():
        print(f"{METRICS[key].label} not computed: {reason}", file=sys.stderr)
    if result.not_applicable:
        print(f"not applicable without references: {', '.join(METRICS[k].label for k in result.not_applicable)}",
              file=sys.stderr)
    action = add_row(table, result.dataset, result.row())
    if args.out:
        atomic_write(args.out, json.dumps(table, indent=1, ensure_ascii=False) + "\n")
        print(f"{action} row {result.method!r} of {result.dataset!r} in {args.out}", file=sys.stderr)
    if args.markdown:
        atomic_write(args.markdown, render_markdown(table))
    if args.per_image:
        write_per_image(args.per_image, list(result.scores), result.per_image)
    print(render_dataset(result.dataset, table["datasets"][result.dataset]["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
