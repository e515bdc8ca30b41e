"""Reading user photos into 8-bit RGB, and the lossless PNG codec of the shards.

Source folders hold whatever users have on disk: 16-bit scans, CMYK exports, palette
GIFs, phone JPEGs with EXIF rotation, half-copied files and the odd decompression bomb.
A worker must never die on one of them (DESIGN section 3): each file either becomes a
plain ``uint8`` HxWx3 RGB array or raises :class:`SourceError`, whose ``reason`` is
written into the shard's failed rows, so it must tell a person what is wrong and what to
do about it.

Why Pillow for sources: it parses the header lazily, so size limits are enforced before
a single pixel is decoded, and it knows far more modes than OpenCV. Why OpenCV for the
shard PNGs: it encodes several times faster, and those PNGs are always plain 8-bit RGB.

Pillow facts this module relies on (checked with Pillow 13.0):

* A 16-bit-per-channel RGB(A) PNG opens as mode ``RGB``/``RGBA`` with raw mode
  ``RGB;16B``: Pillow keeps the high byte of each sample (``v >> 8``), which differs from
  rounding by at most one level. We accept that and say so in ``info["converted"]``.
  A 16-bit grey PNG opens as ``I;16`` and is scaled here with rounding.
* ``Image.open`` itself raises ``DecompressionBombError`` above twice
  ``Image.MAX_IMAGE_PIXELS`` and warns above it; our own ``max_pixels`` check is the
  authority, Pillow's is only a backstop.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "SourceError", "load_source", "encode_png", "decode_png"]

# The file suffixes every folder reader of the project (sources, test sets, restoration
# inputs, evaluation folders) treats as images: one list, so a file one command accepts is
# never skipped by another.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_REMEDY = "re-export or remove it"

# Everything Pillow's decoders are known to raise on malformed files. Narrow try blocks
# around Pillow calls only (our arguments are validated before), so a bug in this module
# still surfaces as a raw exception instead of a misleading "corrupt file" row.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
)

# Modes Pillow's own convert("RGB") handles with correct colour maths, no alpha involved.
_PLAIN_CONVERT = {
    "CMYK": "CMYK to RGB",
    "YCbCr": "YCbCr to RGB",
    "LAB": "LAB to RGB",
    "HSV": "HSV to RGB",
    "RGBX": "RGBX to RGB",
}
# Modes with an alpha channel (or premultiplied alpha), flattened over white.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class SourceError(Exception):
    """A source file that cannot become a training image.

    Carries ``reason`` separately from the exception text because the pipeline stores it
    verbatim in a failed row and the job report; it must read well on its own.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- loading


