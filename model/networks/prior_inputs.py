"""The per-forward inputs of the prior-guided attention, one object per UNet or ControlNet call.

Both attention layouts read the same two tensors that the frozen UNet's own forward knows
nothing about: the refined CLIP image tokens and the ControlNet's down residuals. They
travel inside diffusers' `cross_attention_kwargs` under the single key ``"sspir"``, the
path diffusers itself uses to hand extra inputs to attention layers, so nothing is stored
on any module between calls and every call is independent of the one before (CFG batches,
tiles, DDP ranks, gradient checkpointing's recomputation, which replays the same kwargs).

The layers that read it take it out again (`take`) before they call a diffusers module
that would forward unknown keys to its attention processors (which warn and ignore them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

KEY = "sspir"


@dataclass(frozen=True)
class PriorInputs:
    """image_tokens (B, N, D) or None; residuals: the ControlNet's down residuals in the order
    the ControlNet returns them (conv_in first), or None (no structure attention this call)."""

    image_tokens: torch.Tensor | None = None
    residuals: Sequence[torch.Tensor] | None = None

    def kwargs(self) -> dict[str, Any]:
        """The `cross_attention_kwargs` that carry these inputs."""
        return {KEY: self}

    def tokens_for(self, where: str, batch: int) -> torch.Tensor | None:
        if self.image_tokens is not None:
            _check_batch(where, "image_tokens", self.image_tokens, batch)
        return self.image_tokens

    def residual_for(self, where: str, index: int, batch: int, positions: int, channels: int) -> torch.Tensor | None:
        """Residual `index` as tokens (B, h·w, C), checked against the layer that reads it."""
        if self.residuals is None:
            return None
        feature = self.residuals[index]
        _check_batch(where, f"ControlNet residual {index}", feature, batch)
        tokens = feature.flatten(2).transpose(1, 2)
        if tokens.shape[1] != positions or tokens.shape[2] != channels:
            raise ValueError(
                f"{where}: ControlNet residual {index} has shape {tuple(feature.shape)}, expected {channels} channels "
                f"and {positions} positions (this layer's resolution); pass the ControlNet's down_block_res_samples "
                "in its own order")
        return tokens


def take(cross_attention_kwargs: dict[str, Any] | None, where: str) -> tuple[PriorInputs, dict[str, Any] | None]:
    """(the PriorInputs, the kwargs without them: None when nothing else is left)."""
    if not cross_attention_kwargs or KEY not in cross_attention_kwargs:
        raise ValueError(f"{where}: no prior inputs in cross_attention_kwargs[{KEY!r}]; call the UNet and ControlNet "
                         "through SSPIR (unet_forward / priors), which pass them")
    rest = {k: v for k, v in cross_attention_kwargs.items() if k != KEY}
    inputs = cross_attention_kwargs[KEY]
    if not isinstance(inputs, PriorInputs):
        raise TypeError(f"{where}: cross_attention_kwargs[{KEY!r}] is {type(inputs).__name__}, expected PriorInputs")
    return inputs, rest or None


def _check_batch(where: str, what: str, tensor: torch.Tensor, batch: int) -> None:
    if tensor.shape[0] != batch:
        raise ValueError(f"{where}: {what} has batch {tensor.shape[0]} but the hidden states have {batch} "
                         "(with classifier-free guidance, repeat the priors for both halves)")
