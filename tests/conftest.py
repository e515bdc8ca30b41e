"""Shared fixtures: small real photo folders and manifests written the way users write them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_env() -> dict[str, str]:
    """The environment a job runs in under test: Ray's token auth off (this machine has no
    token) and no RAY_ADDRESS inherited, so a job starts its own private local Ray."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return env


def run_script(script: str | Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A project script (path relative to the repository) run as a user runs it, output captured."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=job_env(), cwd=ROOT)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real photographs from scikit-image (colour, grey, small, JPEG)."""
    import skimage

    src = Path(skimage.__file__).parent / "data"
    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "chelsea.png", "camera.png", "rocket.jpg"):
        shutil.copyfile(src / name, d / name)
    return d


def write_manifest(path: Path, sources: list[dict[str, Any]], output: Path,
                   sections: dict[str, Any] | None = None, **degrade: Any) -> Path:
    body = {
        "name": "test",
        "seed": 7,
        "output": str(output),
        "sources": sources,
        "degrade": {"gt_size": 128, "scale": 4, "crops_per_image": 2, "rows_per_shard": 3,
                    "max_failed_fraction": 0.0, **degrade},
        **(sections or {}),
    }
    path.write_text(json.dumps(body, indent=1))
    return path


@pytest.fixture()
def small_manifest(tmp_path: Path, photo_dir: Path) -> Path:
    """8 pairs at 128² in 3 shards (3, 3, 2 rows)."""
    return write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny LLaVA and SD1.5-shaped models, built once per session like `make demo` does."""
    from demo_fixtures.tiny_llava import build_tiny_llava
    from demo_fixtures.tiny_sd import build_tiny_sd

    d = tmp_path_factory.mktemp("tiny")
    return {"llava": build_tiny_llava(d / "llava"), "sd15": build_tiny_sd(d / "sd15")}
