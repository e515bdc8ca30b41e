"""The results JSON (one table per dataset, one row per method) and its Markdown rendering.

  {"version": 1, "metrics": {key: {label, higher_better}}, "datasets": {name: {"rows": [row, ...]}}}

A row is `EvalResult.row()`: method, images, scores, not_computed (metric -> reason),
not_applicable (metric keys; absent when every metric applies), settings, seconds, date.
A rerun of a method replaces its row. In Markdown a not-computed cell is `-` (its reason
under the table) and a not-applicable one `n/a`; the best value of a column is bold when
two or more rows have one; digits are the paper's (PSNR, MUSIQ, FID 2; others 4).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.evaluation.metrics import METRICS, format_value

TABLE_VERSION = 1
MISSING = "-"  # a not-computed cell
NOT_APPLICABLE = "n/a"  # a metric that cannot exist for the data (full-reference, no references)


def new_table() -> dict[str, Any]:
    return {"version": TABLE_VERSION, "metrics": {k: {"label": s.label, "higher_better": s.higher_better}
                                                  for k, s in METRICS.items()}, "datasets": {}}


def is_table(data: Any) -> bool:
    return isinstance(data, dict) and data.get("version") == TABLE_VERSION and isinstance(data.get("datasets"), dict)


def load_table(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not is_table(table):
        raise ValueError(f"{path}: not an evaluation table of version {TABLE_VERSION} (written by model/evaluate.py)")
    return table


def add_row(table: dict[str, Any], dataset: str, row: dict[str, Any]) -> str:
    """Add a method's row to a dataset's table; a row of the same method is replaced (a rerun
    must not leave two rows for one method). Returns "added" or "replaced"."""
    rows = table["datasets"].setdefault(dataset, {"rows": []})["rows"]
    for i, old in enumerate(rows):
        if old.get("method") == row["method"]:
            rows[i] = row
            return "replaced"
    rows.append(row)
    return "added"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in list(r.get("scores", {})) + list(r.get("not_computed", {})) + list(r.get("not_applicable", [])):
            seen.setdefault(k, None)
    known = [k for k in METRICS if k in seen]
    return known + [k for k in seen if k not in METRICS]


def best_rows(values: dict[str, str], higher_better: bool) -> set[str]:
    """Row ids to bold: the best displayed value, when two or more rows have one."""
    if len(values) < 2:
        return set()
    nums = {m: float(s) for m, s in values.items()}
    best = max(nums.values()) if higher_better else min(nums.values())
    return {m for m, v in nums.items() if v == best}


def cell(row: dict[str, Any], key: str) -> str:
    """A row's cell as shown: the score, `n/a` or `-`."""
    if key in row.get("scores", {}):
        return format_value(METRICS.get(key), row["scores"][key])
    return NOT_APPLICABLE if key in row.get("not_applicable", []) else MISSING


def render_dataset(dataset: str, rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: rows = methods, columns = metrics with arrows, best in bold."""
    cols = _columns(rows)
    head = ["Method"] + [METRICS[k].header if k in METRICS else k for k in cols]
    lines = [f"## {dataset}", "", "| " + " | ".join(head) + " |", "|:--" + "|--:" * len(cols) + "|"]
    best = {}
    for k in cols:
        shown = {r["method"]: cell(r, k) for r in rows if k in r.get("scores", {})}
        best[k] = best_rows(shown, METRICS[k].higher_better) if k in METRICS else set()
    for r in rows:
        cells = [r["method"]]
        for k in cols:
            text = cell(r, k)
            cells.append(f"**{text}**" if r["method"] in best[k] else text)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [note for r in rows for note in _not_computed_notes(r)]
    if notes:
        lines += ["", f"Not computed ({MISSING}):", "", *notes]
    if any(r.get("not_applicable") for r in rows):
        lines += ["", f"{NOT_APPLICABLE}: not applicable (a full-reference metric on images without references)."]
    return "\n".join(lines) + "\n"


def _not_computed_notes(row: dict[str, Any]) -> list[str]:
    """One line per method and reason (first line only), naming the metrics it covers."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in row.get("not_computed", {}).items():
        label = METRICS[key].label if key in METRICS else key
        by_reason.setdefault(reason.splitlines()[0] if reason else "?", []).append(label)
    return [f"- {row['method']}, {', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]


def render_markdown(table: dict[str, Any]) -> str:
    """Every dataset of the table, in the order they were first added."""
    parts = [render_dataset(name, d["rows"]) for name, d in table["datasets"].items() if d.get("rows")]
    return "\n".join(parts)


def write_per_image(path: Path, scores: Sequence[str], per_image: dict[str, dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *scores])
        for name, vals in per_image.items():
            w.writerow([name, *(repr(vals[k]) if k in vals else "" for k in scores)])


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
