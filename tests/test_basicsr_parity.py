"""Our Real-ESRGAN degradation against BasicSR 1.4.2's own functions on the same recipes.

BasicSR is driven by baselines/basicsr_realesrgan.py (the module benchmarks/degrade.py
uses too): its kernel functions, USMSharp, filter2D, F.interpolate, add_*_noise_pt and
DiffJPEG, fed with the draws of our recipes and our stored HQ. Three criteria:

* kernels: every kernel of every recipe within 1e-6 of BasicSR's for the same parameters;
* the sharpened HQ: our pad/crop/flip + USM within one grey level of BasicSR's USMSharp on
  the same crop (cv2 reflect padding, the same box and flip);
* the whole second-order pipeline: the mean paired difference of PSNR(bicubic-up LQ, HQ)
  between our LQ and BasicSR's LQ for the same recipe under 0.5 dB. Only the noise
  realisation and codec implementations differ (cv2 resize vs F.interpolate, libjpeg vs
  DiffJPEG), so a wrong draw or a wrong stage shows up as a gap; a negative control (BasicSR
  given twice our noise levels, the size of a σ-in-the-wrong-units bug) shows the criterion
  does detect a real difference.

`make test` installs BasicSR (`pip install --no-deps basicsr==1.4.2`) and sets
SSPIR_REQUIRE_BASICSR=1, which turns a missing BasicSR into a failure rather than a skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage

from baselines.basicsr_realesrgan import BasicSRMissing, BasicSRPipeline, Geometry, basicsr_kernel
from pipeline.degrade.config import DegradeConfig
from pipeline.degrade.kernels import kernel_from_params
from pipeline.degrade.ops import degrade_gt, prepare_gt
from pipeline.degrade.recipe import sample_recipe, sample_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import lq_psnr  # noqa: E402  (the statistic docs/benchmarks.md reports)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png")  # chelsea: 451x300, padded
SEED = 20261127
GAP_DB = 0.5


@pytest.fixture(scope="module")
def pipe() -> BasicSRPipeline:
    try:
        return BasicSRPipeline(seed=0)
    except BasicSRMissing as e:
        if os.environ.get("SSPIR_REQUIRE_BASICSR") == "1":
            pytest.fail(f"SSPIR_REQUIRE_BASICSR=1 but BasicSR cannot be imported:\n{e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def sources() -> dict[str, np.ndarray]:
    folder = Path(skimage.__file__).parent / "data"
    return {name: cv2.imread(str(folder / name), cv2.IMREAD_COLOR)[..., ::-1].copy() for name in PHOTOS}


def _recipes(sources: dict[str, np.ndarray], n: int, cfg: DegradeConfig) -> list[tuple[str, dict[str, Any]]]:
    out = []
    names = list(sources)
    for i in range(n):
        name = names[i % len(names)]
        h, w = sources[name].shape[:2]
        rng = np.random.default_rng(sample_seed(SEED, f"skimage/{name}#{i}"))
        out.append((name, sample_recipe(rng, cfg, h, w)))
    return out


def test_kernels_match_basicsr(pipe: BasicSRPipeline, sources: dict[str, np.ndarray]) -> None:
    kinds, worst = set(), 0.0
    for _, recipe in _recipes(sources, 400, DegradeConfig()):
        for params in (recipe["blur1"], recipe["blur2"], recipe["final"]["sinc"]):
            if params is None:
                continue
            ours, theirs = kernel_from_params(params), basicsr_kernel(pipe.b.deg, params)
            assert ours.shape == theirs.shape == (21, 21)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            kinds.add(params["type"])
    assert kinds == {"iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc"}
    assert worst < 1e-6


def test_sharpened_hq_within_one_grey_level(pipe: BasicSRPipeline, sources: dict[str, np.ndarray]) -> None:
    cfg = DegradeConfig()
    for name, recipe in _recipes(sources, 8, cfg):
        ours = prepare_gt(sources[name], recipe, cfg)
        theirs = pipe.usm(Geometry.from_recipe(recipe).apply(sources[name]))
        assert ours.shape == theirs.shape == (512, 512, 3)
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        assert diff.max() <= 1, (name, int(diff.max()))


def _double_noise(recipe: dict[str, Any]) -> dict[str, Any]:
    out = dict(recipe)
    for stage in ("noise1", "noise2"):
        n = dict(recipe[stage])
        n["sigma" if n["type"] == "gaussian" else "scale"] *= 2.0
        out[stage] = n
    return out


def _paired_gap(pipe: BasicSRPipeline, pairs: list[tuple[np.ndarray, np.ndarray, dict[str, Any]]],
                change: Any = None) -> float:
    gaps = []
    for hq, lq, recipe in pairs:
        theirs = pipe.degrade_recipe(hq, change(recipe) if change else recipe)
        assert theirs.shape == lq.shape == (128, 128, 3)
        gaps.append(lq_psnr(hq, lq) - lq_psnr(hq, theirs))
    return float(np.mean(gaps))


def test_second_order_pipeline_psnr_gap(pipe: BasicSRPipeline, sources: dict[str, np.ndarray]) -> None:
    cfg = DegradeConfig()
    pairs = []
    for name, recipe in _recipes(sources, 24, cfg):
        hq = prepare_gt(sources[name], recipe, cfg)
        pairs.append((hq, degrade_gt(hq, recipe, cfg), recipe))
    gap = _paired_gap(pipe, pairs)
    assert abs(gap) < GAP_DB, f"ours − BasicSR on the same recipes: {gap:+.3f} dB (limit ±{GAP_DB})"
    # Negative control: the same comparison with BasicSR given twice the noise must fail
    # the criterion by a wide margin, or the criterion proves nothing.
    noisier = _paired_gap(pipe, pairs[:8], _double_noise)
    assert noisier > 2 * GAP_DB + abs(gap), f"control: {noisier:+.3f} dB"
