"""What the degrade settings ask for, draw by draw, and what a stored recipe drew.

Both halves are written from the recipe's documented layout and BasicSR's sampling rules
(``realesrgan_dataset.py``, ``degradations.py``), not by calling
``pipeline.degrade.recipe``: a report that asked the sampler what to expect would agree
with any bug in it. The expected distributions are computed from the settings recorded in
the pairs sidecars (or a manifest given to the report); the draws are read back from each
row's ``recipe`` JSON.

Conditional draws are tested on the rows where they happen: σ_y and θ only for
anisotropic kernels, β only for the generalized / plateau kinds, ω_c only for sinc
kernels, the up- and down-scale factors separately, the second blur only when it is applied.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pipeline.degrade.config import DegradeConfig
from pipeline.report.distributions import Categorical, Distribution, Mixture, Piece

# BasicSR draws ω_c from [π/3, π] for kernels smaller than 13 taps and from [π/5, π]
# otherwise (a small kernel cannot hold a very low cut-off).
SINC_SMALL_KERNEL = 13
UPDOWN = ("up", "down", "keep")
ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")
YES_NO = ("yes", "no")
KERNEL_WORDS = {
    "iso": "isotropic Gaussian",
    "aniso": "anisotropic Gaussian",
    "generalized_iso": "generalized isotropic Gaussian",
    "generalized_aniso": "generalized anisotropic Gaussian",
    "plateau_iso": "plateau isotropic",
    "plateau_aniso": "plateau anisotropic",
    "sinc": "sinc (ringing)",
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One draw of the recipe: its name in the report, words for it, and its law."""

    name: str
    label: str
    dist: Distribution
    settings: str  # the settings that define the law, as the manifest names them
    unit: str = ""


def _coin(p: float) -> Categorical:
    return Categorical(YES_NO, (p, 1.0 - p))


def _uniform(lo: float, hi: float) -> Mixture:
    return Mixture((Piece(1.0, lo, hi),))


def _odd_sizes(kernel_range: tuple[int, int]) -> list[int]:
    return list(range(int(kernel_range[0]), int(kernel_range[1]) + 1, 2))


def _kernel_specs(stage: int, cfg: DegradeConfig) -> list[ParamSpec]:
    sfx = "" if stage == 1 else "2"
    sinc_p = getattr(cfg, f"sinc_prob{sfx}")
    kinds, probs = getattr(cfg, f"kernel_list{sfx}"), getattr(cfg, f"kernel_prob{sfx}")
    total = float(sum(probs))
    weights: dict[str, float] = {}
    for k, p in zip(kinds, probs):
        weights[k] = weights.get(k, 0.0) + (1.0 - sinc_p) * p / total
    types = ("sinc",) + tuple(k for k in KERNEL_WORDS if k != "sinc")
    sizes = _odd_sizes(cfg.kernel_range)
    small = sum(s < SINC_SMALL_KERNEL for s in sizes) / len(sizes)
    sig = getattr(cfg, f"blur_sigma{sfx}")
    bg, bp = getattr(cfg, f"betag_range{sfx}"), getattr(cfg, f"betap_range{sfx}")
    name, words = f"blur{stage}", f"stage {stage} blur"

    def beta(r: tuple[float, float]) -> Mixture:  # half the time below 1, half above (BasicSR)
        return Mixture((Piece(0.5, r[0], 1.0), Piece(0.5, 1.0, r[1])))

    out = []
    if stage == 2:
        out.append(ParamSpec("blur2.applied", "stage 2 blur applied", _coin(cfg.second_blur_prob),
                             f"second_blur_prob {cfg.second_blur_prob:g}"))
    out += [
        ParamSpec(f"{name}.type", f"{words}: kernel type",
                  Categorical(types, (sinc_p,) + tuple(weights.get(t, 0.0) for t in types[1:])),
                  f"sinc_prob{sfx} {sinc_p:g}, kernel_list{sfx} / kernel_prob{sfx}"),
        ParamSpec(f"{name}.size", f"{words}: kernel size",
                  Categorical(tuple(map(str, sizes)), tuple(1.0 for _ in sizes), ordinal=True),
                  f"kernel_range {list(cfg.kernel_range)} (odd sizes, uniform)", "taps"),
        ParamSpec(f"{name}.sigma_x", f"{words}: σx (Gaussian-family kernels)", _uniform(*sig),
                  f"blur_sigma{sfx} {list(sig)}", "px"),
        ParamSpec(f"{name}.sigma_y", f"{words}: σy (anisotropic kernels)", _uniform(*sig),
                  f"blur_sigma{sfx} {list(sig)}", "px"),
        ParamSpec(f"{name}.theta", f"{words}: rotation θ (anisotropic kernels)", _uniform(-math.pi, math.pi),
                  "[-π, π] (BasicSR)", "rad"),
        ParamSpec(f"{name}.beta_generalized", f"{words}: β (generalized kernels)", beta(bg),
                  f"betag_range{sfx} {list(bg)}, half below 1, half above"),
        ParamSpec(f"{name}.beta_plateau", f"{words}: β (plateau kernels)", beta(bp),
                  f"betap_range{sfx} {list(bp)}, half below 1, half above"),
        ParamSpec(f"{name}.omega_c", f"{words}: sinc cut-off ω_c",
                  Mixture((Piece(small, math.pi / 3, math.pi), Piece(1.0 - small, math.pi / 5, math.pi))),
                  f"[π/3, π] below {SINC_SMALL_KERNEL} taps, else [π/5, π]", "rad"),
    ]
    return out


