"""A PNG grid of rows LQ (upsampled) | restoration | HQ, for eyes and for reports."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8 RGB."""
    return ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_grid(path: Path, *columns: torch.Tensor) -> Path:
    """Each column a batch (B, 3, H, W) in [-1, 1] of the same size; one row per sample."""
    rows = [np.concatenate([to_uint8(col[i]) for col in columns], axis=1) for i in range(columns[0].shape[0])]
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
    return path
