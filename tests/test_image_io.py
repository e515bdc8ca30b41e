"""Tests of pipeline.core.image_io: every awkward source either loads sensibly or fails clearly.

Expected pixels come from independent decoders (OpenCV, Pillow without our code) or from
the generating arrays in tests/badfiles.py, never from image_io itself.
"""

from __future__ import annotations

import os
import warnings
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import badfiles
from pipeline.core.image_io import SourceError, decode_png, encode_png, load_source

MAX_PIXELS = 100_000_000
MIN_SIDE = 64

# Words the reason of each failing case must contain (any one of each tuple).
FAIL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "corrupt.png": ("not an image",),
    "truncated.jpg": ("truncated",),
    "empty.png": ("empty",),
    "not_image.jpg": ("not an image",),
    "tiny.png": ("too small", "min_side"),
    "thin.png": ("too small", "min_side"),
    "bomb.png": ("bomb",),
    "float.tif": ("float",),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("zoo")
    return folder, badfiles.make_bad_inputs(folder)


def load(path: Path, **kwargs: int) -> tuple[np.ndarray, dict]:
    limits = {"max_pixels": MAX_PIXELS, "min_side": MIN_SIDE, **kwargs}
    return load_source(path, **limits)


def raw16(path: Path) -> np.ndarray:
    """The file's 16-bit samples, via OpenCV (RGB order), untouched by our code."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.dtype == np.uint16
    return arr[..., ::-1] if arr.ndim == 3 else arr


def scale16(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


# ------------------------------------------------------------------ the whole zoo


def test_zoo_covers_every_case(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, cases = zoo
    assert set(cases) == set(FAIL_KEYWORDS) | set(badfiles.EXPECTED_HW)
    assert all(v in ("ok", "failed") for v in cases.values())
    for name in cases:
        assert (folder / name).stat().st_size < 300_000, name


def test_ok_cases_load_as_uint8_rgb(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, cases = zoo
    for name in (n for n, e in cases.items() if e == "ok"):
        rgb, info = load(folder / name)
        assert rgb.dtype == np.uint8, name
        assert rgb.shape == (*badfiles.EXPECTED_HW[name], 3), name
        assert rgb.flags.c_contiguous, name
        assert 20 < rgb.mean() < 235, name  # a photo, not a blank
        assert set(info) >= {"mode", "size", "format", "exif_orientation", "converted"}
        with Image.open(folder / name) as header:
            assert info["size"] == [header.width, header.height], name


@pytest.mark.parametrize("name", sorted(FAIL_KEYWORDS))
def test_failed_cases_raise_source_error_with_reason(
    zoo: tuple[Path, dict[str, str]], name: str
) -> None:
    folder, cases = zoo
    assert cases[name] == "failed"
    with pytest.raises(SourceError) as caught:
        load(folder / name)
    reason = caught.value.reason
    assert isinstance(reason, str) and str(caught.value) == reason
    assert any(word in reason for word in FAIL_KEYWORDS[name]), reason


def test_no_warning_or_raw_exception_escapes_under_strict_warnings(
    zoo: tuple[Path, dict[str, str]],
) -> None:
    folder, cases = zoo
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for name in cases:
            try:
                load(folder / name)
            except SourceError:
                pass


# ------------------------------------------------------------------ pixel content


def test_grey16_is_scaled_with_rounding(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, info = load(folder / "grey16.png")
    source = raw16(folder / "grey16.png")
    np.testing.assert_array_equal(source, badfiles.grey16_pixels())
    assert list(rgb[0, :6, 0]) == [0, 4, 128, 255, 0, 127]
    np.testing.assert_array_equal(rgb[..., 0], scale16(source))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert info["mode"] == "I;16" and "16-bit" in info["converted"]


def test_rgb16_reduced_within_one_level(zoo: tuple[Path, dict[str, str]]) -> None:
    """Pillow keeps the high byte of 16-bit RGB samples; that is within 1 of rounding."""
    folder, _ = zoo
    rgb, info = load(folder / "rgb16.png")
    source = raw16(folder / "rgb16.png")
    diff = np.abs(rgb.astype(int) - scale16(source).astype(int))
    assert diff.max() <= 1
    np.testing.assert_array_equal(rgb, (source >> 8).astype(np.uint8))
    assert info["mode"] == "RGB" and "16-bit" in info["converted"]


def test_rgba_composited_over_white(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, info = load(folder / "rgba.png")
    colour = badfiles.source_photo(128, 96).astype(np.int64)
    alpha = badfiles.alpha_pixels().astype(np.int64)[..., None]
    block = badfiles.TRANSPARENT_BLOCK
    assert (rgb[:block, :block] == 255).all()
    np.testing.assert_array_equal(rgb[:, 64:], colour[:, 64:])  # opaque half untouched
    expected = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    np.testing.assert_array_equal(rgb, expected.astype(np.uint8))
    assert info["converted"] == "RGBA over white"


def test_la_composited_over_white(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, info = load(folder / "la.png")
    block = badfiles.TRANSPARENT_BLOCK
    assert (rgb[:block, :block] == 255).all()
    with Image.open(folder / "la.png") as im:
        grey = np.asarray(im.getchannel("L"))
    np.testing.assert_array_equal(rgb[:, 64:, 1], grey[:, 64:])
    assert info["mode"] == "LA" and "white" in info["converted"]


def test_palette_transparency_becomes_white(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, info = load(folder / "palette_transparent.png")
    block = badfiles.TRANSPARENT_BLOCK
    assert (rgb[:block, :block] == 255).all()  # the transparent entry is green in the palette
    rest = np.abs(rgb[block:].astype(int) - badfiles.source_photo(128, 96)[block:].astype(int))
    assert rest.mean() < 8  # quantised to 255 colours, otherwise the photo
    assert info["mode"] == "P" and "white" in info["converted"]


def test_exif_orientation_6_rotates_clockwise(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, info = load(folder / "exif_rot6.jpg")
    with Image.open(folder / "exif_rot6.jpg") as im:
        stored = np.asarray(im.convert("RGB"))  # as stored, EXIF ignored
    assert stored.shape == (96, 128, 3) and rgb.shape == (128, 96, 3)
    np.testing.assert_array_equal(rgb, np.rot90(stored, k=-1))  # k=-1: clockwise
    assert info["exif_orientation"] == 6 and info["size"] == [128, 96]


def test_grey_cmyk_mode1_and_plain_jpeg_match_the_photo(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    photo = badfiles.source_photo(128, 96).astype(int)
    luma = np.asarray(Image.fromarray(photo.astype(np.uint8)).convert("L"), dtype=int)
    cmyk, _ = load(folder / "cmyk.jpg")
    assert np.abs(cmyk.astype(int) - photo).mean() < 6
    plain, _ = load(folder / "rgb.jpg")
    assert np.abs(plain.astype(int) - photo).mean() < 6
    grey, info = load(folder / "grey.jpg")
    assert (grey[..., 0] == grey[..., 2]).all() and info["converted"] == "grey to RGB"
    assert np.abs(grey[..., 0].astype(int) - luma).mean() < 6
    bits, _ = load(folder / "mode1.png")
    assert set(np.unique(bits)) <= {0, 255}
    np.testing.assert_array_equal(bits[..., 0] == 255, luma > 128)


def test_animated_gif_gives_first_frame(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, _ = load(folder / "animated.gif")
    assert (rgb == np.array(badfiles.ANIMATED_COLOURS[0], np.uint8)).all()


def test_strip_fails_when_min_side_above_its_height(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    with pytest.raises(SourceError, match="too small"):
        load(folder / "strip.jpg", min_side=71)


# ------------------------------------------------------------------ limits and edges


def test_bomb_reason_from_header_size(tmp_path: Path) -> None:
    """Below Pillow's own guard, our max_pixels check names the dimensions."""
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(SourceError) as caught:
        load(path, max_pixels=100_000)
    assert "bomb" in caught.value.reason and "400x300" in caught.value.reason
    assert "1e5" in caught.value.reason


