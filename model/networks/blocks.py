"""The "paper" attention layout: prior-guided attention as full diffusers transformer blocks.

This is the layout of the authors' release (github.com/zyhrainbow/SSP-IR, `models/` and
`train.py`), rebuilt from diffusers' own classes:

* image cross-attention: a new `Transformer2DModel` (GroupNorm, proj_in, self-attention,
  cross-attention to the refined CLIP tokens, GEGLU feed-forward, proj_out) runs right
  **before** every text transformer (`attentions[j]`) of the UNet's down, mid and up blocks
  and of the ControlNet's down and mid blocks, so the implicit semantic prior also shapes
  the structure controls;
* structure (pixel) attention: a new `Transformer2DModel` whose keys/values are the
  ControlNet residual paired with the skip of that position runs **after** every up-block
  resnet: after the resnet + image + text transformers of the cross-attention up blocks (the
  release's order) and directly after each resnet of the attention-free `UpBlock2D` (8² at
  512²), 12 in SD1.5.

How it hooks in without forking the UNet or changing its state dict: the frozen
`Transformer2DModel`s that sit at those places are given the subclass
`PriorTransformer2DModel` in place (`module.__class__ = ...`, no new module, no copy of a
weight): its `forward` runs the site's new image transformer, then diffusers' own
`Transformer2DModel.forward` (super()), then the site's structure transformer. Each
`UpBlock2D` becomes `StructureUpBlock2D`, which declares `has_cross_attention` so that the
UNet hands it `cross_attention_kwargs`, and runs the block's own resnets and upsampler in
`UpBlock2D.forward`'s order with a structure transformer after each resnet (the one place
where a diffusers loop is restated: an `UpBlock2D` gives its resnets no extra inputs; the
test that the paper layout at initialisation equals SD1.5 exercises it). The new
transformers are *not* registered under the UNet or the ControlNet: they live in
`PriorBlocks` (a trainable part, one safetensors file), the site only references them, so
`unet.state_dict()` stays SD1.5's, `unet.to(bfloat16)` leaves them fp32, and the
ControlNet's `save_pretrained` writes a plain diffusers ControlNet.

The per-forward inputs (image tokens, ControlNet residuals) arrive in `cross_attention_kwargs`
as one `PriorInputs` (model/networks/prior_inputs.py); each site takes it out before calling
diffusers' forward, so the attention processors inside never see it.

Start: every new transformer's `proj_out` (weight and bias) is zero, so each adds exactly
zero to its residual stream: at step 0 the model is SD1.5 plus a zero ControlNet. The
release keeps diffusers' default initialisation (a random proj_out); docs/model.md says why
this project keeps the zero start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import UpBlock2D
from torch import nn

from model.networks.prior_inputs import take
from model.networks.unet_layout import controlnet_residual_layout, up_block_residual_index

CONFIG_FORMAT = "ssp-ir.prior_blocks"
CONFIG_VERSION = 1
IMAGE, STRUCTURE = "image", "structure"
# The Transformer2DModel fields a new block copies from the UNet's own transformers, so that it
# is built exactly as diffusers builds the UNet's (norm groups, projection kind, upcasting, ...).
_TEMPLATE_KEYS = ("norm_num_groups", "use_linear_projection", "only_cross_attention", "upcast_attention",
                  "norm_type", "norm_elementwise_affine", "norm_eps", "attention_type", "activation_fn",
                  "attention_bias", "dropout", "num_layers")


@dataclass(frozen=True)
class BlockSite:
    """One new transformer: where it runs and how it is built."""

    model: str  # "unet" or "controlnet"
    path: str  # the module it attaches to: a text transformer "down_blocks.0.attentions.1" or a resnet "up_blocks.0.resnets.2"
    kind: str  # IMAGE or STRUCTURE
    config: dict  # Transformer2DModel config (from_config)
    residual_index: int | None = None  # STRUCTURE: the ControlNet residual it reads

    @property
    def key(self) -> str:
        return f"{self.model}__{self.path.replace('.', '_')}__{self.kind}"

    @property
    def where(self) -> str:
        return f"{self.model}.{self.path}"

    @property
    def group(self) -> str:
        """The parameter-count group (docs/model.md's table)."""
        return "structure_attention" if self.kind == STRUCTURE else f"image_attention_{self.model}"


def _template(unet: nn.Module) -> dict[str, Any]:
    for module in unet.modules():
        if isinstance(module, Transformer2DModel):
            cfg = dict(module.config)
            return {k: cfg[k] for k in _TEMPLATE_KEYS if k in cfg}
    raise ValueError("the UNet has no transformer blocks to take the prior blocks' configuration from")


def _heads(unet: nn.Module, up_block: int) -> int:
    """The UNet's attention heads for up block `up_block` (diffusers' `attention_head_dim` means heads in SD1.5)."""
    cfg = unet.config
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    if isinstance(heads, (list, tuple)):
        heads = list(reversed(heads))[up_block]
    return int(heads)


def _config(template: dict[str, Any], channels: int, heads: int, context_dim: int) -> dict[str, Any]:
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    return {**template, "num_attention_heads": heads, "attention_head_dim": channels // heads,
            "in_channels": channels, "cross_attention_dim": int(context_dim)}


def _text_config(module: Transformer2DModel, template: dict[str, Any], context_dim: int) -> dict[str, Any]:
    cfg = module.config
    return {**template, "num_attention_heads": cfg.num_attention_heads, "attention_head_dim": cfg.attention_head_dim,
            "in_channels": cfg.in_channels, "cross_attention_dim": int(context_dim)}


def text_transformers(model: nn.Module) -> Iterator[tuple[str, Transformer2DModel]]:
    """(path, module) of every cross-attention transformer in the down, mid and up blocks."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    if getattr(model, "mid_block", None) is not None:
        blocks.append(("mid_block", model.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", []))]
    for prefix, block in blocks:
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            if isinstance(attn, Transformer2DModel):
                yield f"{prefix}.attentions.{j}", attn


def paper_sites(unet: nn.Module, image_dim: int, image: bool = True, structure: bool = True) -> list[BlockSite]:
    """The release's sites for `unet` (and the ControlNet copied from it): image attention before
    every text transformer of both (ControlNet: its down and mid blocks, which it copies), structure
    attention after every up-block resnet. `image` / `structure` False leave that kind out
    (the ablation switches: off removes the blocks)."""
    template = _template(unet)
    layout = controlnet_residual_layout(unet)
    sites: list[BlockSite] = []
    if image:
        for model in ("unet", "controlnet"):
            for path, attn in text_transformers(unet):
                if model == "controlnet" and path.startswith("up_blocks."):
                    continue  # the ControlNet copies the down and mid blocks only
                sites.append(BlockSite(model, path, IMAGE, _text_config(attn, template, image_dim)))
    if structure:
        for i, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                index = up_block_residual_index(unet, i, j)
                if attentions:
                    cfg = _text_config(attentions[j], template, layout[index])
                    path = f"up_blocks.{i}.attentions.{j}"
                elif isinstance(block, UpBlock2D):  # StructureUpBlock2D once installed
                    cfg = _config(template, resnet.out_channels, _heads(unet, i), layout[index])
                    path = f"up_blocks.{i}.resnets.{j}"
                else:
                    raise ValueError(f"up_blocks.{i} is a {type(block).__name__}; the paper layout knows "
                                     "CrossAttnUpBlock2D and UpBlock2D")
                sites.append(BlockSite("unet", path, STRUCTURE, cfg, residual_index=index))
    return sites


def _new_block(config: dict[str, Any]) -> Transformer2DModel:
    block = Transformer2DModel.from_config(config)
    nn.init.zeros_(block.proj_out.weight)  # adds exactly zero at the start: the model is SD1.5 at step 0
    nn.init.zeros_(block.proj_out.bias)
    return block


def _run(block: Transformer2DModel, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A trainable (fp32) block on the frozen stream, which may be bf16: in its dtype, back in the stream's."""
    dtype = block.proj_in.weight.dtype
    out = block(hidden_states.to(dtype), encoder_hidden_states=context.to(dtype), return_dict=False)[0]
    return out.to(hidden_states.dtype)


@dataclass
class _Site:
    """What a retyped module runs besides itself (plain object: never registered as a submodule)."""

    where: str
    image: Transformer2DModel | None = None
    structure: Transformer2DModel | None = None
    residual_index: int | None = None


class PriorTransformer2DModel(Transformer2DModel):
    """A frozen text transformer with its site's new image transformer before it and its
    structure transformer after it. Given to existing modules in place (see the module doc)."""

    _sspir_site: _Site

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.LongTensor | None = None, added_cond_kwargs: dict[str, Any] | None = None,
                class_labels: torch.LongTensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> Any:
        site = self._sspir_site
        inputs, cross_attention_kwargs = take(cross_attention_kwargs, site.where)
        batch, channels, height, width = hidden_states.shape
        if site.image is not None:
            tokens = inputs.tokens_for(site.where, batch)
            if tokens is not None:
                hidden_states = _run(site.image, hidden_states, tokens)
        out = super().forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, class_labels,
                              cross_attention_kwargs, attention_mask, encoder_attention_mask, return_dict=False)[0]
        if site.structure is not None:
            context = inputs.residual_for(site.where, site.residual_index, batch, height * width,
                                          site.structure.config.cross_attention_dim)
            if context is not None:
                out = _run(site.structure, out, context)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class StructureUpBlock2D(UpBlock2D):
    """An `UpBlock2D` with a structure transformer after each resnet (see the module doc)."""

    has_cross_attention = True  # so the UNet passes cross_attention_kwargs (UpBlock2D takes none)
    _sspir_sites: list[_Site]

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: int | None = None,
                encoder_hidden_states: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        sites = self._sspir_sites
        inputs, _ = take(cross_attention_kwargs, sites[0].where)
        if getattr(self, "s1", None):  # diffusers' FreeU rescales the skips inside UpBlock2D.forward
            raise NotImplementedError("FreeU is not supported together with the paper layout's structure attention")
        for resnet, site in zip(self.resnets, sites):
            skip = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(resnet, hidden_states, temb)
            else:
                hidden_states = resnet(hidden_states, temb)
            if site.structure is not None:
                batch, _, height, width = hidden_states.shape
                context = inputs.residual_for(site.where, site.residual_index, batch, height * width,
                                              site.structure.config.cross_attention_dim)
                if context is not None:
                    hidden_states = _run(site.structure, hidden_states, context)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


