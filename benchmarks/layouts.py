#!/usr/bin/env python
"""The two attention layouts at SD1.5 size, side by side, in one run: FLOPs per training
sample, parameter and optimizer-state memory, and CPU step time (ratio paper ÷ adapter).

    .venv/bin/python benchmarks/layouts.py                       # all three (CPU part: ~5-10 min, ~14 GB RAM)
    .venv/bin/python benchmarks/layouts.py --skip-cpu            # FLOPs and memory only (meta device, ~1 min)

FLOPs: `torch.utils.flop_counter.FlopCounterMode` around one training sample at batch 1,
--resolution (512² by default, the paper's), one 77-token text chunk, the model built on the
meta device from manifests/full.json's `train` section (model/networks/counting.py `build_meta`):
no weights, exact shapes. Counted per phase: VAE encode of the HQ (no grad), static priors
(the layout's Processor on LQ↑ + CLIP ViT-L/14 + Refine Layer), ControlNet, UNet, and the
backward pass of the loss (ε-MSE + the RGB terms) into the trainable parameters.
FlopCounterMode counts matrix multiplications and convolutions (2 FLOPs per multiply-add),
not elementwise work.

Memory: from the exact parameter counts: trainable weights, gradients and Adam's two
moments in fp32 (16 bytes per trainable parameter: what the trainer keeps), and the frozen
parts in bf16 (the GPU recipe) and fp32 (the CPU one). Activations are not included (they
depend on batch, resolution and checkpointing: benchmarks/train_fullsize.py measures them).

CPU step: each layout in its own process, the trainer's own setup (`Trainer._load_model`:
`SSPIR.from_pretrained` on the random SD1.5-size folder of benchmarks/bench_models.py, fp32,
no gradient checkpointing) and `TrainStep` on a synthetic batch of 1 at --cpu-resolution
(256² by default): forward, backward, gradient clipping, timed over --steps steps after a
warm-up. Adam's update is timed apart, on a flat fp32 parameter of 64 M elements, and scaled
to each layout's trainable count (it is a streaming, memory-bound pass: linear in the count);
running it on the model itself would add 8 GB of Adam state for the paper layout, more than
a 23 GB machine holds beside the 13 GB of weights and gradients. So "step" = forward +
backward + clip (measured) + update (measured on 64 M, scaled).

Writes --out (default bench-out/layouts.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import cpu_model  # noqa: E402

LAYOUTS = ("paper", "adapter")
ADAM_PROBE = 64 * 2**20


def flops(layout: str, resolution: int) -> dict[str, Any]:
    """Per-phase FLOPs of one training sample and the exact parameter counts, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.networks.counting import build_meta, read_train_section

    t0 = time.perf_counter()
    model = build_meta(read_train_section(ROOT / "manifests" / "full.json"), layout)["model"]
    model.train()
    r = resolution
    width = model.unet.config.cross_attention_dim
    with torch.device("meta"):
        hq, lq_up = torch.randn(1, 3, r, r), torch.randn(1, 3, r, r)
        lq, text, t = torch.rand(1, 3, r // 4, r // 4), torch.randn(1, 77, width), torch.tensor([500])
    out: dict[str, float] = {}

    def count(name: str, fn: Any) -> Any:
        with FlopCounterMode(display=False) as fc:
            result = fn()
        out[name] = fc.get_total_flops()
        return result

    latents = count("vae_encode", lambda: model.encode_images(hq, sample=False))
    static = count("static_priors", lambda: model.static_priors(lq, lq_up))
    p = count("controlnet", lambda: model.priors(latents, t, text, lq, lq_up, static=static))
    pred = count("unet", lambda: model.unet_forward(latents, t, text, p["down"], p["mid"], p["image_tokens"]))
    loss = pred.float().pow(2).mean() + sum(x.abs().mean() for x in static["rgbs"])
    count("backward", loss.backward)
    forward = sum(v for k, v in out.items() if k != "backward")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for _, p in model.iter_frozen_parameters())
    # With the latents stage (train.latents cached) the step draws z from stored moments
    # (elementwise work FlopCounterMode does not count) instead of running the encoder.
    cached = forward + out["backward"] - out["vae_encode"]
    return {"layout": layout, "resolution": r, "flops": out, "forward_flops": forward,
            "total_flops": forward + out["backward"], "total_flops_cached_latents": cached,
            "cached_over_encode": cached / (forward + out["backward"]), "trainable_parameters": trainable,
            "frozen_parameters_loaded": frozen, "groups": model.parameter_groups(),
            "seconds": round(time.perf_counter() - t0, 1)}


