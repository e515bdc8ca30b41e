"""Mergeable accumulators whose size does not depend on how many rows they have seen.

Each shard is summarised on its own (in a worker process, for a large build) and the
summaries are merged: every accumulator here has ``merge``, and merging in any order
gives the same counts. Nothing keeps a value per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from typing import Any, Iterable

import numpy as np

from pipeline.report.distributions import KS_GRID, Categorical, Fit, Mixture, chi_square, ks_from_grid
from pipeline.report.expected import ParamSpec

DISPLAY_BINS = 30


class Moments:
    """Count, mean and variance (Chan et al.'s parallel update), for mean ± std lines."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add_many(self, values: Iterable[float]) -> None:
        x = np.asarray(list(values), dtype=np.float64)
        if x.size:
            other = Moments()
            other.n, other.mean, other.m2 = int(x.size), float(x.mean()), float(((x - x.mean()) ** 2).sum())
            self.merge(other)

    def merge(self, o: "Moments") -> None:
        if o.n == 0:
            return
        n = self.n + o.n
        d = o.mean - self.mean
        self.mean += d * o.n / n
        self.m2 += o.m2 + d * d * self.n * o.n / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean if self.n else None, "std": None if self.n < 2 else self.std}


class Histogram:
    """Counts on fixed edges with np.histogram's rule (last bin closed), plus what fell outside."""

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.below = self.above = 0

    def add_many(self, values: Iterable[float]) -> None:
        x = np.asarray(list(values), dtype=np.float64)
        if not x.size:
            return
        lo, hi = self.edges[0], self.edges[-1]
        self.below += int((x < lo).sum())
        self.above += int((x > hi).sum())
        x = x[(x >= lo) & (x <= hi)]
        idx = np.minimum(np.searchsorted(self.edges, x, side="right") - 1, len(self.counts) - 1)
        np.add.at(self.counts, idx, 1)

    def merge(self, o: "Histogram") -> None:
        self.counts += o.counts
        self.below += o.below
        self.above += o.above

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "below": self.below,
                "above": self.above}


def display_edges(dist: Mixture) -> np.ndarray:
    lo, hi = dist.support
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, DISPLAY_BINS + 1)


