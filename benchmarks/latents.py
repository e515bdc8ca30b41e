#!/usr/bin/env python
"""Latents-stage benchmark: rows/s of jobs/latents.py on this CPU and bytes per row.

  .venv/bin/python benchmarks/latents.py [--rows 16] [--sd-rows 2] [--out bench-out/latents.json]

Two VAEs in one run, both through the stage exactly as a user runs it (LatentsStage via
run_stage: decode the stored HQ PNGs, encode, commit the shard):

* the demo's tiny 4-level VAE (16–32 channels), `--rows` pairs at 512²;
* a randomly initialised VAE of SD1.5's size (128/256/512/512 channels, 34 M encoder
  parameters; the figures do not depend on the weights), `--sd-rows` pairs at 512².

Reported: rows/s of each, the ratio SD1.5-size ÷ tiny in the same run, and the latents
shard's bytes per row beside the pairs shard's (a latents row is 8 × 64 × 64 float16 =
64 KiB at 512², whatever the VAE's size). Then the training loader on that build, in this
process (one core = one worker), uint8 batches as the trainer asks for them: samples/s
shipping VAE moments (train.latents cached) against not (the trainer then encodes), same
run. The GPU figures (SD1.5 VAE in fp16 at batch 32) come from benchmarks/gpu_checks.sh.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import cpu_model  # noqa: E402

from pipeline.core.manifest import load_manifest  # noqa: E402
from pipeline.core.shards import read_sidecar, shard_files  # noqa: E402
from pipeline.core.stage import run_stage  # noqa: E402
from pipeline.degrade.stage import run_degrade  # noqa: E402
from pipeline.latents.config import LatentsConfig  # noqa: E402
from pipeline.latents.stage import LatentsStage  # noqa: E402

SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 512,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "scaling_factor": 0.18215}


def pairs_build(work: Path, rows: int) -> Path:
    """`rows` real 512² pairs from the bundled photographs, through the degradation stage."""
    import skimage

    photos = work / "photos"
    photos.mkdir(parents=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copyfile(Path(skimage.__file__).parent / "data" / name, photos / name)
    manifest = work / "m.json"
    manifest.write_text(json.dumps({
        "name": "bench-latents", "seed": 1, "output": str(work / "out"),
        "sources": [{"name": "sk", "root": str(photos), "limit": -(-rows // -(-rows // 4))}],
        "degrade": {"gt_size": 512, "scale": 4, "crops_per_image": -(-rows // 4), "rows_per_shard": rows}}))
    m = load_manifest(manifest)
    result = run_degrade(m, distributor="serial", show_progress=False, log=io.StringIO())
    assert result.exit_code == 0, result.summary()
    return m.output


def sd15_vae(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**{k: v for k, v in SD15_VAE.items()}).save_pretrained(str(folder / "vae"))
    return folder


def measure(out: Path, vae_ref: str, label: str, device: str = "cpu", dtype: str = "float32",
            batch_size: int | None = None) -> dict:
    build = out.parent / f"build-{label}"
    shutil.rmtree(build, ignore_errors=True)
    (build / "pairs").mkdir(parents=True)
    for s, arrow in shard_files(out, "pairs"):
        shutil.copyfile(arrow, build / "pairs" / arrow.name)
        shutil.copyfile(arrow.with_name(arrow.name + ".json"), build / "pairs" / (arrow.name + ".json"))
    cfg = LatentsConfig(batch_size=batch_size or (1 if "sd15" in label else 8), dtype=dtype)
    stage = LatentsStage(build, cfg, vae_ref, 512, device=device)
    stage.plan(None)  # identity hashed before the clock starts (a one-off per job)
    stage.open()  # the model loads once per job; not part of the rate
    t0 = time.perf_counter()
    result = run_stage(stage, show_progress=False, log=io.StringIO())
    wall = time.perf_counter() - t0
    rows = result.rows_ok
    assert result.exit_code == 0 and rows == result.rows_planned, result.summary()
    lat = [read_sidecar(a) for _, a in shard_files(build, "latents")]
    pairs = [read_sidecar(a) for _, a in shard_files(build, "pairs")]
    return {"label": label, "device": device, "dtype": dtype, "batch_size": cfg.batch_size,
            "rows": rows, "seconds": round(wall, 2), "rows_per_s": round(rows / wall, 3),
            "encode_s": round(sum(s["timing"]["encode_s"] for s in lat), 2),
            "latents_bytes_per_row": round(sum(s["bytes"] for s in lat) / rows),
            "pairs_bytes_per_row": round(sum(s["bytes"] for s in pairs) / rows),
            "moments_shape": lat[0]["moments"]["shape"],
            "encoder_params_m": round(sum(p.numel() for p in stage.vae.encoder.parameters()) / 1e6, 2)}


def loader_rates(build: Path, text_model: Path, rounds: int = 3) -> dict:
    """Samples/s of the trainer's loader over the build, with and without moments, interleaved."""
    import torch

    from model.training.data import ShardedPairs, collate
    from pipeline.caption.config import CaptionConfig
    from pipeline.caption.stage import CaptionStage
    from pipeline.core.shards import read_table
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.stage import run_embed

    keys = [k for _, a in shard_files(build, "pairs") for k in read_table(a).column("key").to_pylist()]
    words = "a photo of a cat sitting on a wooden floor next to a cup of coffee and a red rocket "
    overrides = {k: (words * 6)[: 200 + 7 * i % 150] for i, k in enumerate(keys)}  # written captions: no engine
    run_stage(CaptionStage(build, CaptionConfig(), overrides), show_progress=False, log=io.StringIO())
    run_embed(build, EmbedConfig(model=str(text_model)), show_progress=False, log=io.StringIO())
    out = {}
    for latents in (False, True) * rounds:
        data = ShardedPairs(build, seed=0, null_text_ratio=0.0, image_dtype=torch.uint8, latents=latents)
        n = len(data)
        t0 = time.perf_counter()
        for start in range(0, n - 3, 4):
            collate(data.__getitems__(list(range(start, start + 4))), data.empty_prompt)
        rate = (n - n % 4) / (time.perf_counter() - t0)
        key = "with_moments" if latents else "without_moments"
        out[key] = max(out.get(key, 0.0), rate)  # best of the rounds: the least disturbed
    return {"loader_samples_per_s_" + k: round(v, 1) for k, v in out.items()} | {
        "loader_moments_over_plain": round(out["with_moments"] / out["without_moments"], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="pairs encoded with the tiny VAE")
    ap.add_argument("--sd-rows", type=int, default=2, help="pairs encoded with the SD1.5-size VAE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "latents.json")
    ap.add_argument("--sd-only", action="store_true",
                    help="only the SD1.5-size VAE (the GPU check: --device cuda --dtype float16 --batch-size 32)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for the SD1.5-size VAE")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="compute dtype of the SD1.5-size VAE (latents.dtype)")
    ap.add_argument("--batch-size", type=int, help="images per VAE call for the SD1.5-size VAE (default 1)")
    args = ap.parse_args(argv)
    from demo_fixtures.tiny_sd import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = build_tiny_sd(work / "tiny")
        big = sd15_vae(work / "sd15")
        runs, loader = [], {}
        if not args.sd_only:
            out = pairs_build(work / "a", args.rows)
            runs.append(measure(out, str(tiny), "tiny"))
            loader = loader_rates(out.parent / "build-tiny", tiny)
        out_small = pairs_build(work / "b", args.sd_rows)
        runs.append(measure(out_small, str(big), "sd15-size", args.device, args.dtype, args.batch_size))
    result = {"cpu": cpu_model(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs, **loader}
    if len(runs) == 2:
        result["sd15_over_tiny_time_per_row"] = round(runs[0]["rows_per_s"] / runs[1]["rows_per_s"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"CPU: {result['cpu']}")
    print("| VAE | encoder params | rows | rows/s | latents bytes/row | pairs bytes/row | moments |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['encoder_params_m']} M | {r['rows']} | {r['rows_per_s']} | "
              f"{r['latents_bytes_per_row']} | {r['pairs_bytes_per_row']} | {r['moments_shape']} |")
    if loader:
        print(f"SD1.5-size VAE takes {result['sd15_over_tiny_time_per_row']}x the tiny VAE's time per row")
        print(f"loader, one core, uint8 batches of 4: {loader['loader_samples_per_s_without_moments']} samples/s "
              f"without moments, {loader['loader_samples_per_s_with_moments']} with "
              f"(x{loader['loader_moments_over_plain']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
