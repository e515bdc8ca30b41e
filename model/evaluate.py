#!/usr/bin/env python
"""Evaluate restored images against references: the paper's Tables I–II.

  python model/evaluate.py --restored out/sspir/div2k_val --reference $DATA_ROOT/ssp-ir/div2k_val/hr \\
      --name SSP-IR --dataset DIV2K-Val --out results.json --append --markdown results.md

Files are paired by their path relative to each folder, without the suffix
(`sub/0801_00.png` ↔ `sub/0801_00.jpg`), in sorted order; a file without a counterpart
is an error that lists examples. Every restored image must have its reference's size.

Metrics (columns, in the paper's order; ↑ higher is better, ↓ lower is better):
  psnr ↑, ssim ↑   this module, on the Y channel of YCbCr (BT.601), exactly as BasicSR
                   computes them (`--crop-border N` pixels dropped on each side)
  lpips ↓, dists ↓ pyiqa, full-reference
  clip_i ↑         cosine similarity of CLIP image embeddings (timm, OpenAI ViT-L/14 by
                   default: the image encoder SSP-IR conditions on; `--clip-model`)
  niqe ↓, maniqa ↑, musiq ↑, clipiqa ↑   pyiqa, no-reference, on the restored images
  fid ↓            pyiqa, restored folder against reference folder

pyiqa is optional (`pip install pyiqa==0.1.16`) and imported only when a metric needs
it. No weight is ever downloaded unless `--download` is given: a metric whose package or
weight file is missing is reported as *not computed*, with the file it needs, where to
put it and how to get it; the run still succeeds.

Results accumulate in a JSON table (`--out FILE --append`: one row per method and
dataset; a rerun of the same method replaces its row) rendered as Markdown, one table
per dataset (`--markdown FILE`).

Exit status: 0 done (some metrics may be not computed); 1 PSNR/SSIM could not be
computed (unreadable image, size mismatch); 2 bad arguments or the folders do not pair.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from pipeline.core.image_io import IMAGE_SUFFIXES  # noqa: E402

PYIQA_VERSION = "0.1.16"  # the version whose weight files are listed below
PYIQA_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
DEFAULT_CLIP_MODEL = "vit_large_patch14_clip_224.openai"
TABLE_VERSION = 1
MISSING = "-"  # a not-computed cell in the Markdown table


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """A file a metric loads, where its library caches it, and where it comes from.

    `where` is the cache the library looks in: "pyiqa" (<torch hub>/pyiqa), "torchvision"
    (<torch hub>/checkpoints), "clip" (<torch hub>/clip) or "hf" (a Hugging Face hub repo
    in HF_HUB_CACHE; `name` is then the repo id). Roots follow TORCH_HOME / HF_HOME, so
    they are resolved when asked, not at import.
    """

    where: str
    name: str
    url: str

    def path(self) -> Path:
        if self.where == "hf":
            return hf_cache_dir() / ("models--" + self.name.replace("/", "--"))
        if self.where == "pyiqa":
            return pyiqa_cache_dir() / self.name
        return torch_hub_dir() / {"torchvision": "checkpoints", "clip": "clip"}[self.where] / self.name

    def present(self) -> bool:
        p = self.path()
        if self.where == "hf":
            return any(f.is_file() for f in (p / "snapshots").glob("*/*"))
        return p.is_file()


def _pyiqa_file(name: str) -> WeightFile:
    return WeightFile("pyiqa", name, PYIQA_HF + name)


def _torchvision_file(name: str) -> WeightFile:
    return WeightFile("torchvision", name, "https://download.pytorch.org/models/" + name)


def _hf_repo(repo: str) -> WeightFile:
    return WeightFile("hf", repo, f"https://huggingface.co/{repo}")


_CLIP_RN50 = WeightFile(
    "clip", "RN50.pt",
    "https://openaipublic.azureedge.net/clip/models/"
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    higher_better: bool
    kind: str  # "fr": per pair; "nr": restored image alone; "set": the two folders
    backend: str  # "numpy" | "pyiqa" | "clip"
    digits: int  # decimals in the Markdown table, as the paper prints them
    pyiqa_name: str | None = None
    weights: tuple[WeightFile, ...] = ()

    @property
    def header(self) -> str:
        return self.label + ("↑" if self.higher_better else "↓")


# The files pyiqa 0.1.16 loads for its default variant of each metric (read from its
# source: archs/*_arch.py). The authority at run time is what pyiqa actually asks for —
# every download attempt is intercepted and named — this list makes the message complete.
METRICS: dict[str, MetricSpec] = {s.key: s for s in (
    MetricSpec("psnr", "PSNR", True, "fr", "numpy", 2),
    MetricSpec("ssim", "SSIM", True, "fr", "numpy", 4),
    MetricSpec("lpips", "LPIPS", False, "fr", "pyiqa", 4, "lpips",
               (_torchvision_file("alexnet-owt-7be5be79.pth"), _pyiqa_file("LPIPS_v0.1_alex-df73285e.pth"))),
    MetricSpec("dists", "DISTS", False, "fr", "pyiqa", 4, "dists",
               (_torchvision_file("vgg16-397923af.pth"), _pyiqa_file("DISTS_weights-f5e65c96.pth"))),
    MetricSpec("clip_i", "CLIP-I", True, "fr", "clip", 4),
    MetricSpec("niqe", "NIQE", False, "nr", "pyiqa", 4, "niqe", (_pyiqa_file("niqe_modelparameters.mat"),)),
    MetricSpec("maniqa", "MANIQA", True, "nr", "pyiqa", 4, "maniqa",
               (_hf_repo("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"), _pyiqa_file("ckpt_koniq10k.pt"))),
    MetricSpec("musiq", "MUSIQ", True, "nr", "pyiqa", 2, "musiq", (_pyiqa_file("musiq_koniq_ckpt-e95806b9.pth"),)),
    MetricSpec("clipiqa", "CLIPIQA", True, "nr", "pyiqa", 4, "clipiqa", (_CLIP_RN50,)),
    MetricSpec("fid", "FID", False, "set", "pyiqa", 2, "fid", (_pyiqa_file("pt_inception-2015-12-05-6726825d.pth"),)),
)}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() (TORCH_HOME/hub, else ~/.cache/torch/hub): where pyiqa,
    torchvision and pyiqa's CLIP loader cache their weights."""
    import torch.hub

    return Path(torch.hub.get_dir())


