"""The Refine Layer: CLIP image patch tokens of the LQ image → tokens for image cross-attention.

Three linear layers with LayerNorm + LeakyReLU after the first two (the paper's Refine
Layer; the authors' release builds the same stack as `TPBNet`). The frozen CLIP encoder sees
a degraded image; this trainable map is where the model learns to pull the semantic part
out of those tokens. Input (B, 256, in_dim = 1024 for ViT-L/14), output (B, 256, out_dim),
by default the UNet's cross_attention_dim.

`kind="linear"` is Table III's ablation: the stack replaced by one linear layer in → out
(`train.refine: "linear"`; hidden_dim and negative_slope are then unused). The kind is in
config.json, so `from_pretrained` rebuilds the same one.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class RefineLayer(ModelMixin, ConfigMixin):
    """mlp: Linear(in→hidden) LN LeakyReLU → Linear(hidden→hidden) LN LeakyReLU → Linear(hidden→out);
    linear: Linear(in→out)."""

    @register_to_config
    def __init__(self, in_dim: int = 1024, hidden_dim: int = 1024, out_dim: int = 768,
                 negative_slope: float = 0.01, kind: str = "mlp") -> None:
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(negative_slope),
                nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(negative_slope),
                nn.Linear(hidden_dim, out_dim),
            )
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            raise ValueError(f"RefineLayer kind must be mlp or linear, got {kind!r}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.config.in_dim:
            raise ValueError(f"RefineLayer expects tokens of width {self.config.in_dim}, got {tuple(tokens.shape)}")
        return self.net(tokens)
