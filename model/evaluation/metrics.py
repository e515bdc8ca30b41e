"""The table's columns, and PSNR/SSIM on the Y channel exactly as BasicSR computes them.

The paper (like SeeSR and most of the field) reports BasicSR's `calculate_psnr` /
`calculate_ssim` with `test_y_channel=True`. They are reimplemented here, operation by
operation, so that numbers agree with BasicSR to the last digit without importing it (its
import breaks on current torchvision). The learned metrics are only described here; they
are built in `iqa.py` from the files `weights.py` lists.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One column: how it is labelled, which way is better, what it needs.

    `kind` says what a metric looks at: "fr" a restored image and its reference, "nr" the
    restored image alone, "set" the two folders as wholes (FID). Without references only
    "nr" metrics apply; the others are *not applicable*, which is not the same as failed.
    """

    key: str
    label: str
    higher_better: bool
    kind: str  # "fr" | "nr" | "set"
    backend: str  # "numpy" | "pyiqa" | "clip"
    digits: int  # decimals as the paper prints them
    pyiqa_name: str | None = None

    @property
    def header(self) -> str:
        return self.label + ("↑" if self.higher_better else "↓")

    @property
    def needs_reference(self) -> bool:
        return self.kind != "nr"


METRICS: dict[str, MetricSpec] = {s.key: s for s in (
    MetricSpec("psnr", "PSNR", True, "fr", "numpy", 2),
    MetricSpec("ssim", "SSIM", True, "fr", "numpy", 4),
    MetricSpec("lpips", "LPIPS", False, "fr", "pyiqa", 4, "lpips"),
    MetricSpec("dists", "DISTS", False, "fr", "pyiqa", 4, "dists"),
    MetricSpec("clip_i", "CLIP-I", True, "fr", "clip", 4),
    MetricSpec("niqe", "NIQE", False, "nr", "pyiqa", 4, "niqe"),
    MetricSpec("maniqa", "MANIQA", True, "nr", "pyiqa", 4, "maniqa"),
    MetricSpec("musiq", "MUSIQ", True, "nr", "pyiqa", 2, "musiq"),
    MetricSpec("clipiqa", "CLIPIQA", True, "nr", "pyiqa", 4, "clipiqa"),
    MetricSpec("fid", "FID", False, "set", "pyiqa", 2, "fid"),
)}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)
NO_REFERENCE_METRICS: tuple[str, ...] = tuple(k for k, s in METRICS.items() if not s.needs_reference)


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """Metric keys in the paper's column order, whatever order they were asked in."""
    names = [m.strip().lower().replace("-", "_") for m in (text.split(",") if isinstance(text, str) else text)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    if not names:
        raise ValueError("no metrics given")
    return sorted(dict.fromkeys(names), key=list(METRICS).index)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Y of YCbCr (ITU-R BT.601, MATLAB's rgb2ycbcr) in [16, 235], float64.

    BasicSR's `to_y_channel` step by step — float32 input scaled to [0, 1], the
    65.481/128.553/24.966 dot product + 16, back through float32 — so that numbers match
    papers evaluated with BasicSR to the last digit, not only to ~1e-6 dB.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    x = rgb.astype(np.float32) / 255.0
    y = np.dot(x, [65.481, 128.553, 24.966]) + 16.0
    y = (y / 255.0).astype(np.float32) * 255.0
    return y.astype(np.float64)


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be 0 or more, got {border}")
    return img[border:-border, border:-border] if border else img


def _check_pair(restored: np.ndarray, reference: np.ndarray) -> None:
    if restored.shape != reference.shape:
        raise ValueError(f"restored image is {restored.shape[1]}x{restored.shape[0]} but the reference is "
                         f"{reference.shape[1]}x{reference.shape[0]}")


def psnr_y(restored: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB on the Y channel, peak 255 (BasicSR `calculate_psnr`, test_y_channel=True).

    Identical images give inf, as in BasicSR: the mean over a set is then inf too, the
    honest answer for a method that returns the reference.
    """
    _check_pair(restored, reference)
    a = _crop(rgb_to_y(restored), crop_border)
    b = _crop(rgb_to_y(reference), crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 * 255.0 / mse)


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two float64 planes in [0, 255]: 11x11 Gaussian window (sigma 1.5), valid
    region only, C1 = (0.01*255)^2, C2 = (0.03*255)^2 — BasicSR's `_ssim`, itself checked
    against Wang et al.'s MATLAB code."""
    import cv2

    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels after cropping, got {a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]

    mu1, mu2 = blur(a), blur(b)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = blur(a ** 2) - mu1_sq
    sigma2_sq = blur(b ** 2) - mu2_sq
    sigma12 = blur(a * b) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def ssim_y(restored: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
    """SSIM on the Y channel (BasicSR `calculate_ssim`, test_y_channel=True)."""
    _check_pair(restored, reference)
    return _ssim_plane(_crop(rgb_to_y(restored), crop_border), _crop(rgb_to_y(reference), crop_border))


def json_number(v: float) -> float | str:
    """JSON has no infinity: identical images give PSNR inf, stored as the string "inf"."""
    return v if math.isfinite(v) else ("inf" if v > 0 else ("-inf" if v < 0 else "nan"))


def format_value(spec: MetricSpec | None, value: float | str, digits: int | None = None) -> str:
    """A score as the paper prints it (also reads the "inf" strings of `json_number`)."""
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if math.isnan(v):
        return "nan"
    if digits is None:
        digits = spec.digits if spec else 4
    return f"{v:.{digits}f}"
