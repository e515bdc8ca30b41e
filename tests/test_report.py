"""The build report (jobs/report.py, pipeline/report/) against builds made by the real stages.

* `pairs_build`: a pairs-only build (4 photographs × 12 crops at 128², two sources, one of
  them a truncated file that becomes failed rows), made by jobs/degrade.py;
* `skewed_build`: the same photographs degraded by jobs/degrade.py with its sampler
  deliberately skewed (sinc_prob 0.6 and resize_prob [0.7, 0.2, 0.1] in stage 1) while the
  sidecars record the manifest's settings: the report must flag exactly those draws;
* `demo_chain` (tests/conftest.py): captions, embeddings, training and the held-out set.

Counts are recomputed here from the shards' recipe JSON with this file's own code, so a
bug in the report's reading of recipes shows up as a mismatch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from conftest import ROOT, job_env, ok_script, run_script, write_manifest
from pipeline.report.report import ReportOptions, make_report

CROPS = 12
SKEW = {"sinc_prob": 0.6, "resize_prob": (0.7, 0.2, 0.1)}


def _manifest(d: Path, photo_dir: Path) -> Path:
    broken = d / "broken"
    broken.mkdir()
    (broken / "torn.png").write_bytes((photo_dir / "chelsea.png").read_bytes()[:2000])
    return write_manifest(d / "m.json", [{"name": "sk", "root": str(photo_dir)}, {"name": "bad", "root": str(broken)}],
                          d / "build", crops_per_image=CROPS, rows_per_shard=16, max_failed_fraction=0.5)


@pytest.fixture(scope="module")
def pairs_build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report_pairs")
    m = _manifest(d, photo_dir)
    ok_script("jobs/degrade.py", "--manifest", str(m), "--serial", "--no-progress")
    page = make_report(d / "build", d / "report", ReportOptions(progress=False))
    return {"dir": d, "manifest": m, "build": d / "build", "report": d / "report", "page": page}


@pytest.fixture(scope="module")
def skewed_build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> dict[str, Path]:
    """jobs/degrade.py run with pipeline.degrade.ops.sample_recipe replaced by a sampler
    that draws stage 1 with other probabilities than the settings it is given."""
    d = tmp_path_factory.mktemp("report_skewed")
    m = _manifest(d, photo_dir)
    code = (
        "import dataclasses, runpy, sys\n"
        "import pipeline.degrade.ops as ops\n"
        "real = ops.sample_recipe\n"
        f"ops.sample_recipe = lambda rng, cfg, h, w: real(rng, dataclasses.replace(cfg, **{SKEW!r}), h, w)\n"
        f"sys.argv = ['jobs/degrade.py', '--manifest', {str(m)!r}, '--serial', '--no-progress']\n"
        "runpy.run_path('jobs/degrade.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    page = make_report(d / "build", d / "report", ReportOptions(progress=False))
    return {"dir": d, "manifest": m, "build": d / "build", "report": d / "report", "page": page}


def _stats(report: Path) -> dict[str, Any]:
    return json.loads((report / "stats.json").read_text())


def _param(stats: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in stats["pairs"]["params"] if p["name"] == name)


def _rows(build: Path, stage: str = "pairs") -> list[dict[str, Any]]:
    rows = []
    for arrow in sorted((build / stage).glob("shard-*.arrow")):
        with pa.memory_map(str(arrow)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _recipes(build: Path) -> list[dict[str, Any]]:
    return [json.loads(r["recipe"]) for r in _rows(build)]


# ------------------------------------------------------------ counts are true ---


def test_categorical_counts_equal_the_recipes(pairs_build: dict[str, Path]) -> None:
    stats, recipes = _stats(pairs_build["report"]), _recipes(pairs_build["build"])
    assert stats["pairs"]["rows"] == len(recipes) == 4 * CROPS
    direct = {
        "blur1.type": Counter(r["blur1"]["type"] for r in recipes),
        "blur1.size": Counter(str(r["blur1"]["size"]) for r in recipes),
        "blur2.applied": Counter("yes" if r["blur2"] else "no" for r in recipes),
        "blur2.type": Counter(r["blur2"]["type"] for r in recipes if r["blur2"]),
        "resize2.updown": Counter(r["resize2"]["updown"] for r in recipes),
        "resize1.mode": Counter(r["resize1"]["mode"] for r in recipes),
        "noise1.type": Counter(r["noise1"]["type"] for r in recipes),
        "noise2.gray": Counter("yes" if r["noise2"]["gray"] else "no" for r in recipes),
        "jpeg2": Counter(str(r["jpeg2"]) for r in recipes),
        "final.order": Counter(r["final"]["order"] for r in recipes),
        "final.sinc_size": Counter(str(r["final"]["sinc"]["size"]) for r in recipes if r["final"]["sinc"]),
        "hflip": Counter("yes" if r["hflip"] else "no" for r in recipes),
    }
    for name, counts in direct.items():
        p = _param(stats, name)
        stated = {c: n for c, n in zip(p["categories"], p["counts"]) if n}
        assert stated == dict(counts), name
        assert p["n"] == sum(counts.values()), name


def test_continuous_histograms_equal_the_recipes(pairs_build: dict[str, Path]) -> None:
    stats, recipes = _stats(pairs_build["report"]), _recipes(pairs_build["build"])
    aniso = [r["blur1"] for r in recipes if r["blur1"]["type"] in ("aniso", "generalized_aniso", "plateau_aniso")]
    direct = {
        "blur1.sigma_x": [r["blur1"]["sigma_x"] for r in recipes if r["blur1"]["type"] != "sinc"],
        "blur1.sigma_y": [k["sigma_y"] for k in aniso],
        "blur1.theta": [k["theta"] for k in aniso],
        "resize1.scale_down": [r["resize1"]["scale"] for r in recipes if r["resize1"]["updown"] == "down"],
        "resize2.scale_up": [r["resize2"]["scale"] for r in recipes if r["resize2"]["updown"] == "up"],
        "noise1.sigma": [r["noise1"]["sigma"] for r in recipes if r["noise1"]["type"] == "gaussian"],
        "noise2.poisson_scale": [r["noise2"]["scale"] for r in recipes if r["noise2"]["type"] == "poisson"],
        "final.sinc_omega_c": [r["final"]["sinc"]["omega_c"] for r in recipes if r["final"]["sinc"]],
    }
    for name, values in direct.items():
        h = _param(stats, name)["histogram"]
        counts, _ = np.histogram(values, bins=np.asarray(h["edges"]))
        assert h["counts"] == counts.tolist(), name
        assert h["below"] == h["above"] == 0 and sum(h["counts"]) == len(values) > 0, name


def test_page_states_the_same_counts(pairs_build: dict[str, Path]) -> None:
    page = pairs_build["page"].read_text()
    p = _param(_stats(pairs_build["report"]), "blur1.type")
    block = page[page.index('id="draw-blur1.type"'):]
    block = block[:block.index("</table>")]
    for cat, n in zip(p["categories"], p["counts"]):
        assert f'<td>{cat}</td><td class="n">{n}</td>' in block, cat


def test_lq_quality_equals_a_direct_measurement(pairs_build: dict[str, Path]) -> None:
    """PSNR of the bicubic-upsampled LQ against the HQ, recomputed with scikit-image."""
    from skimage.metrics import peak_signal_noise_ratio

    values, roundtrip = [], []
    for r in _rows(pairs_build["build"]):
        hq = cv2.imdecode(np.frombuffer(r["hq_png"], np.uint8), cv2.IMREAD_COLOR)
        lq = cv2.imdecode(np.frombuffer(r["lq_png"], np.uint8), cv2.IMREAD_COLOR)
        up = cv2.resize(lq, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        values.append(peak_signal_noise_ratio(hq, up, data_range=255))
        down = cv2.resize(hq, (hq.shape[1] // 4, hq.shape[0] // 4), interpolation=cv2.INTER_CUBIC)
        roundtrip.append(peak_signal_noise_ratio(hq, cv2.resize(down, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC),
                                                 data_range=255))
    q = _stats(pairs_build["report"])["pairs"]["psnr"]
    assert q["lq"]["moments"]["n"] == len(values)
    assert q["lq"]["moments"]["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    assert q["lq"]["moments"]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-6)
    assert q["roundtrip"]["moments"]["mean"] == pytest.approx(np.mean(roundtrip), rel=1e-6)
    counts, _ = np.histogram(values, bins=np.asarray(q["lq"]["histogram"]["edges"]))
    assert q["lq"]["histogram"]["counts"] == counts.tolist()
    page = pairs_build["page"].read_text()
    assert "BasicSR 1.4.2" in page and "make_paired_data" in page and "20.86" in page


def test_failed_rows_and_sources(pairs_build: dict[str, Path]) -> None:
    stats = _stats(pairs_build["report"])
    sidecar_failed = [f for p in sorted((pairs_build["build"] / "pairs").glob("*.arrow.json"))
                      for f in json.loads(p.read_text())["failed"]]
    assert len(sidecar_failed) == CROPS  # every crop of the torn file
    f = stats["pairs"]["failed"]
    assert f["total"] == CROPS and f["by_source"] == {"bad": CROPS}
    assert sum(f["by_reason"].values()) == CROPS and len(f["by_reason"]) == 1
    assert stats["pairs"]["sources"] == {"sk": 4 * CROPS}
    page = pairs_build["page"].read_text()
    assert "figures/failed.png" in page and f"{CROPS} of {5 * CROPS} planned" in page


def test_gallery_shows_stored_pairs_with_their_recipe(pairs_build: dict[str, Path]) -> None:
    stats = _stats(pairs_build["report"])
    by_key = {r["key"]: r for r in _rows(pairs_build["build"])}
    gallery = stats["pairs"]["gallery"]
    assert len(gallery) == 8
    import hashlib
    smallest = sorted(by_key, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:8]
    assert [g["key"] for g in gallery] == smallest
    for g in gallery:
        row = by_key[g["key"]]
        recipe = json.loads(row["recipe"])
        assert (pairs_build["report"] / g["lq"]).read_bytes() == row["lq_png"]
        assert (pairs_build["report"] / g["hq"]).read_bytes() == row["hq_png"]
        words = " | ".join(g["words"])
        assert f"JPEG q{recipe['jpeg1']}" in words and f"JPEG q{recipe['jpeg2']}" in words
        assert (recipe["blur2"] is None) == ("no second blur" in words)


def test_parallel_scan_gives_the_same_report(pairs_build: dict[str, Path], tmp_path: Path) -> None:
    make_report(pairs_build["build"], tmp_path / "r", ReportOptions(workers=2, progress=False))
    a, b = _stats(pairs_build["report"]), _stats(tmp_path / "r")
    a.pop("generated"), b.pop("generated")
    assert a == b


# ------------------------------------------------------------ fit can fail ---


def test_correct_sampler_is_not_flagged(pairs_build: dict[str, Path]) -> None:
    fit = _stats(pairs_build["report"])["pairs"]["fit"]
    assert fit["tested"] >= 30 and fit["flagged"] == []
    assert "tested draws follow the degrade settings" in pairs_build["page"].read_text()


def test_skewed_sampler_is_flagged(skewed_build: dict[str, Path]) -> None:
    recipes = _recipes(skewed_build["build"])
    # the patch took effect: the build really is skewed (and its sidecars say it is not)
    assert sum(r["blur1"]["type"] == "sinc" for r in recipes) / len(recipes) > 0.4
    side = json.loads(next((skewed_build["build"] / "pairs").glob("*.arrow.json")).read_text())
    assert side["config"]["degrade"]["sinc_prob"] == 0.1
    stats = _stats(skewed_build["report"])
    flagged = set(stats["pairs"]["fit"]["flagged"])
    assert {"blur1.type", "resize1.updown"} <= flagged
    assert not flagged & {"noise1.type", "jpeg1", "final.order", "blur2.type", "resize2.updown"}
    p = _param(stats, "blur1.type")
    assert p["fit"]["test"] == "chi2" and p["fit"]["p_value"] < 1e-6
    page = skewed_build["page"].read_text()
    assert "do NOT follow the degrade settings" in page and "blur1.type" in page
    assert cv2.imread(str(skewed_build["report"] / p["figure"])) is not None


def test_a_manifest_asking_for_other_settings_is_flagged(pairs_build: dict[str, Path], tmp_path: Path) -> None:
    """The same correct build held against a manifest whose degrade settings differ."""
    body = json.loads(pairs_build["manifest"].read_text())
    body["degrade"].update(gaussian_noise_prob=0.8, jpeg_range=[80, 95])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(body))
    make_report(pairs_build["build"], tmp_path / "r", ReportOptions(manifest=other, progress=False, psnr=False))
    stats = _stats(tmp_path / "r")
    assert stats["settings"]["source"] == str(other)
    assert {"noise1.type", "jpeg1"} <= set(stats["pairs"]["fit"]["flagged"])
    assert _param(stats, "jpeg1")["fit"]["impossible"] > 0  # qualities below 80 cannot be drawn
    assert "noise2.type" not in stats["pairs"]["fit"]["flagged"]


def test_continuous_draws_use_ks_and_point_masses_chi2(pairs_build: dict[str, Path]) -> None:
    stats = _stats(pairs_build["report"])
    assert _param(stats, "noise1.sigma")["fit"]["test"] == "ks"
    # plateau β over [1, 2]: half the draws are exactly 1 (BasicSR's "below 1" branch)
    beta = _param(stats, "blur1.beta_plateau")
    assert beta["fit"]["test"] == "chi2" and beta["point_masses"] == {"1.0": beta["point_masses"]["1.0"]}


# ------------------------------------------------------------ what a build has ---


def test_build_without_captions_or_training_reports_what_it_has(pairs_build: dict[str, Path]) -> None:
    stats = _stats(pairs_build["report"])
    assert stats["captions"] is None and stats["text_emb"] is None and stats["training"] is None
    assert set(stats["missing_stages"]) == {"captions", "text_emb", "latents"}
    page = pairs_build["page"].read_text()
    assert "no captions stage in this build" in page and "No training run in this build" in page
    assert [r["stage"] for r in stats["throughput"]] == ["pairs"]


def test_full_build_captions_embeddings_training(demo_chain: dict[str, Path], tmp_path: Path) -> None:
    make_report(demo_chain["build"], tmp_path / "r", ReportOptions(heldout=demo_chain["held"], progress=False))
    stats = _stats(tmp_path / "r")
    caps = _rows(demo_chain["build"], "captions")
    emb = _rows(demo_chain["build"], "text_emb")
    c = stats["captions"]
    assert c["rows"] == len(caps) == 24
    direct = Counter("length-cut" if r["status"] == "ok" and r.get("finish_reason") == "length" else r["status"]
                     for r in caps)
    assert {k: v for k, v in c["status"].items() if v} == dict(direct)
    assert c["status"]["override"] == 1
    assert c["clip_tokens"] == {str(k): v for k, v in sorted(Counter(r["num_tokens"] for r in emb).items())}
    assert c["truncated_rows"] == sum(r["truncated_tokens"] > 0 for r in emb) == 1
    long = next(r for r in emb if r["key"] == "sk/astronaut.png#0")
    assert c["chunks_needed"][str(math.ceil(long["num_tokens"] / 75))] == 1
    e = stats["text_emb"]
    assert e["chunks"] == {str(k): v for k, v in sorted(Counter(r["num_chunks"] for r in emb).items())}
    size = sum(p.stat().st_size for p in (demo_chain["build"] / "text_emb").glob("shard-*.arrow"))
    assert e["bytes_per_row"] == pytest.approx(size / len(emb))
    lat = stats["latents"]
    pairs_rows = len(_rows(demo_chain["build"]))
    lat_size = sum(p.stat().st_size for p in (demo_chain["build"] / "latents").glob("shard-*.arrow"))
    assert lat["rows"] == pairs_rows and lat["bytes_per_row"] == pytest.approx(lat_size / pairs_rows)
    side = json.loads(next((demo_chain["build"] / "latents").glob("shard-*.arrow.json")).read_text())
    assert lat["details"]["moments shape"] == side["moments"]["shape"]
    t = stats["training"]
    assert t["steps"] == 2 and set(t["losses"]) >= {"loss", "eps", "rgb", "fft"}
    assert stats["evaluation"]["datasets"][0]["rows"][0]["images"] == 2
    assert [g for g in stats["pairs"]["gallery"] if g.get("caption") is not None]


# ------------------------------------------------------------ refusals ---


def test_missing_build_is_refused_naming_the_command(tmp_path: Path) -> None:
    r = run_script("jobs/report.py", "--build", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "jobs/degrade.py" in r.stderr
    assert not (tmp_path / "r").exists()


def test_empty_build_is_refused_naming_the_command(tmp_path: Path, pairs_build: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script("jobs/report.py", "--build", str(empty))
    assert r.returncode == 2 and "no pairs shards" in r.stderr and "jobs/degrade.py" in r.stderr
    unfinished = tmp_path / "unfinished" / "pairs"
    unfinished.mkdir(parents=True)
    shutil.copyfile(next((pairs_build["build"] / "pairs").glob("shard-*.arrow")), unfinished / "shard-00000.arrow")
    r = run_script("jobs/report.py", "--build", str(unfinished.parent))
    assert r.returncode == 2 and "no complete pairs shards (1 unfinished)" in r.stderr


def test_out_folder_of_other_files_is_refused(tmp_path: Path, pairs_build: dict[str, Path]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    r = run_script("jobs/report.py", "--build", str(pairs_build["build"]), "--out", str(tmp_path))
    assert r.returncode == 2 and "holds no report" in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_help() -> None:
    r = run_script("jobs/report.py", "--help")
    assert r.returncode == 0 and "--build" in r.stdout and "--heldout" in r.stdout


# ------------------------------------------------------------ it renders ---


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_renders_in_headless_chromium(demo_chain: dict[str, Path], tmp_path: Path) -> None:
    """Debian's chromium, as .ci/run installs it; skipped only where it is not installed."""
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed: `apt-get install -y chromium` (.ci/run does this)")
    page = make_report(demo_chain["build"], tmp_path / "r", ReportOptions(heldout=demo_chain["held"], progress=False))
    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", f"--screenshot={shot}",
                        "--window-size=1280,2000", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (2000, 1280)
    not_white = (img < 235).any(axis=2).mean()
    colours = len(np.unique(img.reshape(-1, 3) // 8, axis=0))
    # text alone is a few % of grey pixels; the gallery photographs bring colour
    assert not_white > 0.05 and colours > 200, (not_white, colours)


# ------------------------------------------------------- the demo chain ---
# `make demo`'s commands, small (the session fixture `demo_chain`, tests/conftest.py):
# degrade → caption (tiny LLaVA) → embed → latents → train 2 steps → degrade and export a
# held-out set → restore with 2 DDPM steps and evaluate → jobs/report.py. Nothing is
# mocked; the models are the tiny random ones, so these check that the page is built from
# what the stages wrote and that every file it links exists, not that restoration is good.
# They live in this file so that the chain is built once under `make test`'s per-file
# xdist workers.


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
