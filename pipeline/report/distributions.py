"""The two shapes a degradation draw's distribution takes, and their goodness-of-fit tests.

Every draw of the Real-ESRGAN recipe is either a choice among named values (kernel type,
resize mode, a coin, an integer JPEG quality) or a mixture of uniform ranges and point
masses (σ, β, ω_c, a scale factor). With those two shapes the expected distribution of
each draw can be written down from the degrade settings alone, and the draws in a build
can be tested against it: χ² for choices (and for mixtures with point masses), KS for
continuous mixtures.

KS needs the empirical CDF, which would mean keeping every value. Instead each value is
mapped through the expected CDF (u = F(x), uniform on [0, 1] when the draws follow F) and
counted on a fine grid; the KS statistic read at the grid's edges is exact there and
below the true statistic by at most one grid step (1/``KS_GRID``), so memory stays fixed
however many rows a build has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

KS_GRID = 1 << 14  # u-space bins: the KS statistic is exact to 1/16384
MIN_EXPECTED = 5.0  # the usual χ² rule: pool categories until each expects at least 5


@dataclasses.dataclass(frozen=True)
class Categorical:
    """A choice among named values (as strings); `ordinal` values have an order that
    pooling must respect (kernel sizes, JPEG qualities)."""

    categories: tuple[str, ...]
    probs: tuple[float, ...]
    ordinal: bool = False

    def __post_init__(self) -> None:
        if len(self.categories) != len(self.probs) or not self.categories:
            raise ValueError("a categorical needs one probability per category")
        total = float(sum(self.probs))
        if total <= 0 or any(p < 0 for p in self.probs):
            raise ValueError(f"probabilities must be non-negative with a positive sum, got {self.probs}")
        object.__setattr__(self, "probs", tuple(float(p) / total for p in self.probs))

    def prob(self, category: str) -> float:
        return dict(zip(self.categories, self.probs)).get(category, 0.0)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One component of a mixture: uniform on [lo, hi], or a point mass where lo == hi."""

    weight: float
    lo: float
    hi: float

    @property
    def atom(self) -> bool:
        return self.lo == self.hi


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A weighted mixture of uniform ranges and point masses (weights normalised)."""

    pieces: tuple[Piece, ...]

    def __post_init__(self) -> None:
        kept = [Piece(p.weight, min(p.lo, p.hi), max(p.lo, p.hi)) for p in self.pieces if p.weight > 0]
        if not kept:
            raise ValueError("a mixture needs at least one piece of positive weight")
        total = sum(p.weight for p in kept)
        object.__setattr__(self, "pieces", tuple(Piece(p.weight / total, p.lo, p.hi) for p in kept))

    @property
    def support(self) -> tuple[float, float]:
        return min(p.lo for p in self.pieces), max(p.hi for p in self.pieces)

    @property
    def atoms(self) -> dict[float, float]:
        out: dict[float, float] = {}
        for p in self.pieces:
            if p.atom:
                out[p.lo] = out.get(p.lo, 0.0) + p.weight
        return out

    def continuous_cdf(self, x: np.ndarray | float) -> np.ndarray:
        """Mass of the uniform pieces at or below x (point masses excluded)."""
        x = np.asarray(x, dtype=np.float64)
        out = np.zeros_like(x)
        for p in self.pieces:
            if not p.atom:
                out += p.weight * np.clip((x - p.lo) / (p.hi - p.lo), 0.0, 1.0)
        return out

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        out = self.continuous_cdf(x)
        for v, w in self.atoms.items():
            out = out + w * (x >= v)
        return out

    def in_support(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        ok = np.zeros(x.shape, dtype=bool)
        for p in self.pieces:
            ok |= (x == p.lo) if p.atom else ((x >= p.lo) & (x <= p.hi))
        return ok

    def bin_masses(self, edges: np.ndarray) -> np.ndarray:
        """Expected mass of each bin, with np.histogram's edges: [a, b) and a closed last bin."""
        edges = np.asarray(edges, dtype=np.float64)

        def below(x: np.ndarray) -> np.ndarray:  # P(X < x)
            out = self.continuous_cdf(x)
            for v, w in self.atoms.items():
                out = out + w * (x > v)
            return out

        m = below(edges[1:]) - below(edges[:-1])
        m[-1] += sum(w for v, w in self.atoms.items() if v == edges[-1])
        return m


