"""Restoration with a trained checkpoint: the library behind model/restore.py.

`Restorer(checkpoint)` loads what the run trained (the SD1.5 folder and image encoder its
trainer_state.json records, the trainable parts of its attention layout) plus SD1.5's text
encoder; `restore(lq_rgb, prompt, settings)` returns the ×4 restoration. The text becomes
CLIP chunks exactly as the embed stage makes them; sampling starts from the LQ latent noised
to t = 999 (LRE, model/inference/sampling.py) with the scheduler of
model/inference/scheduler.py (the same the trainer's validation grids use), tiles large
inputs (model/inference/tiling.py) and optionally corrects colour (model/inference/colour.py).

The checkpoint's ablation switches (its trainable/layout.json) are honoured: the model is
built as that variant, and a run trained with `text_prior` "none" restores every image with
the empty prompt, whatever prompt is offered (it never saw another).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.inference.colour import COLOR_FIXES, color_fix
from model.inference.images import SCALE, RestoreSetupError, lq_tensors, pad_lq
from model.inference.sampling import OnStep, Predictor
from model.inference.sampling import restore as sample
from model.inference.scheduler import LRE_TIMESTEP, SCHEDULERS, TIMESTEP_SPACING, make_scheduler
from model.inference.tiling import plan_tiles, tiled_predictor

# ------------------------------------------------------------ checkpoint ---


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (`trainable/` + `trainer_state.json`), or the newest complete one
    of a run folder (`<run>/checkpoints/step-*`) or of a checkpoints folder (`step-*`)."""
    from model.training.checkpoint import list_checkpoints

    path = Path(path).expanduser()
    if (path / "trainer_state.json").is_file() and (path / "trainable").is_dir():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise RestoreSetupError(f"--checkpoint {path}: not a checkpoint (trainable/ + trainer_state.json) and no "
                            "checkpoints/step-NNNNNNNN/ under it; give a training run folder or one of its "
                            "checkpoints")


def checkpoint_models(ckpt: Path) -> dict[str, Any]:
    """What the run trained on, from trainer_state.json: `pretrained` (SD1.5), `image_encoder`, `step`;
    and its ablation switches (`switches`, a PriorSwitches) from the trainable parts' layout.json."""
    from model.networks.layouts import folder_switches
    from model.training.checkpoint import load_trainer_state

    state = load_trainer_state(ckpt)
    cfg = state.get("config", state)
    return {"pretrained": cfg.get("pretrained"), "image_encoder": cfg.get("image_encoder"),
            "step": state.get("step"), "switches": folder_switches(ckpt / "trainable")}


# -------------------------------------------------------------- settings ---


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """Sampling settings. `tile` and `tile_overlap` are in LQ pixels; `tile=0` never tiles."""

    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    scheduler: str = "ddpm"
    tile: int = 128
    tile_overlap: int = 32
    color_fix: str = "none"

    def problems(self, multiple: int) -> list[str]:
        """What is wrong, given that tiles must be multiples of `multiple` LQ pixels (the
        latent grid the UNet can halve three times)."""
        out = []
        if self.steps < 1:
            out.append("--steps must be at least 1")
        if self.scheduler not in SCHEDULERS:
            out.append(f"--scheduler must be one of {SCHEDULERS}")
        if self.color_fix not in COLOR_FIXES:
            out.append(f"--color-fix must be one of {COLOR_FIXES}")
        if self.tile < 0 or self.tile % multiple:
            out.append(f"--tile must be 0 (no tiling) or a positive multiple of {multiple} LQ pixels, got {self.tile}")
        elif self.tile and not (0 <= self.tile_overlap < self.tile and self.tile_overlap % multiple == 0):
            out.append(f"--tile-overlap must be a multiple of {multiple} below --tile ({self.tile}), "
                       f"got {self.tile_overlap}")
        return out


