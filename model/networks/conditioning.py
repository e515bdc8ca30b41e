"""The paper layout's Processor: the ControlNet's own conditioning embedding plus RGB heads.

In the authors' release the Processor is not a network of its own: it is the ControlNet's
standard conditioning embedding (diffusers' `ControlNetConditioningEmbedding` with widths
16, 32, 96, 256: conv_in at full resolution, then per stage a 3×3 conv and a stride-2 conv,
SiLU after each, then a zero-initialised conv_out to the UNet's first width) with a 3×3
`to_rgb` head after each stride-2 stage (H/2, H/4, H/8), supervised like our adapter
Processor's heads (L1 + FFT-L1 against the GT at that scale).

`RGBHeads` is that trainable part: the three heads only. Its forward walks the
ControlNet's embedding layer by layer (the same conv_in / blocks / SiLU / conv_out sequence
as `ControlNetConditioningEmbedding.forward`; a test checks the result equals it bit for
bit) and taps the three stages. The ControlNet must then not embed the condition a second
time, so `install_precomputed_embedding` gives its embedding the subclass
`PrecomputedConditioningEmbedding` in place, whose forward returns the embedding it is
handed. The ControlNet itself stays a plain diffusers `ControlNetModel` (RGB conditioning,
standard config and state dict: `save_pretrained` / `from_pretrained` round-trip).

Input: the LQ bicubic-upsampled ×4, in the images' [-1, 1] space (the release conditions on
the LQ image too); RGB outputs in [-1, 1].
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

RELEASE_CHANNELS = (16, 32, 96, 256)


class RGBHeads(ModelMixin, ConfigMixin):
    """3×3 RGB heads after each stride-2 stage of a ControlNet conditioning embedding of `channels`."""

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = RELEASE_CHANNELS, image_channels: int = 3) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the paper layout's Processor has three stride-2 stages (four widths); got {tuple(channels)}")
        self.to_rgb = nn.ModuleList(nn.Conv2d(c, image_channels, 3, padding=1) for c in channels[1:])

    def check(self, embedding: ControlNetConditioningEmbedding) -> None:
        widths = [embedding.conv_in.out_channels] + [b.out_channels for b in embedding.blocks[1::2]]
        if tuple(widths) != tuple(self.config.channels) or len(embedding.blocks) != 2 * len(self.to_rgb):
            raise ValueError(f"the ControlNet's conditioning embedding has widths {tuple(widths)}, the Processor's "
                             f"RGB heads were made for {tuple(self.config.channels)}")

    def forward(self, embedding: ControlNetConditioningEmbedding, image: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embedding of `image` (B, C_unet, H/8, W/8), [rgb H/2, rgb H/4, rgb H/8])."""
        x = F.silu(embedding.conv_in(image))
        rgbs = []
        for k, block in enumerate(embedding.blocks):
            x = F.silu(block(x))
            if k % 2:  # after each stride-2 conv
                rgbs.append(self.to_rgb[k // 2](x))
        return embedding.conv_out(x), rgbs


class PrecomputedConditioningEmbedding(ControlNetConditioningEmbedding):
    """The ControlNet's embedding when SSP-IR has already computed it (with the RGB heads)."""

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        if conditioning.shape[1] != self.conv_out.out_channels:
            raise ValueError(f"this ControlNet takes the conditioning embedding computed by the Processor "
                             f"({self.conv_out.out_channels} channels at the latent size), got {tuple(conditioning.shape)}; "
                             "call it through SSPIR.priors")
        return conditioning


def install_precomputed_embedding(controlnet: ControlNetModel) -> None:
    emb = controlnet.controlnet_cond_embedding
    if type(emb) not in (ControlNetConditioningEmbedding, PrecomputedConditioningEmbedding):
        raise TypeError(f"unexpected conditioning embedding {type(emb).__name__}")
    emb.__class__ = PrecomputedConditioningEmbedding


def rgb_controlnet_from_unet(unet: UNet2DConditionModel, channels: tuple[int, ...] = RELEASE_CHANNELS,
                             image_channels: int = 3) -> ControlNetModel:
    """The release's ControlNet: a copy of the UNet's encoder with the standard RGB conditioning embedding."""
    return ControlNetModel.from_unet(unet, conditioning_channels=int(image_channels),
                                     conditioning_embedding_out_channels=tuple(int(c) for c in channels))


def check_rgb_controlnet(controlnet: ControlNetModel, heads: RGBHeads) -> None:
    heads.check(controlnet.controlnet_cond_embedding)
    if controlnet.config.conditioning_channels != heads.config.image_channels:
        raise ValueError(f"the ControlNet is conditioned on {controlnet.config.conditioning_channels} channels, the "
                         f"Processor's RGB heads on {heads.config.image_channels}")
