"""Restoration sampling: LRE start, classifier-free guidance, a diffusers scheduler.

LRE (as SeeSR): instead of pure noise, start from the LQ latent noised to the first
timestep (t = 999 with the "trailing" schedule of model/inference/scheduler.py), which
carries the LQ's low frequencies into the result. The unconditional branch drops the text
(the empty prompt), as the authors do; the structure and image priors stay on in both
branches.

Precision: the networks may run in bf16 (frozen parts stored in bf16, autocast), but the
diffusion state does not: the latents, the guidance combination ε_u + w·(ε_c − ε_u) and
every scheduler step are float32. In bf16 (8-bit mantissa) 50 steps would accumulate
rounding error, and guidance multiplies the difference of two predictions by 7.5.

The loop is split into pieces so that tiled restoration (model/inference/tiling.py) can swap
how the noise is predicted without a second copy of the loop: `restore(..., predictor=...)`
takes a factory that returns `predict(latents, t) -> ε`; the default predicts on the whole
latent at once.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (model, text, uncond, lq, lq_up, guidance) -> predict(latents, t)
Predictor = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], Predict]
# (step index, timestep, latents before that step); step 0 sees the LRE start
OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]


def lre_start(model: Any, scheduler: Any, lq_up: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The LQ latent noised to the scheduler's first timestep (float32)."""
    latents = model.encode_images(lq_up, sample=False).float()
    noise = torch.randn(latents.shape, generator=generator, device="cpu", dtype=torch.float32).to(latents.device)
    t = scheduler.timesteps[:1].repeat(latents.shape[0]).to(latents.device)
    return scheduler.add_noise(latents, noise, t)


def uncond_like(empty: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The empty prompt (77, D) batched like `text` (B, 77·k, D): repeated k times, so both
    CFG branches have the same sequence length and can share one forward pass."""
    uncond = empty.to(text).unsqueeze(0).expand(text.shape[0], -1, -1)
    if uncond.shape[1] < text.shape[1]:  # pad the empty prompt to the caption's chunk count
        reps = text.shape[1] // uncond.shape[1]
        uncond = uncond.repeat(1, reps, 1)
    return uncond


Static = dict[str, Any]


def doubled(static: Static) -> Static:
    """Static priors of one branch batched for both CFG branches (the priors are on in both;
    a model without image attention has no image tokens)."""
    return {k: None if static[k] is None else torch.cat([static[k]] * 2) for k in ("features", "image_tokens")}


def guided_noise(model: Any, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                 lq: torch.Tensor, lq_up: torch.Tensor, guidance: float, static: Static | None = None
                 ) -> torch.Tensor:
    """ε̂ (float32) with classifier-free guidance: both branches in one batch, priors on in both.

    `static` is `model.static_priors(lq, lq_up)`, computed once per image or tile by the
    caller; without it they are computed here (once, for both branches). The networks'
    output is taken to float32 before the two branches are combined."""
    tt = t.repeat(latents.shape[0]).to(latents.device)
    if static is None:
        static = model.static_priors(lq, lq_up)
    if guidance == 1.0:
        return model(latents, tt, text, lq, lq_up, static=static)[0].float()
    both = torch.cat([latents, latents])
    pred = model(both, torch.cat([tt, tt]), torch.cat([uncond, text]),
                 torch.cat([lq, lq]), torch.cat([lq_up, lq_up]), static=doubled(static))[0]
    p_uncond, p_text = pred.float().chunk(2)
    return p_uncond + guidance * (p_text - p_uncond)


class PriorCache:
    """Static priors per LQ window (a tile), kept across denoising steps within a byte budget.

    They do not change between steps, so computing them once per tile instead of once per
    step saves the Processor (full resolution) and the CLIP tower at every step. Windows
    beyond the budget are recomputed each step (same values: the computation is
    deterministic), so memory stays bounded on very large images. At SD1.5 size a 512² tile
    keeps about 6 MB (320 × 64² features + 257 × 768 tokens, float32).
    """

    def __init__(self, model: Any, budget_bytes: int) -> None:
        self.model, self.budget, self.used = model, budget_bytes, 0
        self.kept: dict[Any, Static] = {}

    def get(self, key: Any, lq: torch.Tensor, lq_up: torch.Tensor) -> Static:
        hit = self.kept.get(key)
        if hit is not None:
            return hit
        full = self.model.static_priors(lq, lq_up)
        static = {"features": full["features"], "image_tokens": full["image_tokens"]}
        size = sum(v.numel() * v.element_size() for v in static.values() if v is not None)
        if self.used + size <= self.budget:
            self.kept[key] = static
            self.used += size
        return static


PRIOR_CACHE_BYTES = 1 << 30


def whole_image(model: Any, text: torch.Tensor, uncond: torch.Tensor, lq: torch.Tensor, lq_up: torch.Tensor,
                guidance: float) -> Predict:
    """The default predictor: the model sees the whole latent; static priors computed once."""
    static = model.static_priors(lq, lq_up)
    return lambda latents, t: guided_noise(model, latents, t, text, uncond, lq, lq_up, guidance, static)


def denoise(scheduler: Any, latents: torch.Tensor, predict: Predict, generator: torch.Generator,
            on_step: OnStep | None = None) -> torch.Tensor:
    """Run the scheduler's timesteps from `latents`; `on_step` sees the latents before each step.
    The state and each step are float32, whatever the predictor's networks run in."""
    latents = latents.float()
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i, t, latents)
        latents = scheduler.step(predict(latents, t).float(), t, latents, generator=generator).prev_sample.float()
    return latents


@torch.no_grad()
def restore(model: Any, scheduler: Any, lq: torch.Tensor, lq_up: torch.Tensor, text: torch.Tensor,
            empty: torch.Tensor, steps: int = 50, guidance: float = 7.5, seed: int = 0, *,
            predictor: Predictor = whole_image, on_step: OnStep | None = None) -> torch.Tensor:
    """Restore a batch: lq (B, 3, h, w) in [0, 1], lq_up (B, 3, H, W) in [-1, 1], text (B, L, D),
    empty (77, D) → images (B, 3, H, W) in [-1, 1].

    All random draws (the LRE noise, the scheduler's noise) come from one generator seeded
    with `seed` and drawn at full latent size, so the result does not depend on how the
    predictor splits the work."""
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = lre_start(model, scheduler, lq_up, generator)
    predict = predictor(model, text, uncond_like(empty, text), lq, lq_up, guidance)
    latents = denoise(scheduler, latents, predict, generator, on_step)
    return model.decode_latents(latents)
