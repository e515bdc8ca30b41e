#!/usr/bin/env python
"""Text-embedding benchmark: rows/s, bytes per row and padding waste of the embed stage.

    .venv/bin/python benchmarks/embed.py                       # tiny encoder (hidden 32, 2 layers)
    .venv/bin/python benchmarks/embed.py --rows 128 --hidden 768 --layers 12 --heads 12 --intermediate 3072
    .venv/bin/python benchmarks/embed.py --hidden 768 --layers 12 --heads 12 --intermediate 3072 \\
        --device cuda --dtype float16 --rows 2000              # SD1.5's size on a GPU

Captions are synthetic LLaVA-length descriptions (a fixed mix of lengths, see LENGTH_MIX),
tokenized by SD1.5's real CLIP tokenizer (rebuilt from open_clip's vocabulary). The
tiny encoder is built as a folder and loaded the way real weights load; any other size
is a random `CLIPTextModel` with SD1.5's configuration built in memory (no download), so
the numbers are those of the real architecture, not of real weights.

Measured, within one run: tokenization alone; `encode_captions` alone; the whole stage
(`EmbedStage` through `run_stage`: captions shard → committed text_emb shard + sidecar); a rerun with
nothing changed; a rerun with 2 captions changed. Results go to a table on stdout and to
--out (default bench-out/embed.json; runs of other sizes already there are kept).
"""

from __future__ import annotations

import argparse
import json
import io
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench_common import busy_cores, fmt_num, render_table  # noqa: E402
from pipeline.embed.config import EmbedConfig  # noqa: E402
from pipeline.core.stage import run_stage  # noqa: E402
from pipeline.embed.stage import EmbedStage  # noqa: E402
from pipeline.core.shards import ShardWriter, atomic_write_json, read_sidecar, shard_path, sidecar_path  # noqa: E402
from pipeline.embed.encoder import (  # noqa: E402
    CHUNK_LENGTH, encode_captions, load_text_encoder, quiet_transformers, tokenize,
)
from demo_fixtures.tiny_sd import build_tiny_sd, text_encoder_config  # noqa: E402

DEFAULT_OUT = ROOT / "bench-out" / "embed.json"
# (share of rows, words low, words high): LLaVA-1.5's "very detailed" descriptions are
# mostly 80-250 words; a few run past 4 chunks (300 tokens) and get truncated.
LENGTH_MIX = ((0.15, 10, 50), (0.40, 50, 110), (0.35, 110, 220), (0.10, 230, 320))
TEXT = (
    "The image features a large fluffy orange cat lying on a wooden windowsill, basking in the warm "
    "sunlight streaming through the glass. Its eyes are half-closed and its tail is curled around its "
    "body. Behind it, a potted plant with green leaves sits on the left side, while white curtains frame "
    "the window. Outside, a blurry view of trees and a red-roofed house can be seen. In the foreground "
    "there is a small table with a cup of coffee, a book and a pair of glasses; the scene conveys calm "
    "and comfort, with soft shadows falling across the surface and the fur appearing detailed and "
    "textured. A person in a blue jacket walks along the street, carrying a bag, near a parked bicycle "
    "and a lamp post. The sky is overcast, the buildings are made of brick and stone, and several "
    "windows reflect the light of the setting sun."
)


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    words = TEXT.split()
    rng = random.Random(seed)
    shares = [m[0] for m in LENGTH_MIX]
    out = []
    for _ in range(n):
        _, lo, hi = rng.choices(LENGTH_MIX, weights=shares)[0]
        start = rng.randrange(len(words))
        length = rng.randint(lo, hi)
        out.append(" ".join(words[(start + j) % len(words)] for j in range(length)))
    return out


def write_captions(out: Path, captions: list[str]) -> None:
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                        ("error", pa.string())])
    arrow = shard_path(out, "captions", 0)
    w = ShardWriter(arrow, schema)
    for i, c in enumerate(captions):
        w.add({"key": f"bench/{i:06d}.png#0", "caption": c, "status": "ok", "error": None})
    size, digest = w.commit()
    atomic_write_json(sidecar_path(arrow), {"stage": "captions", "shard": 0, "rows": len(captions),
                                            "bytes": size, "sha256": digest, "failed": []})


