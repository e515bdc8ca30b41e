"""Blur kernels of the Real-ESRGAN degradation model (BasicSR ``degradations.py``).

Everything here is float64 numpy and free of randomness: a recipe stores kernel
*parameters*, and these functions turn parameters back into the exact same array every
time, which is what makes a stored recipe enough to regenerate an LQ image.

Conventions carried over from BasicSR so that kernels match theirs element for element:
* the grid is centred on the middle tap, x runs along columns and y along rows;
* Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, θ in radians;
* every kernel is normalised to unit sum (a blur must not change the mean brightness);
* a sinc (circular low-pass) kernel has its centre tap set to the analytic limit
  ω_c²/(4π), since the Bessel expression is 0/0 there.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from pipeline.degrade.config import GAUSSIAN_FAMILY

ISOTROPIC_KINDS = frozenset({"iso", "generalized_iso", "plateau_iso"})


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Covariance of a rotated Gaussian; rotation lets anisotropic blur point any way."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    return rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets from the centre tap, (xx, yy) with xx varying along columns."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return np.meshgrid(ax, ax)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """xᵀ Σ⁻¹ x on the grid: the shared 'distance' all Gaussian-family shapes are built from."""
    inv = np.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta))
    xx, yy = _grid(size)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def gaussian_family_kernel(
    kind: str,
    size: int,
    sigma_x: float,
    sigma_y: float,
    theta: float,
    beta: float | None = None,
) -> np.ndarray:
    """One of the six Gaussian-family blur kernels, unit sum, ``size``×``size``.

    The isotropic kinds ignore ``sigma_y`` and ``theta`` (BasicSR uses σx for both axes),
    so a recipe that records them for an iso kernel still maps to one array.
    ``beta`` is the shape parameter of the generalized (exp(-½q^β)) and plateau
    (1/(q^β+1)) kinds; the plain Gaussians ignore it.
    """
    if kind not in GAUSSIAN_FAMILY:
        raise ValueError(f"unknown kernel kind {kind!r}; known: {list(GAUSSIAN_FAMILY)}")
    if size % 2 != 1 or size < 1:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    if kind in ISOTROPIC_KINDS:
        sigma_y, theta = sigma_x, 0.0
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind in ("iso", "aniso"):
        k = np.exp(-0.5 * q)
    else:
        if beta is None:
            raise ValueError(f"kernel kind {kind!r} needs beta")
        if kind.startswith("generalized"):
            k = np.exp(-0.5 * np.power(q, beta))
        else:
            k = 1.0 / (np.power(q, beta) + 1.0)
    return k / k.sum()


def sinc_kernel(omega_c: float, size: int, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel: ringing/overshoot artifacts of real cameras.

    h(r) = ω_c J₁(ω_c r) / (2π r), the inverse transform of a disc of radius ω_c in the
    frequency plane, truncated to ``size`` and renormalised; optionally zero-padded.
    """
    if size % 2 != 1 or size < 1:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    c = (size - 1) // 2
    r[c, c] = 1.0  # placeholder, overwritten below; avoids a 0/0 warning
    k = omega_c * special.j1(omega_c * r) / (2.0 * np.pi * r)
    k[c, c] = omega_c**2 / (4.0 * np.pi)
    k = k / k.sum()
    if pad_to > size:
        k = pad_kernel(k, pad_to)
    return k


def pad_kernel(k: np.ndarray, to: int) -> np.ndarray:
    """Zero-pad a centred odd kernel to ``to``×``to`` so all kernels of a stage share a shape."""
    size = k.shape[0]
    if k.shape[0] != k.shape[1] or size % 2 != 1:
        raise ValueError(f"kernel must be square with odd size, got {k.shape}")
    if to < size or to % 2 != 1:
        raise ValueError(f"cannot pad a {size}×{size} kernel to {to} (need odd to >= size)")
    p = (to - size) // 2
    return np.pad(k, ((p, p), (p, p)))


def kernel_from_params(params: dict, pad: bool = True) -> np.ndarray:
    """Rebuild the kernel a recipe describes (``type`` sinc or a Gaussian-family kind).

    ``pad=False`` returns the unpadded ``size``×``size`` kernel: filtering with it gives the
    same image as with the zero-padded one (the padding taps weigh 0), only faster.
    """
    size = int(params["size"])
    if params["type"] == "sinc":
        k = sinc_kernel(float(params["omega_c"]), size)
    else:
        k = gaussian_family_kernel(
            params["type"],
            size,
            float(params["sigma_x"]),
            float(params["sigma_y"]),
            float(params["theta"]),
            None if params.get("beta") is None else float(params["beta"]),
        )
    pad_to = int(params.get("pad_to", 0) or 0)
    if pad and pad_to > size:
        k = pad_kernel(k, pad_to)
    return k
