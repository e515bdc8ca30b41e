#!/usr/bin/env python
"""Restoration at SD1.5 size with random weights: seconds per 512² image, peak memory, and
what computing the static priors once per image (instead of every step) saves.

    .venv/bin/python benchmarks/restore_fullsize.py                    # CPU: 2 steps, extrapolated to 50
    python benchmarks/restore_fullsize.py --device cuda --dtype bf16 --steps 50 [--layout adapter]  # on a GPU

Builds once, under --cache (about 8 GB, float32 safetensors): an SD1.5-layout folder with
SD1.5's UNet, VAE, scheduler and CLIP ViT-L/14 text encoder configs (model/networks/counting.py) and a
timm CLIP ViT-L/14 image encoder, all random; and a checkpoint of SSP-IR's trainable parts
in --layout (paper: the default; adapter) at their default sizes with the zero-initialised
layers given random values. Everything is
loaded back through `from_pretrained` by model/restore.py's `Restorer`, as real weights are.

Measured in one process, same inputs, 128² LQ → 512², CFG 7.5, DDPM:
  restore     Restorer.restore end to end (text encoding, VAE, `--steps` steps, decode):
              the figure to compare with the paper's 8.82 s on an A100 for its full method;
  cached      s/step with the static priors (Processor, CLIP image tokens) computed once
              per image, what model/inference/sampling.py does;
  per-step    s/step with them recomputed at every step for the CFG batch of 2, what the
              sampler did before (the training forward);
  priors      model.static_priors alone, batch 1.
Random weights give meaningless images; speed and memory do not depend on the values.
Writes bench-out/restore_fullsize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import astronaut_lq, build_sd15_random, ensure_random_run  # noqa: E402  (the script's own folder is on sys.path)

PROMPT = "an astronaut in a white space suit standing in front of a flag, sharp detailed photograph"


def ensure_run(cache: Path, layout: str) -> Path:
    """A run folder with one checkpoint of SSP-IR's trainable parts at their default sizes."""
    sd = build_sd15_random(cache / "sd15")
    return ensure_random_run(cache / f"run-{layout}", sd, scale=0.01, attention_layout=layout)


def per_step_priors(model: Any, text: Any, uncond: Any, lq: Any, lq_up: Any, guidance: float) -> Callable:
    """The baseline predictor: the training forward on the CFG batch, which recomputes the
    Processor and the CLIP image prior for both branches at every step."""
    import torch

    def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.repeat(latents.shape[0]).to(latents.device)
        pred = model(torch.cat([latents] * 2), torch.cat([tt, tt]), torch.cat([uncond, text]),
                     torch.cat([lq] * 2), torch.cat([lq_up] * 2))[0]
        p_uncond, p_text = pred.chunk(2)
        return p_uncond + guidance * (p_text - p_uncond)

    return predict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="frozen parts' dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    ap.add_argument("--steps", type=int, default=None, help="DDPM steps of the end-to-end restore "
                    "(default 50 on CUDA, 2 on the CPU; s/50 steps is extrapolated from s/step)")
    ap.add_argument("--compare-steps", type=int, default=2, help="steps timed for cached vs per-step priors")
    ap.add_argument("--layout", default="paper", choices=("paper", "adapter"), help="attention layout")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-restore-fullsize")
    ap.add_argument("--run", type=Path, help="measure this run folder instead of building the SD1.5-size one "
                    "(e.g. .cache/bench-restore/run, the tiny model of benchmarks/restore.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "restore_fullsize.json")
    args = ap.parse_args(argv)

    import torch

    from model.inference.images import lq_tensors
    from model.inference.restorer import RestoreSettings, Restorer
    from model.inference.sampling import restore as sample
    from model.inference.sampling import whole_image
    from model.inference.scheduler import make_scheduler

    cuda = args.device.startswith("cuda")
    steps = args.steps or (50 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run or ensure_run(args.cache, args.layout)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def now() -> float:
        sync()
        return time.perf_counter()

    t0 = now()
    restorer = Restorer(run, device=args.device, dtype=args.dtype)
    load_s = now() - t0
    model = restorer.model
    lq_rgb = astronaut_lq(128)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    restorer.restore(lq_rgb, PROMPT, RestoreSettings(steps=1))  # warm-up (kernels, allocator)

    t0 = now()
    res = restorer.restore(lq_rgb, PROMPT, RestoreSettings(steps=steps))
    restore_s = now() - t0

    lq, lq_up = lq_tensors(lq_rgb, restorer.device)
    text = restorer.embed(PROMPT)[None].to(restorer.device)
    empty = restorer.empty.to(restorer.device)
    timed: dict[str, list[float]] = {"cached": [], "per_step": []}
    with torch.no_grad(), restorer._autocast():
        # alternated, two rounds each, so drift on a shared machine hits both alike
        for name, predictor in (("cached", whole_image), ("per_step", per_step_priors)) * 2:
            marks: list[float] = []
            sample(model, make_scheduler(model.noise_scheduler.config, "ddpm"), lq, lq_up, text, empty,
                   steps=args.compare_steps + 2, predictor=predictor, on_step=lambda i, t, z: marks.append(now()))
            # marks[i] is taken before step i: timed are steps 1 .. compare_steps (step 0 carries
            # the cached predictor's one-off priors, the last one is followed by the VAE decode)
            timed[name] += [b - a for a, b in zip(marks[1:], marks[2:])]
    compare = {k: sum(v) / len(v) for k, v in timed.items()}
    with torch.no_grad(), restorer._autocast():
        t0 = now()
        for _ in range(3):
            model.static_priors(lq, lq_up)
        priors_s = (now() - t0) / 3

    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6
              for k, m in (("unet", model.unet), ("controlnet", model.controlnet), ("vae", model.vae),
                           ("image_encoder", model.image_encoder), ("processor", model.processor),
                           ("prior", model.prior))}
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "attention_layout": model.attention_layout,
        "dtype": str(restorer.dtype).removeprefix("torch."), "output": list(res.image.shape),
        "load_seconds": round(load_s, 2), "restore_steps": steps, "restore_seconds": round(restore_s, 3),
        # the steps not run, at the cached rate (steps after the first, which adds the one-off priors)
        "seconds_at_50_steps": round(restore_s + max(50 - steps, 0) * compare["cached"], 2),
        "step_cached_priors_s": round(compare["cached"], 4), "step_per_step_priors_s": round(compare["per_step"], 4),
        "per_step_over_cached": round(compare["per_step"] / compare["cached"], 3),
        "static_priors_batch1_s": round(priors_s, 4),
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS",
        "parameters_m": {k: round(v, 2) for k, v in counts.items()},
        "run": str(run), "torch": torch.__version__, "machine": platform.machine(),
    }
    print(json.dumps(result, indent=1))
    print(f"512² restoration, {steps} DDPM steps: {restore_s:.2f} s (50 steps: {result['seconds_at_50_steps']} s"
          f"{' extrapolated' if steps < 50 else ''}); static priors cached vs recomputed "
          f"every step: {compare['cached']:.3f} vs {compare['per_step']:.3f} s/step "
          f"({result['per_step_over_cached']:.3f}×); peak memory {peak:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
