"""SSP-IR: the networks (model/networks/), the trainer and its data path (model/training/),
restoration (model/inference/) and evaluation (model/evaluation/), with thin CLIs beside them
(train.py, restore.py, evaluate.py, summary.py: `python -m model.summary --manifest M`).
Names are imported lazily so that importing `model.<something>` does not load diffusers/timm
unless needed.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SSPIR": "model.networks.sspir",
    "Processor": "model.networks.processor",
    "RefineLayer": "model.networks.refine",
    "PriorAttentionSet": "model.networks.attention",
    "PriorBlocks": "model.networks.blocks",
    "RGBHeads": "model.networks.conditioning",
    "ImageEncoder": "model.networks.image_encoder",
    "load_image_encoder": "model.networks.image_encoder",
    "controlnet_from_unet": "model.networks.controlnet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
