#!/usr/bin/env python
"""Restoration benchmark on the CPU with the tiny SD1.5-shaped model: time and memory.

    .venv/bin/python benchmarks/restore.py [--steps 50] [--tiled-steps 3] [--dpm-steps 20] [--threads 1]

Cases, each in a fresh process so peak RSS is its own:
  512     128² LQ → 512² output, DDPM `--steps` (50), CFG 7.5: seconds per output.
  dpm     the same with DPM-Solver++ at `--dpm-steps` (20), the faster option.
  2048    512² LQ → 2048² output in 128² LQ tiles overlapping by 32 (25 tiles per step),
          `--tiled-steps` DDPM steps (default 3, to keep the run to a few minutes; the
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

from bench_models import astronaut_lq, ensure_random_run  # noqa: E402  (the script's own folder is on sys.path)

# The figures in docs/restore.md were measured with the adapter layout's tiny checkpoint; the
# tiling and caching mechanics measured here do not depend on the layout, so it stays pinned.
LAYOUT = "adapter"
TINY_PROCESSOR = {"stem_channels": 8, "channels": [8, 16, 16]}
CASES = {"512": (128, "ddpm"), "dpm": (128, "dpm"), "2048": (512, "ddpm")}


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds: CPU time is the steadier measure of work when
    other jobs share the machine; wall time is what a user waits."""
    return time.perf_counter(), time.process_time()


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensure_checkpoint(cache: Path) -> Path:
    """A run folder with one checkpoint of the tiny model, built once and reused."""
    from demo_fixtures.tiny_sd import build_tiny_sd

    sd = ROOT / ".cache" / "tiny" / "sd15"
    if not (sd / "model_index.json").is_file():
        build_tiny_sd(sd)
    return ensure_random_run(cache / "run", sd, processor=TINY_PROCESSOR, attention_layout=LAYOUT)


