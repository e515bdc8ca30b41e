"""The "adapter" attention layout: prior-guided attention as diffusers attention processors.

This is the lighter of the two layouts (`train.attention_layout: "adapter"`; the default,
"paper", is model/networks/blocks.py). It is this project's own design, not the authors':
SSP-IR guides SD1.5 with three kinds of cross-attention in the UNet:

* text cross-attention, SD1.5's own `attn2` (frozen), on the caption embedding;
* image cross-attention in the down, mid and up blocks: the same query, keys/values from
  new linear projections of the refined CLIP image tokens, and an output projection of its
  own, initialised to zero;
* structure attention in the up blocks: the same query, keys/values from new projections
  of the ControlNet output at the matching resolution, and a zero-initialised output
  projection.

Everything hooks into diffusers through `Attention.processor`, like IP-Adapter's
processors: `PriorAttnProcessor` replaces the processor of every `attn2` and computes
`to_out(text attention) + image.to_out(image attention) + structure.to_out(structure
attention)`, SD1.5's text path computed exactly as `AttnProcessor2_0` does (with
`F.scaled_dot_product_attention`). The extra inputs travel in the UNet's
`cross_attention_kwargs` as one `PriorInputs` object (model/networks/prior_inputs.py) under
the key "sspir": the refined image tokens and the ControlNet's down-block residuals, in the
order the ControlNet returns them. diffusers' `Attention.forward` keeps only keyword
arguments that the processor's `__call__` declares and warns about the rest, and
`BasicTransformerBlock` hands the same kwargs to the self-attention `attn1`, so `attn1` gets
`PriorPassThroughProcessor`, which declares and ignores it.

Which ControlNet output a structure attention reads: an up block's resnet j concatenates
one skip connection, the down-path sample that the ControlNet's matching residual was
added to. The structure attention after that resnet takes exactly that residual: same
resolution and the channel count of that skip (the ControlNet output "at the matching
resolution", as the authors' release pairs them). With SD1.5 that is, for the up blocks at
16², 32², 64² latents (512² images): 1280, 1280, 640 channels at 16²; 640, 640, 320 at 32²;
320, 320, 320 at 64².

What cannot be reached with processors, and what was done instead:

* SD1.5's first up block (`UpBlock2D`, 8² at 512²) and last down block (`DownBlock2D`) have
  no attention layers, so they get no image or structure attention. The authors' release
  adds a new Transformer2DModel after each resnet of the first up block (forking the UNet's
  blocks); here the ControlNet's additive residuals still reach those blocks (its down
  residuals at 8² are added to the skips the first up block concatenates, its mid
  residual to the mid block output), but no attention does.
* An attention processor sees only its own layer's input, so the structure attention sits
  inside the `attn2` step of each up-block transformer (after the text cross-attention
  and before the feed-forward), not in a separate transformer after it as in the
  authors' release, and it reuses the frozen text query (as IP-Adapter does) instead of a
  new normed query.

Zero initialisation: every new output projection (weights and bias) starts at zero, and
the ControlNet starts with its zero convs, so at step 0 the UNet's noise prediction equals
SD1.5's exactly. The price is the usual one: at step 0 the gradient reaches the output
projections (and the ControlNet's zero convs) but not the key/value projections behind
them, nor the Refine Layer (it feeds only image keys/values); they receive gradient from
step 1 on, once the projections in front of them are non-zero. The structure keys/values
see the ControlNet's residuals, which are zero at step 0, so they are reached one step
later still.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn import functional as F

from model.networks.prior_inputs import PriorInputs
from model.networks.unet_layout import controlnet_residual_layout, up_block_residual_index

CONFIG_FORMAT = "ssp-ir.prior_attention"
CONFIG_VERSION = 1
_UP_ATTN = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")


@dataclass(frozen=True)
class PriorAttentionSpec:
    """Where one set of prior projections goes and its shapes."""

    name: str  # the attn2 module's name in the UNet, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    query_dim: int  # the attention's input (and output) width
    inner_dim: int  # heads × head_dim
    heads: int
    image_dim: int  # width of the refined image tokens
    structure_channels: int | None = None  # channels of the ControlNet residual it reads (up blocks only)
    structure_index: int | None = None  # that residual's position in the ControlNet's down_block_res_samples

    @property
    def key(self) -> str:
        return self.name.replace(".", "_")


class CrossBranch(nn.Module):
    """Keys/values from a context, the shared query, SDPA, then a zero-initialised output projection."""

    def __init__(self, context_dim: int, inner_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, out_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query (B, heads, L, head_dim), context (B, S, context_dim) → (B, L, out_dim)."""
        batch, heads, _, head_dim = query.shape
        dtype = self.to_out.weight.dtype  # trainable fp32 even when the frozen UNet runs in bf16
        context = context.to(dtype)
        key = self.to_k(context).view(batch, -1, heads, head_dim).transpose(1, 2)
        value = self.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query.to(key.dtype), key, value, dropout_p=0.0, is_causal=False)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, heads * head_dim))


