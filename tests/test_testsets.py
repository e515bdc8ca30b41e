"""Test-set manifests and jobs: DIV2K-Val / LSDIR-Val (degraded builds exported as PNG
folders) and RealSR / DRealSR (real pairs, centre-cropped).

The library (pipeline/testsets/paired.py, pipeline/testsets/export.py) is called in-process;
the thin CLIs (jobs/paired_testset.py, jobs/export_testset.py) are run as a user runs them,
for their exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from pipeline.degrade.stage import run_degrade
from pipeline.core.image_io import decode_png
from pipeline.core.manifest import ManifestError, load_manifest
from pipeline.testsets.paired import build_paired_testset, pair_files, paired_config
from pipeline.core.plan import plan_rows
from pipeline.core.shards import read_table, sidecar_path
from pipeline.testsets.export import pair_name
from conftest import write_manifest

ROOT = Path(__file__).resolve().parents[1]

PHOTOS = (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)
LQ_W, LQ_H = 170, 151  # odd margins around 128: the LQ box starts at (21, 11)


def _save(path: Path, rgb: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return rgb


def _cli(job: str, *args: str) -> subprocess.CompletedProcess:
    """jobs/<job>.py as a user runs it (DATA_ROOT and the rest of the environment inherited)."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args], capture_output=True, text=True,
                          timeout=600)


def _photo(i: int, w: int, h: int) -> np.ndarray:
    return cv2.resize(PHOTOS[i % len(PHOTOS)](), (w, h), interpolation=cv2.INTER_AREA)


