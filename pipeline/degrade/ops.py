"""Applying a degradation recipe: HQ crop → Real-ESRGAN second-order LQ image.

Pure functions of (source pixels, recipe, config): no global RNG is touched, noise is
regenerated from the seed stored in the recipe, so the same inputs give the same bytes.
The image path stays float32 in [0, 1] (BasicSR's tensors are float32 too) and uses
OpenCV kernels, which is what keeps one pair in the tens of milliseconds on one core.

BasicSR runs this on GPU tensors with torch ops; the numpy/OpenCV equivalents used here:
* ``filter2D`` (reflect pad + correlation)   → ``cv2.filter2D`` with BORDER_REFLECT_101
* ``F.interpolate`` area/bilinear/bicubic    → ``cv2.resize`` INTER_AREA/LINEAR/CUBIC
* ``DiffJPEG``                               → the real libjpeg codec via cv2.imencode
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np
from scipy import special

from pipeline.degrade.config import DegradeConfig
from pipeline.degrade.kernels import kernel_from_params
from pipeline.degrade.recipe import sample_recipe, sample_seed

_INTERP = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_BORDER = cv2.BORDER_REFLECT_101  # torch's 'reflect' padding, as BasicSR's filter2D uses
_LEVEL_OFFSET = np.int64(2**54)  # > 2⁵³, the largest scaled CDF value
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ------------------------------------------------------------------ GT preparation --


def crop_gt(source_rgb: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """Pad (reflect, bottom/right), crop and flip: the geometric part of ``prepare_gt``."""
    _check_image(source_rgb, "source_rgb")
    h, w = source_rgb.shape[:2]
    if [h, w] != list(recipe["src_size"]):
        raise ValueError(f"recipe was drawn for a {recipe['src_size']} source, got {[h, w]}")
    pad_h, pad_w = recipe["pad"]
    img = source_rgb
    if pad_h or pad_w:
        img = cv2.copyMakeBorder(img, 0, int(pad_h), 0, int(pad_w), cv2.BORDER_REFLECT_101)
    x, y, cw, ch = recipe["crop"]
    img = img[y : y + ch, x : x + cw]
    if recipe["hflip"]:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def usm_sharpen(img: np.ndarray, radius: int, weight: float, threshold: float) -> np.ndarray:
    """BasicSR ``usm_sharp`` on float32 [0, 1]: sharpen only where detail exceeds the
    threshold, with a soft mask so flat regions (and their noise) are left alone."""
    if radius % 2 == 0:
        radius += 1
    blur = cv2.GaussianBlur(img, (radius, radius), 0, borderType=_BORDER)
    residual = img - blur
    mask = (np.abs(residual) * np.float32(255.0) > np.float32(threshold)).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (radius, radius), 0, borderType=_BORDER)
    sharp = np.clip(img + np.float32(weight) * residual, 0.0, 1.0)
    return soft * sharp + (np.float32(1.0) - soft) * img


def prepare_gt(source_rgb: np.ndarray, recipe: dict[str, Any], cfg: DegradeConfig) -> np.ndarray:
    """The stored HQ image (gt×gt×3 uint8): crop, flip, then USM if ``cfg.usm_gt``.

    Rounded to uint8 because the sharpened GT is both what is stored and where the
    degradation starts; starting from the stored bytes keeps HQ and LQ consistent.
    """
    _check_recipe_matches(recipe, cfg)
    gt = crop_gt(source_rgb, recipe)
    if not cfg.usm_gt:
        return gt
    sharp = usm_sharpen(_to_float(gt), cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold)
    return _to_uint8(sharp)


# ------------------------------------------------------------------ primitives --


def _check_image(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = (getattr(img, "dtype", type(img)), getattr(img, "shape", None))
        raise ValueError(f"{name} must be an H×W×3 uint8 array, got {got}")


def _check_recipe_matches(recipe: dict[str, Any], cfg: DegradeConfig) -> None:
    if recipe.get("gt_size") != cfg.gt_size or recipe.get("scale") != cfg.scale:
        raise ValueError(
            f"recipe drawn for gt_size={recipe.get('gt_size')} scale={recipe.get('scale')}, "
            f"config has gt_size={cfg.gt_size} scale={cfg.scale}"
        )


def _to_float(img_u8: np.ndarray) -> np.ndarray:
    return img_u8.astype(np.float32) / np.float32(255.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Round-and-clamp quantisation, the last step of BasicSR's pipeline."""
    return np.clip(np.rint(img * np.float32(255.0)), 0, 255).astype(np.uint8)


