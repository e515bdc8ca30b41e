"""Restoration sampling: LRE start, classifier-free guidance, a diffusers scheduler.

LRE (as SeeSR): instead of pure noise, start from the LQ latent noised to the first
timestep (t = 999), which carries the LQ's low frequencies into the result. The
unconditional branch drops the text (the empty prompt), as the authors do; the
structure and image priors stay on in both branches.
"""

from __future__ import annotations

from typing import Any

import torch


def lre_start(model: Any, scheduler: Any, lq_up: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The LQ latent noised to the scheduler's first timestep."""
    latents = model.encode_images(lq_up, sample=False)
    noise = torch.randn(latents.shape, generator=generator, device="cpu", dtype=torch.float32).to(latents)
    t = scheduler.timesteps[:1].repeat(latents.shape[0]).to(latents.device)
    return scheduler.add_noise(latents, noise, t)


@torch.no_grad()
def restore(model: Any, scheduler: Any, lq: torch.Tensor, lq_up: torch.Tensor, text: torch.Tensor,
            empty: torch.Tensor, steps: int = 50, guidance: float = 7.5, seed: int = 0) -> torch.Tensor:
    """Restore a batch: lq (B, 3, h, w) in [0, 1], lq_up (B, 3, H, W) in [-1, 1], text (B, L, D),
    empty (77, D) → images (B, 3, H, W) in [-1, 1]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = lre_start(model, scheduler, lq_up, generator)
    uncond = empty.to(text).unsqueeze(0).expand(text.shape[0], -1, -1)
    if uncond.shape[1] < text.shape[1]:  # pad the empty prompt to the caption's chunk count
        reps = text.shape[1] // uncond.shape[1]
        uncond = uncond.repeat(1, reps, 1)
    for t in scheduler.timesteps:
        tt = t.repeat(latents.shape[0]).to(latents.device)
        if guidance != 1.0:
            both = torch.cat([latents, latents])
            pred = model(both, torch.cat([tt, tt]), torch.cat([uncond, text]),
                         torch.cat([lq, lq]), torch.cat([lq_up, lq_up]))[0]
            p_uncond, p_text = pred.chunk(2)
            pred = p_uncond + guidance * (p_text - p_uncond)
        else:
            pred = model(latents, tt, text, lq, lq_up)[0]
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    return model.vae.decode(latents / model.vae.config.scaling_factor).sample.clamp(-1, 1)