def _real_pair(lq_path: Path, hr_path: Path, i: int, scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A real photo as HR and its area-downscaled LQ, both saved losslessly."""
    hr = _save(hr_path, _photo(i, LQ_W * scale, LQ_H * scale))
    lq = _save(lq_path, cv2.resize(hr, (LQ_W, LQ_H), interpolation=cv2.INTER_AREA))
    return lq, hr


@pytest.fixture()
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DATA_ROOT laid out as docs/evaluation.md says, with a few images in each set."""
    root = tmp_path / "data"
    for i in range(3):
        _save(root / f"DIV2K/DIV2K_valid_HR/{801 + i:04d}.png", _photo(i, 96, 80))
    for i in range(2):
        _save(root / f"LSDIR/val1/HR/val/{i + 1:07d}.png", _photo(i, 80, 96))
    for i, cam in enumerate(("Canon", "Nikon")):
        d = root / f"RealSR(V3)/{cam}/Test/4"
        _real_pair(d / f"{cam}_001_LR4.png", d / f"{cam}_001_HR.png", i)
    for i in range(2):
        d = root / "DRealSR/x4/Test_x4"
        _real_pair(d / f"test_LR/DSC_{i + 2:04d}_x4.png", d / f"test_HR/DSC_{i + 2:04d}_x1.png", i + 2)
    monkeypatch.setenv("DATA_ROOT", str(root))
    return root


def test_degraded_manifests_plan_their_crops(data_root: Path) -> None:
    for name, images, crops in (("div2k_val", 3, 20), ("lsdir_val", 2, 8)):
        m = load_manifest(ROOT / f"manifests/{name}.json")
        assert m.output == data_root / "ssp-ir" / name
        assert (m.degrade.gt_size, m.degrade.scale, m.degrade.lq_size) == (512, 4, 128)
        assert m.degrade.crops_per_image == crops and m.degrade.max_failed_fraction == 0.0
        assert not m.degrade.usm_gt  # the stored HR is the evaluation reference: unsharpened
        rows = plan_rows(m)
        assert len(rows) == images * crops
        assert len({r.key for r in rows}) == len(rows)
    # the paper's sizes: 100 DIV2K images × 20 and 250 LSDIR images × 8 are 2,000 crops each
    assert 100 * load_manifest(ROOT / "manifests/div2k_val.json").degrade.crops_per_image == 2000
    assert 250 * load_manifest(ROOT / "manifests/lsdir_val.json").degrade.crops_per_image == 2000
    seeds = {load_manifest(ROOT / f"manifests/{n}.json").seed for n in ("div2k_val", "lsdir_val")}
    assert len(seeds) == 2


def test_paired_manifests_load_and_pair(data_root: Path) -> None:
    for name, names in (("realsr_val", ["Canon_001", "Nikon_001"]), ("drealsr_val", ["DSC_0002", "DSC_0003"])):
        m = load_manifest(ROOT / f"manifests/{name}.json", check_sources=False)
        cfg = paired_config(m)
        assert (cfg.scale, cfg.lq_size, cfg.hr_size) == (4, 128, 512)
        assert [p.name for p in pair_files(cfg, m.path)] == names
        with pytest.raises(ManifestError, match="sources is empty"):  # jobs/degrade.py refuses it
            load_manifest(ROOT / f"manifests/{name}.json")


def _read(path: Path) -> np.ndarray:
    return decode_png(path.read_bytes())


def test_paired_testset_centre_crops_exactly(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "realsr"
    returned = build_paired_testset(load_manifest(ROOT / "manifests/realsr_val.json", out=out, check_sources=False))
    listing = json.loads((out / "testset.json").read_text())
    assert listing == returned
    assert listing["count"] == 2 and listing["kind"] == "paired" and not listing["failed"]
    for cam in ("Canon", "Nikon"):
        d = data_root / f"RealSR(V3)/{cam}/Test/4"
        lq = cv2.imread(str(d / f"{cam}_001_LR4.png"))[..., ::-1]
        hr = cv2.imread(str(d / f"{cam}_001_HR.png"))[..., ::-1]
        top, left = (LQ_H - 128) // 2, (LQ_W - 128) // 2
        assert (top, left) == (11, 21)
        assert np.array_equal(_read(out / "lq" / f"{cam}_001.png"), lq[11:139, 21:149])
        assert np.array_equal(_read(out / "hr" / f"{cam}_001.png"), hr[44:556, 84:596])
    item = next(i for i in listing["items"] if i["name"] == "Canon_001")
    assert item["lq_box"] == [21, 11, 128, 128] and item["hr_box"] == [84, 44, 512, 512]


def test_paired_testset_reports_bad_pairs(data_root: Path, tmp_path: Path) -> None:
    manifest = ROOT / "manifests/drealsr_val.json"
    out = tmp_path / "drealsr"
    args = ("--manifest", str(manifest), "--out", str(out), "--no-progress")
    assert _cli("paired_testset", *args).returncode == 0
    (out / "lq" / "stale.png").write_bytes((out / "lq" / "DSC_0002.png").read_bytes())
    # an LQ stored at the HR's size is not a x4 pair: that pair fails, the other is written
    d = data_root / "DRealSR/x4/Test_x4"
    _save(d / "test_LR/DSC_0003_x4.png", cv2.imread(str(d / "test_HR/DSC_0003_x1.png"))[..., ::-1])
    r = _cli("paired_testset", *args)
    assert r.returncode == 1
    listing = json.loads((out / "testset.json").read_text())
    assert [i["name"] for i in listing["items"]] == ["DSC_0002"]
    assert "not 4x larger" in listing["failed"][0]["reason"] and "DSC_0003" in r.stdout
    assert sorted(p.name for p in (out / "lq").iterdir()) == ["DSC_0002.png"]  # stale and failed ones gone
    # an HR without its LQ: the folders do not pair, nothing is cropped
    _save(d / "test_HR/DSC_0009_x1.png", _photo(0, 64, 64))
    r = _cli("paired_testset", *args)
    assert r.returncode == 2
    assert "1 HR without LQ: DSC_0009" in r.stderr


def test_paired_section_is_checked(data_root: Path, tmp_path: Path) -> None:
    body = json.loads((ROOT / "manifests/realsr_val.json").read_text())
    body["paired"]["lq_sise"] = 128
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="unknown key paired.lq_sise"):
        paired_config(load_manifest(bad, check_sources=False))
    with pytest.raises(ManifestError, match="jobs/export_testset.py"):
        paired_config(load_manifest(ROOT / "manifests/div2k_val.json", check_sources=False))
    r = _cli("paired_testset", "--manifest", str(bad), "--no-progress")
    assert r.returncode == 2 and "error: " in r.stderr and "unknown key paired.lq_sise" in r.stderr


def test_export_testset_writes_the_shards_pngs(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "build"
    manifest = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], out)
    r = _cli("export_testset", "--manifest", str(manifest))
    assert r.returncode == 2 and "jobs/degrade.py" in r.stderr  # nothing built yet
    result = run_degrade(load_manifest(manifest), distributor="serial", show_progress=False)
    assert result.exit_code == 0
    r = _cli("export_testset", "--manifest", str(manifest))
    assert r.returncode == 0 and "test: 8 pairs" in r.stdout
    listing = json.loads((out / "testset.json").read_text())
    assert listing["kind"] == "degraded" and listing["count"] == 8
    assert (listing["lq_size"], listing["hr_size"]) == (32, 128)
    seen = set()
    for arrow in sorted((out / "pairs").glob("shard-*.arrow")):
        table = read_table(arrow).to_pydict()
        for key, lq, hq in zip(table["key"], table["lq_png"], table["hq_png"]):
            name = pair_name(key, several_sources=False)
            assert (out / "lq" / f"{name}.png").read_bytes() == lq
            assert (out / "hr" / f"{name}.png").read_bytes() == hq
            seen.add(name)
    assert seen == {f"{stem}_{c:02d}" for stem in ("astronaut", "camera", "chelsea", "rocket") for c in (0, 1)}
    assert sorted(p.stem for p in (out / "lq").glob("*.png")) == sorted(seen)
    # a build that no longer matches its shards is refused, naming the shard
    sidecar_path(out / "pairs" / "shard-00001.arrow").unlink()
    r = _cli("export_testset", "--manifest", str(manifest))
    assert r.returncode == 2 and "shard-00001.arrow" in r.stderr


def test_pair_names_are_flat_and_unique() -> None:
    assert pair_name("DIV2K_val/0801.png#7", False) == "0801_07"
    assert pair_name("LSDIR/0001000/0000001.png#12", True) == "LSDIR_0001000_0000001_12"
