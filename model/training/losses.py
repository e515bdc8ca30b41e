"""SSP-IR's training loss: diffusion MSE + λ_rgb·Σ_s L1(RGB_s, GT_s) + λ_fft·Σ_s L1(FFT(RGB_s), FFT(GT_s)).

The diffusion term compares the UNet's prediction with the target of the scheduler's
prediction type (the noise ε for SD1.5, the velocity for v-prediction models; see
model/training/trainer.py `diffusion_target`); it is logged as "eps".

The Processor's RGB heads are supervised at 1/2, 1/4 and 1/8 of the GT size against
the GT resized to each scale, in pixel space and in frequency (real and imaginary parts
of a 2-D FFT), which keeps its features tied to image structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gt_pyramid(hq: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The GT (B, 3, H, W) in [-1, 1] resized to each RGB head's size (area: exact box filter)."""
    return [F.interpolate(hq, size=s, mode="area") for s in sizes]


def rgb_l1(rgbs: list[torch.Tensor], gts: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.l1_loss(r.float(), g.float()) for r, g in zip(rgbs, gts))  # type: ignore[return-value]


def fft_l1(rgbs: list[torch.Tensor], gts: list[torch.Tensor]) -> torch.Tensor:
    """L1 between unnormalised 2-D FFTs, real and imaginary parts stacked (the usual FFT loss;
    λ_fft = 0.01 offsets its larger magnitude)."""
    total = 0.0
    for r, g in zip(rgbs, gts):
        fr = torch.view_as_real(torch.fft.fft2(r.float(), norm="backward"))
        fg = torch.view_as_real(torch.fft.fft2(g.float(), norm="backward"))
        total = total + F.l1_loss(fr, fg)
    return total  # type: ignore[return-value]


def sspir_loss(pred: torch.Tensor, target: torch.Tensor, rgbs: list[torch.Tensor], hq: torch.Tensor,
               lambda_rgb: float, lambda_fft: float) -> dict[str, torch.Tensor]:
    """Each term and the total, so every term can be logged and checked on its own."""
    gts = gt_pyramid(hq.float(), [tuple(r.shape[-2:]) for r in rgbs])
    eps = F.mse_loss(pred.float(), target.float())
    l_rgb = rgb_l1(rgbs, gts)
    l_fft = fft_l1(rgbs, gts)
    return {"loss": eps + lambda_rgb * l_rgb + lambda_fft * l_fft, "eps": eps, "rgb": l_rgb, "fft": l_fft}
