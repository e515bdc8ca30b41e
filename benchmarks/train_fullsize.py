#!/usr/bin/env python
"""Training at SD1.5 size with random weights: seconds per optimizer step, samples/s and
peak memory, with gradient checkpointing off and on.

    python benchmarks/train_fullsize.py --device cuda [--layout adapter]   # on a GPU: batch 8, 512², bf16
    .venv/bin/python benchmarks/train_fullsize.py --device cpu --batch 1 --resolution 256 --steps 1

Why: the paper trains with a per-GPU micro batch of 8 at 512²; whether that fits a GPU's
memory with and without gradient checkpointing, and what checkpointing costs in time, can
only be measured at the real sizes (benchmarks/train.py runs the trainer with tiny models).
Speed and memory do not depend on the weights' values, so the weights are random: the
SD1.5-size folder of benchmarks/bench_models.py (built once under --cache, shared with
benchmarks/restore_fullsize.py, about 5 GB).

What runs is the trainer's own code, not a copy:
  model     `Trainer._load_model` (model/training/trainer.py): `SSPIR.from_pretrained(sd, sd/image_encoder)`
            in --layout (paper: the default, 997.8 M trainable; adapter: 416.5 M)
            with the default Processor / Refine Layer sizes, frozen VAE, UNet and CLIP image
            encoder in the mixed-precision dtype, trainable parts (Processor, ControlNet,
            Refine Layer, prior attention) in fp32, gradient checkpointing as configured,
            Adam on the trainable parameters (fp32 master weights and moments);
  precision `_mixed_precision` / accelerate's `Accelerator`: bf16 autocast on CUDA (with
            --dtype auto), fp32 on the CPU;
  step      `TrainStep` prepared by accelerate, then as `Trainer.run` does for one
            micro-batch: forward under `accelerator.autocast()`, `accelerator.backward`,
            gradient clipping, `optimizer.step()`, `zero_grad`; gradient accumulation 1, so
            one optimizer step is one micro-batch of --batch samples;
  batch     built by model/training/data.py's `collate` from synthetic items shaped as the loader
            ships them: uint8 HQ (3, R, R), LQ (3, R/4, R/4), LQ↑ (3, R, R), float16 text
            (77·k, 768) with k = --chunks (4, the embed stage's maximum: a batch of 8
            often holds a row with 4 chunks and is padded to it); pinned on CUDA, like the
            loader's. The same batch is fed every step: data loading is not measured here
            (benchmarks/train_loader.py measures it).

Each case (checkpointing off, on) runs in its own process, so its peak memory is its own:
`torch.cuda.max_memory_allocated` over the timed steps on CUDA (it includes the weights,
gradients and Adam state, all resident), peak RSS over the timed steps on the CPU (VmHWM
reset after loading; loading's own peak is reported apart). A case that runs out of GPU
memory is reported as "OOM" and the other case still runs. Reported per case: median
seconds per optimizer step over --steps steps after 2 warm-up steps, samples/s, peak
memory; and checkpointing on ÷ off for time and memory, both measured in the same run.
Writes --out (default bench-out/train_fullsize.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
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

CASES = {"off": False, "on": True}  # gradient checkpointing
WARMUP = 2


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mixed_precision(dtype: str, cuda: bool) -> str:
    """accelerate's mixed_precision for --dtype: auto is what the trainer picks on that device."""
    from model.training.config import TrainConfig
    from model.training.trainer import _mixed_precision

    if dtype == "bf16":
        return "bf16"
    if dtype == "fp32":
        return "no"
    # the trainer's rule (bf16 where CUDA supports it), on the device asked for
    return _mixed_precision(TrainConfig(mixed_precision="auto")) if cuda else "no"


