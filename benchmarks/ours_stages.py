"""Our degradation, measured two ways on one core.

1. ``run_api_pair`` times the public API a worker calls (``sample_recipe``,
   ``prepare_gt``, ``degrade_gt``, ``encode_png``): these are the figures we quote.
2. ``run_breakdown_pair`` replays the same recipe through the public stage primitives of
   ``pipeline.degrade.ops`` (``crop_gt``, ``usm_sharpen``, ``apply_kernel``, ``resize``,
   ``add_noise``, ``jpeg``) so every stage gets its own timer, row for row with BasicSR.
   It must give the API's bytes exactly; the caller checks that, so a breakdown that has
   drifted from the real code is reported instead of silently timing something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bench_common import StageTimer
from pipeline.degrade import ops as D
from pipeline.degrade.config import DegradeConfig
from pipeline.core.image_io import encode_png
from pipeline.degrade.recipe import sample_recipe, sample_seed


@dataclasses.dataclass
class ApiPair:
    """One pair made through the public API, with what the statistics need."""

    key: str
    recipe: dict[str, Any]
    hq: np.ndarray
    lq: np.ndarray
    png_bytes: int


def run_api_pair(source: np.ndarray, key: str, manifest_seed: int, cfg: DegradeConfig,
                 timer: StageTimer) -> ApiPair:
    """Exactly what ``make_pair`` + the worker's two ``encode_png`` calls do, timed per call."""
    with timer("sample"):
        seed = sample_seed(manifest_seed, key)
        recipe = sample_recipe(np.random.default_rng(seed), cfg, source.shape[0], source.shape[1])
    with timer("prepare_gt"):
        hq = D.prepare_gt(source, recipe, cfg)
    with timer("degrade_gt"):
        lq = D.degrade_gt(hq, recipe, cfg)
    with timer("encode"):
        size = len(encode_png(hq, cfg.png_compress_level)) + len(encode_png(lq, cfg.png_compress_level))
    return ApiPair(key, recipe, hq, lq, size)


def _to_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / np.float32(255.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * np.float32(255.0)), 0, 255).astype(np.uint8)


def run_breakdown_pair(source: np.ndarray, recipe: dict[str, Any], cfg: DegradeConfig,
                       timer: StageTimer) -> tuple[np.ndarray, np.ndarray]:
    """Replay ``prepare_gt`` + ``degrade_gt`` stage by stage; returns (hq, lq)."""
    with timer("crop"):
        gt = D.crop_gt(source, recipe)
    if cfg.usm_gt:
        with timer("usm"):
            hq = _to_uint8(D.usm_sharpen(_to_float(gt), cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold))
    else:
        hq = gt
    with timer("convert"):
        x = _to_float(hq)
    with timer("blur1"):
        x = D.apply_kernel(x, recipe["blur1"])
    with timer("resize1"):
        x = D.resize(x, recipe["resize1"]["size"], recipe["resize1"]["mode"])
    with timer("noise1"):
        x = D.add_noise(x, recipe["noise1"])
    with timer("jpeg1"):
        x = D.jpeg(x, recipe["jpeg1"])
    if recipe["blur2"] is not None:
        with timer("blur2"):
            x = D.apply_kernel(x, recipe["blur2"])
    with timer("resize2"):
        x = D.resize(x, recipe["resize2"]["size"], recipe["resize2"]["mode"])
    with timer("noise2"):
        x = D.add_noise(x, recipe["noise2"])
    x = _final(x, recipe, cfg.lq_size, timer)
    with timer("convert"):
        lq = _to_uint8(x)
    return hq, lq


def _final(x: np.ndarray, recipe: dict[str, Any], lq_size: int, timer: StageTimer) -> np.ndarray:
    """The final resize / sinc / JPEG in the recipe's order (see ``final_stage``)."""
    final = recipe["final"]

    def resize_sinc(y: np.ndarray) -> np.ndarray:
        with timer("resize3"):
            y = D.resize(y, (lq_size, lq_size), final["resize_mode"])
        if final["sinc"] is not None:
            with timer("sinc"):
                y = D.apply_kernel(y, final["sinc"])
        return y

    def jpeg2(y: np.ndarray) -> np.ndarray:
        with timer("jpeg2"):
            return D.jpeg(y, recipe["jpeg2"])

    if final["order"] == "resize_sinc_jpeg":
        return jpeg2(resize_sinc(x))
    return resize_sinc(jpeg2(x))
