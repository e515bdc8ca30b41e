"""Loading and validating manifests (what to build).

A manifest is written by a person and never rewritten by a job, so every problem is
reported with the file and the JSON path of the offending key: the person has to find
and fix it by hand. Sections owned by later stages (caption, text_embed, train) are
checked for shape here and interpreted by their stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.caption.config import CaptionConfig
from pipeline.degrade.config import DegradeConfig
from pipeline.embed.config import EmbedConfig
from pipeline.core.image_io import IMAGE_SUFFIXES  # noqa: F401  (re-exported for source listing)

TOP_LEVEL_KEYS = {
    "extends": str,  # a parent manifest (path relative to this file) whose keys this one overrides
    "name": str,
    "description": str,
    "seed": int,
    "output": str,
    "sources": list,
    "degrade": dict,
    "caption": dict,
    "text_embed": dict,
    "train": dict,
    "model": dict,
    "paired": dict,  # real LQ/HR test pairs (pipeline/testsets/paired.py)
    "latents": dict,  # VAE moments of the HQ crops (pipeline/latents/)
}
SOURCE_KEYS = {"name": str, "root": str, "glob": str, "limit": int}
REQUIRED = ("name", "seed", "output", "sources")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ManifestError(ValueError):
    """A manifest that cannot be built; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    root: Path
    glob: str | None = None
    limit: int | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    seed: int
    output: Path
    sources: tuple[Source, ...]
    degrade: DegradeConfig
    caption: CaptionConfig
    text_embed: EmbedConfig
    raw: dict[str, Any]
    chain: tuple[Path, ...] = ()  # this file, then the manifests it extends, nearest first

    def section(self, key: str) -> dict[str, Any]:
        """A later stage's section, already ${VAR}-expanded (empty if absent)."""
        return dict(self.raw.get(key, {}))

    def settings(self, cls: type, key: str) -> Any:
        """A section parsed into `cls` with the same checks as the built-in sections
        (stages outside `pipeline`, like the trainer, own their settings classes)."""
        return section_config(cls, key, self.section(key), self.path)


def _expand(value: Any, where: str, file: Path) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            var = m.group(1)
            if var not in os.environ:
                raise ManifestError(
                    f"{file}: {where} uses ${{{var}}} but the environment variable {var} is not set; "
                    f"export {var}=... before running"
                )
            return os.environ[var]

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k, file) for k, v in value.items()}
    return value


def _type_name(t: type | tuple[type, ...]) -> str:
    return t.__name__ if isinstance(t, type) else " or ".join(x.__name__ for x in t)