def pyiqa_cache_dir() -> Path:
    """pyiqa's DEFAULT_CACHE_DIR: <torch hub>/pyiqa, fixed when pyiqa is imported."""
    util = sys.modules.get("pyiqa.utils.download_util")
    if util is not None and getattr(util, "DEFAULT_CACHE_DIR", None):
        return Path(util.DEFAULT_CACHE_DIR)
    return torch_hub_dir() / "pyiqa"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache timm loads pretrained weights from."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers/timm
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


# ------------------------------------------------------------------------ PSNR and SSIM


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Y of YCbCr (ITU-R BT.601, MATLAB's rgb2ycbcr) in [16, 235], float64.

    Reproduces BasicSR's `to_y_channel` operation by operation — float32 input scaled to
    [0, 1], the 65.481/128.553/24.966 dot product + 16, back through float32 — so that
    numbers are comparable with papers evaluated with BasicSR (SeeSR, SSP-IR) to the last
    digit, not only to ~1e-6 dB.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    x = rgb.astype(np.float32) / 255.0
    y = np.dot(x, [65.481, 128.553, 24.966]) + 16.0
    y = (y / 255.0).astype(np.float32) * 255.0
    return y.astype(np.float64)


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be 0 or more, got {border}")
    return img[border:-border, border:-border] if border else img


def _check_pair(restored: np.ndarray, reference: np.ndarray) -> None:
    if restored.shape != reference.shape:
        raise ValueError(f"restored image is {restored.shape[1]}x{restored.shape[0]} but the reference is "
                         f"{reference.shape[1]}x{reference.shape[0]}")


def psnr_y(restored: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB on the Y channel, peak 255 (BasicSR `calculate_psnr`, test_y_channel=True).

    Identical images give inf, as in BasicSR: the mean over a set is then inf too, which
    is the honest answer for a method that returns the reference.
    """
    _check_pair(restored, reference)
    a = _crop(rgb_to_y(restored), crop_border)
    b = _crop(rgb_to_y(reference), crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 * 255.0 / mse)


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two float64 planes in [0, 255]: 11×11 Gaussian window (σ 1.5), valid region
    only, C1 = (0.01·255)², C2 = (0.03·255)² — BasicSR's `_ssim`, itself checked against
    Wang et al.'s MATLAB code."""
    import cv2

    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels after cropping, got {a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]

    mu1, mu2 = blur(a), blur(b)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = blur(a ** 2) - mu1_sq
    sigma2_sq = blur(b ** 2) - mu2_sq
    sigma12 = blur(a * b) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def ssim_y(restored: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
    """SSIM on the Y channel (BasicSR `calculate_ssim`, test_y_channel=True)."""
    _check_pair(restored, reference)
    return _ssim_plane(_crop(rgb_to_y(restored), crop_border), _crop(rgb_to_y(reference), crop_border))


# ----------------------------------------------------------------------------- pairing


class PairingError(ValueError):
    """The two folders do not hold the same set of images; the message lists examples."""


class EvaluationError(RuntimeError):
    """PSNR/SSIM cannot be computed (unreadable image, size mismatch); names the files."""


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str  # relative path without suffix: the pairing key
    restored: Path
    reference: Path


def list_images(root: Path) -> dict[str, Path]:
    """Images below `root` keyed by relative POSIX path without suffix (hidden files skipped).

    Two files differing only in suffix (a.png, a.jpg) would make the pairing ambiguous,
    so they are an error rather than a silent pick.
    """
    root = Path(root)
    if not root.is_dir():
        raise PairingError(f"{root} is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        key = rel.with_suffix("").as_posix()
        if key in out:
            raise PairingError(f"{root}: {out[key].name} and {p.name} have the same name without suffix; "
                               "keep one of them")
        out[key] = p
    if not out:
        raise PairingError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _examples(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names) - n} more)" if len(names) > n else "")


def pair_folders(restored: Path, reference: Path) -> list[Pair]:
    """Sorted pairs; every image must have a counterpart (a partial set skews the means)."""
    res, ref = list_images(restored), list_images(reference)
    only_res = sorted(set(res) - set(ref))
    only_ref = sorted(set(ref) - set(res))
    if only_res or only_ref:
        lines = [f"the folders do not pair ({len(set(res) & set(ref))} names in common; files are paired by "
                 "relative path without suffix):"]
        if only_ref:
            lines.append(f"  {len(only_ref)} reference images have no restored image in {restored}: "
                         f"{_examples(only_ref)}")
        if only_res:
            lines.append(f"  {len(only_res)} restored images have no reference in {reference}: "
                         f"{_examples(only_res)}")
        raise PairingError("\n".join(lines))
    return [Pair(k, res[k], ref[k]) for k in sorted(res)]


def _header_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable: reported when the pixels are read
        return None


def check_sizes(pairs: Sequence[Pair]) -> None:
    """All size mismatches at once from the file headers, before any metric runs."""
    bad = []
    for p in pairs:
        a, b = _header_size(p.restored), _header_size(p.reference)
        if a is not None and b is not None and a != b:
            bad.append(f"{p.name} ({a[0]}x{a[1]} vs {b[0]}x{b[1]})")
    if bad:
        raise EvaluationError(f"{len(bad)} restored images differ in size from their reference "
                              f"(restored vs reference): {_examples(bad)}")


def read_rgb(path: Path) -> np.ndarray:
    """8-bit RGB through the pipeline's loader (16-bit, grey, palette, EXIF handled alike)."""
    from pipeline.core.image_io import SourceError, load_source

    try:
        rgb, _ = load_source(path, max_pixels=1 << 31, min_side=1)
    except SourceError as e:
        raise EvaluationError(f"{path}: {e.reason}") from None
    return rgb


# ------------------------------------------------------------------- optional backends


class MissingWeight(Exception):
    """A library tried to download a file while downloads are off."""

    def __init__(self, url: str, path: Path | None) -> None:
        super().__init__(f"{url} -> {path}")
        self.url = url
        self.path = path


class NotComputed(Exception):
    """A metric that cannot run here; `reason` goes into the table as is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _set_attr(patches: list[tuple[Any, str, Any]], obj: Any, name: str, value: Any) -> None:
    patches.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Turn every download a metric library would start into MissingWeight.

    pyiqa fetches its own weights with torch.hub's `download_url_to_file` (imported into
    pyiqa.utils.download_util), torchvision backbones through torch.hub, its CLIP loader
    through urllib, and timm through huggingface_hub. Intercepting those — rather than
    trusting a list of file names — names exactly the file the installed version wants,
    and avoids minutes of network retries on machines without internet.
    """
    import urllib.request

    import torch.hub

    def refuse_file(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise MissingWeight(url, Path(dst))

    def refuse_url(url: Any, *args: Any, **kwargs: Any) -> None:
        raise MissingWeight(getattr(url, "full_url", str(url)), None)

    patches: list[tuple[Any, str, Any]] = []
    try:
        _set_attr(patches, torch.hub, "download_url_to_file", refuse_file)
        util = sys.modules.get("pyiqa.utils.download_util")
        if util is not None:
            _set_attr(patches, util, "download_url_to_file", refuse_file)
        _set_attr(patches, urllib.request, "urlopen", refuse_url)
        with contextlib.suppress(ImportError):
            from huggingface_hub import constants

            _set_attr(patches, constants, "HF_HUB_OFFLINE", True)
        yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pyiqa prints "Downloading…"/"Loading…" lines; they would mislead in offline mode."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _how_to_provide(missing: Sequence[tuple[Path | None, str]]) -> str:
    lines = [f"    {path or '(a path the library chooses)'}   <- {url}" for path, url in missing]
    return "\n".join([
        "  needs (path   <- source):", *lines,
        f"  provide: rerun with --download on a machine with internet and copy the caches over, or download "
        f"each source to its path (a Hugging Face repo: `huggingface-cli download <repo>`, cache {hf_cache_dir()}); "
        f"the roots follow TORCH_HOME (torch hub: {torch_hub_dir()}) and HF_HOME/HF_HUB_CACHE.",
    ])


def _weight_reason(spec: MetricSpec, wanted: MissingWeight | None, detail: str = "") -> str:
    """One summary line, then every missing file of the metric with its source: one run
    tells the person everything to fetch, not one file per attempt."""
    missing: list[tuple[Path | None, str]] = [(w.path(), w.url) for w in spec.weights if not w.present()]
    if wanted is None:
        return f"weights not in the local Hugging Face cache ({detail})\n" + _how_to_provide(missing)
    known = next((w for w in spec.weights if w.url == wanted.url), None)
    path = wanted.path or (known.path() if known else None)
    if all(url != wanted.url for _, url in missing):  # a file this module does not list (another pyiqa version)
        missing.insert(0, (path, wanted.url))
    return f"weight file missing: {path or wanted.url}\n" + _how_to_provide(missing)


# pyiqa's CLIP metrics import OpenAI's `clip` package, which imports pkg_resources: gone
# from setuptools 82 on. Installing pyiqa with --no-deps (see docs/evaluation.md) leaves
# these to install by hand.
_PACKAGE_HINTS = {
    "clip": " (pip install openai-clip==1.0.1 ftfy)",
    "ftfy": " (pip install ftfy; openai-clip needs it)",
    "pkg_resources": " (openai-clip imports it; it left setuptools in version 82: pip install 'setuptools<82')",
    "jaraco": " (a broken setuptools; pip install --force-reinstall 'setuptools<82')",
    "addict": " (pip install addict; pyiqa needs it)",
    "einops": " (pip install einops; pyiqa needs it)",
}


def _build_guarded(spec: MetricSpec, download: bool, build: Callable[[], Any]) -> Any:
    """Run `build` with downloads refused (unless `download`), turning every way it can
    fail for want of a package or a file into NotComputed with a reason a person can act on."""
    try:
        with contextlib.ExitStack() as stack:
            if not download:  # quiet only then: a real download should show its progress
                stack.enter_context(_quiet())
                stack.enter_context(no_downloads())
            return build()
    except MissingWeight as e:
        raise NotComputed(_weight_reason(spec, e)) from None
    except ImportError as e:
        pkg = getattr(e, "name", None) or str(e)
        hint = _PACKAGE_HINTS.get(pkg.split(".")[0], "")
        raise NotComputed(f"a Python package it needs is missing: {pkg}{hint}") from None
    except NotComputed:
        raise
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub") or "offline" in str(e).lower():
            raise NotComputed(_weight_reason(spec, None, type(e).__name__)) from None
        raise NotComputed(f"could not be built: {type(e).__name__}: {e}") from None


def build_pyiqa_metric(spec: MetricSpec, device: str, download: bool, name: str | None = None) -> Any:
    """A pyiqa InferenceModel, or NotComputed when pyiqa or a weight file is missing."""
    try:
        import pyiqa
    except ImportError as e:
        if getattr(e, "name", None) not in (None, "pyiqa"):  # pyiqa is there, one of its imports is not
            hint = _PACKAGE_HINTS.get(e.name.split(".")[0], "")
            raise NotComputed(f"pyiqa cannot be imported: a package it needs is missing: {e.name}{hint}") from None
        raise NotComputed(
            f"the optional package pyiqa is not installed ({e}); install it as docs/evaluation.md says: "
            f"`pip install --no-deps pyiqa=={PYIQA_VERSION} openai-clip==1.0.1` and "
            f"`pip install addict einops ftfy 'setuptools<82'`") from None
    except Exception as e:
        raise NotComputed(f"pyiqa cannot be imported: {type(e).__name__}: {e}") from None
    pyiqa_name = name or spec.pyiqa_name
    if pyiqa_name != spec.pyiqa_name:  # another variant loads other files: name only what it asks for
        spec = dataclasses.replace(spec, weights=())
    return _build_guarded(spec, download, lambda: pyiqa.create_metric(pyiqa_name, device=device))


class ClipImageSimilarity:
    """CLIP-I: cosine similarity of the CLIP image embeddings of restored and reference.

    Preprocessing is OpenAI CLIP's: shorter side resized to the model's input size
    (bicubic, antialiased), centre crop, CLIP mean/std. With a projection head (timm's
    `.openai` CLIP towers keep it) the embedding is CLIP's joint-space vector; a tower
    without head (num_classes 0) gives its pooled feature.
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


def build_clip_i(ref: str, device: str, download: bool) -> ClipImageSimilarity:
    """CLIP-I from a timm name (weights from the Hugging Face cache) or a local timm folder."""
    try:
        from model.networks.image_encoder import resolve_image_encoder
    except ImportError as e:  # pragma: no cover - timm/torch are hard dependencies
        raise NotComputed(f"a Python package it needs is missing: {e}") from None

    def build() -> ClipImageSimilarity:
        import timm

        name, kwargs = resolve_image_encoder(ref)
        kwargs.pop("num_classes", None)  # keep CLIP's projection head: CLIP-I compares joint-space embeddings
        return ClipImageSimilarity(timm.create_model(name, pretrained=True, **kwargs), device)

    return _build_guarded(dataclasses.replace(METRICS["clip_i"], weights=_timm_weights(ref)), download, build)


def _timm_weights(ref: str) -> tuple[WeightFile, ...]:
    """The Hugging Face repo timm fetches a named model from (none for a local folder)."""
    if Path(ref).expanduser().exists() or ref.startswith(("local-dir:", "hf-hub:", ".", "/", "~")):
        return ()
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(ref, allow_unregistered=True)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:
        repo = None
    return (_hf_repo(repo or "timm/" + ref),)


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalResult:
    method: str
    dataset: str
    images: int
    scores: dict[str, float]
    not_computed: dict[str, str]
    per_image: dict[str, dict[str, float]]
    settings: dict[str, Any]
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        """The JSON table row (per-image values stay out: they go to --per-image)."""
        return {
            "method": self.method,
            "images": self.images,
            "scores": {k: _json_number(v) for k, v in self.scores.items()},
            "not_computed": dict(self.not_computed),
            "settings": self.settings,
            "seconds": round(self.seconds, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _json_number(v: float) -> float | str:
    """JSON has no inf: identical images give PSNR inf, stored as the string "inf"."""
    return v if math.isfinite(v) else ("inf" if v > 0 else ("-inf" if v < 0 else "nan"))


def _number(v: Any) -> float:
    return float(v)  # also parses the "inf" / "nan" strings of _json_number


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower().replace("-", "_") for m in (text.split(",") if isinstance(text, str) else text)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    if not names:
        raise ValueError("no metrics given")
    return sorted(dict.fromkeys(names), key=list(METRICS).index)


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _to_tensor(rgb: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255.0)


def _score(out: Any) -> float:
    import torch

    if isinstance(out, torch.Tensor):
        return float(out.detach().float().mean().cpu())
    return float(out)


def _build_scorers(metrics: Sequence[str], device: str, download: bool, clip_model: str,
                   pyiqa_names: dict[str, str], not_computed: dict[str, str]) -> dict[str, Any]:
    """One scorer per metric that can run here; the others get their reason."""
    scorers: dict[str, Any] = {}
    for key in metrics:
        spec = METRICS[key]
        try:
            if spec.backend == "numpy":
                scorers[key] = None
            elif spec.backend == "clip":
                scorers[key] = build_clip_i(clip_model, device, download)
            else:
                scorers[key] = build_pyiqa_metric(spec, device, download, pyiqa_names.get(key))
        except NotComputed as e:
            not_computed[key] = e.reason
    return scorers


def _score_pair(key: str, scorer: Any, res: np.ndarray, ref: np.ndarray, crop_border: int,
                tensors: dict[str, Any]) -> float:
    if key == "psnr":
        return psnr_y(res, ref, crop_border)
    if key == "ssim":
        return ssim_y(res, ref, crop_border)
    if key == "clip_i":
        return scorer(res, ref)
    if "res" not in tensors:
        tensors["res"], tensors["ref"] = _to_tensor(res), _to_tensor(ref)
    kind = METRICS[key].kind
    return _score(scorer(tensors["res"], tensors["ref"]) if kind == "fr" else scorer(tensors["res"]))


def _folder_metric(scorer: Any, restored: Path, reference: Path, n: int) -> float:
    if n < 2:
        raise NotComputed("FID needs at least 2 images per folder")
    workers = min(4, os.cpu_count() or 1)
    with _quiet():
        return _score(scorer(str(restored), str(reference), num_workers=workers, batch_size=8, verbose=False))


def evaluate(restored: Path, reference: Path, metrics: Sequence[str] = DEFAULT_METRICS, *,
             method: str | None = None, dataset: str | None = None, crop_border: int = 0,
             device: str | None = None, download: bool = False, clip_model: str = DEFAULT_CLIP_MODEL,
             pyiqa_names: dict[str, str] | None = None, show_progress: bool = False) -> EvalResult:
    """Pair the folders, compute every requested metric, average over images.

    PSNR/SSIM problems raise (EvaluationError); any other metric that cannot run or fails
    on an image is recorded in `not_computed` with its reason, and the others go on.
    """
    started = time.time()
    restored, reference = Path(restored), Path(reference)
    metrics = parse_metrics(metrics)
    pairs = pair_folders(restored, reference)
    check_sizes(pairs)
    device = device or _default_device()
    not_computed: dict[str, str] = {}
    scorers = _build_scorers(metrics, device, download, clip_model, pyiqa_names or {}, not_computed)
    per_image: dict[str, dict[str, float]] = {p.name: {} for p in pairs}
    pair_metrics = [k for k in scorers if METRICS[k].kind != "set"]
    for pair in _progress(pairs, show_progress):
        res, ref = read_rgb(pair.restored), read_rgb(pair.reference)
        if res.shape != ref.shape:
            raise EvaluationError(f"{pair.name}: {res.shape[1]}x{res.shape[0]} restored vs "
                                  f"{ref.shape[1]}x{ref.shape[0]} reference")
        tensors: dict[str, Any] = {}
        for key in list(pair_metrics):
            try:
                per_image[pair.name][key] = _score_pair(key, scorers[key], res, ref, crop_border, tensors)
            except Exception as e:  # a learned metric failing must not take PSNR/SSIM down
                if METRICS[key].backend == "numpy":
                    raise EvaluationError(f"{pair.name}: {e}") from None
                not_computed[key] = f"failed on {pair.name}: {type(e).__name__}: {e}"
                pair_metrics.remove(key)
    scores = {k: float(np.mean([per_image[p.name][k] for p in pairs])) for k in pair_metrics}
    for key in (k for k in scorers if METRICS[k].kind == "set"):
        try:
            scores[key] = _folder_metric(scorers[key], restored, reference, len(pairs))
        except NotComputed as e:
            not_computed[key] = e.reason
        except Exception as e:
            not_computed[key] = f"failed: {type(e).__name__}: {e}"
    for p in pairs:  # a metric dropped half-way has no per-image values either
        per_image[p.name] = {k: v for k, v in per_image[p.name].items() if k in scores}
    ordered = {k: scores[k] for k in metrics if k in scores}
    return EvalResult(
        method=method or restored.name,
        dataset=dataset or default_dataset_name(reference),
        images=len(pairs),
        scores=ordered,
        not_computed={k: not_computed[k] for k in metrics if k in not_computed},
        per_image=per_image,
        settings=_settings(restored, reference, crop_border, device, clip_model, pyiqa_names or {}),
        seconds=time.time() - started,
    )


def _progress(pairs: Sequence[Pair], show: bool) -> Any:
    if not show:
        return pairs
    from tqdm import tqdm

    return tqdm(pairs, desc="evaluate", unit="img", file=sys.stderr)


def _settings(restored: Path, reference: Path, crop_border: int, device: str, clip_model: str,
              pyiqa_names: dict[str, str]) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for mod in ("pyiqa", "torch", "timm"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    return {
        "restored": str(restored.resolve()), "reference": str(reference.resolve()),
        "psnr_ssim": "Y channel (BT.601, BasicSR rgb2ycbcr), SSIM 11x11 Gaussian sigma 1.5",
        "crop_border": crop_border, "device": device, "clip_model": clip_model,
        "pyiqa_names": {k: pyiqa_names.get(k, s.pyiqa_name) for k, s in METRICS.items() if s.pyiqa_name},
        "versions": versions,
    }


def default_dataset_name(reference: Path) -> str:
    """The reference folder's name, or its parent's for the test-set layout `<set>/hr`."""
    reference = Path(reference).resolve()
    return reference.parent.name if reference.name.lower() in ("hr", "gt", "hq") else reference.name


# ------------------------------------------------------------------------------- tables


def new_table() -> dict[str, Any]:
    return {"version": TABLE_VERSION, "metrics": {k: {"label": s.label, "higher_better": s.higher_better}
                                                  for k, s in METRICS.items()}, "datasets": {}}


def load_table(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not isinstance(
            table.get("datasets"), dict):
        raise ValueError(f"{path}: not an evaluation table of version {TABLE_VERSION} (written by model/evaluate.py)")
    return table


def add_row(table: dict[str, Any], dataset: str, row: dict[str, Any]) -> str:
    """Add a method's row to a dataset's table; a row of the same method is replaced
    (a rerun must not leave two rows for one method). Returns "added" or "replaced"."""
    rows = table["datasets"].setdefault(dataset, {"rows": []})["rows"]
    for i, old in enumerate(rows):
        if old.get("method") == row["method"]:
            rows[i] = row
            return "replaced"
    rows.append(row)
    return "added"


def _fmt(spec: MetricSpec | None, value: Any) -> str:
    v = _number(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if math.isnan(v):
        return "nan"
    return f"{v:.{spec.digits if spec else 4}f}"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in list(r.get("scores", {})) + list(r.get("not_computed", {})):
            seen.setdefault(k, None)
    known = [k for k in METRICS if k in seen]
    return known + [k for k in seen if k not in METRICS]


def _best(rows: Sequence[dict[str, Any]], key: str) -> set[str]:
    """Cells to bold: the best displayed value of a column, when two or more rows have one."""
    spec = METRICS.get(key)
    shown = {r["method"]: _fmt(spec, r["scores"][key]) for r in rows if key in r.get("scores", {})}
    if len(shown) < 2 or spec is None:
        return set()
    values = {m: float(s) for m, s in shown.items()}
    best = max(values.values()) if spec.higher_better else min(values.values())
    return {m for m, v in values.items() if v == best}


def render_dataset(dataset: str, rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: rows = methods, columns = metrics with ↑/↓, best in bold."""
    cols = _columns(rows)
    head = ["Method"] + [METRICS[k].header if k in METRICS else k for k in cols]
    lines = [f"## {dataset}", "", "| " + " | ".join(head) + " |", "|:--" + "|--:" * len(cols) + "|"]
    best = {k: _best(rows, k) for k in cols}
    for r in rows:
        cells = [r["method"]]
        for k in cols:
            if k in r.get("scores", {}):
                text = _fmt(METRICS.get(k), r["scores"][k])
                cells.append(f"**{text}**" if r["method"] in best[k] else text)
            else:
                cells.append(MISSING)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [note for r in rows for note in _not_computed_notes(r)]
    if notes:
        lines += ["", f"Not computed ({MISSING}):", "", *notes]
    return "\n".join(lines) + "\n"


def _not_computed_notes(row: dict[str, Any]) -> list[str]:
    """One line per method and reason (first line only), naming the metrics it covers."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in row.get("not_computed", {}).items():
        label = METRICS[key].label if key in METRICS else key
        by_reason.setdefault(reason.splitlines()[0] if reason else "?", []).append(label)
    return [f"- {row['method']}, {', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]


def render_markdown(table: dict[str, Any]) -> str:
    """Every dataset of the table, in the order they were first added."""
    parts = [render_dataset(name, d["rows"]) for name, d in table["datasets"].items() if d.get("rows")]
    return "\n".join(parts)


def write_per_image(path: Path, result: EvalResult) -> None:
    cols = list(result.scores)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *cols])
        for name, vals in result.per_image.items():
            w.writerow([name, *(repr(vals[k]) if k in vals else "" for k in cols)])


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- CLI


def _parse_pyiqa_names(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, name = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in METRICS or METRICS[key].backend != "pyiqa" or not name.strip():
            pyiqa_keys = [k for k, s in METRICS.items() if s.backend == "pyiqa"]
            raise ValueError(f"--pyiqa {item!r}: expected METRIC=PYIQA_NAME with METRIC one of {pyiqa_keys}")
        out[key] = name.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restored", required=True, type=Path, help="folder of restored images")
    ap.add_argument("--reference", required=True, type=Path, help="folder of reference (HR) images")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help=f"comma-separated, default all: {','.join(DEFAULT_METRICS)}")
    ap.add_argument("--out", type=Path, help="JSON table to write (see --append)")
    ap.add_argument("--append", action="store_true",
                    help="add this row to the existing --out table (same method and dataset: replaced)")
    ap.add_argument("--markdown", type=Path, help="write the whole table (every dataset) as Markdown")
    ap.add_argument("--name", help="method name, the row label (default: the restored folder's name)")
    ap.add_argument("--dataset", help="dataset name, one table each (default: the reference folder's name, "
                                      "or its parent's when it is called hr)")
    ap.add_argument("--crop-border", type=int, default=0, help="pixels dropped on each side for PSNR/SSIM")
    ap.add_argument("--device", help="torch device for the learned metrics (default: cuda if present)")
    ap.add_argument("--download", action="store_true",
                    help="let pyiqa/timm download missing weights (default: never; missing ones are reported)")
    ap.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                    help="CLIP-I image tower: a timm model name or a local timm folder")
    ap.add_argument("--pyiqa", action="append", default=[], metavar="METRIC=NAME",
                    help="use another pyiqa variant, e.g. maniqa=maniqa-pipal (repeatable)")
    ap.add_argument("--per-image", type=Path, help="also write every image's scores as CSV")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.append and args.out is None:
        ap.error("--append needs --out")
    if args.crop_border < 0:
        ap.error("--crop-border must be 0 or more")
    try:
        metrics = parse_metrics(args.metrics)
        pyiqa_names = _parse_pyiqa_names(args.pyiqa)
        table = load_table(args.out) if args.append and args.out.exists() else new_table()
        result = evaluate(args.restored, args.reference, metrics, method=args.name, dataset=args.dataset,
                          crop_border=args.crop_border, device=args.device, download=args.download,
                          clip_model=args.clip_model, pyiqa_names=pyiqa_names,
                          show_progress=not args.no_progress)
    except (ValueError, PairingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EvaluationError as e:
        print(f"error: PSNR/SSIM cannot be computed: {e}", file=sys.stderr)
        return 1
    for key, reason in result.not_computed.items():
        print(f"{METRICS[key].label} not computed: {reason}", file=sys.stderr)
    action = add_row(table, result.dataset, result.row())
    if args.out:
        _atomic_write(args.out, json.dumps(table, indent=1, ensure_ascii=False) + "\n")
        print(f"{action} row {result.method!r} of {result.dataset!r} in {args.out}", file=sys.stderr)
    if args.markdown:
        _atomic_write(args.markdown, render_markdown(table))
    if args.per_image:
        write_per_image(args.per_image, result)
    print(render_dataset(result.dataset, table["datasets"][result.dataset]["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