def memory(trainable: int, frozen: int) -> dict[str, float]:
    gib = 2**30
    return {"trainable_weights_gib": 4 * trainable / gib, "gradients_gib": 4 * trainable / gib,
            "adam_state_gib": 8 * trainable / gib, "trainable_total_gib": 16 * trainable / gib,
            "frozen_bf16_gib": 2 * frozen / gib, "frozen_fp32_gib": 4 * frozen / gib,
            "total_bf16_frozen_gib": (16 * trainable + 2 * frozen) / gib}


def adam_seconds_per_parameter() -> float:
    """Seconds of one Adam update per fp32 parameter (a 64 M-element probe, warm state)."""
    import torch

    p = torch.nn.Parameter(torch.zeros(ADAM_PROBE))
    p.grad = torch.randn(ADAM_PROBE) * 1e-3
    opt = torch.optim.Adam([p], lr=1e-4)
    opt.step()  # allocates the moments
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / ADAM_PROBE


def cpu_child(layout: str, resolution: int, steps: int, cache: Path) -> dict[str, Any]:
    """One layout: the trainer's model setup and train step, forward + backward + clip, timed."""
    import torch
    from accelerate import Accelerator

    from train_fullsize import _proc_status_mb, _reset_peak_rss, synthetic_batch
    from model.training.config import TrainConfig
    from model.training.trainer import Trainer, TrainStep, step_generator

    sd = cache / "sd15"
    cfg = TrainConfig(pretrained=str(sd), image_encoder=str(sd / "image_encoder"), attention_layout=layout,
                      batch_size=1, micro_batch_size=1, gradient_checkpointing=False, mixed_precision="no")
    t0 = time.perf_counter()
    state = types.SimpleNamespace(accelerator=Accelerator(cpu=True, mixed_precision="no"), cfg=cfg)
    Trainer._load_model(state)  # type: ignore[arg-type]
    model = state.model
    step = TrainStep(model, state.scheduler, cfg)
    step.train()
    batch = synthetic_batch(1, resolution, 1, model.unet.config.cross_attention_dim, pin=False)
    load_s = time.perf_counter() - t0
    _reset_peak_rss()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        losses = step(batch, step_generator(0, i, 0, 0))
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.max_grad_norm)
        for p in model.trainable_parameters():
            p.grad = None
        if i:  # the first step warms up (allocator, kernels)
            times.append(time.perf_counter() - t0)
        print(f"  [{layout}] step {i}: {time.perf_counter() - t0:.2f} s{' (warm-up)' if not i else ''}",
              file=sys.stderr, flush=True)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {"layout": layout, "load_seconds": round(load_s, 1), "forward_backward_seconds": times,
            "forward_backward_median_s": statistics.median(times), "peak_rss_gib": (_proc_status_mb("VmHWM") or 0) / 1024,
            "trainable_parameters": trainable, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, layout: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, __file__, "--child", layout, "--result", str(out), "--cpu-resolution",
               str(args.cpu_resolution), "--steps", str(args.steps), "--cache", str(args.cache)]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if not out.is_file():
            return {"layout": layout, "status": f"failed (exit status {rc})"}
        return {**json.loads(out.read_text()), "status": "ok"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512, help="HQ side for the FLOP count (the paper's 512)")
    ap.add_argument("--cpu-resolution", type=int, default=256, help="HQ side for the CPU step time")
    ap.add_argument("--steps", type=int, default=2, help="timed CPU steps per layout, after one warm-up")
    ap.add_argument("--skip-cpu", action="store_true", help="FLOPs and memory only (no weights, about a minute)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-restore-fullsize",
                    help="where the random SD1.5-size folder is built once (sd15/, shared with the *_fullsize benchmarks)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "layouts.json")
    ap.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(cpu_child(args.child, args.cpu_resolution, args.steps, args.cache)))
        return 0

    rows = {layout: flops(layout, args.resolution) for layout in LAYOUTS}
    for r in rows.values():
        r["memory"] = memory(r["trainable_parameters"], r["frozen_parameters_loaded"])
    cpu: dict[str, Any] = {}
    if not args.skip_cpu:
        if not (args.cache / "sd15" / "model_index.json").is_file():  # its own process: ~8 GB transient
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), str(args.cache / "sd15")],
                           check=True, cwd=ROOT)
        cpu = {layout: run_child(args, layout) for layout in LAYOUTS}
        per_param = adam_seconds_per_parameter()
        for layout, c in cpu.items():
            if c["status"] == "ok":
                c["adam_update_s"] = per_param * c["trainable_parameters"]
                c["step_s"] = c["forward_backward_median_s"] + c["adam_update_s"]
    ratio = {"total_flops": rows["paper"]["total_flops"] / rows["adapter"]["total_flops"],
             "trainable_parameters": rows["paper"]["trainable_parameters"] / rows["adapter"]["trainable_parameters"],
             "trainable_memory": rows["paper"]["memory"]["trainable_total_gib"]
             / rows["adapter"]["memory"]["trainable_total_gib"]}
    if all(c.get("status") == "ok" for c in cpu.values()) and cpu:
        ratio["cpu_step"] = cpu["paper"]["step_s"] / cpu["adapter"]["step_s"]
        ratio["cpu_forward_backward"] = (cpu["paper"]["forward_backward_median_s"]
                                        / cpu["adapter"]["forward_backward_median_s"])
    import torch

    result = {"flops_and_memory": rows, "cpu": cpu, "paper_over_adapter": ratio,
              "cpu_model": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(rows, cpu, ratio, args))
    print(f"-> {args.out}")
    return 0 if all(c.get("status") == "ok" for c in cpu.values()) else 1


