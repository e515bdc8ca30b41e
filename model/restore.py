#!/usr/bin/env python
"""Restore images with a trained SSP-IR checkpoint (×4).

  python model/restore.py --checkpoint RUN_OR_CKPT --input LQ.png|DIR --out DIR
        [--prompt TEXT | --caption-engine transformers|server|vllm --caption-model M]
        [--steps 50] [--guidance 7.5] [--seed 0] [--scheduler ddpm|dpm]
        [--tile 128] [--tile-overlap 32] [--color-fix none|adain|wavelet]
        [--sd PATH] [--image-encoder REF] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16|fp16]

Per LQ image: a caption from LLaVA through the caption engines (the stage's own code,
default engine `transformers`) unless --prompt overrides it; the text becomes SD1.5 CLIP
chunks exactly as the embed stage makes them; sampling starts from the LQ latent noised to
t = 999 (LRE) and runs DDPM (or DPM-Solver++) with classifier-free guidance (the empty
prompt as the unconditional branch, structure and image priors on in both branches).

Inputs with a side above --tile (LQ pixels) run in overlapping tiles: the model sees one
tile at a time (LQ tile, its ×4 upsampled tile, the matching latent window) and the noise
predictions are blended in latent space with Gaussian weights at every step (as tiled
diffusion / MultiDiffusion); the VAE encodes and decodes in tiles too (diffusers'
`enable_tiling`, sized to the same tile). So activation memory is bounded by the tile; only
the image-sized buffers (LQ↑, latents, output) grow with the image.

Outputs are PNGs named after the inputs, with the prompt and the settings in PNG text
chunks (`prompt`, `sspir`). Exit status: 0 all restored; 1 some inputs failed (each named
on stderr, the others restored); 2 nothing could start (checkpoint, models, engine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import cv2  # noqa: E402
from pipeline.core.image_io import IMAGE_SUFFIXES  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from model.inference.sampling import (PRIOR_CACHE_BYTES, OnStep, Predict, Predictor, PriorCache, guided_noise,  # noqa: E402
                            restore as sample)

SCALE = 4  # SSP-IR restores ×4 (LQ 128² → 512² at training)
LRE_TIMESTEP = 999
SCHEDULERS = ("ddpm", "dpm")
COLOR_FIXES = ("none", "adain", "wavelet")
MAX_LQ_PIXELS = 4096 * 4096  # a 16K² output; larger inputs are refused by name, not OOM-killed


class RestoreSetupError(RuntimeError):
    """Nothing can be restored (checkpoint, models, settings); the message says what to fix."""


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
    """What the run trained on, from trainer_state.json: `pretrained` (SD1.5), `image_encoder`, `step`."""
    from model.training.checkpoint import load_trainer_state

    state = load_trainer_state(ckpt)
    cfg = state.get("config", state)
    return {"pretrained": cfg.get("pretrained"), "image_encoder": cfg.get("image_encoder"),
            "step": state.get("step")}


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


def make_scheduler(config: Any, kind: str) -> Any:
    """DDPM or DPM-Solver++ (2nd order) from SD1.5's scheduler config, with "trailing"
    timesteps: the first step is then t = 999, the very level the LRE start is noised to
    (SD1.5's "leading" spacing would start at 981 for 50 steps and at 751 for 4)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    cls = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}[kind]
    return cls.from_config(config, timestep_spacing="trailing")


# ----------------------------------------------------------------- tiles ---


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, the last one flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) windows covering a (height, width) grid with tiles of `tile` overlapping by `overlap`."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in axis_starts(height, tile, tile - overlap)
            for x in axis_starts(width, tile, tile - overlap)]


def gaussian_weights(height: int, width: int, var: float = 0.01) -> torch.Tensor:
    """(1, 1, h, w) Gaussian bump centred on the tile (Mixture of Diffusers / StableSR's
    weights): a tile's border, where it lacks context, counts least where tiles overlap."""
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return (axis(height)[:, None] * axis(width)[None, :]).float()[None, None]


def blend_weights(tiles: Sequence[tuple[int, int, int, int]], height: int, width: int) -> list[torch.Tensor]:
    """Each tile's Gaussian weights divided by the sum over all tiles at each position, so
    the blend is a convex combination. Computed once per image: the layout never changes
    between steps. With one tile every weight is exactly 1 (w / w), so a single-tile image
    gets bit for bit the untiled prediction."""
    total = torch.zeros(1, 1, height, width)
    raw = [gaussian_weights(h, w) for _, _, h, w in tiles]
    for (y, x, h, w), g in zip(tiles, raw):
        total[..., y:y + h, x:x + w] += g
    return [g / total[..., y:y + h, x:x + w] for (y, x, h, w), g in zip(tiles, raw)]


