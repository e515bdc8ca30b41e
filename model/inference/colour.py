"""Colour correction of a restoration towards its LQ (diffusion models drift in global colour;
the LQ's low frequencies are trustworthy)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

COLOR_FIXES = ("none", "adain", "wavelet")


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std to the reference's (AdaIN, as StableSR/SeeSR):
    diffusion models drift in global colour; the LQ's colour statistics are trustworthy."""
    m_i, s_i = _mean_std(image)
    m_r, s_r = _mean_std(reference)
    return (image - m_i) / s_i * s_r + m_r


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): à-trous decomposition with dilations 1, 2, 4, 8, 16."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The restoration's high frequencies over the reference's lowest band (StableSR/SeeSR's
    wavelet_color_fix): keeps the generated detail and takes colour and tone from the LQ."""
    return _wavelet_split(image)[0] + _wavelet_split(reference)[1]


def color_fix(image: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] corrected towards `reference` (the LQ upsampled, same size)."""
    if mode == "none":
        return image
    fix = {"adain": adain_color_fix, "wavelet": wavelet_color_fix}[mode]
    return fix(image.float(), reference.float()).clamp(-1, 1)
