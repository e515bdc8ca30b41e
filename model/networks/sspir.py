"""SSP-IR: frozen SD1.5 (VAE, UNet) + frozen CLIP image encoder, and the trainable parts
(Processor, ControlNet, Refine Layer, prior-guided attention), wired for training.

    features, rgbs = processor(lq_up)                                  # structure prior
    image_tokens   = refine(image_encoder.encode(lq))                  # implicit semantic prior
    down, mid      = controlnet(z_t, t, text, controlnet_cond=features)
    noise_pred     = unet(z_t, t, text, down/mid residuals added,
                          cross_attention_kwargs={image_tokens, structure_residuals=down})

The text embeddings (explicit semantic prior) are precomputed by jobs/embed.py; the text
encoder is not part of this module.

Trainable parts live in one `nn.ModuleDict` (`self.trainable`) and are always fp32; the
frozen parts may run in bf16/fp16 (`dtype`). `save_trainable(dir)` writes
`processor/`, `controlnet/`, `refine/` (diffusers `save_pretrained`: config.json +
safetensors) and `prior_attention.safetensors` + `prior_attention.json`; no pickle anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import nn

from model.networks.attention import PriorAttentionSet
from model.networks.controlnet import controlnet_from_unet, load_controlnet
from model.networks.image_encoder import ImageEncoder, load_image_encoder
from model.networks.processor import Processor
from model.networks.refine import RefineLayer

TRAINABLE_PARTS = ("processor", "controlnet", "refine", "prior_attention")
PRIOR_WEIGHTS = "prior_attention.safetensors"
PRIOR_CONFIG = "prior_attention.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SD_LAYOUT = ("an SD1.5-layout folder with unet/ (config.json + diffusion_pytorch_model.safetensors), "
              "vae/ (config.json + diffusion_pytorch_model.safetensors) and scheduler/ (scheduler_config.json), "
              "e.g. a local copy of stable-diffusion-v1-5/stable-diffusion-v1-5 or the tiny one "
              "jobs/build_tiny_models.py writes")
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def _same_layout(current: nn.Module, loaded: nn.Module) -> bool:
    """Same class, same config and the same tensor names and shapes."""
    if type(current) is not type(loaded):
        return False
    def public(module: nn.Module) -> str:
        cfg = dict(getattr(module, "config", {}) or {})
        return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)

    if public(current) != public(loaded):
        return False
    a, b = current.state_dict(), loaded.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


class ModelLayoutError(FileNotFoundError):
    """A model reference that is not where it should be, or lacks the expected files."""


def resolve_sd(sd_path: str) -> tuple[str, bool]:
    """(what to hand to from_pretrained, is_local). A local folder must have SD1.5's layout;
    something that is not a folder is taken as a hub id only if it looks like one."""
    path = Path(sd_path).expanduser()
    if path.is_dir():
        missing = []
        for sub, files in (("unet", _WEIGHTS), ("vae", _WEIGHTS), ("scheduler", ())):
            folder = path / sub
            cfg = folder / ("scheduler_config.json" if sub == "scheduler" else "config.json")
            if not folder.is_dir():
                missing.append(f"{folder}/")
            elif not cfg.is_file():
                missing.append(str(cfg))
            elif files and not any((folder / f).is_file() for f in files):
                missing.append(f"{folder}/diffusion_pytorch_model.safetensors")
        if missing:
            raise ModelLayoutError(f"{path} lacks {', '.join(missing)}; expected {_SD_LAYOUT}")
        return str(path.resolve()), True
    if path.exists() or not _HUB_ID.match(sd_path):
        raise ModelLayoutError(f"{path} is not a folder (nor a hub id); expected {_SD_LAYOUT}")
    return sd_path, False


class SSPIR(nn.Module):
    """The SSP-IR network for training (frozen SD1.5 + trainable priors).

    Build it with `SSPIR.from_pretrained(...)`; the constructor takes already-built frozen
    modules (used by `model.summary` on the meta device).
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, image_encoder: ImageEncoder,
                 noise_scheduler: DDPMScheduler | None = None, processor_kwargs: dict[str, Any] | None = None,
                 refine_kwargs: dict[str, Any] | None = None, controlnet: ControlNetModel | None = None,
                 trainable_parts: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.unet = unet.requires_grad_(False).eval()
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.trainable = nn.ModuleDict()
        if trainable_parts is None:
            trainable_parts = self.fresh_trainable(unet, image_encoder, processor_kwargs, refine_kwargs, controlnet)
        self._set_trainable(trainable_parts)

    # ------------------------------------------------------------ building ---
    @staticmethod
    def fresh_trainable(unet: UNet2DConditionModel, image_encoder: ImageEncoder,
                        processor_kwargs: dict[str, Any] | None = None, refine_kwargs: dict[str, Any] | None = None,
                        controlnet: ControlNetModel | None = None) -> dict[str, nn.Module]:
        """Newly initialised trainable parts sized for `unet` and `image_encoder`."""
        processor = Processor(**{"feature_channels": unet.config.block_out_channels[0], **(processor_kwargs or {})})
        if controlnet is None:
            controlnet = controlnet_from_unet(unet, processor.config.feature_channels)
        width = image_encoder.width
        refine = RefineLayer(**{"in_dim": width, "hidden_dim": width,
                                "out_dim": unet.config.cross_attention_dim, **(refine_kwargs or {})})
        prior = PriorAttentionSet.from_unet(unet, image_dim=refine.config.out_dim)
        return {"processor": processor, "controlnet": controlnet, "refine": refine, "prior_attention": prior}

    @classmethod
    def from_pretrained(cls, sd_path: str, image_encoder: str, trainable: str | Path | None = None,
                        processor_kwargs: dict[str, Any] | None = None, refine_kwargs: dict[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32) -> "SSPIR":
        """Frozen parts from `sd_path` (SD1.5 folder or hub id: unet/, vae/, scheduler/) and
        `image_encoder` (timm name or timm folder); trainable parts fresh, or from `trainable`
        (a folder written by `save_trainable`). Frozen parts in `dtype`, trainable in fp32."""
        if trainable is not None and (processor_kwargs or refine_kwargs):
            raise ValueError("processor_kwargs/refine_kwargs configure new parts; with `trainable` the "
                             "configs come from that folder")
        source, local = resolve_sd(sd_path)
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        except OSError as e:
            raise ModelLayoutError(f"cannot load SD1.5 from {source!r}: {e}; expected {_SD_LAYOUT}") from None
        encoder = load_image_encoder(image_encoder, pretrained=True, dtype=dtype)
        parts = controlnet = None
        if trainable is not None:
            parts = cls.read_trainable(trainable)
        else:  # the ControlNet copies the UNet's fp32 weights before the UNet is cast down
            controlnet = controlnet_from_unet(
                unet, (processor_kwargs or {}).get("feature_channels", unet.config.block_out_channels[0]))
        if dtype != torch.float32:  # nn.Module.to: ModelMixin.to warns about fp32-kept modules SD1.5 has none of
            nn.Module.to(unet, dtype=dtype)
        return cls(vae, unet, encoder, scheduler, processor_kwargs, refine_kwargs, controlnet=controlnet,
                   trainable_parts=parts)

    def _set_trainable(self, parts: dict[str, nn.Module]) -> None:
        if set(parts) != set(TRAINABLE_PARTS):
            raise ValueError(f"trainable parts must be {TRAINABLE_PARTS}, got {sorted(parts)}")
        parts["prior_attention"].check_matches(self.unet)
        if tuple(parts["controlnet"].config.block_out_channels) != tuple(self.unet.config.block_out_channels):
            raise ValueError("the ControlNet was made for another UNet (block_out_channels differ)")
        if parts["controlnet"].config.conditioning_channels != parts["processor"].config.feature_channels:
            raise ValueError("the ControlNet's conditioning_channels differ from the Processor's feature_channels")
        if parts["refine"].config.in_dim != self.image_encoder.width:
            raise ValueError(f"the Refine Layer takes width {parts['refine'].config.in_dim}, "
                             f"the image encoder gives {self.image_encoder.width}")
        device = self.unet.conv_in.weight.device
        for name in TRAINABLE_PARTS:
            module = parts[name]
            params = list(module.parameters())
            if device.type != "meta" and any(p.device != device or p.dtype != torch.float32 for p in params):
                nn.Module.to(module, device=device, dtype=torch.float32)
            self.trainable[name] = module.requires_grad_(True).train(self.training)
        parts["prior_attention"].install(self.unet)

    # ---------------------------------------------------------- accessors ---
    @property
    def processor(self) -> Processor:
        return self.trainable["processor"]

    @property
    def controlnet(self) -> ControlNetModel:
        return self.trainable["controlnet"]

    @property
    def refine(self) -> RefineLayer:
        return self.trainable["refine"]

    @property
    def prior_attention(self) -> PriorAttentionSet:
        return self.trainable["prior_attention"]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.trainable.items())

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "unet": self.unet, "image_encoder": self.image_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable.parameters())

    def train(self, mode: bool = True) -> "SSPIR":
        """Train mode for the trainable parts only; frozen parts stay in eval mode."""
        self.training = mode
        self.trainable.train(mode)
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()
        self.controlnet.disable_gradient_checkpointing()

    # ------------------------------------------------------------ compute ---
    @torch.no_grad()
    def encode_images(self, hq: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """HQ in [-1, 1] (B, 3, H, W) → VAE latents × scaling factor (frozen, no grad)."""
        dist = self.vae.encode(hq.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.vae.config.scaling_factor

    def static_priors(self, lq: torch.Tensor, lq_up: torch.Tensor) -> dict[str, Any]:
        """The priors that depend on the LQ alone (Processor features and RGB outputs, refined
        CLIP image tokens): not on the timestep, not on the text. A sampler computes them
        once per image (or tile) and passes them back as `static=`, instead of recomputing
        the Processor at full resolution and the CLIP tower at every step and CFG branch."""
        features, rgbs = self.processor(lq_up.to(torch.float32))
        image_tokens = self.refine(self.image_encoder.encode(lq).to(torch.float32))
        return {"features": features, "rgbs": rgbs, "image_tokens": image_tokens}

    def priors(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
               lq: torch.Tensor, lq_up: torch.Tensor, static: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything the UNet needs besides its own inputs: ControlNet residuals, image tokens, RGB outputs.
        `static` (from `static_priors`, batched like `noisy_latents`) skips recomputing those."""
        if static is None:
            static = self.static_priors(lq, lq_up)
        down, mid = self.controlnet(noisy_latents.to(torch.float32), timesteps,
                                    encoder_hidden_states=text_hidden.to(torch.float32),
                                    controlnet_cond=static["features"], return_dict=False)
        return {"down": tuple(down), "mid": mid, "image_tokens": static["image_tokens"],
                "rgbs": static.get("rgbs", []), "features": static["features"]}

    def unet_forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
                     down: tuple[torch.Tensor, ...] | None, mid: torch.Tensor | None,
                     image_tokens: torch.Tensor | None, structure: tuple[torch.Tensor, ...] | None = None
                     ) -> torch.Tensor:
        """The frozen UNet with additive ControlNet residuals and the prior attention inputs."""
        dtype = self.unet.dtype
        kwargs = {"image_tokens": image_tokens, "structure_residuals": down if structure is None else structure}
        return self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=text_hidden.to(dtype),
            down_block_additional_residuals=None if down is None else [d.to(dtype) for d in down],
            mid_block_additional_residual=None if mid is None else mid.to(dtype),
            cross_attention_kwargs=kwargs, return_dict=False,
        )[0]

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
                lq: torch.Tensor, lq_up: torch.Tensor, static: dict[str, Any] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(noise_pred, [rgb H/2, rgb H/4, rgb H/8]).

        noisy_latents (B, 4, h, w); timesteps (B,); text_hidden (B, 77·k, D); lq (B, 3, H/4, W/4)
        in [0, 1] for CLIP; lq_up (B, 3, H, W) in [-1, 1], the LQ bicubic-upsampled ×4;
        static: precomputed `static_priors` (sampling), None in training.
        """
        p = self.priors(noisy_latents, timesteps, text_hidden, lq, lq_up, static)
        noise_pred = self.unet_forward(noisy_latents, timesteps, text_hidden, p["down"], p["mid"], p["image_tokens"])
        return noise_pred, p["rgbs"]

    # ---------------------------------------------------------- save/load ---
    def save_trainable(self, directory: str | Path) -> Path:
        """Write the trainable parts (safetensors + JSON only). Write into a fresh folder and
        rename it into place if the write must be atomic (the trainer's checkpoints do)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("processor", "controlnet", "refine"):
            self.trainable[name].save_pretrained(str(out / name), safe_serialization=True)
        prior = self.prior_attention
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in prior.state_dict().items()}
        save_file(tensors, str(out / PRIOR_WEIGHTS), metadata={"format": "pt"})
        (out / PRIOR_CONFIG).write_text(json.dumps(prior.config, indent=1) + "\n")
        return out

    @staticmethod
    def read_trainable(directory: str | Path) -> dict[str, nn.Module]:
        """The trainable parts stored in `directory` (written by `save_trainable`), on the CPU, fp32."""
        from safetensors.torch import load_file

        src = Path(directory)
        expected = ["processor/", "controlnet/", "refine/", PRIOR_WEIGHTS, PRIOR_CONFIG]
        missing = [e for e in expected if not (src / e.rstrip("/")).exists()]
        if missing:
            raise FileNotFoundError(f"{src} lacks {', '.join(missing)}; expected a folder written by "
                                    f"SSPIR.save_trainable ({', '.join(expected)})")
        prior = PriorAttentionSet.from_config(json.loads((src / PRIOR_CONFIG).read_text()))
        prior.load_state_dict(load_file(str(src / PRIOR_WEIGHTS)), strict=True)
        return {
            "processor": Processor.from_pretrained(str(src / "processor"), torch_dtype=torch.float32),
            "controlnet": load_controlnet(src / "controlnet", torch_dtype=torch.float32),
            "refine": RefineLayer.from_pretrained(str(src / "refine"), torch_dtype=torch.float32),
            "prior_attention": prior,
        }

    def load_trainable(self, directory: str | Path) -> None:
        """Load the trainable parts saved in `directory` (checked against the frozen parts).

        Where a saved part has the same configuration as the current one, its weights are
        copied into the existing parameters, so an optimizer built on
        `trainable_parameters()` before the call keeps training the loaded weights (resume).
        A part with another configuration replaces the current module (new parameter
        objects: build the optimizer afterwards).
        """
        parts = self.read_trainable(directory)
        same = all(_same_layout(self.trainable[name], parts[name]) for name in TRAINABLE_PARTS)
        if not same:
            self._set_trainable(parts)
            return
        parts["prior_attention"].check_matches(self.unet)
        with torch.no_grad():
            for name in TRAINABLE_PARTS:
                self.trainable[name].load_state_dict(parts[name].state_dict(), strict=True)

    def iter_frozen_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, module in self.frozen_modules().items():
            for pname, param in module.named_parameters():
                yield f"{name}.{pname}", param
