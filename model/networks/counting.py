"""Parameter counts of SSP-IR for a manifest's `train` section, built on the meta device.

No weights and no download: the frozen parts come from the configs of the folders that
`pretrained` / `image_encoder` name when those are local folders, otherwise from SD1.5's
published configs written below (UNet, VAE, CLIP ViT-L/14 text encoder) and timm's own
architecture for the image encoder (`pretrained=False`). Everything is instantiated under
`torch.device("meta")`: shapes only, so the full-size count takes seconds and no memory.
The CLI is `python -m model.summary` (model/summary.py).

Besides the model built for the manifest's `attention_layout` it rebuilds, independently of
model/networks/blocks.py, the trainable count of the authors' public release
(github.com/zyhrainbow/SSP-IR) from the same UNet config: the paper layout must equal it
part by part (tests/test_model.py), and docs/model.md tabulates both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

PAPER_TRAINABLE_M = 997.80
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072}
# The authors' release (train.py: `TPBNet(last_dim=512)`, UNet/ControlNet built with
# use_image_cross_attention=True, image_cross_attention_dim 512, pixel attentions in every up block).
RELEASE_IMAGE_CROSS_DIM = 512
RELEASE_CONDITIONING_CHANNELS = (16, 32, 96, 256)
# The paper layout's parts ↔ the release table's rows (docs/model.md).
PAPER_TO_RELEASE = {"controlnet": "controlnet", "image_attention_controlnet": "image_attention_controlnet",
                    "image_attention_unet": "image_attention_unet", "structure_attention": "pixel_attention_unet",
                    "refine": "refine_tpbnet", "processor": "to_rgb_heads"}


def _count(params: Iterable[nn.Parameter]) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def read_train_section(manifest: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest's `train` section with every `extends` merged, ${VAR}-expanded (only this
    section: other sections may name data folders that do not exist on this machine), and
    its ablation switches checked."""
    from pipeline.core.manifest import ManifestError, _expand, read_resolved

    path = Path(manifest)
    raw, _ = read_resolved(path)
    train = raw.get("train")
    if not isinstance(train, dict):
        raise ManifestError(f"{path}: no `train` section (an object with `pretrained` and `image_encoder`)")
    train = _expand(train, "train", path)
    for key in ("pretrained", "image_encoder"):
        if not isinstance(train.get(key), str):
            raise ManifestError(f"{path}: train.{key} should be a string (a hub id / timm name or a folder)")
    if "processor" in train and not isinstance(train["processor"], dict):
        raise ManifestError(f"{path}: train.processor should be an object of constructor arguments")
    from model.networks.layouts import DEFAULT_LAYOUT
    from model.networks.switches import PriorSwitches

    problems = PriorSwitches.from_dict(train).problems(train.get("attention_layout", DEFAULT_LAYOUT))
    if problems:
        raise ManifestError(f"{path}: train: {'; '.join(problems)}")
    return train


def _frozen_configs(pretrained: str) -> tuple[dict[str, Any], dict[str, Any], Any, str]:
    """(unet config, vae config, text-encoder config, where they came from)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from demo_fixtures.tiny_sd import text_encoder_config

    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        from model.networks.sspir import resolve_sd

        resolve_sd(str(folder))  # clear error on a half-built folder
        unet = UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.load_config(str(folder), subfolder="vae", local_files_only=True)
        text = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        return unet, vae, text, f"configs from {folder}"
    return (dict(SD15_UNET_CONFIG), dict(SD15_VAE_CONFIG), text_encoder_config(**SD15_TEXT_ENCODER),
            f"SD1.5's published configs (model/networks/counting.py); {pretrained!r} is not a local folder")


def build_meta(train: dict[str, Any], attention_layout: str | None = None) -> dict[str, Any]:
    """The SSP-IR model and the text encoder for a `train` section, on the meta device.
    `attention_layout` overrides the section's (default "paper")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from model.networks.image_encoder import load_image_encoder
    from model.networks.layouts import DEFAULT_LAYOUT
    from model.networks.sspir import SSPIR
    from model.networks.switches import PriorSwitches

    layout = attention_layout or train.get("attention_layout", DEFAULT_LAYOUT)
    unet_cfg, vae_cfg, text_cfg, source = _frozen_configs(train["pretrained"])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(text_cfg)
        image_encoder = load_image_encoder(train["image_encoder"], pretrained=False)
        model = SSPIR(vae, unet, image_encoder, attention_layout=layout, processor_kwargs=train.get("processor"),
                      switches=PriorSwitches.from_dict(train))
    return {"model": model, "text_encoder": text_encoder, "source": source}


