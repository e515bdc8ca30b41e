"""Settings of the degradation stage (the manifest's ``degrade`` section).

Names follow Real-ESRGAN's ``train_realesrgan_x4plus.yml`` so that people who know
that file can read ours; defaults are the values SeeSR and SSP-IR train with
(DESIGN section 4). Job-level settings (shard size, failure threshold, input limits)
live here too because they belong to the same manifest section.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.settings import Settings

GAUSSIAN_FAMILY = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class DegradeConfig(Settings):
    # --- job-level ---
    gt_size: int = 512
    scale: int = 4
    crops_per_image: int = 1
    rows_per_shard: int = 500
    max_failed_fraction: float = 0.01
    min_side: int = 64
    max_pixels: int = 100_000_000
    png_compress_level: int = 1
    use_hflip: bool = True
    # --- GT sharpening (BasicSR usm_sharp) ---
    usm_gt: bool = True
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    # --- first degradation ---
    kernel_range: tuple[int, int] = (7, 21)
    kernel_list: tuple[str, ...] = GAUSSIAN_FAMILY
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    # --- second degradation ---
    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = GAUSSIAN_FAMILY
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    final_sinc_prob: float = 0.8
    resize_modes: tuple[str, ...] = RESIZE_MODES

    # Lists whose length the manifest may choose (the others have a fixed arity).
    VARIABLE_LENGTH = frozenset({"kernel_list", "kernel_list2", "kernel_prob", "kernel_prob2", "resize_modes"})

    @property
    def lq_size(self) -> int:
        return self.gt_size // self.scale

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.gt_size <= 0 or self.scale <= 0 or self.gt_size % self.scale:
            out.append(f"gt_size ({self.gt_size}) must be a positive multiple of scale ({self.scale})")
        lo, hi = self.kernel_range
        if lo % 2 == 0 or hi % 2 == 0 or not 3 <= lo <= hi:
            out.append(f"kernel_range {list(self.kernel_range)} must be two odd sizes, 3 <= low <= high")
        for name in ("kernel_list", "kernel_list2"):
            bad = [k for k in getattr(self, name) if k not in GAUSSIAN_FAMILY]
            if bad:
                out.append(f"{name} has unknown kernel types {bad}; known: {list(GAUSSIAN_FAMILY)}")
        for lst, prob in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, lst)) != len(getattr(self, prob)):
                out.append(f"{prob} needs one probability per entry of {lst}")
        for name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            p = getattr(self, name)
            if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
                out.append(f"{name} {list(p)} must be non-negative and sum to 1")
        if len(self.resize_prob) != 3 or len(self.resize_prob2) != 3:
            out.append("resize_prob and resize_prob2 are [up, down, keep]")
        bad_modes = [m for m in self.resize_modes if m not in RESIZE_MODES]
        if bad_modes or not self.resize_modes:
            out.append(f"resize_modes {list(self.resize_modes)} must be drawn from {list(RESIZE_MODES)}")
        for name in (
            "sinc_prob", "sinc_prob2", "second_blur_prob", "final_sinc_prob",
            "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
            "gray_noise_prob2", "max_failed_fraction",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                out.append(f"{name} ({v}) must lie in [0, 1]")
        for name in (
            "blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range",
            "betap_range2", "resize_range", "resize_range2", "noise_range", "noise_range2",
            "poisson_scale_range", "poisson_scale_range2", "jpeg_range", "jpeg_range2",
        ):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                out.append(f"{name} {[lo, hi]} must be [low, high] with 0 <= low <= high")
        for name in ("jpeg_range", "jpeg_range2"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 100:
                out.append(f"{name} {[lo, hi]} must lie within [1, 100]")
        if self.crops_per_image < 1 or self.rows_per_shard < 1:
            out.append("crops_per_image and rows_per_shard must be at least 1")
        if self.min_side < 1 or self.max_pixels < 1:
            out.append("min_side and max_pixels must be at least 1")
        if not 0 <= self.png_compress_level <= 9:
            out.append("png_compress_level must lie in [0, 9]")
        return out



    def output_affecting(self) -> dict[str, Any]:
        """Settings that change the bytes of a pair (job-level knobs excluded)."""
        d = self.to_dict()
        for k in ("rows_per_shard", "max_failed_fraction"):
            d.pop(k)
        return d