def _retype(module: nn.Module, cls: type, base: type) -> None:
    if type(module) not in (base, cls):
        raise TypeError(f"cannot attach prior blocks to a {type(module).__name__} (expected {base.__name__})")
    module.__class__ = cls


class PriorBlocks(nn.Module):
    """All new transformers of the paper layout, as one module (one safetensors file)."""

    def __init__(self, sites: Sequence[BlockSite], fresh: bool = True) -> None:
        super().__init__()
        self.sites = tuple(sites)
        if len({s.key for s in self.sites}) != len(self.sites):
            raise ValueError("two prior blocks share a site")
        make = _new_block if fresh else Transformer2DModel.from_config
        self.blocks = nn.ModuleDict({s.key: make(s.config) for s in self.sites})

    @classmethod
    def for_unet(cls, unet: nn.Module, image_dim: int, image: bool = True, structure: bool = True) -> "PriorBlocks":
        return cls(paper_sites(unet, image_dim, image, structure))

    # --- config -------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "sites": [asdict(s) for s in self.sites]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PriorBlocks":
        if config.get("format") != CONFIG_FORMAT or config.get("version") != CONFIG_VERSION:
            raise ValueError(f"not a prior-blocks config (format {config.get('format')!r}, version "
                             f"{config.get('version')!r}; expected {CONFIG_FORMAT!r} v{CONFIG_VERSION})")
        return cls([BlockSite(**site) for site in config["sites"]], fresh=False)

    def kinds(self) -> set[str]:
        """The kinds of transformer present (IMAGE, STRUCTURE): the ablation switches leave one or both out."""
        return {s.kind for s in self.sites}

    @property
    def image_dim(self) -> int | None:
        dims = {s.config["cross_attention_dim"] for s in self.sites if s.kind == IMAGE}
        return dims.pop() if len(dims) == 1 else None

    # --- hooking in ------------------------------------------------------------
    def check_matches(self, unet: nn.Module) -> None:
        """Raise unless these sites are the ones `unet` has (same paths, shapes and residual pairing)."""
        kinds = self.kinds()
        want = paper_sites(unet, self.image_dim or 0, IMAGE in kinds, STRUCTURE in kinds)
        if [asdict(s) for s in want] != [asdict(s) for s in self.sites]:
            ours, theirs = {s.key for s in self.sites}, {s.key for s in want}
            detail = (f"sites only here: {sorted(ours - theirs)[:3]}, only in the UNet: {sorted(theirs - ours)[:3]}"
                      if ours != theirs else "same sites, other shapes")
            raise ValueError(f"the prior blocks do not match this UNet ({detail})")

    def install(self, unet: nn.Module, controlnet: nn.Module) -> None:
        """Retype every text transformer of both models and every UpBlock2D of the UNet (see the module doc)."""
        self.check_matches(unet)
        by_place = {(s.model, s.path, s.kind): self.blocks[s.key] for s in self.sites}
        index = {(s.model, s.path): s.residual_index for s in self.sites if s.kind == STRUCTURE}
        for name, model in (("unet", unet), ("controlnet", controlnet)):
            for path, attn in text_transformers(model):
                _retype(attn, PriorTransformer2DModel, Transformer2DModel)
                attn._sspir_site = _Site(f"{name}.{path}", by_place.get((name, path, IMAGE)),
                                         by_place.get((name, path, STRUCTURE)), index.get((name, path)))
        for i, block in enumerate(unet.up_blocks):
            if getattr(block, "attentions", None) or type(block) not in (UpBlock2D, StructureUpBlock2D):
                continue
            paths = [f"up_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
            sites = [_Site(f"unet.{p}", None, by_place.get(("unet", p, STRUCTURE)), index.get(("unet", p)))
                     for p in paths]
            if any(s.structure is not None for s in sites):
                _retype(block, StructureUpBlock2D, UpBlock2D)
                block._sspir_sites = sites

    # --- parameter groups -------------------------------------------------------
    def group_parameters(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        for s in self.sites:
            groups.setdefault(s.group, []).extend(self.blocks[s.key].parameters())
        return groups

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        for block in self.blocks.values():
            if enable:
                block.enable_gradient_checkpointing()
            else:
                block.disable_gradient_checkpointing()


def uninstall(*models: nn.Module) -> None:
    """Back to plain diffusers classes (SD1.5 without the prior blocks)."""
    for model in models:
        for module in model.modules():
            if type(module) is PriorTransformer2DModel:
                module.__class__ = Transformer2DModel
                del module._sspir_site
            elif type(module) is StructureUpBlock2D:
                module.__class__ = UpBlock2D
                del module._sspir_sites

