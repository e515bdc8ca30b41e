"""The ControlNet of SSP-IR: a trainable copy of the UNet's encoder, conditioned on the
Processor's H/8 features instead of an RGB image.

diffusers' `ControlNetModel` turns its condition into the latent grid with
`ControlNetConditioningEmbedding(conditioning_embedding_channels, conditioning_channels,
block_out_channels)`: `conv_in` (3×3, conditioning_channels → block_out_channels[0]), then for
each further entry a 3×3 conv and a stride-2 3×3 conv, then a zero-initialised 3×3
`conv_out` to the UNet's first width. With a single entry in `block_out_channels` there is
no stride-2 conv at all, so the same class, configured through ControlNetModel's own config
fields, is exactly the embedding SSP-IR needs:

    conditioning_channels = C_feat (the Processor's feature channels)
    conditioning_embedding_out_channels = (hidden,)
    → conv_in(C_feat → hidden) · SiLU · zero conv_out(hidden → block_out_channels[0]), same resolution

No subclass, no replaced submodule and no forked code: `save_pretrained` writes those two
fields into config.json and `ControlNetModel.from_pretrained` rebuilds the same embedding, so
checkpoints load with plain diffusers. At initialisation the embedding's `conv_out` and all
the ControlNet's zero convs (`controlnet_down_blocks`, `controlnet_mid_block`) are zero, so
the ControlNet adds exactly zero to the UNet.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import ControlNetModel, UNet2DConditionModel


def controlnet_from_unet(unet: UNet2DConditionModel, feature_channels: int,
                         embedding_channels: int | None = None) -> ControlNetModel:
    """A ControlNet copied from `unet` (encoder weights included) taking (B, feature_channels, h, w)
    features at the latent resolution as `controlnet_cond`.

    `embedding_channels` is the hidden width of the conditioning embedding (default: the
    UNet's first block width, 320 for SD1.5).
    """
    hidden = int(embedding_channels or unet.config.block_out_channels[0])
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=int(feature_channels),
                                           conditioning_embedding_out_channels=(hidden,))
    check_feature_controlnet(controlnet)
    return controlnet


def check_feature_controlnet(controlnet: ControlNetModel) -> None:
    """Raise unless `controlnet` embeds its condition without changing the resolution."""
    widths = tuple(controlnet.config.conditioning_embedding_out_channels or ())
    if len(widths) != 1:
        raise ValueError(
            f"this ControlNet downsamples its condition (conditioning_embedding_out_channels={widths}); "
            "SSP-IR's ControlNet takes Processor features at the latent resolution and needs a single entry")


def load_controlnet(path: str | Path, **kwargs) -> ControlNetModel:
    """Load a ControlNet written by `save_pretrained` (plain diffusers) and check it is feature-conditioned."""
    controlnet = ControlNetModel.from_pretrained(str(path), **kwargs)
    check_feature_controlnet(controlnet)
    return controlnet
