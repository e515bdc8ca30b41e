"""Training checkpoints: atomic folders of safetensors and JSON, never pickles.

A checkpoint is written into a temporary folder and renamed into place, so a crash
leaves either the previous checkpoint or the new one. The optimizer's state, a nested
dict of tensors, is flattened into one safetensors file plus a JSON skeleton.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{8})$")


def optimizer_to_files(opt: torch.optim.Optimizer, folder: Path) -> None:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        skeleton["state"][str(pid)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
                skeleton["state"][str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                skeleton["state"][str(pid)][name] = {"value": value}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(skeleton))


def optimizer_from_files(opt: torch.optim.Optimizer, folder: Path) -> None:
    skeleton = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state = {int(pid): {name: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for name, v in entry.items()}
             for pid, entry in skeleton["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})


def save_checkpoint(root: Path, step: int, model: Any, opt: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    keep: int) -> Path:
    """Write `root/step-NNNNNNNN` atomically, then delete all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:6]}"
    try:
        model.save_trainable(tmp / "trainable")
        optimizer_to_files(opt, tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # a rerun reaching the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of crashed writes are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                  and (p / "trainer_state.json").is_file())


def clean_partial(root: Path) -> None:
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())
