"""The trainer: loss terms, overfitting a fixed batch, exact resume, refusals, the CLI.

A small real build (gt 128, tiny models) goes through the real degrade, caption and
embed jobs; training runs on the CPU with the tiny SD1.5-shaped model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_manifest
from model.training.losses import sspir_loss
from model.training.config import TrainConfig
from model.training.trainer import TrainSetupError, run_training
from pipeline.caption.stage import run_captions
from pipeline.degrade.stage import run_degrade
from pipeline.embed.stage import run_embed
from pipeline.core.manifest import load_manifest

TINY_PROCESSOR = {"stem_channels": 8, "channels": [8, 16, 16]}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]):
    d = tmp_path_factory.mktemp("trainbuild")
    sd = tiny_models["sd15"]
    train = {"pretrained": str(sd), "image_encoder": str(sd / "image_encoder"), "batch_size": 4,
             "micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": 6, "num_workers": 2,
             "checkpoint_every": 2, "keep_checkpoints": 2, "validate_every": 6, "validation_pairs": 2,
             "validation_steps": 3, "gradient_checkpointing": False, "processor": TINY_PROCESSOR}
    m = write_manifest(d / "m.json", [{"name": "sk", "root": str(photo_dir)}], d / "out", sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": 8},
        "text_embed": {"model": str(sd)}, "train": train}, crops_per_image=3, rows_per_shard=4)
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    for s in range(3):
        run_captions(manifest.output, manifest.caption, s, {}, show_progress=False)
    run_embed(manifest.output, manifest.text_embed, show_progress=False)
    cfg = manifest.settings(TrainConfig, "train")
    return m, manifest.output, cfg


def test_loss_terms_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    rgbs = [torch.rand(2, 3, s, s, generator=g) * 2 - 1 for s in (32, 16, 8)]
    pred, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    got = sspir_loss(pred, noise, rgbs, hq, lambda_rgb=0.1, lambda_fft=0.01)
    eps = ((pred - noise) ** 2).mean()
    rgb = fft = 0.0
    for r in rgbs:
        s = r.shape[-1]
        gt = hq.reshape(2, 3, s, 64 // s, s, 64 // s).mean(dim=(3, 5))  # box average = area resize
        rgb += (r - gt).abs().mean()
        fr, fg = torch.fft.fft2(r), torch.fft.fft2(gt)
        fft += torch.cat([(fr.real - fg.real).abs().flatten(), (fr.imag - fg.imag).abs().flatten()]).mean()
    torch.testing.assert_close(got["eps"], eps)
    torch.testing.assert_close(got["rgb"], rgb)
    torch.testing.assert_close(got["fft"], fft, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["loss"], eps + 0.1 * rgb + 0.01 * fft, rtol=1e-5, atol=1e-4)


def test_overfits_a_fixed_batch(build) -> None:
    from model.training.data import ShardedPairs, collate, load_empty_prompt
    from model.networks.sspir import SSPIR

    _, out, cfg = build
    torch.manual_seed(0)
    model = SSPIR.from_pretrained(cfg.pretrained, cfg.image_encoder, processor_kwargs=TINY_PROCESSOR)
    data = ShardedPairs(out, seed=0, null_text_ratio=0.0)
    batch = collate([data[i] for i in range(2)], load_empty_prompt(out))
    g = torch.Generator().manual_seed(1)
    latents = model.encode_images(batch["hq"], sample=False)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([300, 700])
    noisy = model.noise_scheduler.add_noise(latents, noise, t)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        pred, rgbs = model(noisy, t, batch["text"].float(), batch["lq"], batch["lq_up"])
        loss = sspir_loss(pred, noise, rgbs, batch["hq"], 0.1, 0.01)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(build, tmp_path: Path) -> None:
    _, out, cfg = build
    full = run_training(out, tmp_path / "full", cfg, max_steps=6, show_progress=False)
    part = tmp_path / "part"
    run_training(out, part, cfg, max_steps=3, show_progress=False)
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]  # keep_checkpoints=2 retired step 1's sibling
    shutil.rmtree(part / "checkpoints" / "step-00000003")  # as if killed after the step-2 checkpoint
    resumed = run_training(out, part, cfg, max_steps=6, resume=True, show_progress=False)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(full[2:], resumed):
        for k in ("loss", "eps", "rgb", "fft", "grad_norm"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    assert [r["step"] for r in _metrics(part)] == [1, 2, 3, 4, 5, 6]
    files = {p.suffix for p in (part / "checkpoints").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}, files  # never pickles
    grid = part / "validation" / "step-00000006.png"
    assert grid.is_file()


def test_refuses_incomplete_build_missing_model_and_existing_run(build, tmp_path: Path) -> None:
    from model.training.data import BuildError

    _, out, cfg = build
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "text_emb" / "shard-00001.arrow").unlink()
    with pytest.raises(BuildError, match="shard.*1"):
        run_training(broken, tmp_path / "r1", cfg, max_steps=1, show_progress=False)
    with pytest.raises(TrainSetupError, match="nope"):
        run_training(out, tmp_path / "r2", dataclasses.replace(cfg, pretrained=str(tmp_path / "nope")),
                     max_steps=1, show_progress=False)
    run_training(out, tmp_path / "r3", cfg, max_steps=1, show_progress=False)
    with pytest.raises(TrainSetupError, match="--resume"):
        run_training(out, tmp_path / "r3", cfg, max_steps=2, show_progress=False)


def test_cli_runs_end_to_end(build, tmp_path: Path) -> None:
    m, out, _ = build
    env = dict(os.environ)
    r = subprocess.run([sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(m), "--max-steps", "4",
                        "--train-dir", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained to step 4" in r.stdout
    blocker = tmp_path / "a-file"  # a run folder under a regular file cannot be created, even by root
    blocker.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "model" / "train.py"), "--manifest", str(m), "--max-steps", "1",
                        "--train-dir", str(blocker / "run")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "cannot write" in r.stderr, r.stderr