def _check_type(value: Any, expected: type | tuple[type, ...], where: str, file: Path) -> None:
    # JSON has no int/bool distinction worth trusting: True is an int in Python.
    if isinstance(value, bool) and expected is not bool:
        ok = False
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ManifestError(
            f"{file}: {where} should be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )


def section_config(cls: type, name: str, section: dict[str, Any], file: Path) -> Any:
    """Type-check a settings section against a frozen dataclass's fields and defaults."""
    fields = {f.name for f in dataclasses.fields(cls)}
    defaults = cls()
    variable = getattr(cls, "VARIABLE_LENGTH", frozenset())
    for key, value in section.items():
        if key not in fields:
            close = [k for k in sorted(fields) if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ManifestError(f"{file}: unknown key {name}.{key}{hint}")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            _check_type(value, list, f"{name}.{key}", file)
            if default and len(value) != len(default) and key not in variable:
                raise ManifestError(f"{file}: {name}.{key} should have {len(default)} entries, got {len(value)}")
            elem = type(default[0]) if default else object
            for i, v in enumerate(value):
                _check_type(v, float if elem is float else elem, f"{name}.{key}[{i}]", file)
        else:
            _check_type(value, float if isinstance(default, float) else type(default), f"{name}.{key}", file)
    try:
        return cls.from_dict({k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()})
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{file}: {name}: {e}") from None


def _sources(items: list[Any], file: Path, base: Path) -> tuple[Source, ...]:
    if not items:
        raise ManifestError(f"{file}: sources is empty; list at least one {{\"name\", \"root\"}}")
    out, names = [], set()
    for i, item in enumerate(items):
        where = f"sources[{i}]"
        _check_type(item, dict, where, file)
        for key, value in item.items():
            if key not in SOURCE_KEYS:
                raise ManifestError(f"{file}: unknown key {where}.{key}; known: {sorted(SOURCE_KEYS)}")
            _check_type(value, SOURCE_KEYS[key], f"{where}.{key}", file)
        for key in ("name", "root"):
            if key not in item:
                raise ManifestError(f"{file}: {where} needs \"{key}\"")
        name = item["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ManifestError(
                f"{file}: {where}.name {name!r} must be unique and use only letters, digits, '_', '.', '-' "
                "(it becomes the first part of every key)"
            )
        names.add(name)
        root = Path(item["root"])
        if not root.is_absolute():
            root = base / root
        if not root.is_dir():
            raise ManifestError(f"{file}: {where}.root {str(root)!r} is not a folder (source {name!r})")
        limit = item.get("limit")
        if limit is not None and limit < 1:
            raise ManifestError(f"{file}: {where}.limit must be at least 1")
        out.append(Source(name=name, root=root, glob=item.get("glob"), limit=limit))
    return tuple(out)


def _read_json(file: Path, wanted_by: Path | None = None) -> dict[str, Any]:
    try:
        text = file.read_text()
    except OSError as e:
        how = f" (extended by {wanted_by})" if wanted_by else ""
        raise ManifestError(f"{file}: cannot read manifest{how} ({e.strerror})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{file}: the top level must be a JSON object")
    return raw


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The child's keys over the parent's: objects merge key by key, anything else
    (strings, numbers, lists such as `sources`) is replaced whole."""
    out = dict(parent)
    for k, v in child.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_resolved(file: Path) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """A manifest with every `extends` resolved (before ${VAR} expansion), and the files
    it came from. A manifest states only what it changes; a cycle or a missing parent is
    an error naming the chain."""
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    current, wanted_by = Path(file), None
    while True:
        resolved = current.resolve()
        if resolved in chain:
            loop = " -> ".join(str(p) for p in [*chain, resolved])
            raise ManifestError(f"{file}: \"extends\" forms a cycle: {loop}")
        chain.append(resolved)
        raw = _read_json(current, wanted_by)
        layers.append(raw)
        parent = raw.get("extends")
        if parent is None:
            break
        if not isinstance(parent, str) or not parent:
            raise ManifestError(f"{current}: extends should be a path to another manifest, got {parent!r}")
        wanted_by, current = current, (current.parent / parent)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = merge(merged, {k: v for k, v in layer.items() if k != "extends"})
    if len(layers) > 1:
        merged["extends"] = layers[0]["extends"]
    return merged, tuple(chain)


def load_manifest(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  check_sources: bool = True) -> Manifest:
    """Read, expand and validate a manifest. `out` (the --out flag) wins over `output`."""
    file = Path(path)
    raw, chain = read_resolved(file)
    for key, value in raw.items():
        if key not in TOP_LEVEL_KEYS:
            raise ManifestError(f"{file}: unknown key {key!r}; known: {sorted(TOP_LEVEL_KEYS)}")
        _check_type(value, TOP_LEVEL_KEYS[key], key, file)
    for key in REQUIRED:
        if key not in raw:
            raise ManifestError(f"{file}: missing required key {key!r}")
    raw = _expand(raw, "", file)
    cwd = Path.cwd()
    output = Path(out) if out is not None else Path(raw["output"])
    if not output.is_absolute():
        output = cwd / output
    if check_sources:
        sources = _sources(raw["sources"], file, cwd)
    else:
        sources = tuple(Source(s.get("name", "?"), Path(s.get("root", ".")), s.get("glob"), s.get("limit"))
                        for s in raw["sources"])
    return Manifest(
        path=file,
        name=raw["name"],
        seed=raw["seed"],
        output=output,
        sources=sources,
        degrade=section_config(DegradeConfig, "degrade", raw.get("degrade", {}), file),
        caption=section_config(CaptionConfig, "caption", raw.get("caption", {}), file),
        text_embed=section_config(EmbedConfig, "text_embed", raw.get("text_embed", {}), file),
        raw=raw,
        chain=chain,
    )


def resolved_text(path: str | os.PathLike[str]) -> tuple[str, tuple[Path, ...]]:
    """The manifest as the jobs see it (every `extends` merged, every ${VAR} expanded) as
    JSON text, and the files it was resolved from, nearest first."""
    file = Path(path)
    raw, chain = read_resolved(file)
    return json.dumps(_expand(raw, "", file), indent=2) + "\n", chain