def _resize_specs(stage: int, cfg: DegradeConfig) -> list[ParamSpec]:
    sfx = "" if stage == 1 else "2"
    prob, rng = getattr(cfg, f"resize_prob{sfx}"), getattr(cfg, f"resize_range{sfx}")
    words = f"stage {stage} resize"
    return [
        ParamSpec(f"resize{stage}.updown", f"{words}: direction", Categorical(UPDOWN, tuple(prob)),
                  f"resize_prob{sfx} {list(prob)} (up, down, keep)"),
        ParamSpec(f"resize{stage}.scale_up", f"{words}: scale when up", _uniform(1.0, rng[1]),
                  f"resize_range{sfx} {list(rng)}: [1, {rng[1]:g}]", "×"),
        ParamSpec(f"resize{stage}.scale_down", f"{words}: scale when down", _uniform(rng[0], 1.0),
                  f"resize_range{sfx} {list(rng)}: [{rng[0]:g}, 1]", "×"),
        ParamSpec(f"resize{stage}.mode", f"{words}: mode",
                  Categorical(tuple(cfg.resize_modes), tuple(1.0 for _ in cfg.resize_modes)),
                  f"resize_modes {list(cfg.resize_modes)}, uniform"),
    ]


def _noise_specs(stage: int, cfg: DegradeConfig) -> list[ParamSpec]:
    sfx = "" if stage == 1 else "2"
    gp, sig = getattr(cfg, f"gaussian_noise_prob{sfx}"), getattr(cfg, f"noise_range{sfx}")
    pr, grey = getattr(cfg, f"poisson_scale_range{sfx}"), getattr(cfg, f"gray_noise_prob{sfx}")
    words = f"stage {stage} noise"
    return [
        ParamSpec(f"noise{stage}.type", f"{words}: kind", Categorical(("gaussian", "poisson"), (gp, 1.0 - gp)),
                  f"gaussian_noise_prob{sfx} {gp:g}"),
        ParamSpec(f"noise{stage}.sigma", f"{words}: Gaussian σ", _uniform(*sig),
                  f"noise_range{sfx} {list(sig)}", "/255"),
        ParamSpec(f"noise{stage}.poisson_scale", f"{words}: Poisson scale", _uniform(*pr),
                  f"poisson_scale_range{sfx} {list(pr)}"),
        ParamSpec(f"noise{stage}.gray", f"{words}: grey (one field for all channels)", _coin(grey),
                  f"gray_noise_prob{sfx} {grey:g}"),
    ]


def _jpeg_spec(stage: int, cfg: DegradeConfig) -> ParamSpec:
    lo, hi = getattr(cfg, "jpeg_range" if stage == 1 else "jpeg_range2")
    q = tuple(str(v) for v in range(int(lo), int(hi) + 1))
    return ParamSpec(f"jpeg{stage}", f"stage {stage} JPEG quality", Categorical(q, tuple(1.0 for _ in q), ordinal=True),
                     f"jpeg_range{'' if stage == 1 else '2'} {[lo, hi]}, integers, uniform")


