"""The paper's Tables I–VI from a folder of results, the paper's own numbers beside ours.

The layout (which datasets, rows and columns each table has) and every number taken from
the paper live in `paper_numbers.json`, each number with the place it was read from.
Ours come from a results folder (docs/evaluation.md, "Paper tables"):

  *.json              evaluation tables written by model/evaluate.py (any number of them)
  <row>.summary.json  `python -m model.summary --manifest M --json` for that row (Table VI)
  <row>.complexity.json  {"seconds_per_image": s, "device": "...", "one_stage": true} (Table VI)

An evaluation row belongs to a table row when its method name is the row's id (or one of
its aliases), compared without case and punctuation: `--name no_fft` is Table IV's
"without L_fft". Nothing is ever filled in: a number neither the results nor the paper
file hold is shown as `missing`; one a metric could not compute is `-` (the evaluation
JSON keeps why); one that cannot exist (full-reference on RealLR200) is `n/a`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from model.evaluation.metrics import METRICS, format_value
from model.evaluation.tables import MISSING, NOT_APPLICABLE, is_table

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.json")
GENERATED_BY = "jobs/paper_tables.py"
ABSENT = "missing"
# Table VI's columns: label, decimals (None: yes/no). The paper's arrows for them are not known here.
COMPLEXITY_COLUMNS: dict[str, tuple[str, int | None]] = {
    "trainable_params_m": ("Trainable params (M)", 2),
    "seconds_per_image": ("Inference time (s per 512²)", 2),
    "one_stage": ("One-stage training", None),
}


class ResultsError(ValueError):
    """The results folder or the paper file cannot be read as documented; names the file."""


def norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


# --------------------------------------------------------------------------- inputs


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict[str, Any]:
    """The layout and the paper's numbers, checked: every number names a known table, row and column."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read the paper's numbers ({e})") from None
    tables = data.get("tables")
    if not isinstance(tables, dict) or not isinstance(data.get("numbers"), list):
        raise ResultsError(f"{path}: expected {{\"tables\": {{...}}, \"numbers\": [...]}}")
    for i, n in enumerate(data["numbers"]):
        where = f"{path}: numbers[{i}]"
        t = tables.get(n.get("table"))
        if t is None:
            raise ResultsError(f"{where}: unknown table {n.get('table')!r}")
        if norm(n.get("row", "")) not in {norm(r["id"]) for r in t["rows"]}:
            raise ResultsError(f"{where}: table {n['table']} has no row {n.get('row')!r}")
        if n.get("column") not in t["columns"]:
            raise ResultsError(f"{where}: table {n['table']} has no column {n.get('column')!r}")
        if not n.get("source"):
            raise ResultsError(f"{where}: every number needs its source")
        if t["kind"] == "metrics" and n.get("dataset") not in t["datasets"]:
            raise ResultsError(f"{where}: table {n['table']} needs a dataset among {t['datasets']}")
        if t["kind"] == "ablation" and not n.get("dataset"):
            raise ResultsError(f"{where}: an ablation number needs the dataset it was measured on")
    return data


@dataclasses.dataclass
class Results:
    """What a results folder holds, indexed by normalised names."""

    evaluations: dict[tuple[str, str], tuple[dict[str, Any], str, Path]] = dataclasses.field(default_factory=dict)
    dataset_names: dict[str, str] = dataclasses.field(default_factory=dict)  # norm -> as written
    summaries: dict[str, tuple[dict[str, Any], Path]] = dataclasses.field(default_factory=dict)
    complexity: dict[str, tuple[dict[str, Any], Path]] = dataclasses.field(default_factory=dict)
    ignored: list[Path] = dataclasses.field(default_factory=list)

    def methods(self, dataset: str) -> list[str]:
        """Methods with a row for `dataset`, in the order the files gave them."""
        return [row["method"] for (d, _), (row, _, _) in self.evaluations.items() if d == norm(dataset)]