def child(case: str, run: Path, steps: int, threads: int) -> dict:
    import torch

    from model.inference.restorer import RestoreSettings, Restorer

    torch.set_num_threads(threads)
    side, scheduler = CASES[case]
    restorer = Restorer(run, device="cpu")
    lq = astronaut_lq(side)
    loaded = rss_mb()
    stamps: list[tuple[float, float]] = []  # (wall, process CPU) seconds before each step
    decode_start: list[tuple[float, float]] = []  # the VAE decoder's first call (tiled: once per tile)
    hook = restorer.model.vae.decoder.register_forward_pre_hook(
        lambda mod, args: decode_start.append(clocks()) if not decode_start else None)
    settings = RestoreSettings(steps=steps, scheduler=scheduler, tile=128, tile_overlap=32)
    load0 = os.getloadavg()[0]
    t0 = clocks()
    res = restorer.restore(lq, "an astronaut in a white suit", settings,
                           on_step=lambda i, t, z: stamps.append(clocks()))
    end = clocks()
    hook.remove()
    # on_step fires before each step, the decoder hook after the last one: step i lasts
    # marks[i+1] - marks[i]. Before step 0: text, LQ↑, VAE encode, LRE; after: decode, colour.
    marks = stamps + decode_start
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    per_step, cpu_per_step = median(wall), median(cpu)  # robust to a stray slow step
    fixed = (stamps[0][0] - t0[0]) + (end[0] - decode_start[0][0])
    cpu_fixed = (stamps[0][1] - t0[1]) + (end[1] - decode_start[0][1])
    mp = res.image.shape[0] * res.image.shape[1] / 1e6
    return {"case": case, "lq": f"{side}x{side}", "output": f"{res.image.shape[1]}x{res.image.shape[0]}",
            "scheduler": scheduler, "steps": steps, "tiles_per_step": res.tiles,
            "seconds": round(end[0] - t0[0], 3), "cpu_seconds": round(end[1] - t0[1], 3),
            "seconds_per_step": round(per_step, 4), "seconds_per_step_min": round(min(wall), 4),
            "seconds_per_step_max": round(max(wall), 4), "cpu_seconds_per_step": round(cpu_per_step, 4),
            "prepare_encode_seconds": round(stamps[0][0] - t0[0], 3),
            "decode_seconds": round(end[0] - decode_start[0][0], 3), "fixed_seconds": round(fixed, 3),
            "cpu_fixed_seconds": round(cpu_fixed, 3),
            "seconds_per_step_per_mp": round(per_step / mp, 4), "fixed_seconds_per_mp": round(fixed / mp, 4),
            "cpu_seconds_per_step_per_mp": round(cpu_per_step / mp, 4),
            "cpu_fixed_seconds_per_mp": round(cpu_fixed / mp, 4),
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


def tile_overhead(base: dict, tiled: dict) -> dict:
    """Cost per output pixel of the tiled 2048² run over the single-tile 512² run."""
    def ratio(key: str) -> float:
        return round(tiled[key] / base[key], 3)

    return {"denoise_per_mp": ratio("seconds_per_step_per_mp"), "fixed_per_mp": ratio("fixed_seconds_per_mp"),
            "denoise_per_mp_cpu_time": ratio("cpu_seconds_per_step_per_mp"),
            "fixed_per_mp_cpu_time": ratio("cpu_fixed_seconds_per_mp"),
            # 25 tiles of 64² latents cover a 256² latent 25·64²/256² = 1.5625 times
            "denoise_area_ratio_expected": 25 * 64 * 64 / (256 * 256)}


def report(rows: dict[str, dict]) -> dict | None:
    print("| case | LQ → output | scheduler | steps | tiles/step | s total | s/step | CPU s/step | s/step/MP "
          "| fixed s | s at 50 steps | peak RSS MB | peak − loaded MB | load avg |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        print(f"| {r['case']} | {r['lq']} → {r['output']} | {r['scheduler']} | {r['steps']} | {r['tiles_per_step']} "
              f"| {r['seconds']} | {r['seconds_per_step']} | {r['cpu_seconds_per_step']} "
              f"| {r['seconds_per_step_per_mp']} | {r['fixed_seconds']} | {r['seconds_at_50_steps']} "
              f"| {r['peak_rss_mb']} | {r['restore_peak_over_loaded_mb']} | {r['loadavg_1min_before_after'][0]} |")
    if "512" not in rows or "2048" not in rows:
        return None
    o = tile_overhead(rows["512"], rows["2048"])
    print(f"\ntile overhead at 2048² (128/32 LQ tiles) vs the untiled 512² cost per output pixel "
          f"(wall / CPU time): denoising {o['denoise_per_mp']:.2f}× / {o['denoise_per_mp_cpu_time']:.2f}× "
          f"(overlap alone: {o['denoise_area_ratio_expected']:.2f}×), fixed part (text + VAE) "
          f"{o['fixed_per_mp']:.2f}× / {o['fixed_per_mp_cpu_time']:.2f}×")
    return o


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="DDPM steps for the 512² case")
    ap.add_argument("--dpm-steps", type=int, default=20, help="DPM-Solver++ steps (0: skip the case)")
    ap.add_argument("--tiled-steps", type=int, default=3, help="DDPM steps for the 2048² tiled case")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable figures on a shared machine; more threads spin-wait there)")
    ap.add_argument("--cases", default="512,dpm,2048", help="comma-separated subset of 512, dpm, 2048")
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
    wanted = set(args.cases.split(","))
    rows = {case: run_case(case, run, steps, args.threads) for case, steps in plan if steps > 0 and case in wanted}
    overhead = report(rows)
    import torch

    env = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "processor": platform.processor(), "device": "cpu",
           "model": "tiny SD1.5-shaped (demo_fixtures/tiny_sd.py), random weights"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": list(rows.values()), "tile_overhead": overhead, "environment": env},
                                   indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