def expected_params(cfg: DegradeConfig) -> list[ParamSpec]:
    """Every draw of a recipe with the law the settings define, in the order of the pipeline."""
    sizes = _odd_sizes(cfg.kernel_range)
    return [
        ParamSpec("hflip", "horizontal flip", _coin(0.5 if cfg.use_hflip else 0.0),
                  f"use_hflip {str(cfg.use_hflip).lower()} (p 0.5)"),
        *_kernel_specs(1, cfg), *_resize_specs(1, cfg), *_noise_specs(1, cfg), _jpeg_spec(1, cfg),
        *_kernel_specs(2, cfg), *_resize_specs(2, cfg), *_noise_specs(2, cfg),
        ParamSpec("final.order", "final steps: order", Categorical(ORDERS, (0.5, 0.5)),
                  "p 0.5 each (Real-ESRGAN)"),
        ParamSpec("final.resize_mode", "final resize to the LQ size: mode",
                  Categorical(tuple(cfg.resize_modes), tuple(1.0 for _ in cfg.resize_modes)),
                  f"resize_modes {list(cfg.resize_modes)}, uniform"),
        ParamSpec("final.sinc", "final sinc applied", _coin(cfg.final_sinc_prob),
                  f"final_sinc_prob {cfg.final_sinc_prob:g}"),
        ParamSpec("final.sinc_size", "final sinc: kernel size",
                  Categorical(tuple(map(str, sizes)), tuple(1.0 for _ in sizes), ordinal=True),
                  f"kernel_range {list(cfg.kernel_range)} (odd sizes, uniform)", "taps"),
        ParamSpec("final.sinc_omega_c", "final sinc: cut-off ω_c", _uniform(math.pi / 3, math.pi),
                  "[π/3, π] (Real-ESRGAN)", "rad"),
        _jpeg_spec(2, cfg),
    ]


# ------------------------------------------------------------------ read back ---


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _kernel_draws(prefix: str, k: dict[str, Any], out: dict[str, str | float]) -> None:
    kind = str(k["type"])
    out[f"{prefix}.type"] = kind
    out[f"{prefix}.size"] = str(int(k["size"]))
    if kind == "sinc":
        out[f"{prefix}.omega_c"] = float(k["omega_c"])
        return
    out[f"{prefix}.sigma_x"] = float(k["sigma_x"])
    if kind.endswith("aniso"):
        out[f"{prefix}.sigma_y"] = float(k["sigma_y"])
        out[f"{prefix}.theta"] = float(k["theta"])
    if kind.startswith("generalized"):
        out[f"{prefix}.beta_generalized"] = float(k["beta"])
    elif kind.startswith("plateau"):
        out[f"{prefix}.beta_plateau"] = float(k["beta"])


def _resize_draws(prefix: str, r: dict[str, Any], out: dict[str, str | float]) -> None:
    out[f"{prefix}.updown"] = str(r["updown"])
    if r["updown"] in ("up", "down"):
        out[f"{prefix}.scale_{r['updown']}"] = float(r["scale"])
    out[f"{prefix}.mode"] = str(r["mode"])


def _noise_draws(prefix: str, n: dict[str, Any], out: dict[str, str | float]) -> None:
    out[f"{prefix}.type"] = str(n["type"])
    if n["type"] == "gaussian":
        out[f"{prefix}.sigma"] = float(n["sigma"])
    else:
        out[f"{prefix}.poisson_scale"] = float(n["scale"])
    out[f"{prefix}.gray"] = _yes(n["gray"])


def recipe_draws(recipe: dict[str, Any]) -> dict[str, str | float]:
    """The draws one stored recipe made, keyed like ``expected_params`` (absent: not drawn).

    Raises KeyError/TypeError/ValueError on a recipe of another layout; the caller counts
    such rows as unreadable rather than guessing.
    """
    if recipe.get("version") != 1:
        raise ValueError(f"recipe version {recipe.get('version')!r}; this report reads version 1")
    out: dict[str, str | float] = {"hflip": _yes(recipe["hflip"])}
    _kernel_draws("blur1", recipe["blur1"], out)
    _resize_draws("resize1", recipe["resize1"], out)
    _noise_draws("noise1", recipe["noise1"], out)
    out["jpeg1"] = str(int(recipe["jpeg1"]))
    out["blur2.applied"] = _yes(recipe["blur2"] is not None)
    if recipe["blur2"] is not None:
        _kernel_draws("blur2", recipe["blur2"], out)
    _resize_draws("resize2", recipe["resize2"], out)
    _noise_draws("noise2", recipe["noise2"], out)
    final = recipe["final"]
    out["final.order"] = str(final["order"])
    out["final.resize_mode"] = str(final["resize_mode"])
    out["final.sinc"] = _yes(final["sinc"] is not None)
    if final["sinc"] is not None:
        out["final.sinc_size"] = str(int(final["sinc"]["size"]))
        out["final.sinc_omega_c"] = float(final["sinc"]["omega_c"])
    out["jpeg2"] = str(int(recipe["jpeg2"]))
    return out