Distribution = Categorical | Mixture


# ------------------------------------------------------------------ the tests ---


@dataclasses.dataclass
class Fit:
    """One parameter's test: which test, its statistic and p-value (None: too few draws)."""

    test: str  # "chi2", "ks" or "none"
    statistic: float | None
    p_value: float | None
    dof: int | None = None
    note: str = ""
    impossible: int = 0  # draws the settings can never produce

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pool(obs: Sequence[float], exp: Sequence[float], ordinal: bool) -> tuple[list[float], list[float]]:
    """Merge categories until each expects at least MIN_EXPECTED draws.

    Ordinal categories merge with their neighbours (left to right, a small tail joins the
    group before it); nominal ones pool the rarest together.
    """
    obs, exp = list(map(float, obs)), list(map(float, exp))
    if ordinal:
        go, ge, acc_o, acc_e = [], [], 0.0, 0.0
        for o, e in zip(obs, exp):
            acc_o, acc_e = acc_o + o, acc_e + e
            if acc_e >= MIN_EXPECTED:
                go.append(acc_o), ge.append(acc_e)
                acc_o = acc_e = 0.0
        if acc_e > 0 or acc_o > 0:
            if go:
                go[-1] += acc_o
                ge[-1] += acc_e
            else:
                go, ge = [acc_o], [acc_e]
        return go, ge
    order = sorted(range(len(exp)), key=lambda i: exp[i])
    small = [i for i in order if exp[i] < MIN_EXPECTED]
    big = [i for i in order if exp[i] >= MIN_EXPECTED]
    go, ge = [obs[i] for i in big], [exp[i] for i in big]
    if small:
        po, pe = sum(obs[i] for i in small), sum(exp[i] for i in small)
        if pe < MIN_EXPECTED and go:
            j = int(np.argmin(ge))
            go[j] += po
            ge[j] += pe
        else:
            go.append(po), ge.append(pe)
    return go, ge


def chi_square(obs: Sequence[float], probs: Sequence[float], ordinal: bool, impossible: int = 0) -> Fit:
    """Pearson's χ² of counts against probabilities (categories of probability 0 carry
    no expectation: any draw there is counted as impossible and fails the test outright)."""
    n = float(sum(obs)) + impossible
    if n == 0:
        return Fit("chi2", None, None, note="no draws")
    extra = sum(o for o, p in zip(obs, probs) if p <= 0)
    impossible += int(extra)
    keep = [(o, p) for o, p in zip(obs, probs) if p > 0]
    if impossible:
        return Fit("chi2", math.inf, 0.0, note=f"{impossible} draws the settings never produce",
                   impossible=impossible)
    go, ge = _pool([o for o, _ in keep], [n * p for _, p in keep], ordinal)
    if len(go) < 2:
        return Fit("chi2", None, None, note=f"too few draws for a test ({int(n)})")
    res = stats.chisquare(go, ge)
    return Fit("chi2", float(res.statistic), float(res.pvalue), dof=len(go) - 1,
               note=f"{len(go)} groups after pooling to ≥ {MIN_EXPECTED:g} expected" if len(go) < len(keep) else "")


def ks_from_grid(grid_counts: np.ndarray, outside: int) -> Fit:
    """KS of draws already mapped to u = F(x) and counted on KS_GRID equal bins of [0, 1]."""
    n = int(grid_counts.sum()) + outside
    if n == 0:
        return Fit("ks", None, None, note="no draws")
    if outside:
        return Fit("ks", 1.0, 0.0, note=f"{outside} draws outside the range the settings allow",
                   impossible=outside)
    cum = np.concatenate([[0], np.cumsum(grid_counts)]) / n
    edges = np.linspace(0.0, 1.0, len(grid_counts) + 1)
    d = float(np.max(np.abs(cum - edges)))
    p = float(stats.kstwo.sf(d, n))
    return Fit("ks", d, p, note=f"D on a {len(grid_counts)}-step grid (exact to {1 / len(grid_counts):.1g})")
