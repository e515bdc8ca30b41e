#!/usr/bin/env python
"""Restoration benchmark on the CPU with the tiny SD1.5-shaped model: time and memory.

    .venv/bin/python benchmarks/restore.py [--steps 50] [--tiled-steps 5] [--dpm-steps 20] [--threads N]

Cases, each in a fresh process so peak RSS is its own:
  512     128² LQ → 512² output, DDPM `--steps` (50), CFG 7.5: seconds per output.
  dpm     the same with DPM-Solver++ at `--dpm-steps` (20), the faster option.
  2048    512² LQ → 2048² output in 128² LQ tiles overlapping by 32 (25 tiles per step),
          `--tiled-steps` DDPM steps (default 5, to keep the run to a few minutes; the
          per-step cost is what scales, and the 50-step time is extrapolated from it).
The tile overhead compares seconds per denoising step per output megapixel of the tiled
2048² run with the 512² run (which is one tile: the untiled-equivalent cost), and the same
for the fixed part (text, VAE encode + decode: tiled at 2048², whole at 512²).
Peak memory is the process's peak RSS, and its growth over the RSS after loading.

Writes bench-out/restore.json. The tiny model's numbers say nothing about SD1.5-size
speed (about 2 M UNet parameters, random weights); they show how cost and memory scale
with image size and tiling. Real-size figures need a GPU (docs/restore.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_PROCESSOR = {"stem_channels": 8, "channels": [8, 16, 16]}
CASES = {"512": (128, "ddpm"), "dpm": (128, "dpm"), "2048": (512, "ddpm")}


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensure_checkpoint(cache: Path) -> Path:
    """A run folder with one checkpoint of the tiny model (zero-initialised layers given
    random values, as training would), built once and reused."""
    import torch

    from model.sspir import SSPIR
    from model.train_config import TrainConfig
    from pipeline.tiny_sd import build_tiny_sd

    sd = ROOT / ".cache" / "tiny" / "sd15"
    if not (sd / "model_index.json").is_file():
        build_tiny_sd(sd)
    ckpt = cache / "run" / "checkpoints" / "step-00000001"
    if (ckpt / "trainer_state.json").is_file():
        return cache / "run"
    torch.manual_seed(0)
    model = SSPIR.from_pretrained(str(sd), str(sd / "image_encoder"), processor_kwargs=TINY_PROCESSOR)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_trainable(ckpt / "trainable")
    cfg = TrainConfig(pretrained=str(sd), image_encoder=str(sd / "image_encoder"), processor=TINY_PROCESSOR)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    return cache / "run"


def lq_image(side: int):
    """A real photograph (scikit-image's astronaut) area-resized to side²."""
    import cv2
    import numpy as np
    import skimage
    from PIL import Image

    rgb = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB"))
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)


