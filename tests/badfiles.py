"""A zoo of awkward source files, for tests of the loader and of whole jobs.

Not a test module: tests import :func:`make_bad_inputs` to get a folder that mixes good
photos in unusual encodings with files that must become failed rows (DESIGN section 3).
Every file is derived from the same real photo (scikit-image's astronaut) so "ok" cases
can be checked against known pixels, and each is small so the zoo builds in well under
a second.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

# The expectation with max_pixels=100_000_000 and min_side=64.
OK, FAILED = "ok", "failed"

# (height, width) of each "ok" case after loading (EXIF rotation applied).
EXPECTED_HW: dict[str, tuple[int, int]] = {
    "grey16.png": (96, 128),
    "rgb16.png": (96, 128),
    "grey.jpg": (96, 128),
    "palette_transparent.png": (96, 128),
    "cmyk.jpg": (96, 128),
    "rgba.png": (96, 128),
    "la.png": (96, 128),
    "exif_rot6.jpg": (128, 96),  # stored 128 wide x 96 high, displayed rotated
    "strip.jpg": (70, 2000),
    "mode1.png": (96, 128),
    "rgb.jpg": (96, 128),
    "animated.gif": (80, 80),
}

BOMB_SIDE = 100_000
TRANSPARENT_BLOCK = 16  # top-left square that is fully transparent in the alpha cases
ANIMATED_COLOURS = ((200, 30, 30), (30, 30, 200))  # frame 0, frame 1


def source_photo(width: int, height: int) -> np.ndarray:
    """The astronaut photo resized to (height, width, 3) uint8 RGB, deterministically."""
    photo = Image.fromarray(skdata.astronaut())
    return np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC)).copy()


def grey16_pixels() -> np.ndarray:
    """The 16-bit grey source: the photo's luma times 257, plus a few known values.

    Row 0 starts with 0, 1000, 32768, 65535, 128, 32767 so tests can check the scaling
    formula at its edges.
    """
    luma = np.asarray(Image.fromarray(source_photo(128, 96)).convert("L"), dtype=np.uint16)
    grey = luma * 257
    grey[0, :6] = (0, 1000, 32768, 65535, 128, 32767)
    return grey


def alpha_pixels(width: int = 128, height: int = 96) -> np.ndarray:
    """An alpha ramp across the columns, with a fully transparent top-left block."""
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    alpha = np.tile(ramp, (height, 1))
    alpha[:, width // 2 :] = 255  # right half opaque
    alpha[:TRANSPARENT_BLOCK, :TRANSPARENT_BLOCK] = 0
    return alpha


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Write one file per awkward case into ``folder``; return {filename: "ok"|"failed"}.

    Expectations assume ``max_pixels=100_000_000`` and ``min_side=64``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, str] = {}
    for name, (writer, expectation) in _CASES.items():
        writer(folder / name)
        cases[name] = expectation
    return cases


# ----------------------------------------------------------------------- the writers


def _photo_image(width: int = 128, height: int = 96) -> Image.Image:
    return Image.fromarray(source_photo(width, height))


def _write_corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def _write_truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    _photo_image().save(buf, "JPEG", quality=90)
    whole = buf.getvalue()
    path.write_bytes(whole[: len(whole) // 2])


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


def _write_text(path: Path) -> None:
    path.write_text("These are holiday notes, not a photo.\n" * 20)


def _write_grey16(path: Path) -> None:
    assert cv2.imwrite(str(path), grey16_pixels())


def _write_rgb16(path: Path) -> None:
    rgb16 = source_photo(128, 96).astype(np.uint16) * 257
    rgb16[0, 0] = (1000, 32768, 65535)  # R, G, B; low bytes that truncation would drop
    rgb16[0, 1] = (383, 127, 65280)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))  # cv2 wants BGR


def _write_grey_jpeg(path: Path) -> None:
    _photo_image().convert("L").save(path, "JPEG", quality=90)


def _write_palette_transparent(path: Path) -> None:
    pal = _photo_image().quantize(colors=255)  # indices 0..254; 255 is free
    indices = np.array(pal)
    indices[:TRANSPARENT_BLOCK, :TRANSPARENT_BLOCK] = 255
    out = Image.fromarray(indices, mode="P")
    palette = pal.getpalette()[: 255 * 3] + [0, 255, 0]  # transparent entry is green
    out.putpalette(palette)
    out.save(path, "PNG", transparency=255)


def _write_cmyk_jpeg(path: Path) -> None:
    _photo_image().convert("CMYK").save(path, "JPEG", quality=95)


def _write_rgba(path: Path) -> None:
    rgba = np.dstack([source_photo(128, 96), alpha_pixels()])
    Image.fromarray(rgba, mode="RGBA").save(path, "PNG")


def _write_la(path: Path) -> None:
    grey = np.asarray(_photo_image().convert("L"))
    Image.fromarray(np.dstack([grey, alpha_pixels()]), mode="LA").save(path, "PNG")


def _write_exif_rot6(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _photo_image().save(path, "JPEG", quality=90, exif=exif.tobytes())


def _write_png_of_size(width: int, height: int):
    def write(path: Path) -> None:
        _photo_image(width, height).save(path, "PNG")

    return write


def _write_strip(path: Path) -> None:
    _photo_image(2000, 70).save(path, "JPEG", quality=85)


def _write_bomb(path: Path) -> None:
    """A PNG whose header claims 100000x100000 RGB (30 GB) but whose file is tiny."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * 64))  # the first few pixels of row 0
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _write_mode1(path: Path) -> None:
    _photo_image().convert("L").point(lambda v: 255 if v > 128 else 0).convert("1").save(path, "PNG")


def _write_float_tiff(path: Path) -> None:
    grey = np.asarray(_photo_image().convert("L"), dtype=np.float32) / 255.0
    Image.fromarray(grey, mode="F").save(path, "TIFF")


def _write_rgb_jpeg(path: Path) -> None:
    _photo_image().save(path, "JPEG", quality=90)


def _write_animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (80, 80), colour) for colour in ANIMATED_COLOURS]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


_CASES = {
    "corrupt.png": (_write_corrupt, FAILED),
    "truncated.jpg": (_write_truncated_jpeg, FAILED),
    "empty.png": (_write_empty, FAILED),
    "not_image.jpg": (_write_text, FAILED),
    "grey16.png": (_write_grey16, OK),
    "rgb16.png": (_write_rgb16, OK),
    "grey.jpg": (_write_grey_jpeg, OK),
    "palette_transparent.png": (_write_palette_transparent, OK),
    "cmyk.jpg": (_write_cmyk_jpeg, OK),
    "rgba.png": (_write_rgba, OK),
    "la.png": (_write_la, OK),
    "exif_rot6.jpg": (_write_exif_rot6, OK),
    "tiny.png": (_write_png_of_size(20, 20), FAILED),
    "thin.png": (_write_png_of_size(3000, 4), FAILED),
    "strip.jpg": (_write_strip, OK),
    "bomb.png": (_write_bomb, FAILED),
    "mode1.png": (_write_mode1, OK),
    "float.tif": (_write_float_tiff, FAILED),
    "rgb.jpg": (_write_rgb_jpeg, OK),
    "animated.gif": (_write_animated_gif, OK),
}
