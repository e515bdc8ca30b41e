#!/usr/bin/env python
"""The demo's last step: restore held-out LQ images, score them, write report/index.html.

  python jobs/demo_report.py [--build out/demo] [--heldout out/demo_heldout] [--report report]

Expects `make demo`'s earlier steps: the demo build (pairs, captions, text_emb, train/)
and the held-out test set exported to <heldout>/lq and <heldout>/hr. Restores the held-out
LQ images with the newest checkpoint (captions from the tiny LLaVA), scores them with
model/evaluate.py, and writes one HTML page with the loss curves, an LQ | restored | HQ
grid, the captions used, the metric table and the throughput of every stage.

The models are tiny and random: they restore nothing useful. The report shows that every
stage runs, end to end, on a laptop-sized machine.
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.shards import SHARD_GLOB, read_sidecar, read_table  # noqa: E402

CURVES = (("loss", (200, 30, 30)), ("eps", (30, 90, 200)), ("rgb", (30, 150, 60)), ("fft", (150, 100, 20)))


def run(cmd: list[str]) -> float:
    """Run a project command, return its wall time (the report's throughput of that step)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return time.perf_counter() - t0


def loss_curves(metrics: list[dict[str, Any]], path: Path, size: tuple[int, int] = (720, 360)) -> Path:
    """Each loss term scaled to its own maximum, against the step (no plotting library needed)."""
    w, h = size
    pad = 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline=(120, 120, 120))
    steps = [m["step"] for m in metrics]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    for i, (name, colour) in enumerate(CURVES):
        vals = np.array([m[name] for m in metrics], dtype=float)
        top = vals.max() if vals.max() > 0 else 1.0
        pts = [(pad + (s - s0) / (s1 - s0) * (w - 1.5 * pad), h - pad - v / top * (h - 1.5 * pad))
               for s, v in zip(steps, vals)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((pad + 10 + 150 * i, h - pad + 12), f"{name} (max {top:.3g})", fill=colour)
    d.text((pad, 4), f"loss terms / their maximum, steps {s0}-{s1}", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def grid(lq_dir: Path, restored_dir: Path, hr_dir: Path, path: Path) -> list[str]:
    rows, names = [], []
    for lq_path in sorted(lq_dir.glob("*.png")):
        restored = restored_dir / lq_path.name
        if not restored.exists():
            continue
        hr = cv2.imread(str(hr_dir / lq_path.name))
        lq = cv2.resize(cv2.imread(str(lq_path)), (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
        rows.append(np.concatenate([lq, cv2.imread(str(restored)), hr], axis=1))
        names.append(lq_path.stem)
    cv2.imwrite(str(path), np.concatenate(rows, axis=0))
    return names


def prompts(restored_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(restored_dir.glob("*.png")):
        with Image.open(p) as im:
            info = dict(getattr(im, "text", {}))
        out[p.stem] = info.get("prompt") or json.dumps(info)[:300]
    return out


def stage_rates(build: Path) -> list[tuple[str, str]]:
    """Throughput of the data stages from their sidecars (work time per shard, summed)."""
    rows = []
    for stage, unit, key in (("pairs", "pairs", "total_s"), ("captions", "captions", "caption_s"),
                             ("text_emb", "rows", "total_s")):
        n = secs = 0.0
        for arrow in sorted((build / stage).glob(SHARD_GLOB)):
            side = read_sidecar(arrow) or {}
            n += side.get("captioned_now", side.get("rows", 0)) if stage == "captions" else side.get("rows", 0)
            secs += side.get("timing", {}).get(key) or 0.0
        if secs:
            rows.append((stage, f"{n / secs:.1f} {unit}/s per worker ({int(n)} {unit}, {secs:.1f} worker-s)"))
    return rows


def training_captions(build: Path, k: int = 3) -> list[tuple[str, str]]:
    arrows = sorted((build / "captions").glob(SHARD_GLOB))
    if not arrows:
        return []
    t = read_table(arrows[0]).to_pydict()
    return list(zip(t["key"][:k], t["caption"][:k]))


def page(build: Path, report: Path, names: list[str], caps: dict[str, str], table_md: str,
         rates: list[tuple[str, str]], train_caps: list[tuple[str, str]]) -> str:
    esc = html.escape
    rate_rows = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in rates)
    cap_rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(caps.get(n, ''))}</td></tr>" for n in names)
    train_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(c or '')}</td></tr>" for k, c in train_caps)
    restored_links = ", ".join(f'<a href="restored/{esc(n)}.png">{esc(n)}</a>' for n in names) or "none"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>SSP-IR demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td{{padding:2px 8px;vertical-align:top}}
img{{max-width:100%}}</style></head><body>
<h1>SSP-IR demo report</h1>
<p><b>The models here are tiny and random.</b> They restore nothing useful; the captions are
noise. This page shows that every stage runs end to end: degrade → caption → embed → train
→ restore → evaluate, on the photographs bundled with scikit-image. Build: <code>{esc(str(build))}</code>.</p>
<h2>Loss curves</h2><img src="loss_curves.png" alt="loss curves">
<h2>Held-out images: LQ (bicubic ×4) | restored | HQ</h2><img src="grid.png" alt="grid">
<h2>Captions used for restoration</h2><table>{cap_rows}</table>
<h2>Some training captions</h2><table>{train_rows}</table>
<h2>Metrics</h2><pre>{esc(table_md)}</pre>
<p>The same table as <a href="metrics.md">Markdown</a> and <a href="metrics.json">JSON</a>;
restored images: {restored_links}.</p>
<h2>Throughput</h2><table>{rate_rows}</table>
</body></html>
"""


def check_inputs(build: Path, held: Path, caption_model: Path) -> list[str]:
    """What the earlier demo steps should have left, and is missing (names the step to run)."""
    problems = []
    if not (build / "train" / "metrics.jsonl").is_file() or not (build / "train" / "checkpoints").is_dir():
        problems.append(f"{build / 'train'} has no metrics.jsonl or checkpoints/: train first "
                        "(model/train.py --manifest manifests/demo.json)")
    if not any((held / "lq").glob("*.png")) or not (held / "hr").is_dir():
        problems.append(f"{held} has no lq/*.png and hr/: degrade and export the held-out set first "
                        "(jobs/degrade.py and jobs/export_testset.py --manifest manifests/demo_heldout.json)")
    if not (caption_model / "config.json").is_file():
        problems.append(f"{caption_model} is not a caption model folder (no config.json): "
                        "build the tiny models first (jobs/build_tiny_models.py)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("out/demo"), help="the demo build (pairs, captions, train/)")
    ap.add_argument("--heldout", type=Path, default=Path("out/demo_heldout"),
                    help="the exported held-out test set (lq/, hr/)")
    ap.add_argument("--report", type=Path, default=Path("report"), help="where index.html and its images go")
    ap.add_argument("--steps", type=int, default=25, help="DDPM steps for the restorations (restore.py defaults to 50)")
    ap.add_argument("--caption-model", type=Path, default=Path(".cache/tiny/llava"),
                    help="the LLaVA folder that captions the held-out LQ images (transformers engine)")
    ap.add_argument("--caption-max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    build, held, report = args.build.resolve(), args.heldout.resolve(), args.report.resolve()
    caption_model = args.caption_model.resolve()
    problems = check_inputs(build, held, caption_model)
    if problems:
        print("demo report: cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    run_dir = build / "train"
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    report.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    restored = report / "restored"
    n_images = len(list((held / "lq").glob("*.png")))
    t_restore = run([py, "model/restore.py", "--checkpoint", str(run_dir), "--input", str(held / "lq"),
                     "--out", str(restored), "--caption-model", str(caption_model),
                     "--caption-max-tokens", str(args.caption_max_tokens),
                     "--steps", str(args.steps)])
    table_json, table_md = report / "metrics.json", report / "metrics.md"
    t_eval = run([py, "model/evaluate.py", "--restored", str(restored), "--reference", str(held / "hr"),
                  "--metrics", "psnr,ssim,lpips", "--name", "SSP-IR (tiny, demo)", "--dataset", "demo held-out",
                  "--out", str(table_json), "--markdown", str(table_md), "--no-progress"])
    loss_curves(metrics, report / "loss_curves.png")
    names = grid(held / "lq", restored, held / "hr", report / "grid.png")
    rates = stage_rates(build)
    steady = metrics[2:] or metrics
    rates.append(("train", f"{sum(m['samples_per_s'] for m in steady) / len(steady):.2f} samples/s, "
                           f"data wait {100 * sum(m['data_wait'] for m in steady) / len(steady):.2f}%"))
    rates.append(("restore", f"{t_restore / max(n_images, 1):.1f} s per image ({n_images} images, "
                             f"{args.steps} DDPM steps, captioning included)"))
    rates.append(("evaluate", f"{t_eval:.1f} s for {n_images} images"))
    (report / "index.html").write_text(page(build, report, names, prompts(restored), table_md.read_text(),
                                            rates, training_captions(build)))
    print(f"report: {report / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