def tiled_predictor(tile: int, overlap: int, prior_cache_bytes: int = PRIOR_CACHE_BYTES) -> Predictor:
    """A `model.inference.sampling.restore` predictor that runs the model tile by tile.

    `tile` and `overlap` are latent pixels. Each tile gets its own LQ window (for the CLIP
    image prior), its ×4 window (for the Processor / ControlNet) and its latent window; its
    guided ε̂ is added into a full-size buffer with its normalised Gaussian weights. The
    text (the caption of the whole image) is the same for every tile. Each tile's static
    priors are computed at its first step and kept (`PriorCache`, up to
    `prior_cache_bytes`; tiles beyond it recompute them every step).
    """
    def make(model: Any, text: torch.Tensor, uncond: torch.Tensor, lq: torch.Tensor, lq_up: torch.Tensor,
             guidance: float) -> Predict:
        f = 2 ** (len(model.vae.config.block_out_channels) - 1)  # image pixels per latent pixel
        lat_h, lat_w = lq_up.shape[-2] // f, lq_up.shape[-1] // f
        q = f * lq.shape[-1] // lq_up.shape[-1]  # LQ pixels per latent pixel (2 at ×4)
        tiles = plan_tiles(lat_h, lat_w, tile, overlap)
        weights = [w.to(lq_up.device) for w in blend_weights(tiles, lat_h, lat_w)]
        cache = PriorCache(model, prior_cache_bytes)

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(latents, dtype=torch.float32)
            for (y, x, h, w), wt in zip(tiles, weights):
                lq_win = lq[..., q * y:q * (y + h), q * x:q * (x + w)]
                up_win = lq_up[..., f * y:f * (y + h), f * x:f * (x + w)]
                eps = guided_noise(model, latents[..., y:y + h, x:x + w], t, text, uncond, lq_win, up_win,
                                   guidance, cache.get((y, x), lq_win, up_win))
                out[..., y:y + h, x:x + w] += eps.float() * wt
            return out.to(latents.dtype)

        return predict

    return make


# ------------------------------------------------------------ colour fix ---


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std to the reference's (AdaIN, as StableSR/SeeSR):
    diffusion models drift in global colour; the LQ's colour statistics are trustworthy."""
    m_i, s_i = _mean_std(image)
    m_r, s_r = _mean_std(reference)
    return (image - m_i) / s_i * s_r + m_r


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): à-trous decomposition with dilations 1, 2, 4, 8, 16."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The restoration's high frequencies over the reference's lowest band (StableSR/SeeSR's
    wavelet_color_fix): keeps the generated detail and takes colour and tone from the LQ."""
    return _wavelet_split(image)[0] + _wavelet_split(reference)[1]


def color_fix(image: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] corrected towards `reference` (the LQ upsampled, same size)."""
    if mode == "none":
        return image
    fix = {"adain": adain_color_fix, "wavelet": wavelet_color_fix}[mode]
    return fix(image.float(), reference.float()).clamp(-1, 1)


# ---------------------------------------------------------------- images ---


