"""Every manifest shipped in manifests/ (subfolders included, found by globbing, so a new
one is covered the day it is added) loads through the real `load_manifest`.

Each `${VAR}` a manifest names is set to a folder of its own, the source roots and the
`paired` roots it points at are created there (empty: loading checks the layout, planning
is tested elsewhere), and relative paths resolve inside a scratch working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.core.manifest import load_manifest
from pipeline.testsets.paired import paired_config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "manifests").rglob("*.json"))
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def test_the_glob_finds_the_shipped_manifests() -> None:
    names = {p.relative_to(ROOT / "manifests").as_posix() for p in MANIFESTS}
    assert {"demo.json", "demo_heldout.json", "full.json", "div2k_val.json", "lsdir_val.json", "realsr_val.json",
            "drealsr_val.json", "reallr200.json"} <= names


def _variables(path: Path, seen: set[Path] | None = None) -> set[str]:
    """${VAR}s of a manifest and of every manifest it extends (by file name, as written)."""
    seen = seen or set()
    text = path.read_text()
    found = set(VAR.findall(text))
    seen.add(path)
    for parent in re.findall(r'"extends"\s*:\s*"([^"]+)"', text):
        p = (path.parent / parent).resolve()
        if p.is_file() and p not in seen:
            found |= _variables(p, seen)
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(ROOT / "manifests").as_posix())
def test_manifest_loads(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _variables(path):
        monkeypatch.setenv(var, str(tmp_path / "env" / var))
    monkeypatch.chdir(tmp_path)
    first = load_manifest(path, check_sources=False)
    assert first.name and isinstance(first.seed, int)
    assert first.output.is_absolute() and tmp_path in first.output.parents  # never outside what was set up
    for source in first.sources:
        source.root.mkdir(parents=True, exist_ok=True)
    if first.sources:
        checked = load_manifest(path)  # with the source roots checked, as jobs/degrade.py loads it
        assert [s.name for s in checked.sources] == [s.name for s in first.sources]
        assert checked.degrade.gt_size % checked.degrade.scale == 0
    if "paired" in first.raw:
        section = first.section("paired")
        for key in ("lq_root", "hr_root"):
            if key in section:
                root = Path(section[key])
                (root if root.is_absolute() else tmp_path / root).mkdir(parents=True, exist_ok=True)
        cfg = paired_config(first)
        assert cfg.lq_root.is_dir() and (cfg.hr_root is None or cfg.hr_root.is_dir())
    assert first.sources or "paired" in first.raw, f"{path.name}: neither sources to degrade nor a paired section"