def child(case: str, run: Path, steps: int, threads: int) -> dict:
    import torch

    from model.restore import RestoreSettings, Restorer

    torch.set_num_threads(threads)
    side, scheduler = CASES[case]
    restorer = Restorer(run, device="cpu")
    lq = lq_image(side)
    loaded = rss_mb()
    stamps: list[float] = []
    decode_start: list[float] = []  # the VAE decoder's first call (a tiled decode calls it per tile)
    hook = restorer.model.vae.decoder.register_forward_pre_hook(
        lambda mod, args: decode_start.append(time.perf_counter()) if not decode_start else None)
    settings = RestoreSettings(steps=steps, scheduler=scheduler, tile=128, tile_overlap=32)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = restorer.restore(lq, "an astronaut in a white suit", settings,
                           on_step=lambda i, t, z: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    hook.remove()
    # on_step fires before each step, the decoder hook after the last one: step i lasts
    # marks[i+1] - marks[i]. Before step 0: text, LQ↑, VAE encode, LRE; after: decode, colour.
    marks = stamps + decode_start
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    per_step = sorted(step_times)[len(step_times) // 2]  # median: robust to a stray slow step
    megapixels = res.image.shape[0] * res.image.shape[1] / 1e6
    encode, decode = stamps[0] - t0, end - decode_start[0]
    fixed = encode + decode
    return {"case": case, "lq": f"{side}x{side}", "output": f"{res.image.shape[1]}x{res.image.shape[0]}",
            "scheduler": scheduler, "steps": steps, "tiles_per_step": res.tiles, "seconds": round(end - t0, 3),
            "seconds_per_step": round(per_step, 4), "seconds_per_step_min": round(min(step_times), 4),
            "seconds_per_step_max": round(max(step_times), 4), "prepare_encode_seconds": round(encode, 3),
            "decode_seconds": round(decode, 3), "fixed_seconds": round(fixed, 3),
            "seconds_per_step_per_mp": round(per_step / megapixels, 4),
            "fixed_seconds_per_mp": round(fixed / megapixels, 4),
            "seconds_at_50_steps": round(fixed + 50 * per_step, 2),
            "rss_loaded_mb": round(loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "restore_peak_over_loaded_mb": round(peak_rss_mb() - loaded, 1), "threads": threads,
            "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def run_case(case: str, run: Path, steps: int, threads: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", case, "--run", str(run), "--steps", str(steps),
                        "--threads", str(threads)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(rows: dict[str, dict]) -> dict:
    base, tiled = rows["512"], rows["2048"]
    overhead = {
        "denoise_per_mp": round(tiled["seconds_per_step_per_mp"] / base["seconds_per_step_per_mp"], 3),
        "fixed_per_mp": round(tiled["fixed_seconds_per_mp"] / base["fixed_seconds_per_mp"], 3),
        # 25 tiles of 64² latents cover a 256² latent 25·64²/256² = 1.5625 times
        "denoise_area_ratio_expected": 25 * 64 * 64 / (256 * 256),
    }
    print("| case | LQ → output | scheduler | steps | tiles/step | s total | s/step | s/step/MP | fixed s "
          "| s at 50 steps | peak RSS MB | peak − loaded MB | load avg |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        print(f"| {r['case']} | {r['lq']} → {r['output']} | {r['scheduler']} | {r['steps']} | {r['tiles_per_step']} "
              f"| {r['seconds']} | {r['seconds_per_step']} | {r['seconds_per_step_per_mp']} | {r['fixed_seconds']} "
              f"| {r['seconds_at_50_steps']} | {r['peak_rss_mb']} | {r['restore_peak_over_loaded_mb']} "
              f"| {r['loadavg_1min_before_after'][0]} |")
    print(f"\ntile overhead at 2048² (128/32 LQ tiles) vs the untiled 512² cost per output pixel: denoising "
          f"{overhead['denoise_per_mp']:.2f}× (overlap alone: {overhead['denoise_area_ratio_expected']:.2f}×), "
          f"fixed part (text + VAE) {overhead['fixed_per_mp']:.2f}×")
    return overhead


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="DDPM steps for the 512² case")
    ap.add_argument("--dpm-steps", type=int, default=20, help="DPM-Solver++ steps (0: skip the case)")
    ap.add_argument("--tiled-steps", type=int, default=5, help="DDPM steps for the 2048² tiled case")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-restore")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "restore.json")
    ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.run, args.steps, args.threads)))
        return 0
    run = ensure_checkpoint(args.cache)
    plan = [("512", args.steps), ("dpm", args.dpm_steps), ("2048", args.tiled_steps)]
    rows = {case: run_case(case, run, steps, args.threads) for case, steps in plan if steps > 0}
    overhead = report(rows)
    import torch

    env = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "processor": platform.processor(), "device": "cpu",
           "model": "tiny SD1.5-shaped (pipeline/tiny_sd.py), random weights"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": list(rows.values()), "tile_overhead": overhead, "environment": env},
                                   indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
