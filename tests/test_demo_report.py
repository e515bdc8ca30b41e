"""The demo's chain, small: every command `make demo` runs, then jobs/demo_report.py.

degrade → caption (tiny LLaVA, transformers engine) → embed → train 2 steps → degrade and
export a held-out set → the report (restore with 2 DDPM steps, evaluate, HTML). Nothing is
mocked; the models are the tiny random ones, so the test checks that the report is built
from what the stages wrote and that every file it links exists, not that restoration is good.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import cv2
import pytest

from conftest import run_script, write_manifest


def _ok(script: str, *args: str) -> subprocess.CompletedProcess:
    r = run_script(script, *args, timeout=900)
    assert r.returncode == 0, f"{script} {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("demo")
    sd = tiny_models["sd15"]
    train = {"pretrained": str(sd), "image_encoder": str(sd / "image_encoder"), "batch_size": 2,
             "micro_batch_size": 2, "max_steps": 2, "num_workers": 0, "checkpoint_every": 2,
             "validate_every": 100, "gradient_checkpointing": False,
             "processor": {"stem_channels": 8, "channels": [8, 16, 16]}}
    m = write_manifest(d / "demo.json", [{"name": "sk", "root": str(photo_dir)}], d / "build", sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": 8},
        "text_embed": {"model": str(sd)}, "train": train}, crops_per_image=1, rows_per_shard=4)
    held_src = d / "heldout_photos"
    held_src.mkdir()
    for name in ("chelsea.png", "rocket.jpg"):
        (held_src / name).write_bytes((photo_dir / name).read_bytes())
    h = write_manifest(d / "heldout.json", [{"name": "held", "root": str(held_src)}], d / "held",
                       crops_per_image=1, usm_gt=False, use_hflip=False)
    _ok("jobs/degrade.py", "--manifest", str(m), "--serial", "--no-progress")
    _ok("jobs/caption.py", "--manifest", str(m), "--all", "--no-progress")
    _ok("jobs/embed.py", "--manifest", str(m), "--all", "--no-progress")
    _ok("model/train.py", "--manifest", str(m), "--no-progress")
    _ok("jobs/degrade.py", "--manifest", str(h), "--serial", "--no-progress")
    _ok("jobs/export_testset.py", "--manifest", str(h))
    report = d / "report"
    _ok("jobs/demo_report.py", "--build", str(d / "build"), "--heldout", str(d / "held"), "--report", str(report),
        "--steps", "2", "--caption-model", str(tiny_models["llava"]), "--caption-max-tokens", "6")
    return {"dir": d, "build": d / "build", "held": d / "held", "report": report}


def test_every_linked_file_exists_and_images_decode(demo: dict[str, Path]) -> None:
    page = (demo["report"] / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    images = [ln for ln in links if ln.endswith(".png")]
    assert {"loss_curves.png", "grid.png", "restored/chelsea_00.png", "restored/rocket_00.png"} <= set(images)
    assert {"metrics.json", "metrics.md"} <= set(links)
    for link in links:
        target = demo["report"] / link
        assert target.is_file() and target.stat().st_size > 0, f"index.html links {link}, which is missing"
    for link in images:
        assert cv2.imread(str(demo["report"] / link)) is not None, f"{link} does not decode"


def test_grid_is_lq_restored_hq_per_held_out_image(demo: dict[str, Path]) -> None:
    grid = cv2.imread(str(demo["report"] / "grid.png"))
    hr = cv2.imread(str(demo["held"] / "hr" / "chelsea_00.png"))
    assert grid.shape == (2 * hr.shape[0], 3 * hr.shape[1], 3)
    # The right column is the HQ reference itself, the middle one the restored file.
    assert (grid[: hr.shape[0], 2 * hr.shape[1]:] == hr).all()
    restored = cv2.imread(str(demo["report"] / "restored" / "chelsea_00.png"))
    assert (grid[: hr.shape[0], hr.shape[1]: 2 * hr.shape[1]] == restored).all()


def test_report_carries_what_the_stages_wrote(demo: dict[str, Path]) -> None:
    page = (demo["report"] / "index.html").read_text()
    assert "tiny and random" in page and "restore nothing useful" in page
    # The metric table scores the restored files against the exported HQ references.
    from model.evaluate import psnr_y
    row = json.loads((demo["report"] / "metrics.json").read_text())["datasets"]["demo held-out"]["rows"][0]
    assert row["images"] == 2
    direct = [psnr_y(cv2.imread(str(demo["report"] / "restored" / f"{n}.png"))[..., ::-1],
                     cv2.imread(str(demo["held"] / "hr" / f"{n}.png"))[..., ::-1]) for n in ("chelsea_00", "rocket_00")]
    assert row["scores"]["psnr"] == pytest.approx(sum(direct) / 2, rel=1e-9)
    assert f"{row['scores']['psnr']:.2f}" in page
    for stage in ("pairs", "captions", "text_emb", "train", "restore", "evaluate"):
        assert re.search(rf"<td>{stage}</td><td>[^<]*\d", page), f"no throughput row for {stage}"
    # The captions shown are the ones written into the restored PNGs' metadata.
    from PIL import Image
    with Image.open(demo["report"] / "restored" / "rocket_00.png") as im:
        prompt = im.text["prompt"]
    assert f"<td>rocket_00</td><td>{prompt}</td>" in page.replace("&#x27;", "'").replace("&quot;", '"')
    losses = [json.loads(ln)["loss"] for ln in (demo["build"] / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2


def test_refuses_a_missing_build_naming_the_step(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    r = run_script("jobs/demo_report.py", "--build", str(tmp_path / "nothing"), "--heldout", str(tmp_path / "held"),
             "--report", str(tmp_path / "report"), "--caption-model", str(tiny_models["llava"]))
    assert r.returncode == 2
    assert "model/train.py" in r.stderr and "jobs/export_testset.py" in r.stderr
    assert not (tmp_path / "report").exists()
