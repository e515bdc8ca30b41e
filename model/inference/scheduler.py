"""The one scheduler factory: what restoration and the trainer's validation grids both sample with.

DDPM (the paper's) or DPM-Solver++ (2nd order) from SD1.5's scheduler config, with
"trailing" timesteps: the first step is then t = 999, the very level the LRE start is noised
to (SD1.5's "leading" spacing would start at 981 for 50 steps, at 901 for 10 and at 751 for 4).
The model's `prediction_type` (epsilon or v_prediction) comes with the config; both
schedulers apply it themselves.
"""

from __future__ import annotations

from typing import Any

SCHEDULERS = ("ddpm", "dpm")
LRE_TIMESTEP = 999
TIMESTEP_SPACING = "trailing"


def make_scheduler(config: Any, kind: str = "ddpm") -> Any:
    """A fresh scheduler of `kind` from a diffusers scheduler config (its own state: safe to
    set_timesteps without touching the training scheduler it came from)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    try:
        cls = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}[kind]
    except KeyError:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {kind!r}") from None
    return cls.from_config(config, timestep_spacing=TIMESTEP_SPACING)
