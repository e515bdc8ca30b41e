"""The latents stage against diffusers' own VAE: stored moments, resume, reruns, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, job_env, run_script, write_manifest
from pipeline.core.image_io import decode_png
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.degrade.stage import run_degrade
from pipeline.latents.stage import moments_array, run_latents

JOB = "jobs/latents.py"


@pytest.fixture()
def pairs_build(tmp_path: Path, photo_dir: Path, tiny_models: dict[str, Path]) -> Path:
    """8 pairs at 128² in 3 shards, with the tiny SD1.5 folder as train.pretrained."""
    sd = tiny_models["sd15"]
    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out",
                       sections={"train": {"pretrained": str(sd)}, "text_embed": {"model": str(sd)},
                                 "latents": {"batch_size": 3}})
    assert run_degrade(load_manifest(m), distributor="serial", show_progress=False).exit_code == 0
    return m


def _latents(manifest: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(JOB, "--manifest", str(manifest), "--no-progress", *args)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "latents").glob("shard-*.arrow"))}


def test_stored_moments_are_the_vaes_latent_distribution_of_every_stored_hq(pairs_build: Path,
                                                                            tiny_models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    r = _latents(pairs_build, "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    out = load_manifest(pairs_build).output
    vae = AutoencoderKL.from_pretrained(str(tiny_models["sd15"]), subfolder="vae").eval()
    rows = 0
    for s in range(3):
        pairs = read_table(shard_path(out, "pairs", s))
        lat = read_table(shard_path(out, "latents", s))
        side = read_sidecar(shard_path(out, "latents", s))
        assert lat.column("key").to_pylist() == pairs.column("key").to_pylist()  # same keys, same order
        shape = side["moments"]["shape"]
        assert shape == [2 * vae.config.latent_channels, 128 // 8, 128 // 8]
        assert side["vae"]["scaling_factor"] == vae.config.scaling_factor
        assert side["pairs_sha256"] == read_sidecar(shard_path(out, "pairs", s))["sha256"]
        stored = moments_array(lat.column("moments"), shape)
        assert stored.dtype == np.float16
        for i, png in enumerate(pairs.column("hq_png").to_pylist()):
            # independent of the stage's conversion: torch's own arithmetic on the decoded PNG
            hq = torch.from_numpy(decode_png(png)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            with torch.no_grad():
                want = vae.encode(hq).latent_dist.parameters[0]
            np.testing.assert_allclose(stored[i].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
            # and the stored moments rebuild the distribution diffusers would sample from
            dist = DiagonalGaussianDistribution(torch.from_numpy(stored[i:i + 1].astype(np.float32)))
            np.testing.assert_allclose(dist.mean[0].numpy(), want[:vae.config.latent_channels].numpy(),
                                       rtol=2e-3, atol=2e-3)
            rows += 1
    assert rows == 8
    index = json.loads((out / "index.json").read_text())
    assert index["stages"]["latents"]["rows"] == 8


def test_rerun_is_a_noop_and_a_changed_vae_redoes_every_shard(pairs_build: Path, tmp_path: Path,
                                                              tiny_models: dict[str, Path]) -> None:
    manifest = load_manifest(pairs_build)
    assert run_latents(manifest, show_progress=False).exit_code == 0
    stamps = {p: p.stat().st_mtime_ns for p in (manifest.output / "latents").iterdir()}
    again = run_latents(manifest, show_progress=False)
    assert (again.shards_built, again.shards_skipped) == (0, 3)
    assert stamps == {p: p.stat().st_mtime_ns for p in (manifest.output / "latents").iterdir()}
    # another VAE (same architecture, other weights): every shard is redone
    other = tmp_path / "other_sd"
    shutil.copytree(tiny_models["sd15"], other)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(other), subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(str(other / "vae"))
    body = json.loads(pairs_build.read_text())
    body["latents"]["vae"] = str(other)
    pairs_build.write_text(json.dumps(body))
    redone = run_latents(load_manifest(pairs_build), show_progress=False)
    assert (redone.shards_built, redone.shards_skipped) == (3, 0)
    side = read_sidecar(shard_path(manifest.output, "latents", 0))
    assert side["vae"]["ref"] == str(other)


def test_killed_run_resumes_byte_identical(pairs_build: Path, tmp_path: Path) -> None:
    ref_out = tmp_path / "ref"
    shutil.copytree(load_manifest(pairs_build).output / "pairs", ref_out / "pairs")
    slow = ("--batch-size", "1")  # one VAE call per image: the run lasts long enough to be cut
    assert _latents(pairs_build, "--all", "--out", str(ref_out), *slow).returncode == 0
    out = load_manifest(pairs_build).output
    proc = subprocess.Popen([sys.executable, str(ROOT / JOB), "--manifest", str(pairs_build), "--all",
                             "--no-progress", *slow], env=job_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and read_sidecar(shard_path(out, "latents", 0)) is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: shard 0 committed, later ones torn or absent
    proc.wait()
    complete = [s for s in range(3) if read_sidecar(shard_path(out, "latents", s)) is not None]
    assert 0 in complete and len(complete) < 3, complete  # really cut in the middle
    r = _latents(pairs_build, "--all", *slow)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _files(out) == _files(ref_out)
    assert not list((out / "latents").glob("*.tmp"))


def test_one_shard_and_bad_input(pairs_build: Path, tmp_path: Path) -> None:
    r = _latents(pairs_build, "--shard", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    out = load_manifest(pairs_build).output
    assert [p.name for p in sorted((out / "latents").glob("*.arrow"))] == ["shard-00001.arrow"]
    r = _latents(pairs_build, "--shard", "9")
    assert r.returncode == 2 and "pairs shard 9 does not exist" in r.stderr and "jobs/degrade.py" in r.stderr
    body = json.loads(pairs_build.read_text())
    body["latents"]["vae"] = str(tmp_path / "no-such-sd")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(body))
    r = _latents(bad, "--all")
    assert r.returncode == 2 and str(tmp_path / "no-such-sd" / "vae") in r.stderr, r.stderr
    assert "--help" not in r.stderr and "Traceback" not in r.stderr
