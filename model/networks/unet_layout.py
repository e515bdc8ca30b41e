"""Where a ControlNet residual goes in the UNet: the facts both attention layouts pair by.

The UNet's down path (and the ControlNet's copy of it) emits one skip per resnet and per
downsampler, conv_in's output first; the up path consumes them from the end, one per
resnet. Structure attention reads the ControlNet residual that was added to the skip its
resnet concatenates, so these two functions are the whole mapping.
"""

from __future__ import annotations

from torch import nn


def controlnet_residual_layout(unet: nn.Module) -> list[int]:
    """Channels of each down-block residual, in the order UNet/ControlNet produce them:
    conv_in, then every resnet (+attention) output of each down block, then its downsampler."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [resnet.out_channels for resnet in block.resnets]
        if getattr(block, "downsamplers", None) is not None:
            channels += [ds.out_channels for ds in block.downsamplers]
    return channels


def up_block_residual_index(unet: nn.Module, block: int, layer: int) -> int:
    """Index (in the ControlNet's down residuals) of the skip that up block `block`'s resnet `layer` concatenates.

    diffusers hands up block i the last len(resnets) residuals not yet used and each resnet
    pops the last one, so up blocks consume the residual list from the end.
    """
    total = len(controlnet_residual_layout(unet))
    used = sum(len(unet.up_blocks[k].resnets) for k in range(block))
    return total - 1 - used - layer
