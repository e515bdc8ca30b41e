"""The demo's chain, small: every command `make demo` runs, ending with jobs/demo_heldout.py
(restore and score the held-out photos) and jobs/report.py (the page).

The chain itself is the session fixture `demo_chain` (tests/conftest.py): degrade →
caption (tiny LLaVA, transformers engine) → embed → train 2 steps → degrade and export a
held-out set → restore with 2 DDPM steps and evaluate. Nothing is mocked; the models are
the tiny random ones, so these tests check that the page is built from what the stages
wrote and that every file it links exists, not that restoration is good.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ok_script, run_script


@pytest.fixture(scope="module")
def demo(demo_chain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    report = tmp_path_factory.mktemp("demo_report") / "report"
    ok_script("jobs/report.py", "--build", str(demo_chain["build"]), "--heldout", str(demo_chain["held"]),
              "--out", str(report), "--no-progress", "--workers", "1")
    return {**demo_chain, "report": report}


def test_every_linked_file_exists_and_decodes(demo: dict[str, Path]) -> None:
    page = (demo["report"] / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"#][^"]*)"', page) + re.findall(r"href='([^'#][^']*)'", page)
    images = [ln for ln in links if ln.endswith(".png")]
    assert {"figures/training.png", "figures/validation.png", "figures/heldout.png", "figures/lq_psnr.png",
            "figures/caption_tokens.png", "gallery/00-lq.png", "gallery/00-hq.png"} <= set(images)
    assert "stats.json" in links
    for link in links:
        target = demo["report"] / link
        assert target.is_file() and target.stat().st_size > 0, f"index.html links {link}, which is missing"
        assert not Path(link).is_absolute() and ".." not in Path(link).parts, f"{link} points outside the report"
    for link in images:
        assert cv2.imread(str(demo["report"] / link)) is not None, f"{link} does not decode"
    json.loads((demo["report"] / "stats.json").read_text())


def test_heldout_grid_is_lq_restored_hq(demo: dict[str, Path]) -> None:
    grid = cv2.imread(str(demo["report"] / "figures" / "heldout.png"))
    hr = cv2.imread(str(demo["held"] / "hr" / "chelsea_00.png"))
    h, w = hr.shape[:2]
    assert grid.shape == (2 * h, 3 * w, 3)
    # Rows are sorted by name: chelsea first. Right column the HQ, the middle the restored file.
    assert (grid[:h, 2 * w:] == hr).all()
    restored = cv2.imread(str(demo["held"] / "restored" / "chelsea_00.png"))
    assert (grid[:h, w:2 * w] == restored).all()
    lq = cv2.resize(cv2.imread(str(demo["held"] / "lq" / "chelsea_00.png")), (w, h), interpolation=cv2.INTER_CUBIC)
    assert (grid[:h, :w] == lq).all()


def _psnr_y(a_bgr: np.ndarray, b_bgr: np.ndarray) -> float:
    """PSNR on BT.601 Y, computed with scikit-image (independent of model/evaluate.py)."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio

    ya, yb = (rgb2ycbcr(x[..., ::-1])[..., 0] for x in (a_bgr, b_bgr))
    return float(peak_signal_noise_ratio(yb, ya, data_range=255))


def test_page_carries_what_the_stages_wrote(demo: dict[str, Path]) -> None:
    page = (demo["report"] / "index.html").read_text()
    assert "Random weights restore nothing" in page and "tiny and random" in page
    table = json.loads((demo["held"] / "results.json").read_text())
    row = table["datasets"]["demo held-out"]["rows"][0]
    assert row["images"] == 2
    direct = [_psnr_y(cv2.imread(str(demo["held"] / "restored" / f"{n}.png")),
                      cv2.imread(str(demo["held"] / "hr" / f"{n}.png"))) for n in ("chelsea_00", "rocket_00")]
    assert row["scores"]["psnr"] == pytest.approx(sum(direct) / 2, rel=1e-5)
    # The metric table is an HTML table whose cell is the results file's value.
    assert re.search(rf'<td>SSP-IR \(tiny, demo\)</td><td class="n">2</td><td class="n">{row["scores"]["psnr"]:,.4f}</td>',
                     page), "the PSNR cell of the evaluation table"
    assert "<pre>" not in page
    for stage in ("pairs", "captions", "text_emb", "train", "restore", "evaluate"):
        assert re.search(rf'<tr><td>{stage}</td><td class="n">[\d,]+</td>', page), f"no throughput row for {stage}"
    # The captions shown for the held-out images are the ones written into the restored PNGs.
    from PIL import Image
    with Image.open(demo["held"] / "restored" / "rocket_00.png") as im:
        prompt = im.text["prompt"]
    assert f"<td>rocket_00</td><td>{prompt}</td>" in page.replace("&#x27;", "'").replace("&quot;", '"')
    steps = [json.loads(ln)["step"] for ln in (demo["build"] / "train" / "metrics.jsonl").read_text().splitlines()]
    stats = json.loads((demo["report"] / "stats.json").read_text())
    assert stats["training"]["steps"] == max(steps) == 2
    assert stats["training"]["validation_step"] == 2


def test_demo_heldout_refuses_a_missing_build_naming_the_step(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    r = run_script("jobs/demo_heldout.py", "--build", str(tmp_path / "nothing"), "--heldout", str(tmp_path / "held"),
                   "--caption-model", str(tiny_models["llava"]))
    assert r.returncode == 2
    assert "model/train.py" in r.stderr and "jobs/export_testset.py" in r.stderr
    assert not (tmp_path / "held").exists()