def pad_lq(rgb: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad (H, W, 3) at the bottom and right to multiples of `multiple`: the UNet
    halves the latent three times, so odd sizes must be padded, and cropped after."""
    h, w = rgb.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return rgb
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def lq_tensors(rgb: np.ndarray, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 LQ (h, w, 3) → (lq (1, 3, h, w) in [0, 1], lq_up (1, 3, 4h, 4w) in [-1, 1]):
    the same cv2 bicubic on uint8 and the same value tables the training loader uses."""
    from model.training.data import images_to_float

    h, w = rgb.shape[:2]
    up = cv2.resize(rgb, (SCALE * w, SCALE * h), interpolation=cv2.INTER_CUBIC)
    chw = {"lq": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
           "lq_up": torch.from_numpy(np.ascontiguousarray(up.transpose(2, 0, 1)))}
    floats = images_to_float(chw)
    return floats["lq"][None].to(device), floats["lq_up"][None].to(device)


def read_lq(path: Path, max_pixels: int = MAX_LQ_PIXELS) -> np.ndarray:
    """uint8 RGB (h, w, 3) through the pipeline's loader (EXIF rotation, 16-bit, CMYK,
    alpha over white); raises SourceError with a reason a person can act on."""
    from pipeline.core.image_io import load_source

    return load_source(path, max_pixels=max_pixels, min_side=1)[0]


def list_inputs(path: Path) -> list[Path]:
    """A file as given, or a folder's image files (by suffix), sorted by name."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not path.exists():
        raise RestoreSetupError(f"--input {path} does not exist")
    return [path]


def output_names(inputs: Sequence[Path]) -> dict[Path, str]:
    """`<stem>.png`, or `<name>.png` where two inputs share a stem (a.jpg, a.png): never
    let one input's result overwrite another's."""
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    return {p: f"{p.stem if stems[p.stem] == 1 else p.name}.png" for p in inputs}


def write_png(path: Path, rgb: np.ndarray, text: dict[str, str]) -> Path:
    """Write atomically (temporary file + rename) with PNG text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
        precomputed embedding for `prompt`); `on_step(i, t, latents)` sees each step."""
        self.check(settings)
        t0 = time.perf_counter()
        h, w = lq_rgb.shape[:2]
        if text is None:
            text = self.embed(prompt)
        lq, lq_up = lq_tensors(pad_lq(lq_rgb, self.multiple), self.device)
        self._configure_vae(settings)
        scheduler = make_scheduler(self.model.noise_scheduler.config, settings.scheduler)
        predictor, tiles = self._predictor(settings, lq_up)
        with self._autocast():
            out = sample(self.model, scheduler, lq, lq_up, text[None].to(self.device), self.empty.to(self.device),
                         steps=settings.steps, guidance=settings.guidance, seed=settings.seed,
                         predictor=predictor, on_step=on_step)
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
                "timestep_spacing": "trailing", **dataclasses.asdict(settings)}
        return {"prompt": prompt, "sspir": json.dumps(meta, sort_keys=True), "Software": "SSP-IR model/restore.py"}


# -------------------------------------------------------------- captions ---


def caption_inputs(paths: Sequence[Path], engine: Any, batch_size: int,
                   read: Callable[[Path], np.ndarray] = read_lq) -> Iterator[tuple[Path, str | None, str | None]]:
    """(path, caption or None, error or None) for each readable input, in batches, with the
    images of one batch in memory at a time. Unreadable inputs yield (path, None, reason)."""
    from PIL import Image

    from pipeline.core.image_io import SourceError

    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for p in paths[start:start + batch_size]:
            try:
                batch.append((p, Image.fromarray(read(p))))
            except SourceError as e:
                yield p, None, f"unreadable: {e.reason}"
        results = engine.caption([im for _, im in batch]) if batch else []
        for (p, _), res in zip(batch, results):
            yield p, res.caption, res.error


def make_caption_engine(name: str, model: str | None, server: str | None, max_tokens: int | None) -> Any:
    """The caption stage's engine with the manifest-free defaults (CaptionConfig())."""
    from pipeline.caption.config import CaptionConfig
    from pipeline.caption.engines import EngineError, make_engine

    fields: dict[str, Any] = {"engine": name}
    for key, value in (("model", model), ("server", server), ("max_tokens", max_tokens)):
        if value is not None:
            fields[key] = value
    try:
        return make_engine(CaptionConfig(**fields))
    except (EngineError, ValueError) as e:
        raise RestoreSetupError(f"caption engine {name!r}: {e}; or pass --prompt") from None


# ------------------------------------------------------------------- CLI ---


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training run folder (newest "
                                                        "checkpoint)")
    ap.add_argument("--input", required=True, type=Path, help="an LQ image or a folder of them")
    ap.add_argument("--out", required=True, type=Path, help="output folder (PNG per input)")
    ap.add_argument("--prompt", help="use this text for every image instead of LLaVA captions")
    ap.add_argument("--caption-engine", default="transformers", choices=("transformers", "server", "vllm"))
    ap.add_argument("--caption-model", help="LLaVA folder or hub id (default: llava-hf/llava-1.5-7b-hf)")
    ap.add_argument("--caption-server", help="OpenAI-compatible base URL for --caption-engine server")
    ap.add_argument("--caption-max-tokens", type=int, help="caption length cap (default 256)")
    d = RestoreSettings()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale (1: off)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS,
                    help="ddpm (the paper's) or dpm (DPM-Solver++: fewer steps, e.g. 20)")
    ap.add_argument("--tile", type=int, default=d.tile, help="tile side in LQ pixels (0: never tile)")
    ap.add_argument("--tile-overlap", type=int, default=d.tile_overlap, help="tile overlap in LQ pixels")
    ap.add_argument("--color-fix", default=d.color_fix, choices=COLOR_FIXES)
    ap.add_argument("--sd", help="SD1.5 folder or hub id (default: the one the run trained on)")
    ap.add_argument("--image-encoder", help="CLIP image encoder (default: the one the run trained on)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="frozen parts' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> RestoreSettings:
    return RestoreSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler,
                           tile=args.tile, tile_overlap=args.tile_overlap, color_fix=args.color_fix)


