"""Real test sets → PNG folders: LQ/HR pairs (RealSR, DRealSR), or real LQ images alone (RealLR200).

Reads the images named by the manifest's "paired" section, crops the centre lq_size² of
each LQ (128²) and the matching region of its HR (scale × larger: 512²), and writes

  <out>/lq/<name>.png     LQ crops, what model/restore.py takes
  <out>/hr/<name>.png     HR crops with the same names, what model/evaluate.py compares to
  <out>/testset.json      the listing: every pair's source files and crop box, failures

A section without `hr_root` describes a set that has no references (RealLR200: real LQ
photographs without ground truth, scored with no-reference metrics only): only `lq/` is
written, and `"centre_crop": false` keeps every image whole (restoration then tiles it and
upscales it 4×, as the paper's RealLR200 protocol restores whole images).

`<out>` is the manifest's "output" (the CLI's --out overrides it). Pairs are matched by
their path relative to each root, without suffix and without the manifest's `lq_strip` /
`hr_strip` ending (RealSR: `Canon_001_LR4.png` ↔ `Canon_001_HR.png`); `<name>` is that stem.
The HR region is the LQ box scaled, not the HR's own centre: with an odd margin the two differ.
A rerun rewrites the folders; PNGs of an earlier run that this run did not write are removed
(the folders are written by `pipeline/testsets/folders.py`, shared with `pipeline/testsets/export.py`).

Kept apart from the command-line layer (jobs/paired_testset.py) so tests run the exact
job a user runs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.image_io import SourceError, encode_png, load_source
from pipeline.core.image_io import IMAGE_SUFFIXES
from pipeline.core.manifest import Manifest, ManifestError
from pipeline.testsets.folders import PairFolderWriter

PAIRED_KEYS: dict[str, type] = {
    "lq_root": str, "hr_root": str, "lq_glob": str, "hr_glob": str,
    "lq_strip": str, "hr_strip": str, "scale": int, "lq_size": int, "limit": int, "centre_crop": bool,
}
HR_KEYS = ("hr_root", "hr_glob", "hr_strip")


@dataclasses.dataclass(frozen=True)
class PairedConfig:
    """The manifest's "paired" section: where the real images are and how to crop them.
    `hr_root` None: LQ images without references."""

    lq_root: Path
    hr_root: Path | None = None
    lq_glob: str | None = None
    hr_glob: str | None = None
    lq_strip: str = ""
    hr_strip: str = ""
    scale: int = 4
    lq_size: int = 128
    limit: int | None = None
    centre_crop: bool = True

    @property
    def references(self) -> bool:
        return self.hr_root is not None

    @property
    def hr_size(self) -> int:
        return self.lq_size * self.scale


@dataclasses.dataclass(frozen=True)
class RealPair:
    name: str  # output file stem, shared by lq/ and hr/
    key: str  # relative path without suffix and strip ending: the matching key
    lq: Path
    hr: Path | None  # None in a set without references


def paired_config(manifest: Manifest) -> PairedConfig:
    """Check the "paired" section like the manifest loader checks its own: name the key."""
    file = manifest.path
    if "paired" not in manifest.raw:
        raise ManifestError(f"{file}: no \"paired\" section; this job builds real LQ/HR test sets. For a degraded "
                            "test set run jobs/degrade.py, then jobs/export_testset.py")
    section = manifest.section("paired")
    for key, value in section.items():
        if key not in PAIRED_KEYS:
            raise ManifestError(f"{file}: unknown key paired.{key}; known: {sorted(PAIRED_KEYS)}")
        want = PAIRED_KEYS[key]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            raise ManifestError(f"{file}: paired.{key} should be {want.__name__}, got {type(value).__name__} {value!r}")
    if "lq_root" not in section:
        raise ManifestError(f"{file}: paired needs \"lq_root\"")
    if "hr_root" not in section and any(k in section for k in HR_KEYS):
        raise ManifestError(f"{file}: paired has {[k for k in HR_KEYS if k in section]} but no \"hr_root\"; "
                            "give hr_root for LQ/HR pairs, or drop the hr_* keys for a set without references")
    if section.get("centre_crop") is False and "hr_root" in section:
        raise ManifestError(f"{file}: paired.centre_crop false keeps LQ images whole, which only a set without "
                            "references (no hr_root) can do; LQ/HR pairs are always centre-cropped")
    roots = {}
    for key in ("lq_root", "hr_root"):
        if key not in section:
            continue
        root = Path(section[key])
        root = root if root.is_absolute() else Path.cwd() / root
        if not root.is_dir():
            raise ManifestError(f"{file}: paired.{key} {str(root)!r} is not a folder")
        roots[key] = root
    cfg = PairedConfig(**{**section, **roots})
    for key in ("scale", "lq_size", "limit"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ManifestError(f"{file}: paired.{key} must be at least 1, got {value}")
    return cfg


def list_side(root: Path, glob: str | None, strip: str) -> dict[str, Path]:
    """Images under `root` keyed by relative path without suffix and without `strip`,
    sorted. Two files with one key would pair arbitrarily, so they are an error."""
    found = root.glob(glob) if glob else root.rglob("*")
    out: dict[str, Path] = {}
    for p in sorted(found):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = p.relative_to(root).with_suffix("")
        stem = rel.name[: -len(strip)] if strip and rel.name.endswith(strip) else rel.name
        key = rel.with_name(stem).as_posix() if stem else rel.as_posix()
        if key in out:
            raise ManifestError(f"{out[key]} and {p} both pair as {key!r}")
        out[key] = p
    return out


def _examples(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


def pair_files(cfg: PairedConfig, file: Path) -> list[RealPair]:
    """Every LQ with its HR, sorted by key; unmatched files or clashing names are errors.
    Without references, every LQ alone."""
    lq = list_side(cfg.lq_root, cfg.lq_glob, cfg.lq_strip)
    if cfg.hr_root is None:
        if not lq:
            raise ManifestError(f"{file}: paired.lq_glob {cfg.lq_glob or '(all images)'!r} matches no images under "
                                f"{cfg.lq_root}")
        keys = sorted(lq)[: cfg.limit] if cfg.limit else sorted(lq)
        return _unique([RealPair(Path(k).name, k, lq[k], None) for k in keys], file)
    hr = list_side(cfg.hr_root, cfg.hr_glob, cfg.hr_strip)
    if not lq or not hr:
        empty = "lq" if not lq else "hr"
        root, glob = (cfg.lq_root, cfg.lq_glob) if empty == "lq" else (cfg.hr_root, cfg.hr_glob)
        raise ManifestError(f"{file}: paired.{empty}_glob {glob or '(all images)'!r} matches no images under {root}")
    only_lq, only_hr = sorted(set(lq) - set(hr)), sorted(set(hr) - set(lq))
    if only_lq or only_hr:
        lines = [f"{file}: LQ and HR files do not pair (matched by relative path without suffix and without "
                 f"lq_strip {cfg.lq_strip!r} / hr_strip {cfg.hr_strip!r}):"]
        if only_lq:
            lines.append(f"  {len(only_lq)} LQ without HR: {_examples(only_lq)}")
        if only_hr:
            lines.append(f"  {len(only_hr)} HR without LQ: {_examples(only_hr)}")
        raise ManifestError("\n".join(lines))
    keys = sorted(lq)[: cfg.limit] if cfg.limit else sorted(lq)
    return _unique([RealPair(Path(k).name, k, lq[k], hr[k]) for k in keys], file)


def _unique(pairs: list[RealPair], file: Path) -> list[RealPair]:
    clashes = _clashes(pairs)
    if clashes:
        raise ManifestError(f"{file}: pairs in different folders would share an output name: {_examples(clashes)}")
    return pairs


def _clashes(pairs: Iterable[RealPair]) -> list[str]:
    seen: dict[str, str] = {}
    out = []
    for p in pairs:
        if p.name in seen:
            out.append(f"{seen[p.name]} / {p.key}")
        seen.setdefault(p.name, p.key)
    return out


def centre_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred size² window; an odd margin leaves the extra pixel below/right."""
    if height < size or width < size:
        raise ValueError(f"LQ is {width}x{height}, smaller than the {size}x{size} crop")
    return (height - size) // 2, (width - size) // 2


