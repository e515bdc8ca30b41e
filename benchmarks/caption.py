#!/usr/bin/env python
"""Caption server client benchmark: is the client the bottleneck, and is its memory bounded?
And what does a real OpenAI-compatible server cost against the in-process engine?

    .venv/bin/python benchmarks/caption.py [--images 640] [--concurrency 32] [--delay-ms 200]
                                           [--serve-images 24] [--out bench-out/caption.json]

A server answering every request after a fixed delay ``d`` with ``c`` requests in flight
can do at most ``c / d`` captions/s; a client that keeps ``c`` requests in flight reaches
it. Measured against tests/standin_server.py in mode "fixed" (a stand-in for
``vllm serve``: vLLM cannot run on these CPU machines), run as a separate process so the
client's CPU time and memory are its own. Server and client share the same (2-core)
machine, so the figures are a lower bound for the client.

Reported: captions/s and its ratio to c/d (target >= 0.9), the client's CPU ms per
caption (PNG encoding, base64, JSON, HTTP), and the client's peak RSS growth and peak
traced Python allocations while captioning N and 2N images (bounded memory: the same for
both, since an image is encoded only when its request starts).

Then, in the same run: captions/s of the server engine through a real ``transformers
serve`` (tests/transformers_serve.py, the tiny LLaVA on the CPU, a separate process) and
of the in-process transformers engine on the same images, same greedy settings, and
their ratio; the captions must be identical. Results: tables on stdout and JSON at --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # the project, run from a checkout (benchmarks/ is sys.path[0])

from PIL import Image  # noqa: E402

from bench_common import busy_cores, cpu_model, fmt_num, proc_status_kb, render_table  # noqa: E402
from pipeline.caption.config import CaptionConfig  # noqa: E402
from pipeline.caption.engines import ServerEngine, TransformersEngine  # noqa: E402

DEFAULT_OUT = ROOT / "bench-out" / "caption.json"
TARGET_RATIO = 0.9
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg", "motorcycle_left.png", "grass.png", "gravel.png", "brick.png")


def lq_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` 128² crops of scikit-image's photographs (real content, so the PNGs the
    client encodes are as large as real LQ images', not the size of flat test images)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    photos = [Image.open(data / name).convert("RGB") for name in PHOTOS]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = rng.randint(128, min(photo.size))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        out.append(photo.crop((x, y, x + side, y + side)).resize((128, 128), Image.BICUBIC))
    return out


class Server:
    """tests/standin_server.py in its own process (mode fixed)."""

    def __init__(self, delay_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "standin_server.py"), "--mode", "fixed",
             "--delay", str(delay_s), "--served-model", "bench/llava"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"stand-in server did not start: {line!r}")
        self.url = line.split()[1]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()  # the server exits when its stdin closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)


class PeakRss:
    """Peak RSS of this process over a block: VmHWM after resetting it through
    /proc/self/clear_refs, or a 5 ms sampler where that reset is not allowed."""

    def __enter__(self) -> "PeakRss":
        self.before_kb = proc_status_kb_self("VmRSS")
        self.peak_kb = self.before_kb
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._sampler = None
        except OSError:
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, proc_status_kb_self("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._sampler is None:
            self.peak_kb = proc_status_kb_self("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.before_kb) / 1024


def proc_status_kb_self(field: str) -> int:
    import os

    return proc_status_kb(os.getpid(), field) or 0


def run(n: int, concurrency: int, delay_s: float, timeout_s: float) -> dict[str, Any]:
    server = Server(delay_s)
    try:
        cfg = CaptionConfig(engine="server", model="bench/llava", server=server.url,
                            concurrency=concurrency, timeout_s=timeout_s, retries=0)
        images = lq_images(2 * n)
        with ServerEngine(cfg) as engine:
            engine.caption(images[: 2 * concurrency])  # warm up: connections, imports
            done = 0

            def tick(k: int) -> None:
                nonlocal done
                done += k

            with PeakRss() as mem_n:
                t0, c0 = time.perf_counter(), time.process_time()
                results = engine.caption(images[:n], progress=tick)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            failed = sum(not r.ok for r in results)
            with PeakRss() as mem_2n:
                t1 = time.perf_counter()
                results_2n = engine.caption(images, progress=tick)
                wall_2n = time.perf_counter() - t1
            failed += sum(not r.ok for r in results_2n)
            traced = {}
            for size in (n, 2 * n):  # tracemalloc slows the client: a separate pass
                tracemalloc.start()
                tracemalloc.reset_peak()
                engine.caption(images[:size])
                traced[size] = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
        ideal = concurrency / delay_s
        return {
            "images": n, "concurrency": concurrency, "delay_s": delay_s, "failed": failed,
            "progress_calls_ok": done == 3 * n,
            "captions_per_s": n / wall, "captions_per_s_2n": 2 * n / wall_2n,
            "ideal_captions_per_s": ideal, "ratio": (n / wall) / ideal,
            "ratio_2n": (2 * n / wall_2n) / ideal,
            "client_cpu_ms_per_caption": 1000 * cpu / n,
            "client_rss_growth_mb": {"n": mem_n.growth_mb, "2n": mem_2n.growth_mb},
            "client_traced_peak_mb": {"n": traced[n], "2n": traced[2 * n]},
            "input_images_mb": sum(len(im.tobytes()) for im in images[:n]) / 2**20,
        }
    finally:
        server.close()


def serve_vs_in_process(n: int, max_tokens: int, workdir: Path, repeats: int = 3) -> dict[str, Any]:
    """The same n images captioned through transformers serve and in-process."""
    sys.path.insert(1, str(ROOT / "tests"))
    from demo_fixtures.tiny_llava import build_tiny_llava
    from transformers_serve import TransformersServe

    model = build_tiny_llava(workdir / "llava", seed=0)
    images = lq_images(n, seed=1)
    cfg = CaptionConfig(engine="transformers", model=str(model), max_tokens=max_tokens, batch_size=8,
                        concurrency=4, retries=0, timeout_s=120.0, add_special_tokens=False)
    local = TransformersEngine(cfg)
    local.caption(images[:2])  # warm up
    local_s: list[float] = []
    served_s: list[float] = []
    with TransformersServe(model, workdir / "serve") as serve:
        with ServerEngine(dataclasses.replace(cfg, engine="server", server=serve.url)) as engine:
            engine.caption(images[:2])
            for _ in range(repeats):  # interleaved, best of `repeats`: other load hits both alike
                t0 = time.perf_counter()
                local_results = local.caption(images)
                local_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                served = engine.caption(images)
                served_s.append(time.perf_counter() - t0)
    local.close()
    same = [r.caption for r in served] == [r.caption for r in local_results]
    best_local, best_served = n / min(local_s), n / min(served_s)
    return {"images": n, "max_tokens": max_tokens, "repeats": repeats,
            "in_process_captions_per_s": best_local, "in_process_batch_size": cfg.batch_size,
            "serve_captions_per_s": best_served, "serve_concurrency": cfg.concurrency,
            "ratio_serve_to_in_process": best_served / best_local,
            "all_in_process_s": local_s, "all_serve_s": served_s,
            "captions_identical": same, "failed": sum(not r.ok for r in served)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay-ms", type=float, default=200.0, help="server delay per request")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    ap.add_argument("--serve-images", type=int, default=24, help="images for the transformers serve comparison")
    ap.add_argument("--serve-max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    busy = busy_cores(0.5)
    r = run(args.images, args.concurrency, args.delay_ms / 1000, args.timeout)
    r["target_ratio"] = TARGET_RATIO
    r["meets_target"] = r["ratio"] >= TARGET_RATIO
    r["machine"] = {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "cpu_model": cpu_model(),
                    "busy_cores_before": busy, "note": "server and client on the same machine"}
    n = r["images"]
    rows = [
        ["captions/s (N images)", fmt_num(r["captions_per_s"]), f"{n}"],
        ["captions/s (2N images)", fmt_num(r["captions_per_s_2n"]), f"{2 * n}"],
        ["ideal c/d", fmt_num(r["ideal_captions_per_s"]), f"c={r['concurrency']}, d={r['delay_s']:g}s"],
        ["ratio to ideal", f"{r['ratio']:.3f}", f"target ≥ {TARGET_RATIO}"],
        ["client CPU ms/caption", fmt_num(r["client_cpu_ms_per_caption"], 2), "encode+HTTP"],
        ["client peak RSS growth MB", fmt_num(r["client_rss_growth_mb"]["n"]),
         f"2N: {fmt_num(r['client_rss_growth_mb']['2n'])}"],
        ["client traced peak MB", fmt_num(r["client_traced_peak_mb"]["n"]),
         f"2N: {fmt_num(r['client_traced_peak_mb']['2n'])}"],
        ["input images MB (N)", fmt_num(r["input_images_mb"]), "held by the caller"],
        ["failed requests", str(r["failed"]), ""],
    ]
    print(render_table(["measure", "value", "note"], rows))
    if busy > 0.25:
        print(f"warning: {busy:.2f} cores were busy before the run; figures may be low")
    with tempfile.TemporaryDirectory() as tmp:
        s = serve_vs_in_process(args.serve_images, args.serve_max_tokens, Path(tmp))
    r["transformers_serve"] = s
    print(render_table(["tiny LLaVA, CPU", "captions/s", "note"], [
        ["in-process transformers engine", fmt_num(s["in_process_captions_per_s"]),
         f"batches of {s['in_process_batch_size']}"],
        ["server engine -> transformers serve", fmt_num(s["serve_captions_per_s"]),
         f"{s['serve_concurrency']} in flight"],
        ["ratio serve / in-process", f"{s['ratio_serve_to_in_process']:.3f}",
         f"{s['images']} images, {s['max_tokens']} tokens, best of {s['repeats']}, "
         f"identical: {s['captions_identical']}"],
    ]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