def load_source(
    path: str | os.PathLike[str], max_pixels: int, min_side: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one user photo into a C-contiguous ``uint8`` HxWx3 RGB array.

    Returns ``(rgb, info)`` where ``info`` is JSON-ready provenance for the shard's
    sidecar: ``mode`` and ``size`` ([w, h]) as stored in the file, ``format``,
    ``exif_orientation`` (the EXIF orientation that was applied, or None) and
    ``converted`` (what had to be done to reach 8-bit RGB, or None).

    Size limits are checked on the header before any pixel is decoded, so a bomb costs
    no memory. Animated files give their first frame. Truncated files are errors: a
    half-grey photo would silently poison training pairs.

    Raises SourceError for every problem with the file; TypeError/ValueError for wrong
    arguments, because those are bugs in the caller, not bad data.
    """
    _check_args(path, max_pixels, min_side)
    _check_file(path)
    with _pillow_bomb_guard(max_pixels), _open(path, max_pixels) as src:
        info = _header_info(src)
        _check_header_size(src.size, max_pixels, min_side)
        depth_note = _high_byte_note(src)
        _decode(src)
        upright, info["exif_orientation"] = _apply_orientation(src)
        try:
            rgb, converted = _to_rgb(upright)
        except MemoryError as exc:
            raise SourceError(_reason_for(exc)) from exc
    info["converted"] = depth_note or converted
    return rgb, info


def _check_args(path: object, max_pixels: object, min_side: object) -> None:
    """Fail loudly on caller bugs so they never masquerade as bad files."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be str or os.PathLike, got {type(path).__name__}")
    for name, value in (("max_pixels", max_pixels), ("min_side", min_side)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be int, got {type(value).__name__}")
    if max_pixels <= 0 or min_side < 1:  # type: ignore[operator]
        raise ValueError(f"need max_pixels > 0 and min_side >= 1, got {max_pixels}, {min_side}")


def _check_file(path: str | os.PathLike[str]) -> None:
    """Reject what Pillow would misreport: missing, empty, or non-regular paths.

    A FIFO or device would block or stream forever inside Image.open, so it is turned
    away here.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SourceError(f"missing file: {os.fspath(path)!s}; was it moved or deleted?") from exc
    except OSError as exc:
        raise SourceError(f"unreadable file ({exc.strerror or exc}); check permissions") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceError("not a regular file (directory, pipe or device); remove it from the source")
    if st.st_size == 0:
        raise SourceError("empty file (0 bytes); re-copy or remove it")


@contextlib.contextmanager
def _pillow_bomb_guard(max_pixels: int) -> Iterator[None]:
    """Keep Pillow's own bomb guard as a backstop that never rejects what we accept.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that. Our
    header check is the authority, so the limit is raised to ``max_pixels`` when lower
    (never lowered) and the warning is silenced: left on, it would spam logs or, under
    ``-W error``, reject images we accept. Both are process-global, so they are restored
    on exit; loading from several threads at once with different limits is unsupported
    (workers are processes).
    """
    previous = Image.MAX_IMAGE_PIXELS
    if previous is not None and previous < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open(path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Parse the header only; Image.open is lazy, so no pixel data is decoded yet.

    Pillow's bomb guard fires inside open() for huge headers, before our own check can
    see the size; its message is rewritten in terms of the setting users can change.
    """
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"header declares {_sci(int(found.group(1)))} px" if found else str(exc)
        raise SourceError(
            f"decompression bomb: {declared}, exceeds max_pixels {_sci(max_pixels)}; "
            "raise degrade.max_pixels or resize the file"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise SourceError(_reason_for(exc)) from exc


def _sci(n: int) -> str:
    """1e8, 1.6e9: pixel counts people can read at a glance (exact, else 83_810_205)."""
    mantissa, exponent = f"{n:.2e}".split("e")
    short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return short if float(short) == n else f"{n:_}"


def _header_info(im: Image.Image) -> dict[str, Any]:
    return {
        "mode": im.mode,
        "size": [im.width, im.height],
        "format": im.format,
        "exif_orientation": None,
        "converted": None,
    }


def _check_header_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    """Enforce limits from the header alone, before decoding costs memory or time.

    The shortest side does not change under EXIF rotation, so checking it here equals
    checking it after orientation.
    """
    w, h = size
    if w * h > max_pixels:
        raise SourceError(
            f"decompression bomb: {w}x{h} = {_sci(w * h)} px exceeds max_pixels "
            f"{_sci(max_pixels)}; raise degrade.max_pixels or resize the file"
        )
    if min(w, h) < min_side:
        raise SourceError(
            f"too small: {w}x{h} px, shortest side below min_side {min_side}; "
            "drop it or lower degrade.min_side"
        )


def _high_byte_note(im: Image.Image) -> str | None:
    """Record that Pillow already reduced 16-bit colour samples to their high byte.

    Must be read before load(): the raw mode only lives in the tile list, which
    decoding clears.
    """
    if im.mode.startswith("I") or not im.tile:
        return None
    args = im.tile[0][3]  # (codec, extents, offset, args); PNG args is the raw mode
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        args = args[0]  # TIFF and others: (rawmode, ...)
    rawmode = args if isinstance(args, str) else ""
    if "16" in rawmode:
        return f"16-bit {im.mode} reduced to 8 (high byte, by Pillow)"
    return None


def _decode(im: Image.Image) -> None:
    """Force the full pixel decode now, so damage shows up as a SourceError here."""
    try:
        im.load()
    except _DECODE_ERRORS as exc:
        raise SourceError(_reason_for(exc)) from exc


def _apply_orientation(im: Image.Image) -> tuple[Image.Image, int | None]:
    """Rotate/flip as the camera asked, so crops see the scene upright.

    A damaged EXIF block is not worth losing a good photo over: orientation is then
    skipped (the pixels are fine).
    """
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation)
    except _DECODE_ERRORS:
        return im, None
    if not isinstance(orientation, int) or orientation not in range(2, 9):
        return im, None
    try:
        return ImageOps.exif_transpose(im), orientation
    except _DECODE_ERRORS as exc:
        raise SourceError(_reason_for(exc)) from exc


def _reason_for(exc: BaseException) -> str:
    """Turn a decoder exception into a reason a person can act on."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {msg}; raise degrade.max_pixels or resize the file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image: cannot identify image file (unknown format or corrupt header); remove it"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding; lower degrade.max_pixels or resize the file"
    if "truncated" in msg.lower():
        return f"truncated image file ({msg}); {_REMEDY}"
    return f"corrupt image data ({type(exc).__name__}: {msg}); {_REMEDY}"


# ------------------------------------------------------------------------ conversion


def _to_rgb(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """Bring any decoded Pillow mode to uint8 RGB; say what was done."""
    mode = im.mode
    if mode == "F":
        raise SourceError("32-bit float image not supported; convert to 8 or 16-bit")
    if mode.startswith("I"):
        return _int_grey_to_rgb(im)
    if mode in _ALPHA_MODES:
        label = {"PA": "palette+alpha", "La": "LA", "RGBa": "RGBA"}.get(mode, mode)
        return _over_white(im), f"{label} over white"
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        # tRNS: a palette index or colour key that means "transparent".
        src = im.convert("L") if mode == "1" else im
        label = {"P": "palette", "L": "grey", "1": "1-bit"}.get(mode, mode)
        return _over_white(src), f"{label} with transparency over white"
    if mode == "P":
        if im.palette is not None and im.palette.mode == "RGBA":
            return _over_white(im), "palette with alpha over white"
        return _rgb_array(im.convert("RGB")), "palette to RGB"
    if mode == "RGB":
        return _rgb_array(im), None
    if mode == "L":
        return _rgb_array(im.convert("RGB")), "grey to RGB"
    if mode == "1":
        return _rgb_array(im.convert("L").convert("RGB")), "1-bit to RGB"
    label = _PLAIN_CONVERT.get(mode, f"{mode} to RGB")
    try:
        return _rgb_array(im.convert("RGB")), label
    except ValueError as exc:
        raise SourceError(f"unsupported image mode {mode!r}; convert it to RGB") from exc


def _rgb_array(im: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.array(im, dtype=np.uint8))


def _over_white(im: Image.Image) -> np.ndarray:
    """Flatten transparency onto white with exact integer rounding.

    White because transparent regions of logos/scans are meant to be paper; integer
    arithmetic so the same file gives the same bytes on every machine.
    """
    rgba = np.asarray(im if im.mode == "RGBA" else im.convert("RGBA"), dtype=np.uint16)
    color, alpha = rgba[..., :3], rgba[..., 3:4]
    out = (color * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


def _int_grey_to_rgb(im: Image.Image) -> tuple[np.ndarray, str]:
    """Scale integer grey to 8 bits with rounding: (v*255 + 32767) // 65535.

    Mode I (32-bit) is treated as 16-bit range, unless every value already fits in 8
    bits (some writers store 8-bit data as I); out-of-range values are clipped.
    """
    values = np.asarray(im).astype(np.int64)  # handles I;16B byte order too
    if im.mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
        grey, label = values.astype(np.uint8), "32-bit int grey (8-bit values) to RGB"
    else:
        v = np.clip(values, 0, 65535)
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)
        label = "16-bit scaled to 8" if im.mode != "I" else "32-bit int grey as 16-bit, scaled to 8"
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb), label


# ------------------------------------------------------------------------ shard PNGs


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Losslessly encode an RGB uint8 array as PNG.

    Level 1 because shards hold many crops and zlib time dominates; the size gain of
    higher levels on photo noise is small. Output bytes are deterministic for the same
    array and the same OpenCV build (the sidecar sha256 relies on that for reruns).
    """
    _check_rgb(rgb)
    if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be an int in 0..9, got {compress_level!r}")
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise RuntimeError("cv2.imencode failed to write PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by :func:`encode_png` back to RGB uint8 HxWx3.

    Orientation metadata is ignored on purpose: shard PNGs are stored upright.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if bytes(data[:8]) != _PNG_SIGNATURE:
        raise ValueError("not a PNG (bad signature)")
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if bgr is None:
        raise ValueError("PNG could not be decoded")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"rgb must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 HxWx3, got {rgb.dtype} {rgb.shape}")


def level_table(scale: float, offset: float) -> np.ndarray:
    """float32 value of every uint8 level (level · scale + offset), computed in float64 and
    rounded once, so the ends of [-1, 1] are exact (a float32 multiply-add gives 1.0000001).
    The one conversion of stored pixels to model inputs: the latents stage and the trainer's
    loader use the same table, so cached and encoded latents see the same numbers."""
    return (np.arange(256, dtype=np.float64) * scale + offset).astype(np.float32)


SIGNED_LEVELS = level_table(1 / 127.5, -1.0)  # 0..255 → [-1, 1]
UNIT_LEVELS = level_table(1 / 255, 0.0)  # 0..255 → [0, 1]
