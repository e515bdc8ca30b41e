"""SSP-IR: frozen SD1.5 (VAE, UNet) + frozen CLIP image encoder, and the trainable parts
(Processor, ControlNet, Refine Layer, prior-guided attention), wired for training.

    features, rgbs = conditioning(lq_up)                       # structure prior (layout's Processor)
    image_tokens   = refine(image_encoder.encode(lq))          # implicit semantic prior
    down, mid      = controlnet(z_t, t, text, controlnet_cond=features, [paper: image tokens])
    noise_pred     = unet(z_t, t, text, down/mid residuals added,
                          cross_attention_kwargs={"sspir": PriorInputs(image_tokens, residuals=down)})

What the Processor and the prior attention are depends on the attention layout
(model/networks/layouts.py: "paper", the release's transformer blocks, or "adapter", this
project's lighter projections); everything here is common to both. The ablation switches
(model/networks/switches.py) say which priors exist: with `image_prior` "none" the CLIP
tokens are replaced by zeros (the null image embedding), without image attention there are
no image tokens at all (no Refine Layer, the CLIP tower not run).

The text embeddings (explicit semantic prior) are precomputed by jobs/embed.py; the text
encoder is not part of this module.

Trainable parts live in one `nn.ModuleDict` (`self.trainable`) and are always fp32; the
frozen parts may run in bf16/fp16 (`dtype`). `save_trainable(dir)` writes `layout.json`,
`processor/`, `controlnet/`, `refine/` (diffusers `save_pretrained`: config.json +
safetensors) and the layout's prior part as one safetensors file + its JSON; no pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import nn

from model.networks.image_encoder import ImageEncoder, load_image_encoder
from model.networks.layouts import (DEFAULT_LAYOUT, AttentionLayout, LayoutMismatchError, folder_layout,
                                    folder_switches, get_layout, read_parts, save_parts)
from model.networks.prior_inputs import PriorInputs
from model.networks.switches import PriorSwitches
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
    modules (used by the parameter counts on the meta device).
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, image_encoder: ImageEncoder,
                 noise_scheduler: DDPMScheduler | None = None, attention_layout: str = DEFAULT_LAYOUT,
                 processor_kwargs: dict[str, Any] | None = None, refine_kwargs: dict[str, Any] | None = None,
                 controlnet: ControlNetModel | None = None, trainable_parts: dict[str, nn.Module] | None = None,
                 switches: PriorSwitches | None = None) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.unet = unet.requires_grad_(False).eval()
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.layout: AttentionLayout = get_layout(attention_layout)
        self.switches = (switches or PriorSwitches()).check(self.layout.name)
        self.trainable = nn.ModuleDict()
        if trainable_parts is None:
            trainable_parts = self.layout.fresh(unet, image_encoder.width, processor_kwargs, refine_kwargs, controlnet,
                                                self.switches)
        self._set_trainable(trainable_parts)

    # ------------------------------------------------------------ building ---
    @classmethod
    def from_pretrained(cls, sd_path: str, image_encoder: str, trainable: str | Path | None = None,
                        attention_layout: str | None = None, processor_kwargs: dict[str, Any] | None = None,
                        refine_kwargs: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                        switches: PriorSwitches | None = None) -> "SSPIR":
        """Frozen parts from `sd_path` (SD1.5 folder or hub id: unet/, vae/, scheduler/) and
        `image_encoder` (timm name or timm folder); trainable parts fresh (`attention_layout`,
        default "paper"; ablation `switches`, default the full model), or from `trainable` (a
        folder written by `save_trainable`, whose layout and switches must equal
        `attention_layout` / `switches` when those are given). Frozen parts in `dtype`,
        trainable in fp32."""
        if trainable is not None and (processor_kwargs or refine_kwargs):
            raise ValueError("processor_kwargs/refine_kwargs configure new parts; with `trainable` the "
                             "configs come from that folder")
        parts = None
        if trainable is not None:
            stored = folder_layout(trainable)
            if attention_layout is not None and stored != attention_layout:
                raise LayoutMismatchError(_mismatch(trainable, stored, attention_layout))
            attention_layout = stored
            stored_switches = folder_switches(trainable)
            if switches is not None and switches != stored_switches:
                raise LayoutMismatchError(_switch_mismatch(trainable, stored_switches, switches))
            switches = stored_switches
        layout = get_layout(attention_layout or DEFAULT_LAYOUT)
        source, local = resolve_sd(sd_path)
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        except OSError as e:
            raise ModelLayoutError(f"cannot load SD1.5 from {source!r}: {e}; expected {_SD_LAYOUT}") from None
        encoder = load_image_encoder(image_encoder, pretrained=True, dtype=dtype)
        controlnet = None
        if trainable is not None:
            parts = read_parts(trainable)[1]
        else:  # the ControlNet copies the UNet's fp32 weights before the UNet is cast down
            controlnet = layout.new_controlnet(unet, processor_kwargs)
        if dtype != torch.float32:  # nn.Module.to: ModelMixin.to warns about fp32-kept modules SD1.5 has none of
            nn.Module.to(unet, dtype=dtype)
        return cls(vae, unet, encoder, scheduler, layout.name, processor_kwargs, refine_kwargs,
                   controlnet=controlnet, trainable_parts=parts, switches=switches)

    def _set_trainable(self, parts: dict[str, nn.Module]) -> None:
        self.layout.check(parts, self.unet, self.image_encoder.width, self.switches)
        device = self.unet.conv_in.weight.device
        for name in list(self.trainable):
            del self.trainable[name]
        for name in self.layout.part_names(self.switches):
            module = parts[name]
            params = list(module.parameters())
            if device.type != "meta" and any(p.device != device or p.dtype != torch.float32 for p in params):
                nn.Module.to(module, device=device, dtype=torch.float32)
            self.trainable[name] = module.requires_grad_(True).train(self.training)
        self.layout.install(parts, self.unet)

    # ---------------------------------------------------------- accessors ---
    @property
    def attention_layout(self) -> str:
        return self.layout.name

    @property
    def processor(self) -> nn.Module:
        return self.trainable["processor"]

    @property
    def controlnet(self) -> ControlNetModel:
        return self.trainable["controlnet"]

    @property
    def refine(self) -> nn.Module | None:
        """The Refine Layer; None without image attention (`image_attention: false`)."""
        return self.trainable["refine"] if "refine" in self.trainable else None

    @property
    def prior(self) -> nn.Module:
        """The layout's prior-attention part (`PriorBlocks` or `PriorAttentionSet`)."""
        return self.trainable[self.layout.prior_part]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.trainable.items())

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "unet": self.unet, "image_encoder": self.image_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable.parameters())

    def parameter_groups(self) -> dict[str, int]:
        """Trainable parameters per part of the layout (docs/model.md's tables)."""
        return self.layout.groups(self.trainable_modules())

    def train(self, mode: bool = True) -> "SSPIR":
        """Train mode for the trainable parts only; frozen parts stay in eval mode."""
        self.training = mode
        self.trainable.train(mode)
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """UNet, ControlNet and the layout's own blocks."""
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()
        self.layout.enable_gradient_checkpointing(self.trainable_modules(), True)

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()
        self.controlnet.disable_gradient_checkpointing()
        self.layout.enable_gradient_checkpointing(self.trainable_modules(), False)

    # ------------------------------------------------------------ compute ---
    @torch.no_grad()
    def encode_images(self, hq: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """HQ in [-1, 1] (B, 3, H, W) → VAE latents × scaling factor in float32 (frozen, no
        grad): the diffusion state stays fp32 even when the VAE runs in bf16."""
        dist = self.vae.encode(hq.to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (× scaling factor, any dtype) → images in [-1, 1], in the VAE's dtype."""
        return self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.clamp(-1, 1)

    def static_priors(self, lq: torch.Tensor, lq_up: torch.Tensor) -> dict[str, Any]:
        """The priors that depend on the LQ alone (the ControlNet's condition and the RGB
        outputs, refined CLIP image tokens): not on the timestep, not on the text. A sampler
        computes them once per image (or tile) and passes them back as `static=`, instead of
        recomputing the Processor at full resolution and the CLIP tower at every step and CFG
        branch."""
        features, rgbs = self.layout.conditioning(self.trainable_modules(), lq_up.to(torch.float32))
        return {"features": features, "rgbs": rgbs, "image_tokens": self.image_tokens(lq)}

    def image_tokens(self, lq: torch.Tensor) -> torch.Tensor | None:
        """The refined image tokens the image attention reads: Refine(CLIP(lq)), Refine(0) with
        `image_prior` "none" (the null image embedding), None without image attention."""
        if not self.switches.has_refine:
            return None
        if self.switches.runs_image_encoder:
            embedding = self.image_encoder.encode(lq).to(torch.float32)
        else:
            embedding = self.null_image_embedding(lq.shape[0], lq.device)
        return self.refine(embedding)

    def null_image_embedding(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """Zeros in the shape of the CLIP patch tokens (B, patches, width), fp32: the image
        embedding of `image_prior` "none" (docs/model.md, "Ablation switches")."""
        return torch.zeros(batch, self.image_encoder.num_patches, self.image_encoder.width, device=device)

    def priors(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
               lq: torch.Tensor, lq_up: torch.Tensor, static: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything the UNet needs besides its own inputs: ControlNet residuals, image tokens, RGB outputs.
        `static` (from `static_priors`, batched like `noisy_latents`) skips recomputing those."""
        if static is None:
            static = self.static_priors(lq, lq_up)
        down, mid = self.controlnet(noisy_latents.to(torch.float32), timesteps,
                                    encoder_hidden_states=text_hidden.to(torch.float32),
                                    controlnet_cond=static["features"],
                                    cross_attention_kwargs=self.layout.controlnet_kwargs(static["image_tokens"]),
                                    return_dict=False)
        return {"down": tuple(down), "mid": mid, "image_tokens": static["image_tokens"],
                "rgbs": static.get("rgbs", []), "features": static["features"]}

    def unet_forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
                     down: tuple[torch.Tensor, ...] | None, mid: torch.Tensor | None,
                     image_tokens: torch.Tensor | None, structure: tuple[torch.Tensor, ...] | None = None
                     ) -> torch.Tensor:
        """The frozen UNet with additive ControlNet residuals and the prior attention inputs
        (`structure`: the residuals structure attention reads; default: `down`)."""
        dtype = self.unet.dtype
        inputs = PriorInputs(image_tokens=image_tokens, residuals=down if structure is None else structure)
        return self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=text_hidden.to(dtype),
            down_block_additional_residuals=None if down is None else [d.to(dtype) for d in down],
            mid_block_additional_residual=None if mid is None else mid.to(dtype),
            cross_attention_kwargs=inputs.kwargs(), return_dict=False,
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
        """Write the trainable parts and layout.json (safetensors + JSON only). Write into a
        fresh folder and rename it into place if the write must be atomic (the trainer's
        checkpoints do)."""
        return save_parts(self.layout, self.trainable_modules(), directory, self.switches)

    @staticmethod
    def read_trainable(directory: str | Path) -> dict[str, nn.Module]:
        """The trainable parts stored in `directory` (written by `save_trainable`), on the CPU, fp32."""
        return read_parts(directory)[1]

    def load_trainable(self, directory: str | Path) -> None:
        """Load the trainable parts saved in `directory` (checked against the frozen parts).

        A folder of the other attention layout is refused (`LayoutMismatchError`). Where a
        saved part has the same configuration as the current one, its weights are copied
        into the existing parameters, so an optimizer built on `trainable_parameters()`
        before the call keeps training the loaded weights (resume). A part with another
        configuration replaces the current module (new parameter objects: build the
        optimizer afterwards).
        """
        stored = folder_layout(directory)
        if stored != self.layout.name:
            raise LayoutMismatchError(_mismatch(directory, stored, self.layout.name))
        stored_switches = folder_switches(directory)
        if stored_switches != self.switches:
            raise LayoutMismatchError(_switch_mismatch(directory, stored_switches, self.switches))
        parts = read_parts(directory)[1]
        names = self.layout.part_names(self.switches)
        same = all(_same_layout(self.trainable[name], parts[name]) for name in names)
        if not same:
            self._set_trainable(parts)
            return
        self.layout.check(parts, self.unet, self.image_encoder.width, self.switches)
        with torch.no_grad():
            for name in names:
                self.trainable[name].load_state_dict(parts[name].state_dict(), strict=True)

    def iter_frozen_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, module in self.frozen_modules().items():
            for pname, param in module.named_parameters():
                yield f"{name}.{pname}", param


def _mismatch(directory: str | Path, stored: str, wanted: str) -> str:
    return (f"{directory} holds trainable parts of attention_layout {stored!r}, but this model uses {wanted!r}; "
            f"the two layouts have different parts and cannot load each other's weights: set "
            f"train.attention_layout to {stored!r} to continue that run, or start a fresh --train-dir")


def _switch_mismatch(directory: str | Path, stored: PriorSwitches, wanted: PriorSwitches) -> str:
    diff = "; ".join(f"train.{k}: folder {a}, model {b}" for k, a, b in stored.differences(wanted))
    return (f"{directory} was trained with other ablation switches ({diff}): its "
            "parts are another variant's; put the switches back to continue that run, or start a fresh --train-dir")