def crop_pair(lq: np.ndarray, hr: np.ndarray, scale: int, lq_size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Centre lq_size² of the LQ and the HR region it depicts (its box × scale).

    Returns the two crops and the LQ box [x, y, w, h]. Raises ValueError when the HR is not
    about `scale` times the LQ (e.g. an LQ stored upsampled to the HR size) or does not
    cover the scaled box.
    """
    h, w = lq.shape[:2]
    top, left = centre_box(h, w, lq_size)
    big_h, big_w = hr.shape[:2]
    ratio_h, ratio_w = big_h / h, big_w / w
    if not (0.9 * scale <= ratio_h <= 1.1 * scale and 0.9 * scale <= ratio_w <= 1.1 * scale):
        raise ValueError(f"HR is {big_w}x{big_h} and LQ {w}x{h}: not {scale}x larger (ratio {ratio_w:.2f}); "
                         "is the LQ stored at the HR size, or is paired.scale wrong?")
    size = lq_size * scale
    y, x = top * scale, left * scale
    if y + size > big_h or x + size > big_w:
        raise ValueError(f"HR {big_w}x{big_h} does not cover the scaled box {x},{y} + {size}x{size}")
    lq_crop = np.ascontiguousarray(lq[top:top + lq_size, left:left + lq_size])
    hr_crop = np.ascontiguousarray(hr[y:y + size, x:x + size])
    return lq_crop, hr_crop, [left, top, lq_size, lq_size]


def _progress(items: list[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="pair", file=sys.stderr)


def build_paired_testset(manifest: Manifest, show_progress: bool = False) -> dict[str, Any]:
    """Crop every pair of the manifest into <output>/lq and <output>/hr; returns the listing."""
    cfg = paired_config(manifest)
    pairs = pair_files(cfg, manifest.path)
    writer = PairFolderWriter(manifest.output, references=cfg.references)
    level = manifest.degrade.png_compress_level
    meta = {"name": manifest.name, "kind": "paired" if cfg.references else "lq_only", "manifest": str(manifest.path),
            "scale": cfg.scale, "lq_size": cfg.lq_size if cfg.centre_crop else None,
            "hr_size": cfg.hr_size if cfg.references else None}
    if not cfg.references:
        for pair in _progress(pairs, show_progress, manifest.name):
            _add_lq_only(writer, pair, cfg, manifest, level)
        return writer.finish(meta)
    for pair in _progress(pairs, show_progress, manifest.name):
        try:
            lq, _ = load_source(pair.lq, max_pixels=manifest.degrade.max_pixels, min_side=1)
            hr, _ = load_source(pair.hr, max_pixels=manifest.degrade.max_pixels, min_side=1)
            lq_crop, hr_crop, box = crop_pair(lq, hr, cfg.scale, cfg.lq_size)
        except SourceError as e:
            writer.fail(pair.key, e.reason)
            continue
        except ValueError as e:
            writer.fail(pair.key, str(e))
            continue
        writer.add(pair.name, encode_png(lq_crop, level), encode_png(hr_crop, level), {
            "key": pair.key, "lq_file": str(pair.lq), "hr_file": str(pair.hr), "lq_box": box,
            "hr_box": [v * cfg.scale for v in box], "lq_source_size": [lq.shape[1], lq.shape[0]],
            "hr_source_size": [hr.shape[1], hr.shape[0]],
        })
    return writer.finish(meta)


def _add_lq_only(writer: PairFolderWriter, pair: RealPair, cfg: PairedConfig, manifest: Manifest, level: int) -> None:
    """One LQ image of a set without references: whole, or its centre lq_size²."""
    try:
        lq, _ = load_source(pair.lq, max_pixels=manifest.degrade.max_pixels, min_side=1)
        size = [lq.shape[1], lq.shape[0]]
        box = [0, 0, *size]
        if cfg.centre_crop:
            top, left = centre_box(lq.shape[0], lq.shape[1], cfg.lq_size)
            lq = np.ascontiguousarray(lq[top:top + cfg.lq_size, left:left + cfg.lq_size])
            box = [left, top, cfg.lq_size, cfg.lq_size]
    except SourceError as e:
        writer.fail(pair.key, e.reason)
        return
    except ValueError as e:
        writer.fail(pair.key, str(e))
        return
    writer.add(pair.name, encode_png(lq, level), None,
               {"key": pair.key, "lq_file": str(pair.lq), "lq_box": box, "lq_source_size": size})
