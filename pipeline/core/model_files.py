"""Where a diffusers model component's files are, and what identifies them.

A stage that stores a frozen model's output (VAE moments) and the trainer that consumes it
must agree that they mean the same model. A path or hub id is not enough (a folder can be
overwritten, a hub revision moves), so both sides compare the component's identity: the
sha256 of its config (without fields a mere re-save changes) and of its weight files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.core.shards import sha256_file

WEIGHT_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
VOLATILE_CONFIG_KEYS = ("_diffusers_version", "_name_or_path", "_class_name_version", "transformers_version",
                        "dtype", "torch_dtype")


class ComponentNotFoundError(ValueError):
    """The model folder named in a manifest lacks the component (exit code 2)."""


def resolve_component(ref: str, subfolder: str, key: str) -> Path | None:
    """The local folder of `ref`'s `subfolder` (checked), or None when `ref` is a hub id
    not yet in the local cache. `key` names the manifest key for the error message."""
    path = Path(ref).expanduser()
    if path.exists() or not _HUB_ID.match(ref):
        folder = path / subfolder
        if not (folder / "config.json").is_file():
            raise ComponentNotFoundError(
                f"{key}: {folder}/config.json does not exist; expected a diffusers folder with {subfolder}/ "
                "(config.json + diffusion_pytorch_model.safetensors), e.g. a Stable Diffusion 1.5 snapshot; "
                "build a tiny one with jobs/build_tiny_models.py")
        if not weight_files(folder):
            raise ComponentNotFoundError(f"{key}: {folder} holds no *.safetensors weights")
        return folder.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(ref, f"{subfolder}/config.json")
    return Path(found).parent if isinstance(found, str) else None


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def component_identity(folder: Path) -> dict[str, Any]:
    """{"config_sha256", "weights_sha256"}: what decides the component's outputs.

    The weights are hashed whole (a 335 MB SD1.5 VAE takes about a second), once per job.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    for k in VOLATILE_CONFIG_KEYS:
        config.pop(k, None)
    weights = hashlib.sha256()
    for p in weight_files(folder):
        weights.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights.hexdigest()}


def identity_tag(identity: dict[str, Any]) -> str:
    """A short form for config hashes and messages."""
    return f"c{identity['config_sha256'][:8]}-w{identity['weights_sha256'][:8]}"
