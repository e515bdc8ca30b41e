"""The learned metrics: pyiqa's LPIPS, DISTS, NIQE, MANIQA, MUSIQ, CLIPIQA, FID, and CLIP-I.

Each is built only once every file it loads is in place (weights.py checks them first), so
building never starts a download unless `download=True`. Anything that keeps a metric from
being built here — a missing optional package, a missing or damaged file, a pyiqa version
whose files are not the listed ones — becomes `NotComputed` with a reason a person can act
on; the other metrics go on. pyiqa is optional and imported only when a metric needs it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np

from model.evaluation.metrics import MetricSpec
from model.evaluation.weights import (
    PYIQA_FILES, PYIQA_VERSION, Caches, MissingWeights, WeightFile, check_files, hf_cached_file, hf_repo,
)

DEFAULT_CLIP_MODEL = "vit_large_patch14_clip_224.openai"

# pyiqa's CLIP metrics import OpenAI's `clip` package, which imports pkg_resources (gone
# from setuptools 82 on). Installing pyiqa with --no-deps (docs/evaluation.md) leaves these
# to install by hand; the hint says which.
PACKAGE_HINTS = {
    "clip": " (pip install openai-clip==1.0.1 ftfy)",
    "ftfy": " (pip install ftfy; openai-clip needs it)",
    "pkg_resources": " (openai-clip imports it; it left setuptools in version 82: pip install 'setuptools<82')",
    "jaraco": " (a broken setuptools; pip install --force-reinstall 'setuptools<82')",
    "addict": " (pip install addict; pyiqa needs it)",
    "einops": " (pip install einops; pyiqa needs it)",
}
PYIQA_INSTALL = (f"install it as docs/evaluation.md says (`make iqa`, or `pip install --no-deps pyiqa=={PYIQA_VERSION} "
                 f"openai-clip==1.0.1` and `pip install addict einops ftfy 'setuptools<82'`)")


class NotComputed(Exception):
    """A metric that cannot run here; `reason` goes into the table as is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_reason(e: ImportError, what: str) -> str:
    pkg = getattr(e, "name", None) or str(e)
    return f"{what}a Python package it needs is missing: {pkg}{PACKAGE_HINTS.get(pkg.split('.')[0], '')}"


def _pyiqa_preflight(pyiqa_name: str, caches: Caches) -> None:
    """Without downloads: the package's version and every file, checked before anything is built."""
    version = installed_version("pyiqa")
    files = PYIQA_FILES.get(pyiqa_name)
    if files is None:
        raise NotComputed(f"pyiqa metric {pyiqa_name!r}: its weight files are not listed in "
                          "model/evaluation/weights.py (PYIQA_FILES), so they cannot be checked before loading; "
                          "add them there, or pass --download to let pyiqa fetch what it needs")
    if version is not None and version != PYIQA_VERSION:
        raise NotComputed(f"pyiqa {version} is installed; the weight files checked here are those of pyiqa "
                          f"{PYIQA_VERSION}: install {PYIQA_VERSION} (`make iqa`) or pass --download")
    head = "" if version is not None else f"the optional package pyiqa is not installed; {PYIQA_INSTALL}\n"
    try:
        check_files(files, caches)
    except MissingWeights as e:
        raise NotComputed(head + str(e)) from None
    if head:
        raise NotComputed(head.rstrip("\n"))


def build_pyiqa_metric(spec: MetricSpec, device: str, caches: Caches, download: bool = False,
                       name: str | None = None) -> Any:
    """A pyiqa InferenceModel built from the files in the caches, or NotComputed."""
    pyiqa_name = name or spec.pyiqa_name
    assert pyiqa_name is not None, spec
    if not download:
        _pyiqa_preflight(pyiqa_name, caches)
    try:
        import pyiqa
    except ImportError as e:
        if getattr(e, "name", None) not in (None, "pyiqa"):  # pyiqa is there, one of its imports is not
            raise NotComputed(_package_reason(e, "pyiqa cannot be imported: ")) from None
        raise NotComputed(f"the optional package pyiqa is not installed ({e}); {PYIQA_INSTALL}") from None
    except Exception as e:
        raise NotComputed(f"pyiqa cannot be imported: {type(e).__name__}: {e}") from None
    try:
        return pyiqa.create_metric(pyiqa_name, device=device)
    except ImportError as e:
        raise NotComputed(_package_reason(e, "")) from None
    except Exception as e:
        raise NotComputed(f"could not be built: {type(e).__name__}: {e}") from None


class ClipImageSimilarity:
    """CLIP-I: cosine similarity of the CLIP image embeddings of restored and reference.

    Preprocessing is OpenAI CLIP's: shorter side resized to the model's input size (bicubic,
    antialiased), centre crop, CLIP mean/std. With a projection head (timm's `.openai` CLIP
    towers keep it) the embedding is CLIP's joint-space vector; a tower without head
    (num_classes 0) gives its pooled feature.
    """

    def __init__(self, vit: Any, device: str) -> None:
        import torch

        from model.networks.image_encoder import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.vit = vit.to(device).eval().requires_grad_(False)
        self.device = device
        size = getattr(getattr(vit, "patch_embed", None), "img_size", (224, 224))
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1)

    def embed(self, rgb: np.ndarray) -> Any:
        import torch
        from torch.nn import functional as F

        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255.0).to(self.device)
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        with torch.no_grad():
            f = self.vit((x - self.mean) / self.std).float()
        return F.normalize(f.flatten(1), dim=1)

    def __call__(self, restored: np.ndarray, reference: np.ndarray) -> float:
        return float((self.embed(restored) * self.embed(reference)).sum())


def clip_tower_file(ref: str) -> WeightFile | None:
    """The hub file timm loads a named CLIP tower from (None for a local folder)."""
    if Path(ref).expanduser().exists() or ref.startswith(("local-dir:", "hf-hub:", ".", "/", "~")):
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(ref, allow_unregistered=True)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return hf_repo(repo or "timm/" + ref)


def build_clip_i(ref: str, device: str, caches: Caches, download: bool = False) -> ClipImageSimilarity:
    """CLIP-I from a local timm folder, or a timm name whose weights are the cached hub file
    (handed to timm by path, so timm never looks anything up)."""
    try:
        import timm

        from model.networks.image_encoder import ImageEncoderNotFoundError, resolve_image_encoder
    except ImportError as e:  # pragma: no cover - timm/torch are hard dependencies
        raise NotComputed(_package_reason(e, "")) from None
    try:
        name, kwargs = resolve_image_encoder(ref)
        hub_file = clip_tower_file(ref)
    except (ImageEncoderNotFoundError, ValueError) as e:
        raise NotComputed(str(e)) from None
    kwargs.pop("num_classes", None)  # keep CLIP's projection head: CLIP-I compares joint-space embeddings
    if hub_file is not None:
        cached = hf_cached_file(hub_file.name, hub_file.filename, caches.hf_hub)
        if cached is None and not download:
            try:
                check_files([hub_file], caches)
            except MissingWeights as e:
                raise NotComputed(str(e)) from None
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}
    try:
        return ClipImageSimilarity(timm.create_model(name, pretrained=True, **kwargs), device)
    except Exception as e:
        raise NotComputed(f"could not be built: {type(e).__name__}: {e}") from None