class ParamCounts:
    """Everything the report needs about one draw: counts to plot and the test's inputs."""

    def __init__(self, spec: ParamSpec) -> None:
        self.spec = spec
        self.n = 0
        if isinstance(spec.dist, Categorical):
            self.counts: Counter[str] = Counter()
        else:
            self.hist = Histogram(display_edges(spec.dist))
            self.atoms = {v: 0 for v in spec.dist.atoms}
            self.grid = None if self.atoms else np.zeros(KS_GRID, dtype=np.int64)
            self.outside = 0
            self.moments = Moments()

    def add_many(self, values: list[Any]) -> None:
        if not values:
            return
        self.n += len(values)
        if isinstance(self.spec.dist, Categorical):
            self.counts.update(values)
            return
        dist: Mixture = self.spec.dist
        x = np.asarray(values, dtype=np.float64)
        self.hist.add_many(x)
        self.moments.add_many(x)
        ok = dist.in_support(x)
        self.outside += int((~ok).sum())
        x = x[ok]
        for v in self.atoms:
            self.atoms[v] += int((x == v).sum())
        if self.grid is not None:
            u = np.clip(dist.cdf(x), 0.0, 1.0)
            idx = np.minimum((u * KS_GRID).astype(np.int64), KS_GRID - 1)
            np.add.at(self.grid, idx, 1)

    def merge(self, o: "ParamCounts") -> None:
        self.n += o.n
        if isinstance(self.spec.dist, Categorical):
            self.counts.update(o.counts)
            return
        self.hist.merge(o.hist)
        self.moments.merge(o.moments)
        self.outside += o.outside
        for v in self.atoms:
            self.atoms[v] += o.atoms[v]
        if self.grid is not None:
            self.grid += o.grid

    # -------------------------------------------------------------- results --

    def expected_counts(self) -> list[float]:
        """Expected count per category or per display bin, for n draws."""
        if isinstance(self.spec.dist, Categorical):
            return [self.n * p for p in self.spec.dist.probs]
        return (self.n * self.spec.dist.bin_masses(self.hist.edges)).tolist()

    def categories(self) -> list[str]:
        """The settings' categories, then any value drawn that the settings do not name."""
        cats = list(self.spec.dist.categories)
        return cats + sorted(set(self.counts) - set(cats))

    def fit(self) -> Fit:
        dist = self.spec.dist
        if isinstance(dist, Categorical):
            unknown = sum(c for k, c in self.counts.items() if k not in dist.categories)
            obs = [self.counts.get(c, 0) for c in dist.categories]
            return chi_square(obs, dist.probs, dist.ordinal, impossible=unknown)
        if self.grid is not None:
            return ks_from_grid(self.grid, self.outside)
        # point masses: χ² over the atoms and the display bins' continuous mass
        atoms = sorted(self.atoms)
        cont = dist.continuous_cdf(self.hist.edges)
        masses = np.diff(cont).tolist()
        obs_bins = self.hist.counts.astype(float).copy()
        for v in atoms:  # take the atoms out of the bins they fall in
            i = min(int(np.searchsorted(self.hist.edges, v, side="right") - 1), len(obs_bins) - 1)
            obs_bins[max(i, 0)] -= self.atoms[v]
        obs = [float(self.atoms[v]) for v in atoms] + obs_bins.tolist()
        probs = [dist.atoms[v] for v in atoms] + masses
        fit = chi_square(obs, probs, ordinal=True, impossible=self.outside)
        fit.note = ("χ² over point masses + bins (the law has point masses: "
                    + ", ".join(f"{dist.atoms[v]:.2g} at {v:g}" for v in atoms) + ")"
                    + (f"; {fit.note}" if fit.note else ""))
        return fit

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.spec.name, "label": self.spec.label, "settings": self.spec.settings,
                               "unit": self.spec.unit, "n": self.n}
        if isinstance(self.spec.dist, Categorical):
            cats = self.categories()
            out.update(kind="categorical", categories=cats, counts=[self.counts.get(c, 0) for c in cats],
                       expected=self.expected_counts() + [0.0] * (len(cats) - len(self.spec.dist.categories)))
        else:
            out.update(kind="continuous", histogram=self.hist.to_json(), expected=self.expected_counts(),
                       outside=self.outside, moments=self.moments.to_json(),
                       point_masses={repr(v): c for v, c in self.atoms.items()},
                       law=[dataclasses.asdict(p) for p in self.spec.dist.pieces])
        return out


class BottomK:
    """The k rows with the smallest sha256(key): a fixed, uniform sample of any build,
    the same whatever order the shards are read in."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.items: list[tuple[str, dict[str, Any]]] = []

    @staticmethod
    def rank(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def would_keep(self, key: str) -> bool:
        return len(self.items) < self.k or self.rank(key) < self.items[-1][0]

    def offer(self, key: str, payload: dict[str, Any]) -> None:
        if self.would_keep(key):
            self.items.append((self.rank(key), payload))
            self.items.sort(key=lambda t: t[0])
            del self.items[self.k:]

    def merge(self, o: "BottomK") -> None:
        for r, p in o.items:
            self.items.append((r, p))
        self.items.sort(key=lambda t: t[0])
        del self.items[self.k:]

    def rows(self) -> list[dict[str, Any]]:
        return [p for _, p in self.items]


class BoundedCounter:
    """Word counts with a cap on distinct words: past the cap the rarest half is dropped
    (counts of frequent words stay exact unless a word was once among the dropped)."""

    def __init__(self, cap: int = 50_000) -> None:
        self.cap, self.counts, self.pruned = cap, Counter(), False

    def update(self, words: Iterable[str]) -> None:
        self.counts.update(words)
        self._prune()

    def merge(self, o: "BoundedCounter") -> None:
        self.counts.update(o.counts)
        self.pruned |= o.pruned
        self._prune()

    def _prune(self) -> None:
        if len(self.counts) > self.cap:
            self.counts = Counter(dict(self.counts.most_common(self.cap // 2)))
            self.pruned = True