class PriorAttention(nn.Module):
    """The trainable parts attached to one `attn2`: an image branch and, in up blocks, a structure branch."""

    def __init__(self, spec: PriorAttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.image = CrossBranch(spec.image_dim, spec.inner_dim, spec.query_dim, spec.heads)
        self.structure = (CrossBranch(spec.structure_channels, spec.inner_dim, spec.query_dim, spec.heads)
                          if spec.structure_channels else None)


class PriorAttnProcessor:
    """SD1.5's cross-attention (as AttnProcessor2_0) + image attention + structure attention.

    Not an nn.Module on purpose: its parameters live in `PriorAttentionSet` (the trainable
    side), not inside the frozen UNet, so `unet.requires_grad_(False)`, `unet.to(bf16)` and
    the UNet's state dict never touch them.
    """

    def __init__(self, layer: PriorAttention) -> None:
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 sspir: PriorInputs | None = None) -> torch.Tensor:
        spec = self.layer.spec
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False)
        text = text.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](text))

        inputs = sspir or PriorInputs()
        image_tokens = inputs.tokens_for(spec.name, batch_size)
        if image_tokens is not None:
            hidden_states = hidden_states + self.layer.image(query, image_tokens).to(hidden_states.dtype)
        if self.layer.structure is not None:
            tokens = inputs.residual_for(spec.name, spec.structure_index, batch_size, query.shape[2],
                                         spec.structure_channels)
            if tokens is not None:
                hidden_states = hidden_states + self.layer.structure(query, tokens).to(hidden_states.dtype)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class PriorPassThroughProcessor(AttnProcessor2_0):
    """SD's own SDPA processor for the layers without priors (self-attention); it declares the
    prior keyword argument so that diffusers passes it silently, and ignores it."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 sspir: PriorInputs | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def prior_specs(unet: nn.Module, image_dim: int, structure: bool = True) -> list[PriorAttentionSpec]:
    """One spec per cross-attention (`attn2`) of the UNet's down, mid and up blocks."""
    layout = controlnet_residual_layout(unet)
    specs = []
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and name.endswith("attn2") and module.is_cross_attention):
            continue
        if not name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            continue
        channels = index = None
        match = _UP_ATTN.match(name)
        if structure and match:
            index = up_block_residual_index(unet, int(match.group(1)), int(match.group(2)))
            channels = layout[index]
        specs.append(PriorAttentionSpec(name=name, query_dim=module.to_q.in_features, inner_dim=module.inner_dim,
                                        heads=module.heads, image_dim=int(image_dim), structure_channels=channels,
                                        structure_index=index))
    if not specs:
        raise ValueError("the UNet has no cross-attention layers to attach prior attention to")
    return specs


class PriorAttentionSet(nn.Module):
    """All prior-attention parameters of one UNet, as one module (one safetensors file)."""

    def __init__(self, specs: Sequence[PriorAttentionSpec]) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict({spec.key: PriorAttention(spec) for spec in self.specs})

    @classmethod
    def from_unet(cls, unet: nn.Module, image_dim: int, structure: bool = True) -> "PriorAttentionSet":
        return cls(prior_specs(unet, image_dim, structure))

    # --- config -------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "layers": [asdict(s) for s in self.specs]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PriorAttentionSet":
        if config.get("format") != CONFIG_FORMAT or config.get("version") != CONFIG_VERSION:
            raise ValueError(f"not a prior-attention config (format {config.get('format')!r}, "
                             f"version {config.get('version')!r}; expected {CONFIG_FORMAT!r} v{CONFIG_VERSION})")
        return cls([PriorAttentionSpec(**layer) for layer in config["layers"]])

    # --- hooking into the UNet ------------------------------------------------
    def check_matches(self, unet: nn.Module) -> None:
        """Raise if these specs do not fit `unet` (another UNet layout or width)."""
        image_dim = self.specs[0].image_dim
        want = prior_specs(unet, image_dim, structure=any(s.structure_channels for s in self.specs))
        if list(want) != list(self.specs):
            theirs = {s.name for s in want}
            ours = {s.name for s in self.specs}
            detail = (f"layers only here: {sorted(ours - theirs)[:3]}, only in the UNet: {sorted(theirs - ours)[:3]}"
                      if theirs != ours else "same layers, other shapes")
            raise ValueError(f"prior attention does not match this UNet ({detail})")

    def install(self, unet: nn.Module) -> None:
        """Set PriorAttnProcessor on each listed attn2 and the pass-through processor everywhere else."""
        self.check_matches(unet)
        by_name = {f"{spec.name}.processor": PriorAttnProcessor(self.layers[spec.key]) for spec in self.specs}
        passthrough = PriorPassThroughProcessor()
        unet.set_attn_processor({name: by_name.get(name, passthrough) for name in unet.attn_processors})

    # --- parameter groups -----------------------------------------------------
    def image_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.image.parameters()

    def structure_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            if layer.structure is not None:
                yield from layer.structure.parameters()


def uninstall(unet: nn.Module) -> None:
    """Back to diffusers' SDPA processor everywhere (SD1.5 without priors)."""
    unet.set_attn_processor(AttnProcessor2_0())
