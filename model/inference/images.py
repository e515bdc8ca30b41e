"""Restoration's image input and output: reading LQ files, padding, the model's tensors, PNGs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from pipeline.core.image_io import IMAGE_SUFFIXES

SCALE = 4  # SSP-IR restores ×4 (LQ 128² → 512² at training)
MAX_LQ_PIXELS = 4096 * 4096  # a 16K² output; larger inputs are refused by name, not OOM-killed


class RestoreSetupError(RuntimeError):
    """Nothing can be restored (checkpoint, models, settings); the message says what to fix."""


def pad_lq(rgb: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad (H, W, 3) at the bottom and right to multiples of `multiple`: the UNet
    halves the latent three times, so odd sizes must be padded, and cropped after."""
    h, w = rgb.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return rgb
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def lq_tensors(rgb: np.ndarray, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 LQ (h, w, 3) → (lq (1, 3, h, w) in [0, 1], lq_up (1, 3, 4h, 4w) in [-1, 1]):
    the same cv2 bicubic on uint8 and the same value tables the training loader uses."""
    from model.training.data import images_to_float

    h, w = rgb.shape[:2]
    up = cv2.resize(rgb, (SCALE * w, SCALE * h), interpolation=cv2.INTER_CUBIC)
    chw = {"lq": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
           "lq_up": torch.from_numpy(np.ascontiguousarray(up.transpose(2, 0, 1)))}
    floats = images_to_float(chw)
    return floats["lq"][None].to(device), floats["lq_up"][None].to(device)


def read_lq(path: Path, max_pixels: int = MAX_LQ_PIXELS) -> np.ndarray:
    """uint8 RGB (h, w, 3) through the pipeline's loader (EXIF rotation, 16-bit, CMYK,
    alpha over white); raises SourceError with a reason a person can act on."""
    from pipeline.core.image_io import load_source

    return load_source(path, max_pixels=max_pixels, min_side=1)[0]


def list_inputs(path: Path) -> list[Path]:
    """A file as given, or a folder's image files (by suffix), sorted by name."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not path.exists():
        raise RestoreSetupError(f"--input {path} does not exist")
    return [path]


def output_names(inputs: Sequence[Path]) -> dict[Path, str]:
    """`<stem>.png`, or `<name>.png` where two inputs share a stem (a.jpg, a.png): never
    let one input's result overwrite another's."""
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    return {p: f"{p.stem if stems[p.stem] == 1 else p.name}.png" for p in inputs}


def write_png(path: Path, rgb: np.ndarray, text: dict[str, str]) -> Path:
    """Write atomically (temporary file + rename) with PNG text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