def check_models_exist(args: argparse.Namespace) -> None:
    """The checkpoint and the SD1.5 folder it needs are there (cheap: no weights read)."""
    from model.networks.sspir import ModelLayoutError, resolve_sd

    sd = args.sd or checkpoint_models(resolve_checkpoint(args.checkpoint))["pretrained"]
    if not sd:
        raise RestoreSetupError("the checkpoint records no SD1.5 model; pass --sd")
    try:
        resolve_sd(sd)
    except ModelLayoutError as e:
        raise RestoreSetupError(f"{e}; pass --sd if it moved") from None


def prompts_for(args: argparse.Namespace, inputs: Sequence[Path],
                failed: dict[Path, str]) -> dict[Path, tuple[str, str]]:
    """(prompt, source) per input: --prompt, or LLaVA's caption (engine closed afterwards,
    before SD1.5 loads, so the two never share a GPU). Unreadable inputs go to `failed`."""
    if args.prompt is not None:
        return {p: (args.prompt, "user") for p in inputs}
    engine = make_caption_engine(args.caption_engine, args.caption_model, args.caption_server,
                                 args.caption_max_tokens)
    out: dict[Path, tuple[str, str]] = {}
    try:
        for path, caption, error in caption_inputs(inputs, engine, engine.cfg.batch_size):
            if caption is not None:
                out[path] = (caption, "caption")
            elif error.startswith("unreadable"):
                failed[path] = error
                print(f"error: {path}: {error}", file=sys.stderr)
            else:  # as the embed stage does with a failed caption: the empty prompt
                print(f"warning: {path}: caption failed ({error}); restoring with the empty prompt", file=sys.stderr)
                out[path] = ("", "caption-failed")
    finally:
        engine.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def restore_all(restorer: Restorer, inputs: Iterable[Path], prompts: dict[Path, tuple[str, str]],
                names: dict[Path, str], out: Path, settings: RestoreSettings, failed: dict[Path, str]) -> int:
    """Restore each input; a failure is named on stderr and the rest go on. Returns the count done."""
    from pipeline.core.image_io import SourceError

    done = 0
    for path in inputs:
        if path in failed:
            continue
        prompt, source = prompts[path]
        try:
            rgb = read_lq(path)
            result = restorer.restore(rgb, prompt, settings)
            target = write_png(out / names[path], result.image,
                               restorer.metadata(prompt, source, settings, path, rgb.shape[:2]))
        except SourceError as e:
            failed[path] = f"unreadable: {e.reason}"
        except (RuntimeError, ValueError, OSError) as e:  # e.g. out of memory on one huge input
            failed[path] = f"{type(e).__name__}: {e}"
        else:
            done += 1
            print(f"{path} -> {target} ({result.image.shape[1]}x{result.image.shape[0]}, {result.tiles} tile(s), "
                  f"{result.seconds:.1f} s)")
            continue
        print(f"error: {path}: {failed[path]}", file=sys.stderr)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    failed: dict[Path, str] = {}
    try:
        early = settings.problems(1)  # the tile multiple is checked once the model is loaded
        if early:
            raise RestoreSetupError("; ".join(early))
        inputs = list_inputs(args.input)
        if not inputs:
            raise RestoreSetupError(f"--input {args.input} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        check_models_exist(args)  # fail before minutes of captioning, not after
        prompts = prompts_for(args, inputs, failed)
        restorer = Restorer(args.checkpoint, sd=args.sd, image_encoder=args.image_encoder, device=args.device,
                            dtype=args.dtype)
        restorer.check(settings)
    except RestoreSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = restore_all(restorer, inputs, prompts, output_names(inputs), args.out, settings, failed)
    print(f"restored {done} of {len(inputs)} image(s) into {args.out}" +
          (f"; {len(failed)} failed: {', '.join(str(p) for p in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
