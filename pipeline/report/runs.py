"""The training run and the held-out evaluation, read from the files their jobs write.

``pipeline`` never imports ``model``, so the layouts are read as files:
* training (``model/train.py``): ``<run>/metrics.jsonl``, one JSON object per optimizer
  step (``step``, each loss term, ``lr``, ``grad_norm``, ``samples_per_s``, ``data_wait``
  as a fraction of the step), ``<run>/validation/step-NNNNNNNN.png`` grids, and
  ``<run>/checkpoints/step-*/trainer_state.json``;
* evaluation (``model/evaluate.py --out``): a results table ``{"version": 1, "metrics":
  {key: {label, higher_better}}, "datasets": {name: {"rows": [{method, images, scores,
  not_computed, seconds}]}}}``; restored images and the held-out ``lq/`` and ``hr/``
  folders beside it; ``restore.json`` (written by ``jobs/demo_heldout.py``) for timing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# metrics.jsonl keys that are not loss terms
NOT_LOSSES = ("step", "lr", "grad_norm", "samples_per_s", "data_wait")
RESULTS_FILE = "results.json"
RESTORE_FILE = "restore.json"


@dataclasses.dataclass
class TrainingRun:
    root: Path
    steps: np.ndarray
    series: dict[str, np.ndarray]  # every numeric key of metrics.jsonl but "step"
    losses: list[str]
    validation: Path | None
    state: dict[str, Any]
    bad_lines: int

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if self.steps.size else 0


def read_training(run: Path) -> TrainingRun | None:
    """None when there is no metrics.jsonl (the build was never trained)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return None
    by_step: dict[int, dict[str, float]] = {}
    bad = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = {k: float(v) for k, v in rec.items()
                                             if k != "step" and isinstance(v, (int, float))}
            except (ValueError, KeyError, TypeError):
                bad += 1  # a line torn by a kill; the trainer rewrites it on resume
    steps = np.array(sorted(by_step), dtype=np.int64)
    keys: list[str] = []
    for rec in by_step.values():
        keys += [k for k in rec if k not in keys]
    series = {k: np.array([by_step[s].get(k, math.nan) for s in steps], dtype=np.float64) for k in keys}
    grids = sorted((Path(run) / "validation").glob("step-*.png"))
    states = sorted((Path(run) / "checkpoints").glob("step-*/trainer_state.json"))
    state: dict[str, Any] = {}
    if states:
        try:
            state = json.loads(states[-1].read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
    return TrainingRun(Path(run), steps, series, [k for k in keys if k not in NOT_LOSSES],
                       grids[-1] if grids else None, state, bad)


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (NaNs carried over, not spread)."""
    out = np.full_like(values, np.nan)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isnan(v):
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


@dataclasses.dataclass
class HeldOut:
    root: Path
    table: dict[str, Any] | None
    images: list[str]  # names with lq, restored and hr
    restore: dict[str, Any]
    problems: list[str]
    prompts: dict[str, str]  # the caption each image was restored with (restore.py's PNG text)


def read_heldout(root: Path) -> HeldOut:
    """The held-out folder's results; what is missing is listed, not fatal."""
    root = Path(root)
    problems: list[str] = []
    table = None
    path = root / RESULTS_FILE
    if path.is_file():
        try:
            table = json.loads(path.read_text())
            if not isinstance(table.get("datasets"), dict):
                problems.append(f"{path} is not an evaluation table (no datasets)")
                table = None
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{path} does not read as JSON ({e})")
    else:
        problems.append(f"no {path}: score with `python model/evaluate.py --restored {root / 'restored'} "
                        f"--reference {root / 'hr'} --out {path}`")
    restored = root / "restored"
    names = sorted(p.stem for p in restored.glob("*.png")
                   if (root / "lq" / p.name).is_file() and (root / "hr" / p.name).is_file())
    if not names:
        problems.append(f"no restored images in {restored} with matching lq/ and hr/ files")
    restore: dict[str, Any] = {}
    if (root / RESTORE_FILE).is_file():
        try:
            restore = json.loads((root / RESTORE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            problems.append(f"{root / RESTORE_FILE} does not read as JSON")
    return HeldOut(root, table, names, restore, problems, {n: _prompt(restored / f"{n}.png") for n in names})


def _prompt(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(getattr(im, "text", {}).get("prompt", ""))
    except OSError:
        return ""


def heldout_grid(held: HeldOut, path: Path, limit: int = 6) -> list[str]:
    """LQ (bicubic to HQ size) | restored | HQ, one row per image (the first `limit`)."""
    rows, names = [], []
    for name in held.images[:limit]:
        hr = cv2.imread(str(held.root / "hr" / f"{name}.png"), cv2.IMREAD_COLOR)
        lq = cv2.imread(str(held.root / "lq" / f"{name}.png"), cv2.IMREAD_COLOR)
        res = cv2.imread(str(held.root / "restored" / f"{name}.png"), cv2.IMREAD_COLOR)
        if hr is None or lq is None or res is None:
            continue
        size = (hr.shape[1], hr.shape[0])
        lq = cv2.resize(lq, size, interpolation=cv2.INTER_CUBIC)
        if res.shape[:2] != hr.shape[:2]:
            res = cv2.resize(res, size, interpolation=cv2.INTER_CUBIC)
        rows.append(np.concatenate([lq, res, hr], axis=1))
        names.append(name)
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.concatenate(rows, axis=0))
    return names
