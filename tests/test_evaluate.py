"""model/evaluate.py: Y-channel PSNR/SSIM against scikit-image, pairing, tables, and the
"not computed" path for metrics whose package or weights are missing."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model import evaluate as ev


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
        assert ev.psnr_y(restored, reference, crop) == pytest.approx(want_psnr, abs=1e-4)
        assert ev.ssim_y(restored, reference, crop) == pytest.approx(want_ssim, abs=1e-5)


def test_identical_images_give_inf_and_one() -> None:
    img = skimage.data.coffee()[:64, :96]
    assert ev.psnr_y(img, img.copy()) == math.inf
    assert ev.ssim_y(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_y_channel_is_bt601() -> None:
    img = skimage.data.astronaut()[:32, :32]
    assert np.allclose(ev.rgb_to_y(img), _y(img), atol=1e-4)
    assert ev.rgb_to_y(np.zeros((2, 2, 3), np.uint8)).max() == pytest.approx(16.0, abs=1e-4)
    assert ev.rgb_to_y(np.full((2, 2, 3), 255, np.uint8)).min() == pytest.approx(235.0, abs=1e-4)


def test_size_mismatch_and_tiny_images_are_errors() -> None:
    a, b = skimage.data.astronaut()[:64, :64], skimage.data.astronaut()[:64, :60]
    with pytest.raises(ValueError, match="64x64 but the reference is 60x64"):
        ev.psnr_y(a, b)
    with pytest.raises(ValueError, match="at least 11x11"):
        ev.ssim_y(a[:10, :10], a[:10, :10])


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


def test_folders_pair_by_relative_stem(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    pairs = ev.pair_folders(res, ref)
    assert [p.name for p in pairs] == ["a", "b", "sub/c"]
    assert pairs[1].restored.suffix == ".bmp" and pairs[1].reference.suffix == ".png"


def test_pairing_errors_list_examples(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, ref = folders
    (res / "a.png").unlink()
    _write(res, "extra.png", np.zeros((64, 72, 3), np.uint8))
    with pytest.raises(ev.PairingError) as e:
        ev.pair_folders(res, ref)
    text = str(e.value)
    assert "1 reference images have no restored image" in text and "a" in text
    assert "1 restored images have no reference" in text and "extra" in text
    _write(res, "a.png", np.zeros((64, 72, 3), np.uint8))
    _write(res, "a.jpg", np.zeros((64, 72, 3), np.uint8))
    with pytest.raises(ev.PairingError, match="same name without suffix"):
        ev.list_images(res)
    with pytest.raises(ev.PairingError, match="not a folder"):
        ev.list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.PairingError, match="holds no images"):
        ev.list_images(tmp_path / "empty")


def test_evaluate_means_per_image_values(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    result = ev.evaluate(res, ref, ["ssim", "psnr"], method="noisy")
    assert list(result.scores) == ["psnr", "ssim"]  # the paper's column order, whatever was asked
    assert result.dataset == "set" and result.images == 3 and not result.not_computed
    want = np.mean([ev.psnr_y(cv2.imread(str(p.restored))[..., ::-1].copy(),
                              cv2.imread(str(p.reference))[..., ::-1].copy())
                    for p in ev.pair_folders(res, ref)])
    assert result.scores["psnr"] == pytest.approx(want, abs=1e-9)
    assert result.per_image["sub/c"]["ssim"] < 1.0


def test_size_mismatch_is_listed_before_any_metric(folders: tuple[Path, Path]) -> None:
    res, ref = folders
    _write(res, "b.bmp", np.zeros((60, 72, 3), np.uint8))
    with pytest.raises(ev.EvaluationError, match=r"b \(72x60 vs 72x64\)"):
        ev.evaluate(res, ref, ["psnr"])
    assert ev.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr", "--no-progress"]) == 1


def test_cli_pairing_error_exits_2(folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    res, ref = folders
    (ref / "a.png").unlink()
    assert ev.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr", "--no-progress"]) == 2
    assert "have no reference" in capsys.readouterr().err
    assert ev.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr,sharpness"]) == 2
    assert "unknown metrics ['sharpness']" in capsys.readouterr().err


# --------------------------------------------------------------------------- not computed


def test_missing_pyiqa_is_not_computed(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError, installed or not
    res, ref = folders
    out = tmp_path / "t.json"
    rc = ev.main(["--restored", str(res), "--reference", str(ref), "--metrics", "psnr,lpips,fid",
                  "--out", str(out), "--name", "noisy", "--no-progress"])
    assert rc == 0
    row = json.loads(out.read_text())["datasets"]["set"]["rows"][0]
    assert set(row["scores"]) == {"psnr"}
    assert set(row["not_computed"]) == {"lpips", "fid"}
    assert "pyiqa is not installed" in row["not_computed"]["lpips"]


def test_missing_weight_file_names_its_path(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """A stand-in pyiqa that fetches its weights through torch.hub, as pyiqa's backbones do:
    the download is refused (no network touched) and the reason names the cache path."""
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "https://example.invalid/weights/LPIPS_v0.1_alex-df73285e.pth"

    def create_metric(name: str, device: str | None = None) -> None:
        torch.hub.load_state_dict_from_url(url)

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    original = torch.hub.download_url_to_file
    res, ref = folders
    result = ev.evaluate(res, ref, ["psnr", "lpips"])
    reason = result.not_computed["lpips"]
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "LPIPS_v0.1_alex-df73285e.pth"
    assert reason.startswith(f"weight file missing: {expected}")
    assert url in reason and "--download" in reason
    assert str(ev.pyiqa_cache_dir() / "LPIPS_v0.1_alex-df73285e.pth") in reason  # pyiqa's own file, listed too
    assert torch.hub.download_url_to_file is original  # the guard put everything back
    assert "psnr" in result.scores


def test_missing_hub_weights_are_not_computed(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """timm-style weights from the Hugging Face hub: offline mode makes the miss immediate."""
    from huggingface_hub import constants, hf_hub_download

    def create_metric(name: str, device: str | None = None) -> None:
        hf_hub_download("timm/surely-not-cached", "model.safetensors", cache_dir=tmp_path / "hf")

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    offline = constants.HF_HUB_OFFLINE
    res, ref = folders
    result = ev.evaluate(res, ref, ["maniqa"])
    assert result.not_computed["maniqa"].startswith("weights not in the local Hugging Face cache")
    assert "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k" in result.not_computed["maniqa"]
    assert constants.HF_HUB_OFFLINE == offline


def test_real_pyiqa_without_weights(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    """Runs only where pyiqa is installed; TORCH_HOME points at an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    pytest.importorskip("pyiqa")
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR  # fixed when pyiqa was first imported

    res, ref = folders
    result = ev.evaluate(res, ref, ["lpips", "niqe"])
    assert result.not_computed["lpips"].startswith(
        f"weight file missing: {tmp_path / 'torch' / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth'}")
    niqe = Path(DEFAULT_CACHE_DIR) / "niqe_modelparameters.mat"
    if not niqe.exists():
        assert result.not_computed["niqe"].startswith(f"weight file missing: {niqe}")


