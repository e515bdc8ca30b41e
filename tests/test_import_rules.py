"""The one-way import rule (docs/architecture.md): `pipeline` never imports `model`; from
`pipeline`, `model` imports only `pipeline.core` and the stage libraries that inference and
training must share with the data stages so both sides compute the same thing — the chunked
CLIP encoding and its settings (`pipeline.embed.encoder`, `.config`: prompts are encoded as
the captions were) and the caption engines (`pipeline.caption.engines`, `.config`:
restoration captions an LQ as the caption stage does) — never a stage (`*.stage`). Every module's imports are read with `ast` — top-level, inside functions, and
`importlib.import_module("...")` with a literal name — so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_MAY_IMPORT = ("pipeline.core", "pipeline.embed.encoder", "pipeline.embed.config",
                    "pipeline.caption.engines", "pipeline.caption.config")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved.
    `from pkg import a` names `pkg.a` when pkg is a top-level package (a is then a
    subpackage), else `pkg`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if "." in mod:
                out.append((node.lineno, mod))
            else:
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"] or [(node.lineno, mod)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return sorted(out)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in imported_names(path, root):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if package == "pipeline" and _within(name, "model"):
                bad.append(where)
            if package == "model" and _within(name, "pipeline") and not any(_within(name, p) for p in MODEL_MAY_IMPORT):
                bad.append(where)
    return bad


def test_rule_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself, on a module written to break the rule in each way it can be broken."""
    (tmp_path / "model").mkdir()
    f = tmp_path / "model" / "_import_rule_probe.py"
    f.write_text("import pipeline.caption.stage\nfrom pipeline.core import manifest\nfrom pipeline import degrade\n"
                 "def later():\n    from pipeline.testsets.paired import pair_files\n"
                 "    import importlib\n    importlib.import_module('pipeline.caption')\n"
                 "from . import evaluation\nfrom .evaluation.metrics import psnr_y\n")
    names = [n for _, n in imported_names(f, tmp_path)]
    assert "model.evaluation" in names and "model.evaluation.metrics" in names  # relative, resolved
    assert "pipeline.core" in names  # allowed, and seen
    assert [v.split(" imports ")[1] for v in violations("model", tmp_path)] == [
        "pipeline.caption.stage", "pipeline.degrade", "pipeline.testsets.paired", "pipeline.caption"]
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "x.py").write_text("def f():\n    from model.evaluation import metrics\n")
    assert violations("pipeline", tmp_path) == ["pipeline/x.py:2 imports model.evaluation"]


@pytest.mark.parametrize("package", ["pipeline", "model"])
def test_one_way_imports(package: str) -> None:
    bad = violations(package)
    rule = ("pipeline never imports model" if package == "pipeline" else
            f"model imports from pipeline only {', '.join(MODEL_MAY_IMPORT)}")
    assert not bad, f"{rule}; found:\n  " + "\n  ".join(bad)