def sample_batch(model: Any, lq: torch.Tensor, lq_up: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
                 settings: RestoreSettings, predictor: Predictor | None = None, on_step: OnStep | None = None
                 ) -> torch.Tensor:
    """Restore a batch with `settings`' scheduler, steps, guidance and seed: how `Restorer` and
    the trainer's validation grids both sample (lq (B, 3, h, w) in [0, 1], lq_up (B, 3, H, W)
    in [-1, 1], text (B, L, D), empty (77, D) → (B, 3, H, W) in [-1, 1])."""
    from model.inference.sampling import whole_image

    scheduler = make_scheduler(model.noise_scheduler.config, settings.scheduler)
    return sample(model, scheduler, lq, lq_up, text, empty, steps=settings.steps, guidance=settings.guidance,
                  seed=settings.seed, predictor=predictor or whole_image, on_step=on_step)


# -------------------------------------------------------------- restorer ---


@dataclasses.dataclass
class RestoreResult:
    image: np.ndarray  # uint8 (4h, 4w, 3) RGB
    prompt: str
    text: torch.Tensor  # float32 (77·k, D): the text embedding the sampler was given
    tiles: int  # diffusion tiles per step (1: untiled)
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RestoreSetupError("--device cuda requested but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Frozen parts' dtype: bf16 on CUDA (as the trainer's autocast), fp32 on CPUs."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


class Restorer:
    """A loaded checkpoint with its SD1.5 text encoder; `restore(lq, prompt, settings)`.

    Loading takes the SD1.5 folder and the image encoder the run recorded in its
    trainer_state.json unless `sd` / `image_encoder` override them (a moved folder, a
    hub id instead of a local copy).
    """

    def __init__(self, checkpoint: str | Path, sd: str | None = None, image_encoder: str | None = None,
                 device: str = "auto", dtype: str = "auto", max_chunks: int | None = None) -> None:
        from model.networks.sspir import SSPIR
        from pipeline.embed.config import EmbedConfig
        from pipeline.embed.encoder import empty_prompt_embedding, load_text_encoder

        self.checkpoint = resolve_checkpoint(checkpoint)
        recorded = checkpoint_models(self.checkpoint)
        self.step = recorded["step"]
        self.sd = sd or recorded["pretrained"]
        self.image_encoder_ref = image_encoder or recorded["image_encoder"]
        if not self.sd or not self.image_encoder_ref:
            raise RestoreSetupError(f"{self.checkpoint}/trainer_state.json records no pretrained / image_encoder; "
                                    "pass --sd and --image-encoder")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_chunks = max_chunks or EmbedConfig().max_chunks
        try:
            self.model = SSPIR.from_pretrained(self.sd, self.image_encoder_ref, trainable=self.checkpoint / "trainable",
                                               dtype=self.dtype)
            self.tokenizer, self.text_encoder = load_text_encoder(self.sd, self.device)
        except (OSError, ValueError) as e:  # ModelLayoutError, ImageEncoderNotFoundError, ModelNotFoundError
            raise RestoreSetupError(f"cannot load the models of {self.checkpoint} ({e}); pass --sd / "
                                    "--image-encoder if they moved") from None
        self.model.to(self.device).eval()
        self.switches = self.model.switches
        self.empty = torch.from_numpy(empty_prompt_embedding(self.tokenizer, self.text_encoder)).float()
        unet_halvings = len(self.model.unet.config.block_out_channels) - 1
        self.vae_factor = 2 ** (len(self.model.vae.config.block_out_channels) - 1)
        # LQ pixels per latent-grid unit the UNet can halve `unet_halvings` times: 16 for SD1.5 at ×4
        self.multiple = 2 ** unet_halvings * self.vae_factor // SCALE

    def embed(self, prompt: str) -> torch.Tensor:
        """(77·k, D) float32: the embed stage's chunking and float16 storage, so a prompt is
        conditioned on exactly as a caption was during training."""
        from pipeline.embed.encoder import encode_captions

        row = encode_captions(self.tokenizer, self.text_encoder, [prompt], self.max_chunks, batch_size=1)[0]
        if row.truncated_tokens:
            print(f"note: the prompt is {row.num_tokens} tokens; the last {row.truncated_tokens} beyond "
                  f"{self.max_chunks} chunks of 75 are dropped", file=sys.stderr)
        return torch.from_numpy(row.hidden.astype(np.float32))

    def check(self, settings: RestoreSettings) -> None:
        problems = settings.problems(self.multiple)
        if problems:
            raise RestoreSetupError("; ".join(problems))

    def _configure_vae(self, settings: RestoreSettings) -> None:
        """diffusers' tiled VAE at the diffusion tile's size (×4 pixels), same overlap ratio."""
        vae = self.model.vae
        if not settings.tile:
            vae.disable_tiling()
            return
        vae.enable_tiling()
        vae.tile_sample_min_size = SCALE * settings.tile
        vae.tile_latent_min_size = SCALE * settings.tile // self.vae_factor
        vae.tile_overlap_factor = settings.tile_overlap / settings.tile

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def restore(self, lq_rgb: np.ndarray, prompt: str, settings: RestoreSettings = RestoreSettings(),
                on_step: OnStep | None = None, text: torch.Tensor | None = None) -> RestoreResult:
        """uint8 LQ (h, w, 3) → ×4 uint8 restoration. `text` skips the text encoder (a
        precomputed embedding for `prompt`); `on_step(i, t, latents)` sees each step. A
        checkpoint trained with `text_prior` "none" gets the empty prompt instead of both."""
        self.check(settings)
        t0 = time.perf_counter()
        h, w = lq_rgb.shape[:2]
        if self.switches.text_prior == "none":
            prompt, text = "", self.empty
        elif text is None:
            text = self.embed(prompt)
        lq, lq_up = lq_tensors(pad_lq(lq_rgb, self.multiple), self.device)
        self._configure_vae(settings)
        predictor, tiles = self._predictor(settings, lq_up)
        with self._autocast():
            out = sample_batch(self.model, lq, lq_up, text[None].to(self.device), self.empty.to(self.device),
                               settings, predictor=predictor, on_step=on_step)
        out = out.float()[..., :SCALE * h, :SCALE * w]
        out = color_fix(out, lq_up[..., :SCALE * h, :SCALE * w], settings.color_fix)
        from model.training.validation import to_uint8

        return RestoreResult(image=to_uint8(out[0]), prompt=prompt, text=text, tiles=tiles,
                             seconds=time.perf_counter() - t0)

    def _predictor(self, settings: RestoreSettings, lq_up: torch.Tensor) -> tuple[Predictor, int]:
        from model.inference.sampling import whole_image

        if not settings.tile:
            return whole_image, 1
        per_latent = self.vae_factor // SCALE  # LQ pixels per latent pixel
        tile, overlap = settings.tile // per_latent, settings.tile_overlap // per_latent
        lat_h, lat_w = lq_up.shape[-2] // self.vae_factor, lq_up.shape[-1] // self.vae_factor
        return tiled_predictor(tile, overlap), len(plan_tiles(lat_h, lat_w, tile, overlap))

    def metadata(self, prompt: str, source: str, settings: RestoreSettings, path: Path,
                 lq_size: tuple[int, int]) -> dict[str, str]:
        """PNG text chunks: the prompt, and everything needed to redo the result."""
        meta = {"input": str(path), "input_size": [lq_size[1], lq_size[0]],
                "output_size": [SCALE * lq_size[1], SCALE * lq_size[0]], "prompt_source": source,
                "checkpoint": str(self.checkpoint), "step": self.step, "sd": str(self.sd),
                "image_encoder": str(self.image_encoder_ref), "max_chunks": self.max_chunks,
                "dtype": str(self.dtype).removeprefix("torch."), "lre_timestep": LRE_TIMESTEP,
                "switches": self.switches.to_dict(),
                "timestep_spacing": TIMESTEP_SPACING, **dataclasses.asdict(settings)}
        return {"prompt": prompt, "sspir": json.dumps(meta, sort_keys=True), "Software": "SSP-IR model/restore.py"}