def collect_results(folder: Path) -> Results:
    """Every results file below `folder` (see the module docstring); duplicates are errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsError(f"--results {folder}: not a folder")
    out = Results()
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ResultsError(f"{path}: not readable JSON ({e})") from None
        name = path.name
        if isinstance(data, dict) and data.get("generated_by") == GENERATED_BY:
            continue  # an earlier output of this command
        if name.endswith(".summary.json"):
            if not isinstance(data, dict) or not isinstance(data.get("trainable_total"), int):
                raise ResultsError(f"{path}: not `python -m model.summary --json` output (no integer trainable_total)")
            _put(out.summaries, norm(name[: -len(".summary.json")]), (data, path), path)
        elif name.endswith(".complexity.json"):
            if not isinstance(data, dict):
                raise ResultsError(f"{path}: expected an object like {{\"seconds_per_image\": 8.8, \"one_stage\": true}}")
            _put(out.complexity, norm(name[: -len(".complexity.json")]), (data, path), path)
        elif is_table(data):
            for dataset, block in data["datasets"].items():
                out.dataset_names.setdefault(norm(dataset), dataset)
                for row in block.get("rows", []):
                    _put(out.evaluations, (norm(dataset), norm(row["method"])), (row, dataset, path), path)
        else:
            out.ignored.append(path)
    return out


def _put(index: dict[Any, Any], key: Any, value: Any, path: Path) -> None:
    if key in index:
        other = index[key][-1]
        raise ResultsError(f"{path} and {other} both give {key!r}; keep one (a table must not choose between them)")
    index[key] = value


# ------------------------------------------------------------------------ building


def _cell(value: Any, state: str, source: str | None = None, reason: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"value": value, "state": state}
    if source:
        c["source"] = source
    if reason:
        c["reason"] = reason
    return c


def _ours_metric(row: dict[str, Any] | None, key: str) -> dict[str, Any]:
    if row is None:
        return _cell(None, "missing")
    if key in row.get("scores", {}):
        return _cell(float(row["scores"][key]), "ok")
    if key in row.get("not_applicable", []):
        return _cell(None, "not_applicable")
    if key in row.get("not_computed", {}):
        return _cell(None, "not_computed", reason=row["not_computed"][key])
    return _cell(None, "missing")


def _paper_cell(numbers: dict[tuple[str, str, str, str], dict[str, Any]], table: dict[str, Any], tid: str,
                row_id: str, col: str, dataset: str | None) -> dict[str, Any]:
    n = numbers.get((tid, norm(row_id), col, norm(dataset or "")))
    if n is not None:
        return _cell(n["value"], "ok", source=n["source"])
    if dataset is not None and col in table.get("not_applicable", {}).get(dataset, []):
        return _cell(None, "not_applicable")
    return _cell(None, "missing")


def _row_names(row: dict[str, Any]) -> set[str]:
    return {norm(row["id"]), *(norm(a) for a in row.get("aliases", []))}


def _find_eval(results: Results, dataset: str, layout_row: dict[str, Any]) -> dict[str, Any] | None:
    for name in _row_names(layout_row):
        hit = results.evaluations.get((norm(dataset), name))
        if hit is not None:
            return hit[0]
    return None


def _metric_block(tid: str, table: dict[str, Any], dataset: str | None, rows: list[dict[str, Any]],
                  results: Results, numbers: dict[Any, Any]) -> dict[str, Any]:
    cols = table["columns"]
    out_rows = []
    for lr in rows:
        ev = _find_eval(results, dataset, lr) if dataset is not None else None
        out_rows.append({
            "id": lr["id"], "label": lr.get("label", lr["id"]),
            "ours": {c: _ours_metric(ev, c) for c in cols},
            "paper": {c: _paper_cell(numbers, table, tid, lr["id"], c, dataset) for c in cols},
        })
    return {"dataset": dataset, "columns": [_column(c) for c in cols], "rows": out_rows}


def _column(key: str) -> dict[str, Any]:
    if key in METRICS:
        spec = METRICS[key]
        return {"key": key, "label": spec.label, "arrow": "↑" if spec.higher_better else "↓", "digits": spec.digits}
    label, digits = COMPLEXITY_COLUMNS[key]
    return {"key": key, "label": label, "arrow": None, "digits": digits}


def _metrics_table(tid: str, table: dict[str, Any], results: Results, numbers: dict[Any, Any],
                   ablation_ids: set[str]) -> list[dict[str, Any]]:
    blocks = []
    for dataset in table["datasets"]:
        rows = list(table["rows"])
        known = set().union(*(_row_names(r) for r in rows)) | ablation_ids  # ablation runs belong to III–V
        for method in results.methods(dataset):  # methods of ours the layout does not list
            if norm(method) not in known:
                rows.append({"id": method, "label": method})
                known.add(norm(method))
        blocks.append(_metric_block(tid, table, dataset, rows, results, numbers))
    return blocks


def _ablation_table(tid: str, table: dict[str, Any], results: Results, numbers: dict[Any, Any],
                    ablation_ids: set[str]) -> list[dict[str, Any]]:
    # A block per dataset some variant was evaluated on; the full model's row (the
    # baseline, also named SSP-IR) joins those blocks but does not open one of its own.
    names = set().union(*(_row_names(r) for r in table["rows"] if not r.get("baseline")))
    datasets = [d for d in results.dataset_names if any((d, n) in results.evaluations for n in names)]
    datasets += [norm(n["dataset"]) for n in numbers.values() if n["table"] == tid and n.get("dataset")
                 and norm(n["dataset"]) not in datasets]
    if not datasets:
        return [_metric_block(tid, table, None, table["rows"], results, numbers)]
    shown = [results.dataset_names.get(d, d) for d in datasets]
    return [_metric_block(tid, table, d, table["rows"], results, numbers) for d in shown]


def _ours_complexity(results: Results, layout_row: dict[str, Any], col: str) -> dict[str, Any]:
    for name in _row_names(layout_row):
        if col == "trainable_params_m" and name in results.summaries:
            data, path = results.summaries[name]
            return _cell(data["trainable_total"] / 1e6, "ok", source=str(path))
        if col != "trainable_params_m" and name in results.complexity:
            data, path = results.complexity[name]
            if col in data:
                return _cell(data[col], "ok", source=str(path) + (f" ({data['device']})" if data.get("device") else ""))
    return _cell(None, "missing")


def _complexity_table(tid: str, table: dict[str, Any], results: Results, numbers: dict[Any, Any],
                      ablation_ids: set[str]) -> list[dict[str, Any]]:
    rows = list(table["rows"])
    known = set().union(*(_row_names(r) for r in rows))
    for name in list(results.summaries) + list(results.complexity):
        if name not in known:
            path = (results.summaries.get(name) or results.complexity[name])[-1]
            label = path.name.split(".")[0]
            rows.append({"id": label, "label": label})
            known.add(name)
    out_rows = [{"id": r["id"], "label": r.get("label", r["id"]),
                 "ours": {c: _ours_complexity(results, r, c) for c in table["columns"]},
                 "paper": {c: _paper_cell(numbers, table, tid, r["id"], c, None) for c in table["columns"]}}
                for r in rows]
    return [{"dataset": None, "columns": [_column(c) for c in table["columns"]], "rows": out_rows}]


def build_tables(results: Results, paper: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of Tables I–VI: per table, blocks (one per dataset) of rows with
    `ours` and `paper` cells {value, state ("ok" | "missing" | "not_computed" |
    "not_applicable"), source, reason}."""
    numbers = {(n["table"], norm(n["row"]), n["column"], norm(n.get("dataset") or "")): n for n in paper["numbers"]}
    build = {"metrics": _metrics_table, "ablation": _ablation_table, "complexity": _complexity_table}
    ablation_ids = {norm(r["id"]) for t in paper["tables"].values() if t["kind"] == "ablation" for r in t["rows"]}
    tables = []
    for tid, table in paper["tables"].items():
        tables.append({"id": tid, "title": table["title"], "kind": table["kind"],
                       "layout_source": table.get("layout_source", ""),
                       "blocks": build[table["kind"]](tid, table, results, numbers, ablation_ids)})
    return {"generated_by": GENERATED_BY, "paper": paper.get("paper", {}), "tables": tables,
            "ignored_files": [str(p) for p in results.ignored]}


