"""Tiled diffusion: overlapping latent tiles whose noise predictions are blended at every step.

Inputs larger than a tile run tile by tile: the model sees one tile at a time (LQ tile, its
×4 upsampled tile, the matching latent window) and the guided noise predictions are added
into a full-size buffer with Gaussian weights normalised so that they sum to one at every
latent position (as tiled diffusion / MultiDiffusion / Mixture of Diffusers do). So
activation memory is bounded by the tile.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from model.inference.sampling import PRIOR_CACHE_BYTES, Predict, Predictor, PriorCache, guided_noise


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