def apply_kernel(img: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Blur with a recipe kernel (cross-correlation, reflect-101 border, like BasicSR).

    The unpadded kernel is used: zero padding to 21 taps adds only zero-weight taps, so the
    result is the same while small kernels stay cheap. Isotropic Gaussians are exactly
    rank one (g gᵀ / (Σg)²), so they run as a separable filter.
    """
    if params["type"] == "iso":
        size = int(params["size"])
        ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        g = np.exp(-0.5 * ax * ax / float(params["sigma_x"]) ** 2)
        g = (g / g.sum()).astype(np.float32)
        return cv2.sepFilter2D(img, -1, g, g, borderType=_BORDER)
    k = kernel_from_params(params, pad=False).astype(np.float32)
    return cv2.filter2D(img, -1, k, borderType=_BORDER)


def resize(img: np.ndarray, size: tuple[int, int] | list[int], mode: str) -> np.ndarray:
    """Resize to (h, w); a same-size resize is the identity in every mode, so skip it."""
    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=_INTERP[mode])


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Real JPEG round trip (libjpeg, 4:2:0) of a float RGB image; returns float32 RGB."""
    u8 = _to_uint8(np.clip(img, 0.0, 1.0))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write JPEG")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return _to_float(cv2.cvtColor(dec, cv2.COLOR_BGR2RGB))


_CHUNK = 1 << 16
_GUIDE_BITS = 12  # the guide splits [0, 1) into 4096 bins per level: a 2 MiB int16 table


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse-CDF tables for Poisson(k/255·vals), k = 0..255, for exact sampling.

    Only 256 rates ever occur (the image is quantised to /255 before sampling), so the
    inverse CDF can be tabulated once per ``vals`` (a power of two ≤ 256). CDF values are
    scaled by 2⁵³ and floored: for a 53-bit uniform integer m, ``cdf·2⁵³ ≤ m`` iff
    ``floor(cdf·2⁵³) ≤ m``, so every comparison is exact integer arithmetic.

    Returns (guide, flat, width): ``guide[k·2^bits + b]`` is the sample value shared by
    every uniform in bin b of level k, or -1 when a CDF step falls inside the bin;
    ``flat`` holds each level's scaled CDF (``width`` entries ending in 2⁵³), level k
    shifted up by k·2⁵⁴, so one sorted array serves a binary search for every level.
    """
    lam = np.arange(256, dtype=np.float64) / 255.0 * vals
    width = int(math.ceil(vals + 20.0 * math.sqrt(vals) + 40.0))
    x = np.arange(width, dtype=np.float64)
    cdf = special.pdtr(x[None, :], lam[:, None])
    cdf[:, -1] = 1.0  # the tail beyond width has mass < 1e-30, far below 2⁻⁵³
    rows = np.floor(cdf * 2.0**53).astype(np.int64)
    shift = 53 - _GUIDE_BITS
    starts = np.arange(2**_GUIDE_BITS, dtype=np.int64) << shift
    ends = starts + ((1 << shift) - 1)
    lo = np.stack([np.searchsorted(r, starts, side="right") for r in rows])
    hi = np.stack([np.searchsorted(r, ends, side="right") for r in rows])
    guide = np.where(lo == hi, lo, -1).astype(np.int16).reshape(-1)
    flat = (rows + np.arange(256, dtype=np.int64)[:, None] * _LEVEL_OFFSET).reshape(-1)
    return guide, flat, width


def poisson_levels(levels: np.ndarray, vals: int, rng: np.random.Generator) -> np.ndarray:
    """Exact Poisson(levels/255·vals) samples (int32, shape of the uint8 ``levels``).

    numpy's ``Generator.poisson`` costs ~35 ns a sample (rejection sampling for rates
    ≥ 10) and dominated the pipeline; inverse-CDF sampling costs one table gather, plus a
    binary search for the ~2% of uniforms whose bin straddles a CDF step. Same law: the
    only departure from Poisson is the 2⁻⁵³ granularity of the uniform itself.
    Work runs in cache-sized chunks (large int64 temporaries cost more in page faults
    than in arithmetic); chunks consume the bit stream in order, so chunking does not
    change the samples.
    """
    guide, flat, width = _poisson_tables(int(vals))
    src = levels.reshape(-1)
    out = np.empty(src.size, dtype=np.int32)
    shift = 53 - _GUIDE_BITS
    for i in range(0, src.size, _CHUNK):
        lv = src[i : i + _CHUNK].astype(np.int64)
        m = rng.bit_generator.random_raw(lv.size) >> np.uint64(11)  # 53-bit uniform integers
        m = m.view(np.int64)
        got = guide[(lv << _GUIDE_BITS) | (m >> shift)]
        todo = np.flatnonzero(got < 0)
        if todo.size:
            lt = lv[todo]
            got[todo] = np.searchsorted(flat, m[todo] + lt * _LEVEL_OFFSET, side="right") - lt * width
        out[i : i + lv.size] = got
    return out.reshape(levels.shape)


def _gaussian_noise(shape: tuple[int, ...], sigma: float, gray: bool, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    h, w = shape[:2]
    scale = np.float32(sigma / 255.0)
    if gray:
        return (rng.standard_normal((h, w), dtype=np.float32) * scale)[:, :, None]
    return rng.standard_normal((h, w, 3), dtype=np.float32) * scale


def _poisson_noise(img: np.ndarray, scale: float, gray: bool, seed: int) -> np.ndarray:
    """BasicSR ``generate_poisson_noise_pt``: shot noise on the /255-quantised image with
    ``vals`` photon levels (next power of two of the number of distinct grey values)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    src = img @ _LUMA if gray else img
    levels = np.clip(np.rint(src * np.float32(255.0)), 0, 255).astype(np.uint8)
    n_unique = int(np.count_nonzero(np.bincount(levels.reshape(-1), minlength=256)))
    vals = int(2 ** math.ceil(math.log2(n_unique)))
    counts = poisson_levels(levels, vals, rng)
    quantised = levels.astype(np.float32) / np.float32(255.0)
    noise = (counts.astype(np.float32) / np.float32(vals) - quantised) * np.float32(scale)
    return noise[:, :, None] if gray else noise


