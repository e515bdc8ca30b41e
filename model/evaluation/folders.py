"""Which restored image goes with which reference.

Files pair by their path relative to each folder, without the suffix (`sub/0801_00.png`
with `sub/0801_00.jpg`), in sorted order. A partial set would skew every mean, so a file
without a counterpart is an error listing examples. Without a reference folder (RealLR200:
real LQ images and nothing to compare to) every restored image stands alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.image_io import IMAGE_SUFFIXES


class PairingError(ValueError):
    """The folders do not hold the same set of images (or no images); the message lists examples."""


class EvaluationError(RuntimeError):
    """PSNR/SSIM cannot be computed (unreadable image, size mismatch); names the files."""


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str  # relative path without suffix: the pairing key
    restored: Path
    reference: Path | None  # None when there are no references


def list_images(root: Path) -> dict[str, Path]:
    """Images below `root` keyed by relative POSIX path without suffix (hidden files skipped).

    Two files differing only in suffix (a.png, a.jpg) would make the pairing ambiguous, so
    they are an error rather than a silent pick.
    """
    root = Path(root)
    if not root.is_dir():
        raise PairingError(f"{root} is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        key = rel.with_suffix("").as_posix()
        if key in out:
            raise PairingError(f"{root}: {out[key].name} and {p.name} have the same name without suffix; "
                               "keep one of them")
        out[key] = p
    if not out:
        raise PairingError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def examples(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names) - n} more)" if len(names) > n else "")


def pair_folders(restored: Path, reference: Path | None) -> list[Pair]:
    """Sorted pairs; with `reference` None, the restored images alone."""
    res = list_images(restored)
    if reference is None:
        return [Pair(k, res[k], None) for k in sorted(res)]
    ref = list_images(reference)
    only_res = sorted(set(res) - set(ref))
    only_ref = sorted(set(ref) - set(res))
    if only_res or only_ref:
        lines = [f"the folders do not pair ({len(set(res) & set(ref))} names in common; files are paired by "
                 "relative path without suffix):"]
        if only_ref:
            lines.append(f"  {len(only_ref)} reference images have no restored image in {restored}: "
                         f"{examples(only_ref)}")
        if only_res:
            lines.append(f"  {len(only_res)} restored images have no reference in {reference}: "
                         f"{examples(only_res)}")
        raise PairingError("\n".join(lines))
    return [Pair(k, res[k], ref[k]) for k in sorted(res)]


def _header_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable: reported when the pixels are read
        return None


def check_sizes(pairs: Sequence[Pair]) -> None:
    """All size mismatches at once from the file headers, before any metric runs."""
    bad = []
    for p in pairs:
        if p.reference is None:
            continue
        a, b = _header_size(p.restored), _header_size(p.reference)
        if a is not None and b is not None and a != b:
            bad.append(f"{p.name} ({a[0]}x{a[1]} vs {b[0]}x{b[1]})")
    if bad:
        raise EvaluationError(f"{len(bad)} restored images differ in size from their reference "
                              f"(restored vs reference): {examples(bad)}")


def read_rgb(path: Path) -> np.ndarray:
    """8-bit RGB through the pipeline's loader (16-bit, grey, palette, EXIF handled alike)."""
    from pipeline.core.image_io import SourceError, load_source

    try:
        rgb, _ = load_source(path, max_pixels=1 << 31, min_side=1)
    except SourceError as e:
        raise EvaluationError(f"{path}: {e.reason}") from None
    return rgb


def default_dataset_name(reference: Path | None, restored: Path) -> str:
    """The reference folder's name, or its parent's for the test-set layout `<set>/hr`;
    without references, the restored folder's name."""
    folder = Path(reference if reference is not None else restored).resolve()
    return folder.parent.name if reference is not None and folder.name.lower() in ("hr", "gt", "hq") else folder.name
