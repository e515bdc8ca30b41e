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


def tiny_train(sd: Path, **overrides: Any) -> dict[str, Any]:
    """A `train` section for the tiny SD1.5: one real step is seconds on the CPU."""
    return {"pretrained": str(sd), "image_encoder": str(sd / "image_encoder"), "batch_size": 2,
            "micro_batch_size": 2, "learning_rate": 1e-3, "num_workers": 0, "validate_every": 100,
            "gradient_checkpointing": False, **overrides}


def build_dataset(d: Path, photos: Path, tiny_models: dict[str, Path], train: dict[str, Any],
                  shards: int, latents: bool = False, caption_tokens: int = 8, **degrade: Any):
    """A training build made by the real stages, in-process: degrade `photos` (128², the
    `degrade` overrides), caption every shard with the tiny LLaVA, embed, and optionally encode
    latents. Returns the loaded manifest; its `train` section is `train`."""
    from pipeline.caption.stage import run_captions
    from pipeline.core.manifest import load_manifest
    from pipeline.degrade.stage import run_degrade
    from pipeline.embed.stage import run_embed
    from pipeline.latents.stage import run_latents

    m = write_manifest(d / "m.json", [{"name": "sk", "root": str(photos)}], d / "out", sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": caption_tokens},
        "text_embed": {"model": str(tiny_models["sd15"])}, "train": train}, **degrade)
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    for s in range(shards):
        run_captions(manifest.output, manifest.caption, s, {}, show_progress=False)
    run_embed(manifest.output, manifest.text_embed, show_progress=False)
    if latents:
        assert run_latents(manifest, show_progress=False).exit_code == 0
    return manifest


def ok_script(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    r = run_script(script, *args, timeout=timeout)
    assert r.returncode == 0, f"{script} {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture(scope="session")
def demo_chain(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    """`make demo`'s chain, small and built once: degrade (4 photos × 6 crops, 3 shards) →
    caption (tiny LLaVA), one caption overridden with a 400-word text (so a row is an
    override, spans several 75-token chunks and is truncated) → embed → latents → train 2 steps →
    degrade and export 2 held-out photos → restore and score them (jobs/demo_heldout.py).
    Nothing is mocked; the models are the tiny random ones."""
    d = tmp_path_factory.mktemp("demo")
    sd = tiny_models["sd15"]
    train = {"pretrained": str(sd), "image_encoder": str(sd / "image_encoder"), "batch_size": 2,
             "micro_batch_size": 2, "max_steps": 2, "num_workers": 0, "checkpoint_every": 2,
             "validate_every": 100, "validation_pairs": 2, "validation_steps": 2, "gradient_checkpointing": False}
    m = write_manifest(d / "demo.json", [{"name": "sk", "root": str(photo_dir)}], d / "build", sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": 8},
        "text_embed": {"model": str(sd), "max_chunks": 2}, "train": train}, crops_per_image=6, rows_per_shard=8)
    held_src = d / "heldout_photos"
    held_src.mkdir()
    for name in ("chelsea.png", "rocket.jpg"):
        (held_src / name).write_bytes((photo_dir / name).read_bytes())
    h = write_manifest(d / "heldout.json", [{"name": "held", "root": str(held_src)}], d / "held",
                       crops_per_image=1, usm_gt=False, use_hflip=False)
    ok_script("jobs/degrade.py", "--manifest", str(m), "--serial", "--no-progress")
    ok_script("jobs/caption.py", "--manifest", str(m), "--all", "--no-progress")
    overrides = d / "overrides.jsonl"
    overrides.write_text(json.dumps({"key": "sk/astronaut.png#0", "caption": " ".join(["astronaut"] * 400)}) + "\n")
    ok_script("jobs/caption.py", "--manifest", str(m), "--all", "--no-progress", "--overrides", str(overrides))
    ok_script("jobs/embed.py", "--manifest", str(m), "--all", "--no-progress")
    ok_script("jobs/latents.py", "--manifest", str(m), "--all", "--no-progress")
    ok_script("model/train.py", "--manifest", str(m), "--no-progress")
    ok_script("jobs/degrade.py", "--manifest", str(h), "--serial", "--no-progress")
    ok_script("jobs/export_testset.py", "--manifest", str(h))
    ok_script("jobs/demo_heldout.py", "--build", str(d / "build"), "--heldout", str(d / "held"), "--steps", "2",
              "--caption-model", str(tiny_models["llava"]), "--caption-max-tokens", "6")
    return {"dir": d, "manifest": m, "build": d / "build", "held": d / "held"}
