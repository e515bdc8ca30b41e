"""Sampling of degradation recipes: every random draw of one HQ→LQ pair, and nothing else.

Splitting *sampling* from *applying* (``pipeline.degrade.ops``) is what makes the stored
``recipe`` column useful: a recipe is plain JSON holding the drawn parameters (kernel
parameters, not kernel arrays; a seed for the noise field, not the noise), and applying
it is a pure function. So a pair can be audited, regenerated bit for bit, or re-rendered
with a fixed recipe while one stage is changed.

Semantics follow BasicSR's ``RealESRGANDataset`` and ``RealESRGANModel.feed_data``, except
that draws are per sample rather than shared across a batch (DESIGN section 4).

Draw order (fixed; changing it changes every recipe, so bump ``RECIPE_VERSION``):
 1. crop top, crop left (inside the reflect-padded image)
 2. hflip coin (always drawn, so ``use_hflip`` does not shift later draws)
 3. kernel 1: size, sinc coin, then ω_c — or kind, σx, [σy, θ], [β half coin, β]
 4. kernel 2: the same with the ``*2`` settings (always drawn, as BasicSR does)
 5. final sinc: coin, then size and ω_c when used
 6. stage 1: up/down/keep, scale, resize mode, Gaussian-vs-Poisson coin, σ or scale,
    grey coin, noise seed, JPEG quality
 7. stage 2: blur coin, up/down/keep, scale, resize mode, noise as in 6, (no JPEG here)
 8. final: order coin, resize mode, JPEG quality
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from pipeline.degrade.config import DegradeConfig

RECIPE_VERSION = 1
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")
UPDOWN = ("up", "down", "keep")
# BasicSR hard-codes this threshold for kernels ranging over 7..21: small kernels cannot
# represent a very low cut-off, so they get a narrower ω_c range.
SINC_SMALL_KERNEL_LIMIT = 13


def sample_seed(manifest_seed: int, key: str) -> int:
    """Per-sample seed from (manifest seed, key): stable across runs, machines and shard
    layouts, so a row's draws never depend on which worker or in what order it ran."""
    digest = hashlib.sha256(f"{manifest_seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _coin(rng: np.random.Generator, p: float) -> bool:
    """True with probability p; always consumes exactly one draw to keep the order fixed."""
    return bool(rng.random() < p)


def _weighted_index(rng: np.random.Generator, probs: tuple[float, ...] | list[float]) -> int:
    """Index drawn with the given weights (random.choices semantics, one uniform draw)."""
    cum = np.cumsum(np.asarray(probs, dtype=np.float64))
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return min(i, len(cum) - 1)


def _odd_sizes(kernel_range: tuple[int, int]) -> list[int]:
    lo, hi = kernel_range
    return list(range(lo, hi + 1, 2))


def _sample_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    """BasicSR's β draw: half the time below 1 (heavier tails), half above (flatter top)."""
    if rng.random() < 0.5:
        return _uniform(rng, beta_range[0], 1.0)
    return _uniform(rng, 1.0, beta_range[1])


def _sample_kernel(
    rng: np.random.Generator,
    kernel_range: tuple[int, int],
    sinc_prob: float,
    kernel_list: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    blur_sigma: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> dict[str, Any]:
    sizes = _odd_sizes(kernel_range)
    size = sizes[int(rng.integers(len(sizes)))]
    pad_to = kernel_range[1]
    if _coin(rng, sinc_prob):
        lo = math.pi / 3 if size < SINC_SMALL_KERNEL_LIMIT else math.pi / 5
        return {"type": "sinc", "size": size, "pad_to": pad_to, "omega_c": _uniform(rng, lo, math.pi)}
    kind = kernel_list[_weighted_index(rng, kernel_prob)]
    sigma_x = _uniform(rng, *blur_sigma)
    if kind.endswith("aniso"):
        sigma_y = _uniform(rng, *blur_sigma)
        theta = _uniform(rng, -math.pi, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    beta = None
    if kind.startswith("generalized"):
        beta = _sample_beta(rng, betag_range)
    elif kind.startswith("plateau"):
        beta = _sample_beta(rng, betap_range)
    return {
        "type": kind,
        "size": size,
        "pad_to": pad_to,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
        "beta": beta,
    }


def _sample_final_sinc(rng: np.random.Generator, cfg: DegradeConfig) -> dict[str, Any] | None:
    if not _coin(rng, cfg.final_sinc_prob):
        return None
    sizes = _odd_sizes(cfg.kernel_range)
    size = sizes[int(rng.integers(len(sizes)))]
    return {
        "type": "sinc",
        "size": size,
        "pad_to": cfg.kernel_range[1],
        "omega_c": _uniform(rng, math.pi / 3, math.pi),
    }


def _sample_updown(
    rng: np.random.Generator,
    resize_prob: tuple[float, float, float],
    resize_range: tuple[float, float],
    modes: tuple[str, ...],
) -> dict[str, Any]:
    updown = UPDOWN[_weighted_index(rng, resize_prob)]
    if updown == "up":
        scale = _uniform(rng, 1.0, resize_range[1])
    elif updown == "down":
        scale = _uniform(rng, resize_range[0], 1.0)
    else:
        scale = 1.0
    mode = modes[int(rng.integers(len(modes)))]
    return {"updown": updown, "scale": scale, "mode": mode}


def _sample_noise(
    rng: np.random.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> dict[str, Any]:
    if _coin(rng, gaussian_prob):
        out: dict[str, Any] = {"type": "gaussian", "sigma": _uniform(rng, *sigma_range)}
    else:
        out = {"type": "poisson", "scale": _uniform(rng, *poisson_range)}
    out["gray"] = _coin(rng, gray_prob)
    # The noise field itself is regenerated from this seed; storing 3×H×W floats is not an option.
    out["noise_seed"] = int(rng.integers(0, 2**64, dtype=np.uint64))
    return out


def _jpeg_quality(rng: np.random.Generator, jpeg_range: tuple[int, int]) -> int:
    return int(rng.integers(int(jpeg_range[0]), int(jpeg_range[1]) + 1))


def sample_recipe(rng: np.random.Generator, cfg: DegradeConfig, src_h: int, src_w: int) -> dict[str, Any]:
    """Every random draw for one pair, as JSON-ready plain Python values (no image work).

    Crop coordinates are in the reflect-padded image; padding only grows the bottom and
    right edges, so they are also source coordinates (a box may run into the padding).
    """
    if src_h < 1 or src_w < 1:
        raise ValueError(f"source size must be positive, got {src_h}×{src_w}")
    gt = cfg.gt_size
    pad_h, pad_w = max(0, gt - src_h), max(0, gt - src_w)
    padded_h, padded_w = src_h + pad_h, src_w + pad_w

    top = int(rng.integers(0, padded_h - gt + 1))
    left = int(rng.integers(0, padded_w - gt + 1))
    hflip = _coin(rng, 0.5) and cfg.use_hflip

    blur1 = _sample_kernel(
        rng, cfg.kernel_range, cfg.sinc_prob, cfg.kernel_list, cfg.kernel_prob,
        cfg.blur_sigma, cfg.betag_range, cfg.betap_range,
    )
    blur2 = _sample_kernel(
        rng, cfg.kernel_range, cfg.sinc_prob2, cfg.kernel_list2, cfg.kernel_prob2,
        cfg.blur_sigma2, cfg.betag_range2, cfg.betap_range2,
    )
    final_sinc = _sample_final_sinc(rng, cfg)

    # stage 1 (resize by a factor of the GT size, floor like torch's scale_factor interpolate)
    resize1 = _sample_updown(rng, cfg.resize_prob, cfg.resize_range, cfg.resize_modes)
    side1 = max(1, int(gt * resize1["scale"]))
    resize1["size"] = [side1, side1]
    noise1 = _sample_noise(
        rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob
    )
    jpeg1 = _jpeg_quality(rng, cfg.jpeg_range)

    # stage 2 (resize to a factor of the *LQ* size, as BasicSR does)
    use_blur2 = _coin(rng, cfg.second_blur_prob)
    resize2 = _sample_updown(rng, cfg.resize_prob2, cfg.resize_range2, cfg.resize_modes)
    side2 = max(1, int(gt / cfg.scale * resize2["scale"]))
    resize2["size"] = [side2, side2]
    noise2 = _sample_noise(
        rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2
    )

    order = FINAL_ORDERS[0] if _coin(rng, 0.5) else FINAL_ORDERS[1]
    final_mode = cfg.resize_modes[int(rng.integers(len(cfg.resize_modes)))]
    jpeg2 = _jpeg_quality(rng, cfg.jpeg_range2)

    return {
        "version": RECIPE_VERSION,
        "src_size": [int(src_h), int(src_w)],
        "gt_size": gt,
        "scale": cfg.scale,
        "pad": [pad_h, pad_w],
        "crop": [left, top, gt, gt],
        "hflip": hflip,
        "blur1": blur1,
        "resize1": resize1,
        "noise1": noise1,
        "jpeg1": jpeg1,
        "blur2": blur2 if use_blur2 else None,
        "resize2": resize2,
        "noise2": noise2,
        "final": {"order": order, "resize_mode": final_mode, "sinc": final_sinc},
        "jpeg2": jpeg2,
    }


def recipe_to_json(recipe: dict[str, Any]) -> str:
    """Canonical text (sorted keys, no spaces): equal recipes give equal strings and hashes."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"), allow_nan=False)


def recipe_from_json(text: str) -> dict[str, Any]:
    """Parse a stored recipe; refuse versions whose draw layout this code does not know."""
    recipe = json.loads(text)
    if not isinstance(recipe, dict) or recipe.get("version") != RECIPE_VERSION:
        got = recipe.get("version") if isinstance(recipe, dict) else type(recipe).__name__
        raise ValueError(f"unsupported recipe version {got!r}; this code reads version {RECIPE_VERSION}")
    return recipe