def release_layout_counts(unet_config: dict[str, Any], clip_width: int = 1024) -> dict[str, int]:
    """Trainable parameters of the authors' released layout, rebuilt from a UNet config on meta.

    Written from the release's own block definitions, not from model/networks/blocks.py, so
    the two can check each other: their UNet and ControlNet add a full `Transformer2DModel`
    (norms, self-attention, cross-attention, feed-forward) for image cross-attention next to
    every text transformer (ControlNet: down + mid; UNet: down + mid + up), a full
    `Transformer2DModel` for pixel (structure) attention after every resnet of all four up
    blocks (first up block included), a standard ControlNet with the RGB conditioning
    embedding (16, 32, 96, 256) and three `to_rgb` 3×3 convs, and `TPBNet(1024 → 1024 → 1024
    → 512)` as the Refine Layer.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from model.networks.unet_layout import controlnet_residual_layout

    cfg = unet_config
    heads = cfg.get("attention_head_dim", 8)
    groups = cfg.get("norm_num_groups", 32)

    def transformer(channels: int, cross: int) -> int:
        t = Transformer2DModel(heads, channels // heads, in_channels=channels, num_layers=1,
                               cross_attention_dim=cross, norm_num_groups=groups)
        return _count(t.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=RELEASE_CONDITIONING_CHANNELS)
        image_unet = image_cn = pixel = 0
        for block in list(unet.down_blocks) + [unet.mid_block]:
            for attn in getattr(block, "attentions", []):
                n = transformer(attn.in_channels, RELEASE_IMAGE_CROSS_DIM)
                image_unet += n
                image_cn += n  # the ControlNet copies the down and mid blocks, image attentions included
        layout = controlnet_residual_layout(unet)
        pos = len(layout)
        for block in unet.up_blocks:
            out_ch = block.resnets[0].out_channels
            for attn in getattr(block, "attentions", []):
                image_unet += transformer(attn.in_channels, RELEASE_IMAGE_CROSS_DIM)
            for _ in block.resnets:
                pos -= 1
                cross = layout[pos] if getattr(block, "attentions", None) else out_ch
                pixel += transformer(out_ch, cross)
        refine = nn.Sequential(nn.Linear(clip_width, clip_width), nn.LayerNorm(clip_width),
                               nn.Linear(clip_width, clip_width), nn.LayerNorm(clip_width),
                               nn.Linear(clip_width, RELEASE_IMAGE_CROSS_DIM))
        to_rgb = sum(_count(nn.Conv2d(c, 3, 3, padding=1).parameters()) for c in RELEASE_CONDITIONING_CHANNELS[1:])
    return {"controlnet": _count(controlnet.parameters()), "image_attention_controlnet": image_cn,
            "image_attention_unet": image_unet, "pixel_attention_unet": pixel,
            "refine_tpbnet": _count(refine.parameters()), "to_rgb_heads": to_rgb}


def parameter_counts(train: dict[str, Any], release: bool = True, attention_layout: str | None = None
                     ) -> dict[str, Any]:
    """All counts (exact integers) for a `train` section."""
    built = build_meta(train, attention_layout)
    model, text_encoder = built["model"], built["text_encoder"]
    frozen = {
        "vae": _count(model.vae.parameters()),
        "unet": _count(model.unet.parameters()),
        "text_encoder": _count(text_encoder.parameters()),
        "image_encoder": _count(model.image_encoder.parameters()),
    }
    trainable = model.parameter_groups()
    if sum(trainable.values()) != _count(model.trainable_parameters()):
        raise RuntimeError("trainable groups do not add up to the model's trainable parameters")
    out: dict[str, Any] = {
        "source": built["source"], "image_encoder": train["image_encoder"],
        "attention_layout": model.attention_layout, "switches": model.switches.to_dict(),
        "variant": model.switches.label(),
        "frozen": frozen, "trainable": trainable,
        "frozen_total": sum(frozen.values()), "trainable_total": sum(trainable.values()),
        "paper_trainable_m": PAPER_TRAINABLE_M,
        "prior_layers": _prior_layers(model),
    }
    out["difference_m"] = round(out["trainable_total"] / 1e6 - PAPER_TRAINABLE_M, 2)
    if release:
        rel = release_layout_counts(dict(model.unet.config), clip_width=model.image_encoder.width)
        out["release_layout"] = rel
        out["release_clip_width"] = model.image_encoder.width
        out["release_layout_total"] = sum(rel.values())
    return out


def _prior_layers(model: Any) -> dict[str, int]:
    prior = model.prior
    if model.attention_layout == "adapter":
        return {"image": len(prior.specs), "structure": sum(1 for s in prior.specs if s.structure_channels)}
    groups: dict[str, int] = {}
    for site in prior.sites:
        groups[site.group] = groups.get(site.group, 0) + 1
    return groups


def _m(n: int) -> str:
    return f"{n / 1e6:10.2f} M  {n:>13,d}"


def format_counts(c: dict[str, Any], manifest: str = "") -> str:
    layers = c["prior_layers"]
    labels = {
        "vae": "VAE (AutoencoderKL)", "unet": "UNet (UNet2DConditionModel)", "text_encoder": "text encoder (CLIP)",
        "image_encoder": f"image encoder ({c['image_encoder']})", "controlnet": "ControlNet",
        "processor": "Processor", "refine": "Refine Layer",
        "prior_attention_image": f"prior attention: image ({layers.get('image', 0)} attn2 layers)",
        "prior_attention_structure": f"prior attention: structure ({layers.get('structure', 0)} attn2 layers)",
        "image_attention_controlnet": f"image attention in the ControlNet ({layers.get('image_attention_controlnet', 0)} "
                                      "transformers)",
        "image_attention_unet": f"image attention in the UNet ({layers.get('image_attention_unet', 0)} transformers)",
        "structure_attention": f"structure attention in the UNet ({layers.get('structure_attention', 0)} transformers)",
    }
    if c["attention_layout"] == "paper":
        labels["controlnet"] = "ControlNet (RGB conditioning embedding)"
        labels["processor"] = "Processor (RGB heads on the ControlNet's embedding)"
    width = 60
    lines = [f"SSP-IR parameters{' for ' + manifest if manifest else ''}, attention_layout {c['attention_layout']!r} "
             f"(meta device; {c['source']})", f"ablation switches: {c['variant']}", ""]
    lines.append("frozen")
    lines += [f"  {labels[k]:<{width}}{_m(v)}" for k, v in c["frozen"].items()]
    lines.append(f"  {'total frozen':<{width}}{_m(c['frozen_total'])}")
    lines.append("trainable")
    lines += [f"  {labels[k]:<{width}}{_m(v)}" for k, v in c["trainable"].items()]
    sign = "+" if c["difference_m"] >= 0 else ""
    lines.append(f"  {'total trainable':<{width}}{_m(c['trainable_total'])}   "
                 f"paper: {c['paper_trainable_m']:.2f} M, difference {sign}{c['difference_m']:.2f} M")
    if "release_layout" in c:
        rel = c["release_layout"]
        w = c["release_clip_width"]
        names = {"controlnet": "ControlNet (RGB conditioning embedding)",
                 "image_attention_controlnet": "image-attention transformers in the ControlNet",
                 "image_attention_unet": "image-attention transformers in the UNet",
                 "pixel_attention_unet": "pixel-attention transformers in the UNet",
                 "refine_tpbnet": f"Refine Layer (TPBNet {w}→{w}→{w}→{RELEASE_IMAGE_CROSS_DIM})",
                 "to_rgb_heads": "Processor's to_rgb heads (in its ControlNet embedding)"}
        lines += ["", "authors' release layout, rebuilt from the same UNet config (see docs/model.md)"]
        lines += [f"  {names[k]:<{width}}{_m(v)}" for k, v in rel.items()]
        total = c["release_layout_total"]
        lines.append(f"  {'total':<{width}}{_m(total)}   paper: {c['paper_trainable_m']:.2f} M, "
                     f"difference {total / 1e6 - c['paper_trainable_m']:+.2f} M")
    return "\n".join(lines)
