"""RealLR200: a test set of real LQ images without references, end to end — the shipped
manifest through jobs/paired_testset.py, model/evaluate.py without --reference, and
jobs/paper_tables.py showing the row as Table II does (full-reference columns n/a)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from conftest import run_script
from pipeline.core.image_io import decode_png
from pipeline.core.manifest import ManifestError, load_manifest
from pipeline.testsets.paired import build_paired_testset, pair_files, paired_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$DATA_ROOT/RealLR200 with images of several sizes and kinds (colour PNG, grey, JPEG)."""
    root = tmp_path / "data"
    d = root / "RealLR200"
    d.mkdir(parents=True)
    assert cv2.imwrite(str(d / "001.png"), cv2.resize(skimage.data.astronaut(), (170, 151))[..., ::-1])
    assert cv2.imwrite(str(d / "002.png"), cv2.resize(skimage.data.camera(), (133, 140)))  # grey
    assert cv2.imwrite(str(d / "003.jpg"), cv2.resize(skimage.data.chelsea(), (128, 200))[..., ::-1])
    (d / "notes.txt").write_text("not an image")
    monkeypatch.setenv("DATA_ROOT", str(root))
    return root


def test_manifest_describes_a_set_without_references(data_root: Path) -> None:
    m = load_manifest(ROOT / "manifests/reallr200.json", check_sources=False)
    cfg = paired_config(m)
    assert cfg.hr_root is None and not cfg.references and not cfg.centre_crop and cfg.scale == 4
    assert m.output == data_root / "ssp-ir" / "reallr200"
    assert [(p.name, p.hr) for p in pair_files(cfg, m.path)] == [("001", None), ("002", None), ("003", None)]
    with pytest.raises(ManifestError, match="sources is empty"):  # jobs/degrade.py refuses it
        load_manifest(ROOT / "manifests/reallr200.json")


def test_whole_images_are_written_unchanged(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    (out / "hr").mkdir(parents=True)
    (out / "hr" / "stale.png").write_bytes(b"x")  # a folder from another build: must not survive
    r = run_script("jobs/paired_testset.py", "--manifest", str(ROOT / "manifests/reallr200.json"), "--out", str(out),
                   "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "3 LQ images (no references)" in r.stdout
    listing = json.loads((out / "testset.json").read_text())
    assert listing["kind"] == "lq_only" and listing["hr_dir"] is None and listing["count"] == 3
    assert listing["lq_size"] is None and listing["removed_stale"] == 1 and not (out / "hr" / "stale.png").exists()
    src = data_root / "RealLR200"
    for name, item in zip(("001", "002", "003"), listing["items"]):
        png = decode_png((out / "lq" / f"{name}.png").read_bytes())
        want = cv2.imread(str(next(src.glob(f"{name}.*"))), cv2.IMREAD_COLOR)[..., ::-1]
        assert png.shape == want.shape and item["lq_box"] == [0, 0, want.shape[1], want.shape[0]]
        if name != "003":  # lossless sources: the very pixels (JPEG decoders may differ by a level)
            assert np.array_equal(png, want)
        else:
            assert np.abs(png.astype(int) - want.astype(int)).max() <= 2


def test_lq_only_sections_are_checked(data_root: Path, tmp_path: Path) -> None:
    body = json.loads((ROOT / "manifests/reallr200.json").read_text())
    for change, words in ((dict(hr_glob="*.png"), "but no \"hr_root\""),
                          (dict(hr_root=str(data_root / "RealLR200")), "centre_crop false keeps LQ images whole"),
                          (dict(centre_crop="no"), "paired.centre_crop should be bool")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**body, "paired": {**body["paired"], **change}}))
        with pytest.raises(ManifestError, match=words):
            paired_config(load_manifest(bad, check_sources=False))
    cropped = tmp_path / "crop.json"
    cropped.write_text(json.dumps({**body, "paired": {**body["paired"], "centre_crop": True, "lq_size": 136}}))
    listing = build_paired_testset(load_manifest(cropped, out=tmp_path / "c", check_sources=False))
    assert [i["name"] for i in listing["items"]] == ["001"]  # 133 wide and 128 wide are smaller than 136
    assert listing["items"][0]["lq_box"] == [17, 7, 136, 136]
    assert sorted(f["pair"] for f in listing["failed"]) == ["002", "003"]
    lq = decode_png((tmp_path / "c" / "lq" / "001.png").read_bytes())
    whole = cv2.resize(skimage.data.astronaut(), (170, 151))
    assert np.array_equal(lq, whole[7:143, 17:153])


def test_no_reference_scores_reach_table_ii(data_root: Path, tmp_path: Path) -> None:
    """Evaluate the (stand-in) restored folder without references, then render the paper's
    tables: the RealLR200 row has n/a in every full-reference column, as Table II does."""
    out = tmp_path / "set"
    assert run_script("jobs/paired_testset.py", "--manifest", str(ROOT / "manifests/reallr200.json"), "--out",
                      str(out), "--no-progress").returncode == 0
    results = tmp_path / "results"
    r = run_script("model/evaluate.py", "--restored", str(out / "lq"), "--name", "SSP-IR", "--dataset", "RealLR200",
                   "--out", str(results / "results.json"), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    row = json.loads((results / "results.json").read_text())["datasets"]["RealLR200"]["rows"][0]
    assert row["not_applicable"] == ["psnr", "ssim", "lpips", "dists", "clip_i", "fid"]
    assert set(row["not_computed"]) | set(row["scores"]) == {"niqe", "maniqa", "musiq", "clipiqa"}
    t = run_script("jobs/paper_tables.py", "--results", str(results))
    assert t.returncode == 0, t.stderr
    block = t.stdout.split("### RealLR200")[1].split("##")[0]
    ours = next(ln for ln in block.splitlines() if ln.startswith("| SSP-IR | ours |"))
    cells = [c.strip() for c in ours.strip("|").split("|")][2:]
    assert [cells[i] for i in (0, 1, 2, 3, 4, 9)] == ["n/a"] * 6
    assert all(c != "n/a" for c in cells[5:9])
