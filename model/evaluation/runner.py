"""One evaluation: a restored folder (and its references, when there are any) -> one table row.

Every metric of a row ends in exactly one of three states, kept apart because they mean
different things to a reader of the table:

  scores          computed (the mean over the images; FID one number for the folders)
  not_computed    could run in principle but not here: a package or weight file is missing,
                  or it failed on an image — the reason says which and what to do
  not_applicable  cannot exist for this data: a full-reference metric on a set without
                  references (RealLR200)

PSNR/SSIM problems (unreadable image, size mismatch) raise EvaluationError: without them a
row is not worth keeping.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.evaluation.folders import EvaluationError, Pair, check_sizes, default_dataset_name, pair_folders, read_rgb
from model.evaluation.iqa import DEFAULT_CLIP_MODEL, NotComputed, build_clip_i, build_pyiqa_metric
from model.evaluation.metrics import (
    DEFAULT_METRICS, METRICS, NO_REFERENCE_METRICS, json_number, parse_metrics, psnr_y, ssim_y,
)
from model.evaluation.weights import Caches


@dataclasses.dataclass
class EvalResult:
    method: str
    dataset: str
    images: int
    scores: dict[str, float]
    not_computed: dict[str, str]
    per_image: dict[str, dict[str, float]]
    settings: dict[str, Any]
    not_applicable: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        """The JSON table row (per-image values stay out: they go to --per-image)."""
        row: dict[str, Any] = {
            "method": self.method,
            "images": self.images,
            "scores": {k: json_number(v) for k, v in self.scores.items()},
            "not_computed": dict(self.not_computed),
        }
        if self.not_applicable:
            row["not_applicable"] = list(self.not_applicable)
        row.update(settings=self.settings, seconds=round(self.seconds, 1),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return row


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_tensor(rgb: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255.0)


def _score(out: Any) -> float:
    import torch

    if isinstance(out, torch.Tensor):
        return float(out.detach().float().mean().cpu())
    return float(out)


def split_applicable(metrics: Sequence[str], have_reference: bool) -> tuple[list[str], list[str]]:
    """(metrics to run, metrics not applicable): without references only no-reference ones run."""
    if have_reference:
        return list(metrics), []
    run = [k for k in metrics if not METRICS[k].needs_reference]
    if not run:
        raise ValueError(f"without --reference only the no-reference metrics apply ({', '.join(NO_REFERENCE_METRICS)}); "
                         f"asked for {', '.join(metrics)}")
    return run, [k for k in metrics if METRICS[k].needs_reference]


def _build_scorers(metrics: Sequence[str], device: str, caches: Caches | None, download: bool, clip_model: str,
                   pyiqa_names: dict[str, str], not_computed: dict[str, str]) -> dict[str, Any]:
    """One scorer per metric that can run here; the others get their reason."""
    scorers: dict[str, Any] = {}
    for key in metrics:
        spec = METRICS[key]
        try:
            if spec.backend == "numpy":
                scorers[key] = None
            elif spec.backend == "clip":
                assert caches is not None
                scorers[key] = build_clip_i(clip_model, device, caches, download)
            else:
                assert caches is not None
                scorers[key] = build_pyiqa_metric(spec, device, caches, download, pyiqa_names.get(key))
        except NotComputed as e:
            not_computed[key] = e.reason
    return scorers


def _score_pair(key: str, scorer: Any, res: np.ndarray, ref: np.ndarray | None, crop_border: int,
                tensors: dict[str, Any]) -> float:
    if key == "psnr":
        return psnr_y(res, ref, crop_border)
    if key == "ssim":
        return ssim_y(res, ref, crop_border)
    if key == "clip_i":
        return scorer(res, ref)
    if "res" not in tensors:
        tensors["res"] = _to_tensor(res)
        tensors["ref"] = _to_tensor(ref) if ref is not None else None
    if METRICS[key].kind == "fr":
        return _score(scorer(tensors["res"], tensors["ref"]))
    return _score(scorer(tensors["res"]))


def _folder_metric(scorer: Any, restored: Path, reference: Path, n: int) -> float:
    if n < 2:
        raise NotComputed("FID needs at least 2 images per folder")
    workers = min(4, os.cpu_count() or 1)
    return _score(scorer(str(restored), str(reference), num_workers=workers, batch_size=8, verbose=False))


def evaluate(restored: Path, reference: Path | None = None, metrics: Sequence[str] = DEFAULT_METRICS, *,
             method: str | None = None, dataset: str | None = None, crop_border: int = 0,
             device: str | None = None, download: bool = False, clip_model: str = DEFAULT_CLIP_MODEL,
             pyiqa_names: dict[str, str] | None = None, caches: Caches | None = None,
             show_progress: bool = False) -> EvalResult:
    """Pair the folders, compute every requested metric that applies, average over images."""
    started = time.time()
    restored = Path(restored)
    reference = Path(reference) if reference is not None else None
    metrics, not_applicable = split_applicable(parse_metrics(metrics), reference is not None)
    pairs = pair_folders(restored, reference)
    check_sizes(pairs)
    learned = any(METRICS[k].backend != "numpy" for k in metrics)  # PSNR/SSIM alone need no torch
    device = device or (_default_device() if learned else "cpu")
    caches = caches or (Caches.of_libraries() if learned else None)
    not_computed: dict[str, str] = {}
    scorers = _build_scorers(metrics, device, caches, download, clip_model, pyiqa_names or {}, not_computed)
    per_image: dict[str, dict[str, float]] = {p.name: {} for p in pairs}
    pair_metrics = [k for k in scorers if METRICS[k].kind != "set"]
    for pair in _progress(pairs, show_progress):
        res = read_rgb(pair.restored)
        ref = read_rgb(pair.reference) if pair.reference is not None else None
        if ref is not None and res.shape != ref.shape:
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
            assert reference is not None  # set metrics need references (split_applicable)
            scores[key] = _folder_metric(scorers[key], restored, reference, len(pairs))
        except NotComputed as e:
            not_computed[key] = e.reason
        except Exception as e:
            not_computed[key] = f"failed: {type(e).__name__}: {e}"
    for p in pairs:  # a metric dropped half-way has no per-image values either
        per_image[p.name] = {k: v for k, v in per_image[p.name].items() if k in scores}
    return EvalResult(
        method=method or restored.name,
        dataset=dataset or default_dataset_name(reference, restored),
        images=len(pairs),
        scores={k: scores[k] for k in metrics if k in scores},
        not_computed={k: not_computed[k] for k in metrics if k in not_computed},
        per_image=per_image,
        settings=_settings(restored, reference, crop_border, device, clip_model, pyiqa_names or {}, caches),
        not_applicable=not_applicable,
        seconds=time.time() - started,
    )


def _progress(pairs: Sequence[Pair], show: bool) -> Any:
    if not show:
        return pairs
    from tqdm import tqdm

    return tqdm(pairs, desc="evaluate", unit="img", file=sys.stderr)


def _settings(restored: Path, reference: Path | None, crop_border: int, device: str, clip_model: str,
              pyiqa_names: dict[str, str], caches: Caches | None) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for mod in ("pyiqa", "torch", "timm"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    return {
        "restored": str(restored.resolve()), "reference": str(reference.resolve()) if reference else None,
        "psnr_ssim": "Y channel (BT.601, BasicSR rgb2ycbcr), SSIM 11x11 Gaussian sigma 1.5",
        "crop_border": crop_border, "device": device, "clip_model": clip_model,
        "pyiqa_names": {k: pyiqa_names.get(k, s.pyiqa_name) for k, s in METRICS.items() if s.pyiqa_name},
        "weight_caches": None if caches is None else {
            "torch_hub": str(caches.torch_hub), "pyiqa": str(caches.pyiqa), "hf_hub": str(caches.hf_hub)},
        "versions": versions,
    }
