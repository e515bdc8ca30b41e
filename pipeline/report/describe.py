"""A stored recipe in words, step by step, for the gallery of pairs.

The gallery is where a person checks by eye that a pair looks like its recipe says
(heavy blur, strong JPEG, a ringing sinc), so every step is named in the order it is
applied, with the values that matter and nothing a reader cannot see.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.report.expected import KERNEL_WORDS


def _kernel(k: dict[str, Any]) -> str:
    kind = str(k["type"])
    words = f"{KERNEL_WORDS.get(kind, kind)} {int(k['size'])}×{int(k['size'])}"
    if kind == "sinc":
        return f"{words}, ω_c {float(k['omega_c']):.2f}"
    if kind.endswith("aniso"):
        words += (f", σ {float(k['sigma_x']):.2f}×{float(k['sigma_y']):.2f} px, "
                  f"θ {math.degrees(float(k['theta'])):.0f}°")
    else:
        words += f", σ {float(k['sigma_x']):.2f} px"
    if k.get("beta") is not None:
        words += f", β {float(k['beta']):.2f}"
    return words


def _resize(r: dict[str, Any]) -> str:
    side = r.get("size", ["?"])[0]
    if r["updown"] == "keep":
        return f"keep size ({side}²)"
    return f"{'up' if r['updown'] == 'up' else 'down'}scale ×{float(r['scale']):.2f} to {side}² ({r['mode']})"


def _noise(n: dict[str, Any]) -> str:
    grey = ", grey" if n.get("gray") else ", colour"
    if n["type"] == "gaussian":
        return f"Gaussian noise σ {float(n['sigma']):.1f}/255{grey}"
    return f"Poisson noise ×{float(n['scale']):.2f}{grey}"


def recipe_words(recipe: dict[str, Any]) -> list[str]:
    """The recipe's steps in the order they are applied (one short phrase each)."""
    steps = []
    if recipe.get("hflip"):
        steps.append("flipped")
    steps += [f"blur: {_kernel(recipe['blur1'])}", _resize(recipe["resize1"]), _noise(recipe["noise1"]),
              f"JPEG q{int(recipe['jpeg1'])}"]
    steps.append(f"blur: {_kernel(recipe['blur2'])}" if recipe.get("blur2") else "no second blur")
    steps += [_resize(recipe["resize2"]), _noise(recipe["noise2"])]
    final = recipe["final"]
    lq = int(recipe["gt_size"]) // int(recipe["scale"])
    resize = f"resize to {lq}² ({final['resize_mode']})"
    sinc = f"final sinc {int(final['sinc']['size'])}×{int(final['sinc']['size'])}, ω_c {float(final['sinc']['omega_c']):.2f}" \
        if final.get("sinc") else "no final sinc"
    jpeg = f"JPEG q{int(recipe['jpeg2'])}"
    steps += [resize, sinc, jpeg] if final["order"] == "resize_sinc_jpeg" else [jpeg, resize, sinc]
    return steps
