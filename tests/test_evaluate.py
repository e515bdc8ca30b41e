"""model/evaluate.py and model/evaluation/: Y-channel PSNR/SSIM against scikit-image,
pairing, tables, evaluation without references, and learned metrics whose weights are not
in place — reported with the path and source of every file, and nothing downloaded.

Nothing in the process is patched: "no download" is shown by running the real command
with every cache folder the libraries read (TORCH_HOME, HF_HUB_CACHE, HF_HOME) pointed at
empty folders, and an HTTPS proxy that refuses connections, then checking the answer names
files under those folders and the folders are still empty."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model import evaluate as cli
from model.evaluation import folders as fo
from model.evaluation import metrics as me
from model.evaluation import tables as tb
from model.evaluation.iqa import build_clip_i
from model.evaluation.runner import evaluate
from model.evaluation.weights import PYIQA_FILES, Caches, WeightFile, hf_cached_file, hf_repo

ROOT = Path(__file__).resolve().parents[1]


def _y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma on [0, 255], written from the formula, not from the module under test."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _pairs(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    photo = skimage.data.astronaut()[40:200, 60:260]  # 160 x 200, not square
    noisy = np.clip(photo.astype(np.int16) + rng.integers(-25, 26, photo.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(skimage.data.chelsea()[:96, :128], (5, 5), 1.2)
    return [
        (noisy, photo),
        (blurred, skimage.data.chelsea()[:96, :128]),
        (rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)),
    ]


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_ssim_match_scikit_image_on_y(crop: int) -> None:
    for restored, reference in _pairs():
        ya, yb = _y(restored), _y(reference)
        if crop:
            ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
        want_psnr = peak_signal_noise_ratio(yb, ya, data_range=255)
        want_ssim = structural_similarity(yb, ya, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=255)
        assert me.psnr_y(restored, reference, crop) == pytest.approx(want_psnr, abs=1e-4)
        assert me.ssim_y(restored, reference, crop) == pytest.approx(want_ssim, abs=1e-5)


def test_identical_images_give_inf_and_one() -> None:
    img = skimage.data.coffee()[:64, :96]
    assert me.psnr_y(img, img.copy()) == math.inf
    assert me.ssim_y(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_y_channel_is_bt601() -> None:
    img = skimage.data.astronaut()[:32, :32]
    assert np.allclose(me.rgb_to_y(img), _y(img), atol=1e-4)
    assert me.rgb_to_y(np.zeros((2, 2, 3), np.uint8)).max() == pytest.approx(16.0, abs=1e-4)
    assert me.rgb_to_y(np.full((2, 2, 3), 255, np.uint8)).min() == pytest.approx(235.0, abs=1e-4)


def test_size_mismatch_and_tiny_images_are_errors() -> None:
    a, b = skimage.data.astronaut()[:64, :64], skimage.data.astronaut()[:64, :60]
    with pytest.raises(ValueError, match="64x64 but the reference is 60x64"):
        me.psnr_y(a, b)
    with pytest.raises(ValueError, match="at least 11x11"):
        me.ssim_y(a[:10, :10], a[:10, :10])


# ------------------------------------------------------------------------------ folders


def _write(folder: Path, name: str, rgb: np.ndarray) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three references (one in a subfolder) and their noisy restorations (one saved as .bmp)."""
    res, ref = tmp_path / "restored", tmp_path / "set" / "hr"
    rng = np.random.default_rng(3)
    photos = {"a": skimage.data.astronaut(), "b": skimage.data.chelsea(), "sub/c": skimage.data.coffee()}
    for name, photo in photos.items():
        img = cv2.resize(photo, (72, 64), interpolation=cv2.INTER_AREA)
        _write(ref, f"{name}.png", img)
        noisy = np.clip(img.astype(np.int16) + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
        _write(res, f"{name}.{'bmp' if name == 'b' else 'png'}", noisy)
    return res, ref


@pytest.fixture()
def empty_caches(tmp_path: Path) -> Caches:
    """Cache folders with nothing in them (torch hub, pyiqa's, Hugging Face's)."""
    hub = tmp_path / "empty-torch" / "hub"
    return Caches(hub, hub / "pyiqa", tmp_path / "empty-hf")


def test_folders_pair_by_relative_stem(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    pairs = fo.pair_folders(res, ref)
    assert [p.name for p in pairs] == ["a", "b", "sub/c"]
    assert pairs[1].restored.suffix == ".bmp" and pairs[1].reference.suffix == ".png"
    alone = fo.pair_folders(res, None)
    assert [(p.name, p.reference) for p in alone] == [("a", None), ("b", None), ("sub/c", None)]


def test_pairing_errors_list_examples(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, ref = folders
    (res / "a.png").unlink()
    _write(res, "extra.png", np.zeros((64, 72, 3), np.uint8))
    with pytest.raises(fo.PairingError) as e:
        fo.pair_folders(res, ref)
    text = str(e.value)
    assert "1 reference images have no restored image" in text and "a" in text
    assert "1 restored images have no reference" in text and "extra" in text
    _write(res, "a.png", np.zeros((64, 72, 3), np.uint8))
    _write(res, "a.jpg", np.zeros((64, 72, 3), np.uint8))
    with pytest.raises(fo.PairingError, match="same name without suffix"):
        fo.list_images(res)
    with pytest.raises(fo.PairingError, match="not a folder"):
        fo.list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fo.PairingError, match="holds no images"):
        fo.list_images(tmp_path / "empty")


def test_evaluate_means_per_image_values(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    result = evaluate(res, ref, ["ssim", "psnr"], method="noisy")
    assert list(result.scores) == ["psnr", "ssim"]  # the paper's column order, whatever was asked
    assert result.dataset == "set" and result.images == 3 and not result.not_computed
    assert result.not_applicable == [] and "not_applicable" not in result.row()
    want = np.mean([me.psnr_y(cv2.imread(str(p.restored))[..., ::-1].copy(),
                              cv2.imread(str(p.reference))[..., ::-1].copy())
                    for p in fo.pair_folders(res, ref)])
    assert result.scores["psnr"] == pytest.approx(want, abs=1e-9)
    assert result.per_image["sub/c"]["ssim"] < 1.0


def test_size_mismatch_is_listed_before_any_metric(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    _write(res, "b.bmp", np.zeros((60, 72, 3), np.uint8))
    with pytest.raises(fo.EvaluationError, match=r"b \(72x60 vs 72x64\)"):
        evaluate(res, ref, ["psnr"])
    assert cli.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr", "--no-progress"]) == 1


def test_cli_pairing_error_exits_2(folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    res, ref = folders
    (ref / "a.png").unlink()
    assert cli.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr", "--no-progress"]) == 2
    assert "have no reference" in capsys.readouterr().err
    assert cli.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr,sharpness"]) == 2
    assert "unknown metrics ['sharpness']" in capsys.readouterr().err


# ------------------------------------------------------------------- weights not in place


def test_nothing_is_downloaded_with_empty_caches(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """The real command in a fresh process whose library caches are empty folders: every
    learned metric is reported not computed, naming each file under those folders with its
    source; PSNR/SSIM are computed; the folders stay empty; the run exits 0."""
    res, ref = folders
    torch_home, hf_home = tmp_path / "torch-home", tmp_path / "hf-home"
    torch_home.mkdir()
    hf_home.mkdir()
    env = dict(os.environ, TORCH_HOME=str(torch_home), HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # a download could not even start
    env.pop("XDG_CACHE_HOME", None)
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(ROOT / "model" / "evaluate.py"), "--restored", str(res),
                           "--reference", str(ref), "--out", str(out), "--name", "noisy", "--no-progress",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["datasets"]["set"]["rows"][0]
    assert set(row["scores"]) == {"psnr", "ssim"}
    assert set(row["not_computed"]) == {"lpips", "dists", "clip_i", "niqe", "maniqa", "musiq", "clipiqa", "fid"}
    hub = torch_home / "hub"
    expect = {
        "lpips": [hub / "checkpoints" / "alexnet-owt-7be5be79.pth", hub / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth"],
        "dists": [hub / "checkpoints" / "vgg16-397923af.pth", hub / "pyiqa" / "DISTS_weights-f5e65c96.pth"],
        "niqe": [hub / "pyiqa" / "niqe_modelparameters.mat"],
        "maniqa": [hf_home / "hub" / "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k",
                   hub / "pyiqa" / "ckpt_koniq10k.pt"],
        "musiq": [hub / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"],
        "clipiqa": [hub / "clip" / "RN50.pt"],
        "fid": [hub / "pyiqa" / "pt_inception-2015-12-05-6726825d.pth"],
        "clip_i": [hf_home / "hub" / "models--timm--vit_large_patch14_clip_224.openai"],
    }
    for key, paths in expect.items():
        reason = row["not_computed"][key]
        assert "weight files not in place (nothing was downloaded)" in reason, (key, reason)
        for p in paths:
            assert f"    {p}   <- https://" in reason, (key, p, reason)
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in row["not_computed"]["lpips"]
    assert "huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/ckpt_koniq10k.pt" in row["not_computed"]["maniqa"]
    assert "LPIPS not computed: " in proc.stderr
    assert [p for p in torch_home.rglob("*") if p.is_file()] == []
    assert [p for p in hf_home.rglob("*") if p.is_file()] == []


def test_damaged_weight_file_is_named_not_loaded(folders: tuple[Path, Path], empty_caches: Caches) -> None:
    """A truncated torchvision checkpoint: its published sha256 prefix does not match, so it
    is reported (not handed to torch.load) and the other file of the metric is listed too."""
    bad = empty_caches.torch_hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the whole file")
    res, ref = folders
    result = evaluate(res, ref, ["psnr", "lpips"], caches=empty_caches, device="cpu")
    reason = result.not_computed["lpips"]
    assert f"{bad}   <- https://download.pytorch.org/models/alexnet-owt-7be5be79.pth   [its sha256 does not " \
           f"start with 7be5be79" in reason
    assert f"{empty_caches.pyiqa / 'LPIPS_v0.1_alex-df73285e.pth'}   <- " in reason
    assert bad.read_bytes() == b"not the whole file" and "psnr" in result.scores


def test_unlisted_pyiqa_variant_needs_download(folders: tuple[Path, Path], empty_caches: Caches) -> None:
    res, ref = folders
    result = evaluate(res, ref, ["musiq"], pyiqa_names={"musiq": "musiq-imagenet"}, caches=empty_caches,
                      device="cpu")
    assert "not listed in model/evaluation/weights.py" in result.not_computed["musiq"]
    assert "--download" in result.not_computed["musiq"]
    listed = evaluate(res, ref, ["musiq"], pyiqa_names={"musiq": "musiq-ava"}, caches=empty_caches, device="cpu")
    assert "musiq_ava_ckpt-e8d3f067.pth" in listed.not_computed["musiq"]


def test_hub_files_are_found_where_huggingface_hub_caches_them(tmp_path: Path) -> None:
    """A snapshot laid out as huggingface_hub writes it is found by huggingface_hub's own
    offline lookup; the same repo in another cache folder is not."""
    repo = "timm/vit_large_patch14_clip_224.openai"
    cache = tmp_path / "hf"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    assert hf_cached_file(repo, "model.safetensors", cache) == snap / "model.safetensors"
    assert hf_cached_file(repo, "model.safetensors", tmp_path / "elsewhere") is None
    found = Caches(tmp_path / "hub", tmp_path / "hub" / "pyiqa", cache)
    assert hf_repo(repo).problem(found) is None
    assert hf_repo(repo).path(found) == snap / "model.safetensors"
    assert hf_repo(repo).problem(Caches(tmp_path, tmp_path, tmp_path / "elsewhere")) == "missing"


def test_every_listed_file_has_a_source() -> None:
    for name, files in PYIQA_FILES.items():
        assert files, name
        for f in files:
            assert isinstance(f, WeightFile) and f.url.startswith("https://") and f.url.endswith(f.filename or f.name)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("pyiqa"), reason="runs where pyiqa is installed "
                    "(make iqa); test_nothing_is_downloaded_with_empty_caches covers the same path without it")
def test_real_pyiqa_without_weights(folders: tuple[Path, Path], empty_caches: Caches) -> None:
    res, ref = folders
    result = evaluate(res, ref, ["lpips", "niqe"], caches=empty_caches, device="cpu")
    assert result.not_computed["lpips"].startswith("weight files not in place")
    assert str(empty_caches.pyiqa / "niqe_modelparameters.mat") in result.not_computed["niqe"]


def test_clip_i_with_a_local_timm_tower(folders: tuple[Path, Path], tmp_path: Path, empty_caches: Caches) -> None:
    """CLIP-I runs through the same loader real weights use: here the tiny test tower."""
    from demo_fixtures.tiny_sd import build_image_encoder

    tower = tmp_path / "tower"
    build_image_encoder(tower)
    res, ref = folders
    same = evaluate(ref, ref, ["clip_i"], clip_model=str(tower), device="cpu", caches=empty_caches)
    assert same.scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    inverted = tmp_path / "inverted"
    for p in fo.pair_folders(res, ref):
        _write(inverted, p.reference.relative_to(ref).as_posix(), 255 - cv2.imread(str(p.reference))[..., ::-1])
    other = evaluate(inverted, ref, ["clip_i"], clip_model=str(tower), device="cpu", caches=empty_caches)
    assert -1.0 <= other.scores["clip_i"] < same.scores["clip_i"] - 1e-6  # a random tiny tower: barely lower
    bad = evaluate(res, ref, ["clip_i"], clip_model=str(tmp_path / "no-such-tower"), device="cpu",
                   caches=empty_caches)
    assert "clip_i" in bad.not_computed and "not a folder" in bad.not_computed["clip_i"]
    with pytest.raises(Exception) as e:
        build_clip_i("vit_large_patch14_clip_224.openai", "cpu", empty_caches)
    assert "models--timm--vit_large_patch14_clip_224.openai" in str(e.value)


# ------------------------------------------------------------------ without references


def test_no_reference_evaluation(folders: tuple[Path, Path], empty_caches: Caches, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A folder without references (RealLR200): full-reference metrics are not applicable —
    listed as such, not as failed — and the no-reference ones are attempted on the restored
    images (here they lack weights, so they are not computed, with the reason)."""
    res, _ = folders
    result = evaluate(res, None, method="SSP-IR", dataset="RealLR200", caches=empty_caches, device="cpu")
    assert result.not_applicable == ["psnr", "ssim", "lpips", "dists", "clip_i", "fid"]
    assert set(result.not_computed) == {"niqe", "maniqa", "musiq", "clipiqa"}
    assert result.scores == {} and result.images == 3
    row = json.loads(json.dumps(result.row()))
    assert row["not_applicable"] == result.not_applicable and row["settings"]["reference"] is None
    md = tb.render_dataset("RealLR200", [row])
    assert "| SSP-IR | n/a | n/a | n/a | n/a | n/a | - | - | - | - | n/a |" in md
    assert "n/a: not applicable" in md and "SSP-IR, NIQE, MANIQA, MUSIQ, CLIPIQA:" in md
    with pytest.raises(ValueError, match="only the no-reference metrics apply"):
        evaluate(res, None, ["psnr", "lpips"], caches=empty_caches)
    out = tmp_path / "r.json"
    assert cli.main(["--restored", str(res), "--metrics", "psnr,ssim", "--no-progress"]) == 2
    assert "only the no-reference metrics apply" in capsys.readouterr().err
    rc = cli.main(["--restored", str(res), "--metrics", "psnr,niqe", "--dataset", "RealLR200", "--out", str(out),
                   "--no-progress", "--device", "cpu"])
    assert rc == 0
    saved = json.loads(out.read_text())["datasets"]["RealLR200"]["rows"][0]
    assert saved["method"] == "restored" and saved["not_applicable"] == ["psnr"] and "niqe" in saved["not_computed"]
    assert "not applicable without references: PSNR" in capsys.readouterr().err


# ------------------------------------------------------------------------------- tables


GOLDEN = """\
## DIV2K-Val

| Method | PSNR↑ | SSIM↑ | LPIPS↓ | FID↓ |
|:--|--:|--:|--:|--:|
| A | 21.54 | **0.5432** | **0.3000** | 25.12 |
| B | **22.00** | 0.5000 | 0.3123 | - |

Not computed (-):

- B, FID: the optional package pyiqa is not installed

## RealSR

| Method | PSNR↑ |
|:--|--:|
| C | inf |
"""


def test_markdown_layout_is_stable() -> None:
    table = tb.new_table()
    tb.add_row(table, "DIV2K-Val", {"method": "A", "scores": {"psnr": 21.5432, "ssim": 0.54321, "lpips": 0.3,
                                                              "fid": 25.123}})
    tb.add_row(table, "DIV2K-Val", {"method": "B", "scores": {"psnr": 22.0, "ssim": 0.5, "lpips": 0.31234},
                                    "not_computed": {"fid": "the optional package pyiqa is not installed\n  more"}})
    tb.add_row(table, "RealSR", {"method": "C", "scores": {"psnr": me.json_number(math.inf)}})
    table = json.loads(json.dumps(table))  # what --append reads back
    assert tb.render_markdown(table) == GOLDEN
    assert tb.add_row(table, "RealSR", {"method": "C", "scores": {"psnr": 30.0}}) == "replaced"
    assert len(table["datasets"]["RealSR"]["rows"]) == 1


def test_cli_append_accumulates_methods(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, ref = folders
    out, md, per = tmp_path / "results.json", tmp_path / "results.md", tmp_path / "per.csv"
    common = ["--reference", str(ref), "--metrics", "psnr,ssim", "--out", str(out), "--markdown", str(md),
              "--dataset", "Toy", "--no-progress"]
    assert cli.main(["--restored", str(res), "--name", "noisy", *common]) == 0
    assert cli.main(["--restored", str(ref), "--name", "oracle", "--append", *common]) == 0
    assert cli.main(["--restored", str(res), "--name", "noisy", "--append", "--per-image", str(per), *common]) == 0
    rows = json.loads(out.read_text())["datasets"]["Toy"]["rows"]
    assert [r["method"] for r in rows] == ["noisy", "oracle"]
    assert rows[1]["scores"] == {"psnr": "inf", "ssim": 1.0}
    text = md.read_text()
    assert "| oracle | **inf** | **1.0000** |" in text and "| Method | PSNR↑ | SSIM↑ |" in text
    lines = per.read_text().splitlines()
    assert lines[0] == "image,psnr,ssim" and [ln.split(",")[0] for ln in lines[1:]] == ["a", "b", "sub/c"]
    with pytest.raises(SystemExit) as e:
        cli.main(["--restored", str(res), "--reference", str(ref), "--append"])
    assert e.value.code == 2
