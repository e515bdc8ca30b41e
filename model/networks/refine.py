"""The Refine Layer: CLIP image patch tokens of the LQ image → tokens for image cross-attention.

Three linear layers with LayerNorm + LeakyReLU after the first two (the paper's Refine
Layer; the authors' release builds the same stack as `TPBNet`). The frozen CLIP encoder sees
a degraded image; this trainable map is where the model learns to pull the semantic part
out of those tokens. Input (B, 256, in_dim = 1024 for ViT-L/14), output (B, 256, out_dim),
by default the UNet's cross_attention_dim.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class RefineLayer(ModelMixin, ConfigMixin):
    """Linear(in→hidden) LN LeakyReLU → Linear(hidden→hidden) LN LeakyReLU → Linear(hidden→out)."""

    @register_to_config
    def __init__(self, in_dim: int = 1024, hidden_dim: int = 1024, out_dim: int = 768,
                 negative_slope: float = 0.01) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.config.in_dim:
            raise ValueError(f"RefineLayer expects tokens of width {self.config.in_dim}, got {tuple(tokens.shape)}")
        return self.net(tokens)
