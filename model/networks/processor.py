"""The Processor: a small constrained conv net that turns the LQ image into structure features.

SSP-IR's structure prior. The LQ image, bicubic-upsampled ×4 to the HQ size H (512 at full
size) and scaled to [-1, 1], goes through a stem at full resolution and three stride-2
stages (H/2, H/4, H/8). Each stage ends in an RGB head (a 3×3 conv, no activation: its
output lives in the same [-1, 1] space as the images) whose output is compared with the GT
downsampled to that scale (L1 + FFT-L1, in the trainer). Those losses are what "constrain"
the Processor: its features must carry a degradation-free image at every scale. The last
stage is projected to `feature_channels` at H/8, the latent resolution, and conditions the
ControlNet (model/networks/controlnet.py).

The authors' release builds the same thing inside the ControlNet's conditioning embedding
(widths 16/32/96/256 plus per-scale `to_rgb` convs); here it is a module of its own, with
widths that default to 64/128/256 and a residual block per stage.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Processor(ModelMixin, ConfigMixin):
    """LQ↑ (B, 3, H, W) in [-1, 1] → (features (B, C_feat, H/8, W/8), [rgb H/2, rgb H/4, rgb H/8]).

    Args:
        in_channels: image channels.
        stem_channels: width of the one conv at full resolution (kept small: at 512² it
            is the most expensive layer in memory).
        channels: widths of the three stride-2 stages (H/2, H/4, H/8).
        blocks_per_stage: residual blocks after each stride-2 conv.
        feature_channels: channels of the output features (320 = SD1.5's first UNet block).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, stem_channels: int = 32, channels: tuple[int, ...] = (64, 128, 256),
                 blocks_per_stage: int = 1, feature_channels: int = 320) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"the Processor has three stages (H/2, H/4, H/8); got channels={tuple(channels)}")
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1)
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        prev = stem_channels
        for width in channels:
            self.downs.append(nn.Conv2d(prev, width, 3, stride=2, padding=1))
            self.stages.append(nn.Sequential(*[_ResBlock(width) for _ in range(blocks_per_stage)]))
            self.to_rgb.append(nn.Conv2d(width, in_channels, 3, padding=1))
            prev = width
        self.to_features = nn.Conv2d(prev, feature_channels, 3, padding=1)

    @property
    def downscale(self) -> int:
        return 2 ** len(self.downs)

    def forward(self, lq_up: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if lq_up.ndim != 4 or lq_up.shape[-1] % self.downscale or lq_up.shape[-2] % self.downscale:
            raise ValueError(f"Processor input must be (B, C, H, W) with H and W divisible by {self.downscale}; "
                             f"got {tuple(lq_up.shape)}")
        x = F.silu(self.stem(lq_up))
        rgbs = []
        for down, stage, head in zip(self.downs, self.stages, self.to_rgb):
            x = stage(F.silu(down(x)))
            rgbs.append(head(F.silu(x)))
        return self.to_features(F.silu(x)), rgbs