def synthetic_batch(batch: int, resolution: int, chunks: int, width: int, pin: bool,
                    moments: bool = False) -> dict[str, Any]:
    """A batch as the loader ships it (image_dtype=torch.uint8), made by the loader's `collate`;
    with `moments`, as it ships it with train.latents cached (VAE mean ‖ log-variance, float16)."""
    import torch

    from model.training.data import CHUNK_LENGTH, collate

    g = torch.Generator().manual_seed(0)
    lq_side = resolution // 4

    def img(side: int) -> torch.Tensor:
        return torch.randint(0, 256, (3, side, side), generator=g, dtype=torch.uint8)

    items = [{"key": f"synthetic-{i:02d}", "hq": img(resolution), "lq": img(lq_side), "lq_up": img(resolution),
              "text": torch.randn(chunks * CHUNK_LENGTH, width, generator=g).to(torch.float16),
              "null_text": False, "epoch": 0, "index": i} for i in range(batch)]
    if moments:
        for it in items:
            mean = torch.randn(4, resolution // 8, resolution // 8, generator=g)
            it["moments"] = torch.cat([mean, torch.full_like(mean, -6.0)]).to(torch.float16)
    out = collate(items, torch.zeros(CHUNK_LENGTH, width, dtype=torch.float16))
    if pin:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def child(args: argparse.Namespace, case: str) -> dict[str, Any]:
    """One case, in this process: load as the trainer does, run WARMUP + --steps steps."""
    import torch
    from accelerate import Accelerator

    from model.training.config import TrainConfig
    from model.training.trainer import Trainer, TrainStep, step_generator

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        return {"case": case, "status": "failed", "error": "--device cuda, but torch sees no CUDA device"}
    mp = mixed_precision(args.dtype, cuda)
    sd = args.cache / "sd15"
    cfg = TrainConfig(pretrained=str(sd), image_encoder=str(sd / "image_encoder"), batch_size=args.batch,
                      micro_batch_size=args.batch, gradient_checkpointing=CASES[case], mixed_precision=mp,
                      attention_layout=args.layout)
    result: dict[str, Any] = {"case": case, "gradient_checkpointing": CASES[case], "status": "ok",
                              "mixed_precision": mp, "attention_layout": args.layout, "latents": args.latents}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_mb() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _proc_status_mb("VmHWM")
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    phase = "load"
    try:
        t0 = time.perf_counter()
        acc = Accelerator(mixed_precision=mp, cpu=not cuda)
        # The trainer's own setup (model, frozen dtype, checkpointing, scheduler, Adam),
        # run on a stand-in for the Trainer that has just the two attributes it reads.
        state = types.SimpleNamespace(accelerator=acc, cfg=cfg, latents_source=args.latents)
        Trainer._load_model(state)  # type: ignore[arg-type]
        model = state.model
        train_step, optimizer = acc.prepare(TrainStep(model, state.scheduler, cfg), state.optimizer)
        train_step.train()
        width = model.unet.config.cross_attention_dim
        batch = synthetic_batch(args.batch, args.resolution, args.chunks, width, pin=cuda,
                                moments=args.latents == "cached")
        sync()
        result["load_seconds"] = round(time.perf_counter() - t0, 2)
        result["load_peak_memory_mb"] = round(peak_mb(), 1)
        result["parameters_m"] = {
            "trainable": round(sum(p.numel() for p in model.trainable_parameters()) / 1e6, 2),
            "frozen": round(sum(p.numel() for _, p in model.iter_frozen_parameters()) / 1e6, 2)}
        result["frozen_dtype"] = str(model.unet.dtype).removeprefix("torch.")
        if cuda:
            result["memory_after_load_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        else:
            result["memory_after_load_mb"] = round(_proc_status_mb("VmRSS") or 0.0, 1)
            result["peak_rss_reset"] = _reset_peak_rss()

        phase = "step"
        times: list[float] = []
        losses: list[float] = []
        for i in range(WARMUP + args.steps):
            result["steps_done"] = i
            sync()
            t0 = time.perf_counter()
            gen = step_generator(cfg.seed, i, 0, 0)
            with acc.autocast():
                out = train_step(batch, gen)
            acc.backward(out["loss"])
            acc.clip_grad_norm_(model.trainable_parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out["loss"].detach()))  # the trainer reads the losses every step too
            del out
            sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
            print(f"  [{case}] step {i + 1}/{WARMUP + args.steps}: {time.perf_counter() - t0:.3f} s"
                  f"{' (warm-up)' if i < WARMUP else ''}", file=sys.stderr, flush=True)
        result["steps_done"] = len(losses)
    except torch.cuda.OutOfMemoryError as e:
        result.update(status="OOM", phase=phase, error=str(e).splitlines()[0][:300])
        result["peak_memory_mb"] = round(peak_mb(), 1)
        return result
    med = statistics.median(times)
    result.update({
        "step_seconds_median": round(med, 4), "step_seconds": [round(t, 4) for t in times],
        "samples_per_s": round(args.batch / med, 3), "peak_memory_mb": round(peak_mb(), 1),
        "losses_finite": all(map(math.isfinite, losses)),
    })
    if cuda:
        result["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    result["peak_rss_process_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def run_case(args: argparse.Namespace, case: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        res_path = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--child", case, "--result", str(res_path), "--layout", args.layout,
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--chunks", str(args.chunks),
               "--cache", str(args.cache), "--latents", args.latents]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        wall = round(time.perf_counter() - t0, 1)
        if res_path.is_file():
            res = json.loads(res_path.read_text())
        elif rc < 0 and -rc == 9:
            res = {"case": case, "status": "killed", "error": "SIGKILL (out of host memory?)"}
        else:
            res = {"case": case, "status": "failed", "error": f"exit status {rc}"}
    res["process_seconds"] = wall
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--layout", default="paper", choices=("paper", "adapter"), help="train.attention_layout")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                    help="mixed precision: auto is the trainer's choice (bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--batch", type=int, default=8, help="micro batch per step (the paper's per-GPU batch: 8)")
    ap.add_argument("--resolution", type=int, default=512, help="HQ side; the LQ is a quarter of it")
    ap.add_argument("--steps", type=int, default=10, help=f"timed steps per case, after {WARMUP} warm-up steps")
    ap.add_argument("--chunks", type=int, default=4, help="77-token text chunks per row (4: the embed maximum)")
    ap.add_argument("--cases", default="off,on", help="gradient checkpointing cases to run (off,on)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-restore-fullsize",
                    help="where the random SD1.5-size folder is built once (sd15/), shared with restore_fullsize.py")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "train_fullsize.json")
    ap.add_argument("--latents", default="encode", choices=("encode", "cached"),
                    help="encode: the VAE encoder runs in the step; cached: the batch carries stored moments "
                         "(train.latents cached) and the encoder is not on the device")
    ap.add_argument("--child", choices=tuple(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.resolution % 32 or args.resolution < 64:
        ap.error("--resolution must be a multiple of 32 (VAE ÷8, LQ ÷4) and at least 64")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        ap.error("--cases takes off, on or off,on")

    if args.child:
        res = child(args, args.child)
        args.result.write_text(json.dumps(res) + "\n")
        return 0

    if not (args.cache / "sd15" / "model_index.json").is_file():  # in a process of its own: ~8 GB transient
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), str(args.cache / "sd15")],
                       check=True, cwd=ROOT)
    rows = []
    for case in cases:
        print(f"case: gradient checkpointing {case} (batch {args.batch}, {args.resolution}², {args.device}, "
              f"--dtype {args.dtype})", file=sys.stderr, flush=True)
        rows.append(run_case(args, case))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    by = {r["case"]: r for r in rows}
    ratios = None
    if by.get("on", {}).get("status") == "ok" and by.get("off", {}).get("status") == "ok":
        ratios = {"time_on_over_off": round(by["on"]["step_seconds_median"] / by["off"]["step_seconds_median"], 3),
                  "memory_on_over_off": round(by["on"]["peak_memory_mb"] / by["off"]["peak_memory_mb"], 3)}
    cuda = args.device == "cuda"
    device = f"cpu ({os.cpu_count()} cores)"
    if cuda:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (not available)"
    result = {
        "device": device, "attention_layout": args.layout, "dtype": args.dtype, "batch": args.batch,
        "resolution": args.resolution,
        "lq_resolution": args.resolution // 4, "text_chunks": args.chunks, "timed_steps": args.steps,
        "warmup_steps": WARMUP,
        "peak_memory_kind": ("torch.cuda.max_memory_allocated over the timed steps" if cuda
                             else "peak RSS (VmHWM) over the timed steps"),
        "cases": rows, "checkpointing_on_over_off": ratios,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError:
        pass
    print(json.dumps(result, indent=1))
    print(f"\n{args.layout} layout\n| gradient checkpointing | status | s/step (median of {args.steps}) | samples/s | "
          "peak memory MB |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['status']} | {r.get('step_seconds_median', '-')} | {r.get('samples_per_s', '-')} | "
              f"{r.get('peak_memory_mb', '-')} |")
    if ratios:
        print(f"\ncheckpointing on ÷ off: time {ratios['time_on_over_off']}×, memory {ratios['memory_on_over_off']}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0 if all(r["status"] in ("ok", "OOM") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