def _table(rows: dict[str, Any], cpu: dict[str, Any], ratio: dict[str, float], args: argparse.Namespace) -> str:
    tf = 1e12
    lines = ["| | paper | adapter | paper ÷ adapter |", "|---|---:|---:|---:|"]

    def row(name: str, a: float, b: float, fmt: str = "{:.3f}") -> None:
        lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} |")

    p, a = rows["paper"], rows["adapter"]
    row("trainable parameters (M)", p["trainable_parameters"] / 1e6, a["trainable_parameters"] / 1e6, "{:.2f}")
    for phase in ("vae_encode", "static_priors", "controlnet", "unet", "backward"):
        row(f"TFLOPs per sample at {args.resolution}²: {phase}", p["flops"][phase] / tf, a["flops"][phase] / tf)
    row(f"TFLOPs per training sample at {args.resolution}² (total)", p["total_flops"] / tf, a["total_flops"] / tf)
    row("... with cached latents (jobs/latents.py)", p["total_flops_cached_latents"] / tf,
        a["total_flops_cached_latents"] / tf)
    row("cached ÷ encoding every step", p["cached_over_encode"], a["cached_over_encode"])
    row("trainable weights + grads + Adam, fp32 (GiB)", p["memory"]["trainable_total_gib"],
        a["memory"]["trainable_total_gib"], "{:.2f}")
    row("... + frozen parts in bf16 (GiB)", p["memory"]["total_bf16_frozen_gib"], a["memory"]["total_bf16_frozen_gib"],
        "{:.2f}")
    if cpu and all(c.get("status") == "ok" for c in cpu.values()):
        cp, ca = cpu["paper"], cpu["adapter"]
        r = args.cpu_resolution
        row(f"CPU forward + backward, batch 1, {r}² (s)", cp["forward_backward_median_s"],
            ca["forward_backward_median_s"], "{:.2f}")
        row("CPU Adam update (s, scaled from 64 M)", cp["adam_update_s"], ca["adam_update_s"], "{:.2f}")
        row(f"CPU step, batch 1, {r}² (s)", cp["step_s"], ca["step_s"], "{:.2f}")
        row("peak RSS of the step process (GiB)", cp["peak_rss_gib"], ca["peak_rss_gib"], "{:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