def test_bomb_header_is_refused_before_decoding(zoo: tuple[Path, dict[str, str]]) -> None:
    """Pillow's guard fires inside open(); the reason still speaks of max_pixels."""
    folder, _ = zoo
    assert (folder / "bomb.png").stat().st_size < 200
    with pytest.raises(SourceError, match="bomb") as caught:
        load(folder / "bomb.png")
    assert "1e10 px" in caught.value.reason and "max_pixels 1e8" in caught.value.reason


def test_pillow_global_limit_is_left_as_found(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    before = Image.MAX_IMAGE_PIXELS
    load(folder / "rgb.jpg", max_pixels=10**12)
    with pytest.raises(SourceError):
        load(folder / "truncated.jpg", max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == before


def test_mode_i_uses_16_bit_range_unless_values_fit_8_bits(tmp_path: Path) -> None:
    small = np.array([[0, 7, 255]] * 64, dtype=np.int32).repeat(22, axis=1)
    big = np.array([[0, 1000, 65535, 70000, -5]] * 64, dtype=np.int32).repeat(13, axis=1)
    for name, values in (("small.tif", small), ("big.tif", big)):
        Image.fromarray(values).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "I"
    rgb, _ = load(tmp_path / "small.tif")
    np.testing.assert_array_equal(rgb[..., 0], small.astype(np.uint8))
    rgb, _ = load(tmp_path / "big.tif")
    assert list(rgb[0, ::13, 0]) == [0, 4, 255, 255, 0]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="missing file"):
        load(tmp_path / "nope.jpg")
    with pytest.raises(SourceError, match="not a regular file"):
        load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(SourceError, match="not a regular file"):
        load(tmp_path / "pipe.jpg")


def test_wrong_argument_types_are_programming_errors(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    with pytest.raises(TypeError):
        load_source(123, MAX_PIXELS, MIN_SIDE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        load_source(folder / "rgb.jpg", "1e8", MIN_SIDE)  # type: ignore[arg-type]


def test_accepts_str_paths(zoo: tuple[Path, dict[str, str]]) -> None:
    folder, _ = zoo
    rgb, _ = load_source(str(folder / "rgb.jpg"), MAX_PIXELS, MIN_SIDE)
    assert rgb.shape == (96, 128, 3)


# ------------------------------------------------------------------ shard PNG codec


def test_png_round_trip_is_exact_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    photo = badfiles.source_photo(128, 96)
    for rgb in (noise, photo, np.asfortranarray(photo), photo[:, ::-1]):
        for level in (0, 1, 9):
            data = encode_png(rgb, compress_level=level)
            assert data == encode_png(rgb.copy(), compress_level=level)
            back = decode_png(data)
            assert back.dtype == np.uint8 and back.flags.c_contiguous
            np.testing.assert_array_equal(back, rgb)
    # an independent decoder agrees about channel order
    data = encode_png(photo)
    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(data))), photo)


def test_png_codec_rejects_wrong_input() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError):
        decode_png(b"not a png at all")