# ----------------------------------------------------------------------- rendering


def cell_text(cell: dict[str, Any], column: dict[str, Any]) -> str:
    state = cell["state"]
    if state == "not_applicable":
        return NOT_APPLICABLE
    if state == "not_computed":
        return MISSING
    if state == "missing":
        return ABSENT
    value = cell["value"]
    if column["digits"] is None:
        return "yes" if value else "no"
    return format_value(METRICS.get(column["key"]), value, column["digits"])


def render_markdown(tables: dict[str, Any]) -> str:
    lines = ["# SSP-IR: the paper's Tables I–VI, ours beside the paper's", "",
             f"`ours`: these results; `paper`: the paper's number (model/evaluation/paper_numbers.json names the "
             f"source of each); `{ABSENT}`: no number (never filled in); `{MISSING}`: not computed (the evaluation "
             f"JSON keeps the reason); `{NOT_APPLICABLE}`: cannot exist for this data.", ""]
    for t in tables["tables"]:
        lines += [f"## Table {t['id']}: {t['title']}", ""]
        for block in t["blocks"]:
            if block["dataset"] is not None:
                lines += [f"### {block['dataset']}", ""]
            elif t["kind"] == "ablation":
                lines += ["(no results for these rows yet, and the paper's numbers for them are not on file)", ""]
            cols = block["columns"]
            head = ["Method", ""] + [c["label"] + (c["arrow"] or "") for c in cols]
            lines += ["| " + " | ".join(head) + " |", "|:--|:--" + "|--:" * len(cols) + "|"]
            for r in block["rows"]:
                for side in ("ours", "paper"):
                    label = r["label"] if side == "ours" else ""
                    cells = [cell_text(r[side][c["key"]], c) for c in cols]
                    lines.append("| " + " | ".join([label, side, *cells]) + " |")
            lines.append("")
    if tables.get("ignored_files"):
        lines += ["Files in the results folder that are none of the documented kinds (ignored):", ""]
        lines += [f"- {p}" for p in tables["ignored_files"]] + [""]
    return "\n".join(lines)


def paper_tables(results_dir: Path, paper_file: Path = PAPER_NUMBERS) -> tuple[dict[str, Any], str]:
    """(JSON, Markdown) of Tables I–VI for a results folder."""
    tables = build_tables(collect_results(results_dir), load_paper_numbers(paper_file))
    return tables, render_markdown(tables)
