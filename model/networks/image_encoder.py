"""The frozen CLIP image encoder (ViT-L/14, OpenAI weights) through timm.

SSP-IR's implicit semantic prior: CLIP patch tokens of the LQ image, refined by the
Refine Layer, are the keys/values of the image cross-attention. The encoder is frozen.

`load_image_encoder(ref)` takes either
* a timm model name, e.g. `vit_large_patch14_clip_224.openai` (real runs; timm fetches the
  weights from its hub the first time, which is the user's business), or `hf-hub:<repo>`;
* a local folder in timm's format (`config.json` with architecture / model_args /
  pretrained_cfg + `model.safetensors`), loaded with `timm.create_model("local-dir:<dir>",
  pretrained=True)`: the path hub weights take after download. Tests use the tiny one
  written by `demo_fixtures.tiny_sd` (`<sd folder>/image_encoder`).

OpenAI's CLIP uses QuickGELU. timm's `vit_large_patch14_clip_224` builds plain GELU unless
asked (its `.openai` config notes "natively QuickGELU, use quickgelu model variant for
original results"), so for such names the loader passes `act_layer="quick_gelu"`: the same
weights, the activation they were trained with.

`encode(lq)` takes LQ in [0, 1], resizes to 224² (bicubic, antialias), normalises with
OpenAI CLIP's mean/std (not ImageNet's: a pitfall seen in peers' releases) and returns the
256 patch tokens of the final (layer-normed) output, CLS dropped: (B, 256, width).
The authors' release takes HF CLIPVisionModel's `hidden_states[24][:, 1:]`, the last
block's output *before* the final LayerNorm; this module returns the normed output as this
project's design fixes. The Refine Layer starts with a Linear + LayerNorm, so the two differ
by a per-token affine normalisation that the layer can absorb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224
DEFAULT_IMAGE_ENCODER = "vit_large_patch14_clip_224.openai"


class ImageEncoderNotFoundError(FileNotFoundError):
    """The image_encoder reference is a path that does not hold a timm model folder."""


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or ("/" in ref and ":" not in ref)


def resolve_image_encoder(ref: str) -> tuple[str, dict[str, Any]]:
    """(timm model name for `create_model`, extra kwargs) for a folder or a timm name."""
    import timm
    from timm.models import get_pretrained_cfg

    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ImageEncoderNotFoundError(
                f"image_encoder: {path} has no config.json; expected a timm model folder "
                "(config.json with architecture/model_args/pretrained_cfg + model.safetensors), "
                "e.g. the image_encoder/ folder jobs/build_tiny_models.py writes")
        return f"local-dir:{path.resolve()}", {}
    if path.exists() or _looks_like_path(ref):
        raise ImageEncoderNotFoundError(
            f"image_encoder: {path} is not a folder; give a timm model folder (config.json + model.safetensors) "
            f"or a timm model name such as {DEFAULT_IMAGE_ENCODER}")
    if ref.startswith(("hf-hub:", "local-dir:")):
        return ref, {}
    arch = ref.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ValueError(f"image_encoder: {ref!r} is neither a folder nor a timm model name")
    kwargs: dict[str, Any] = {"num_classes": 0}  # patch tokens only: drop CLIP's projection head
    cfg = get_pretrained_cfg(ref, allow_unregistered=True)
    notes = " ".join(getattr(cfg, "notes", None) or ())
    if "quickgelu" in notes.lower() and "quickgelu" not in arch:
        kwargs["act_layer"] = "quick_gelu"
    return ref, kwargs


class ImageEncoder(nn.Module):
    """A frozen timm ViT with CLIP preprocessing; `encode(lq)` → (B, patch tokens, width)."""

    def __init__(self, vit: nn.Module, image_size: int = CLIP_IMAGE_SIZE) -> None:
        super().__init__()
        self.vit = vit
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        for key, want in (("mean", OPENAI_CLIP_MEAN), ("std", OPENAI_CLIP_STD)):
            have = cfg.get(key)
            if have is not None and any(abs(a - b) > 1e-6 for a, b in zip(have, want)):
                raise ValueError(f"image encoder was trained with {key}={tuple(have)}, not OpenAI CLIP's {want}; "
                                 "SSP-IR's encode() normalises with CLIP's statistics")

    @property
    def width(self) -> int:
        return int(self.vit.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.vit, "num_prefix_tokens", 1))

    @property
    def num_patches(self) -> int:
        grid = self.vit.patch_embed.grid_size
        return int(grid[0] * grid[1])

    @torch.no_grad()
    def encode(self, lq: torch.Tensor) -> torch.Tensor:
        """LQ in [0, 1] (B, 3, h, w) → patch tokens (B, 256, width) of the final normed output."""
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"encode expects (B, 3, h, w) images in [0, 1], got {tuple(lq.shape)}")
        x = F.interpolate(lq.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True).clamp_(0.0, 1.0)
        x = (x - self.mean.float()) / self.std.float()
        dtype = next(self.vit.parameters()).dtype
        tokens = self.vit.forward_features(x.to(dtype))
        return tokens[:, self.num_prefix_tokens:]

    forward = encode


def load_image_encoder(ref: str = DEFAULT_IMAGE_ENCODER, pretrained: bool = True,
                       dtype: torch.dtype | None = None) -> ImageEncoder:
    """The frozen encoder from a timm name or a local timm folder (eval mode, no grad).

    `pretrained=False` builds the architecture only (random or, under
    `torch.device("meta")`, empty weights): what `model.summary` uses.
    """
    import timm

    name, kwargs = resolve_image_encoder(ref)
    vit = timm.create_model(name, pretrained=pretrained, **kwargs)
    if getattr(vit, "num_classes", 0):
        vit.reset_classifier(0)
    encoder = ImageEncoder(vit)
    if dtype is not None:
        encoder.to(dtype=dtype)
    return encoder.eval().requires_grad_(False)