def make_encoder(args: argparse.Namespace, work: Path) -> tuple[Any, Any, str, str]:
    """(tokenizer, encoder, model folder, identity). The tiny default goes through a folder
    and load_text_encoder; other sizes are random SD1.5-configured models in memory."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = build_tiny_sd(work / "sd", hidden=32, layers=2, seed=0)
    tiny = (args.hidden, args.layers, args.heads, args.intermediate) in ((32, 2, 2, None), (32, 2, 2, 64))
    if tiny and args.dtype == "auto":
        tokenizer, encoder = load_text_encoder(str(folder), args.device)
        return tokenizer, encoder, str(folder), "tiny-h32-l2"
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
             "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    torch.manual_seed(0)
    with quiet_transformers():
        encoder = CLIPTextModel(text_encoder_config(args.hidden, args.layers, args.heads, args.intermediate))
    encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ident = f"random-h{args.hidden}-l{args.layers}"
    return tokenizer, encoder, str(folder), ident


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        work = Path(tmp)
        tokenizer, encoder, folder, ident = make_encoder(args, work)
        param = next(encoder.parameters())
        captions = synthetic_captions(args.rows, seed=args.seed)
        sync = torch.cuda.synchronize if param.device.type == "cuda" else (lambda: None)

        t0 = time.perf_counter()
        ids = tokenize(tokenizer, captions)
        tok_s = time.perf_counter() - t0
        n_tokens = np.array([len(t) for t in ids])

        encode_captions(tokenizer, encoder, captions[: min(len(captions), args.batch_size)], args.max_chunks,
                        args.batch_size)  # warm-up: allocator, kernels, thread pool
        busy = busy_cores(1.0)  # other load on the machine makes every figure below slower
        enc_times = []
        for _ in range(args.repeat):
            sync()
            t0 = time.perf_counter()
            rows = encode_captions(tokenizer, encoder, captions, args.max_chunks, args.batch_size)
            sync()
            enc_times.append(time.perf_counter() - t0)
        enc_s = float(np.median(enc_times))
        chunks = sum(r.num_chunks for r in rows)
        del rows

        out = work / "out"
        write_captions(out, captions)
        cfg = EmbedConfig(model=folder, max_chunks=args.max_chunks, batch_size=args.batch_size)
        def embed(force: bool = False):  # the stage as jobs/embed.py runs it, encoder already loaded
            stage = EmbedStage(out, cfg, force=force, tokenizer=tokenizer, encoder=encoder, identity=ident)
            return run_stage(stage, [0], show_progress=False, log=io.StringIO())

        stage_times = []
        for _ in range(args.repeat):  # force: every repeat encodes and commits the whole shard
            t0 = time.perf_counter()
            embed(force=True)
            stage_times.append(time.perf_counter() - t0)
        stage_s = float(np.median(stage_times))
        arrow = shard_path(out, "text_emb", 0)
        side = read_sidecar(arrow)

        t0 = time.perf_counter()
        noop = embed()
        noop_s = time.perf_counter() - t0
        changed = list(captions)
        changed[1] += " edited by hand"
        changed[len(changed) // 2] = "a sharp photo of a red bicycle"
        write_captions(out, changed)
        t0 = time.perf_counter()
        two = embed()
        two_s = time.perf_counter() - t0

        n = len(captions)
        width = int(encoder.config.hidden_size)
        return {
            "label": f"h{width}-l{encoder.config.num_hidden_layers}-{param.device.type}-{str(param.dtype)[6:]}",
            "encoder": {"hidden": width, "layers": encoder.config.num_hidden_layers,
                        "heads": encoder.config.num_attention_heads,
                        "intermediate": encoder.config.intermediate_size,
                        "params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
                        "device": str(param.device), "dtype": str(param.dtype)[6:],
                        "how": "folder + load_text_encoder" if ident.startswith("tiny") else "random, in memory"},
            "rows": n, "batch_size": args.batch_size, "max_chunks": args.max_chunks,
            "tokens_per_row": {"mean": float(n_tokens.mean()), "p50": float(np.median(n_tokens)),
                               "max": int(n_tokens.max())},
            "chunks_per_row": round(chunks / n, 3),
            "rows_by_chunks": side["counts"]["rows_by_chunks"],
            "truncated_rows": side["counts"]["truncated_rows"],
            "tokenize_rows_per_s": round(n / tok_s, 1),
            "repeats": args.repeat, "busy_cores_before": round(busy, 2),
            "encode_seconds": [round(t, 3) for t in enc_times],
            "stage_seconds_all": [round(t, 3) for t in stage_times],
            "encode_rows_per_s": round(n / enc_s, 2),
            "encode_chunks_per_s": round(chunks / enc_s, 2),
            "stage_rows_per_s": round(n / stage_s, 2),
            "stage_seconds": round(stage_s, 3),
            "bytes_per_row": round(side["bytes"] / n, 1),
            "hidden_bytes_per_row": round(chunks * CHUNK_LENGTH * width * 2 / n, 1),
            "padding_waste": side["padding_waste"],
            "rerun_noop_seconds": round(noop_s, 3), "rerun_noop_skipped": noop.shards_skipped == 1,
            "rerun_two_changed_seconds": round(two_s, 3),
            "rerun_two_changed_encoded": two.counts["encoded"], "rerun_two_changed_reused": two.counts["reused"],
            "host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if param.device.type == "cuda" else None,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400, help="synthetic captions (default 400)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 × hidden)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                    help="compute dtype (auto: float16 on CUDA, float32 on the CPU, as the stage does)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per encoder call")
    ap.add_argument("--max-chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats; the median is reported")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    r = run(args)
    headers = ["measure", r["label"]]
    table = [
        ("encoder params (M)", fmt_num(r["encoder"]["params_m"], 2)),
        ("rows", str(r["rows"])),
        ("tokens / row (mean, max)", f"{r['tokens_per_row']['mean']:.0f}, {r['tokens_per_row']['max']}"),
        ("chunks / row", fmt_num(r["chunks_per_row"], 2)),
        ("truncated rows", str(r["truncated_rows"])),
        ("tokenize rows/s", fmt_num(r["tokenize_rows_per_s"], 0)),
        ("busy cores before (other load)", fmt_num(r["busy_cores_before"], 2)),
        ("encode rows/s (median)", fmt_num(r["encode_rows_per_s"], 1)),
        ("encode chunks/s", fmt_num(r["encode_chunks_per_s"], 1)),
        ("stage rows/s (shard committed, median)", fmt_num(r["stage_rows_per_s"], 1)),
        ("bytes / row (shard)", fmt_num(r["bytes_per_row"], 0)),
        ("padding waste", f"{100 * r['padding_waste']:.1f}%"),
        ("rerun, nothing changed (s)", fmt_num(r["rerun_noop_seconds"], 3)),
        ("rerun, 2 captions changed (s)", fmt_num(r["rerun_two_changed_seconds"], 3)),
    ]
    print(render_table(headers, table))
    runs: dict[str, Any] = {}
    if args.out.is_file():
        try:
            runs = json.loads(args.out.read_text()).get("runs", {})
        except (json.JSONDecodeError, AttributeError):
            runs = {}
    runs[r["label"]] = r
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "embed", "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