def add_noise(img: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Add the recipe's noise and clip to [0, 1] (BasicSR: clip=True, rounds=False)."""
    seed = int(params["noise_seed"])
    if params["type"] == "gaussian":
        noise = _gaussian_noise(img.shape, float(params["sigma"]), bool(params["gray"]), seed)
    elif params["type"] == "poisson":
        noise = _poisson_noise(img, float(params["scale"]), bool(params["gray"]), seed)
    else:
        raise ValueError(f"unknown noise type {params['type']!r}")
    return np.clip(img + noise, 0.0, 1.0)


# ------------------------------------------------------------------ the pipeline --


def stage1(img: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    out = apply_kernel(img, recipe["blur1"])
    out = resize(out, recipe["resize1"]["size"], recipe["resize1"]["mode"])
    out = add_noise(out, recipe["noise1"])
    return jpeg(out, recipe["jpeg1"])


def stage2(img: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    out = img
    if recipe["blur2"] is not None:
        out = apply_kernel(out, recipe["blur2"])
    out = resize(out, recipe["resize2"]["size"], recipe["resize2"]["mode"])
    return add_noise(out, recipe["noise2"])


def final_stage(img: np.ndarray, recipe: dict[str, Any], lq_size: int) -> np.ndarray:
    """Resize back to the LQ size + optional sinc, and JPEG, in the recipe's order.

    (Real-ESRGAN found sinc → JPEG → resize orders produce twisted lines, so only these two.)
    """
    final = recipe["final"]

    def resize_sinc(x: np.ndarray) -> np.ndarray:
        x = resize(x, (lq_size, lq_size), final["resize_mode"])
        return x if final["sinc"] is None else apply_kernel(x, final["sinc"])

    if final["order"] == "resize_sinc_jpeg":
        return jpeg(resize_sinc(img), recipe["jpeg2"])
    if final["order"] == "jpeg_resize_sinc":
        return resize_sinc(jpeg(img, recipe["jpeg2"]))
    raise ValueError(f"unknown final order {final['order']!r}")


def degrade_gt(gt_rgb: np.ndarray, recipe: dict[str, Any], cfg: DegradeConfig) -> np.ndarray:
    """LQ image ((gt/scale)² ×3 uint8) from the stored GT bytes and a recipe."""
    _check_image(gt_rgb, "gt_rgb")
    _check_recipe_matches(recipe, cfg)
    if gt_rgb.shape[:2] != (cfg.gt_size, cfg.gt_size):
        raise ValueError(f"gt_rgb must be {cfg.gt_size}×{cfg.gt_size}, got {gt_rgb.shape[:2]}")
    out = stage1(_to_float(gt_rgb), recipe)
    out = stage2(out, recipe)
    out = final_stage(out, recipe, cfg.lq_size)
    return _to_uint8(out)


def make_pair(
    source_rgb: np.ndarray, key: str, manifest_seed: int, cfg: DegradeConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], int]:
    """One training pair from a source photo: (HQ, LQ, recipe, seed), all reproducible
    from (source, key, manifest seed, config)."""
    _check_image(source_rgb, "source_rgb")
    seed = sample_seed(manifest_seed, key)
    recipe = sample_recipe(np.random.default_rng(seed), cfg, source_rgb.shape[0], source_rgb.shape[1])
    hq = prepare_gt(source_rgb, recipe, cfg)
    lq = degrade_gt(hq, recipe, cfg)
    return hq, lq, recipe, seed