def test_clip_i_with_a_local_timm_tower(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """CLIP-I runs through the same loader real weights use: here the tiny test tower."""
    from demo_fixtures.tiny_sd import build_image_encoder

    tower = tmp_path / "tower"
    build_image_encoder(tower)
    res, ref = folders
    same = ev.evaluate(ref, ref, ["clip_i"], clip_model=str(tower), device="cpu")
    assert same.scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    inverted = tmp_path / "inverted"
    for p in ev.pair_folders(res, ref):
        _write(inverted, p.reference.relative_to(ref).as_posix(), 255 - cv2.imread(str(p.reference))[..., ::-1])
    other = ev.evaluate(inverted, ref, ["clip_i"], clip_model=str(tower), device="cpu")
    assert -1.0 <= other.scores["clip_i"] < same.scores["clip_i"] - 1e-6  # a random tiny tower: barely lower
    bad = ev.evaluate(res, ref, ["clip_i"], clip_model=str(tmp_path / "no-such-tower"), device="cpu")
    assert "clip_i" in bad.not_computed and "not a folder" in bad.not_computed["clip_i"]


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
    table = ev.new_table()
    ev.add_row(table, "DIV2K-Val", {"method": "A", "scores": {"psnr": 21.5432, "ssim": 0.54321, "lpips": 0.3,
                                                              "fid": 25.123}})
    ev.add_row(table, "DIV2K-Val", {"method": "B", "scores": {"psnr": 22.0, "ssim": 0.5, "lpips": 0.31234},
                                    "not_computed": {"fid": "the optional package pyiqa is not installed\n  more"}})
    ev.add_row(table, "RealSR", {"method": "C", "scores": {"psnr": ev._json_number(math.inf)}})
    table = json.loads(json.dumps(table))  # what --append reads back
    assert ev.render_markdown(table) == GOLDEN
    assert ev.add_row(table, "RealSR", {"method": "C", "scores": {"psnr": 30.0}}) == "replaced"
    assert len(table["datasets"]["RealSR"]["rows"]) == 1


def test_cli_append_accumulates_methods(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, ref = folders
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    common = ["--reference", str(ref), "--metrics", "psnr,ssim", "--out", str(out), "--markdown", str(md),
              "--dataset", "Toy", "--no-progress"]
    assert ev.main(["--restored", str(res), "--name", "noisy", *common]) == 0
    assert ev.main(["--restored", str(ref), "--name", "oracle", "--append", *common]) == 0
    assert ev.main(["--restored", str(res), "--name", "noisy", "--append", *common]) == 0  # replaces its row
    rows = json.loads(out.read_text())["datasets"]["Toy"]["rows"]
    assert [r["method"] for r in rows] == ["noisy", "oracle"]
    assert rows[1]["scores"] == {"psnr": "inf", "ssim": 1.0}
    text = md.read_text()
    assert "| oracle | **inf** | **1.0000** |" in text and "| Method | PSNR↑ | SSIM↑ |" in text
    with pytest.raises(SystemExit) as e:
        ev.main(["--restored", str(res), "--reference", str(ref), "--append"])
    assert e.value.code == 2
