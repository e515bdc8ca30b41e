"""jobs/paper_tables.py and model/evaluation/paper.py: Tables I–VI in the paper's layout.

The central check: results files made from the paper's own numbers render exactly the
paper's numbers in the `ours` cells, cell for cell, in both JSON and Markdown — and every
cell the paper file has no number for stays `missing` on both sides."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import run_script
from model.evaluation import paper as pp
from model.evaluation.tables import add_row, new_table


def results_from_numbers(paper: dict[str, Any], folder: Path) -> Path:
    """The results folder a perfect reproduction would leave: one evaluation table with a
    row per (dataset, row) the paper has numbers for, and Table VI's summary/complexity files."""
    folder.mkdir(parents=True, exist_ok=True)
    table = new_table()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    complexity: dict[str, dict[str, Any]] = {}
    for n in paper["numbers"]:
        if n["table"] == "VI" or paper["tables"][n["table"]]["kind"] == "complexity":
            if n["column"] == "trainable_params_m":
                summaries[n["row"]] = {"trainable_total": round(n["value"] * 1_000_000), "frozen": {}}
            else:
                complexity.setdefault(n["row"], {})[n["column"]] = n["value"]
            continue
        rows.setdefault((n["dataset"], n["row"]), {"method": n["row"], "scores": {}})["scores"][n["column"]] = n["value"]
    for (dataset, _), row in rows.items():
        add_row(table, dataset, row)
    (folder / "results.json").write_text(json.dumps(table))
    for name, data in summaries.items():
        (folder / f"{name}.summary.json").write_text(json.dumps(data))
    for name, data in complexity.items():
        (folder / f"{name}.complexity.json").write_text(json.dumps(data))
    return folder


def _cells(tables: dict[str, Any]) -> dict[tuple[str, str | None, str, str], tuple[dict, dict, dict]]:
    out = {}
    for t in tables["tables"]:
        for b in t["blocks"]:
            for r in b["rows"]:
                for c in b["columns"]:
                    out[(t["id"], b["dataset"], pp.norm(r["id"]), c["key"])] = (r["ours"][c["key"]],
                                                                                r["paper"][c["key"]], c)
    return out


def _markdown_cells(markdown: str) -> dict[tuple[str, str | None, str, str], dict[str, str]]:
    """(table, dataset, row label, side) -> {column header: cell text}, read back from the Markdown."""
    out: dict[tuple[str, str | None, str, str], dict[str, str]] = {}
    table = dataset = label = None
    header: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("## Table "):
            table, dataset = line[len("## Table "):].split(":")[0], None
        elif line.startswith("### "):
            dataset = line[4:]
        elif line.startswith("| Method |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and not line.startswith("|:"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            label = cells[0] or label
            out[(table, dataset, label, cells[1])] = dict(zip(header[2:], cells[2:]))
    return out


def _check_reproduces(paper: dict[str, Any], tables: dict[str, Any], markdown: str) -> int:
    cells = _cells(tables)
    keyed = {(n["table"], n.get("dataset"), pp.norm(n["row"]), n["column"]) for n in paper["numbers"]}
    checked = 0
    for (tid, dataset, row, col), (ours, theirs, column) in cells.items():
        if (tid, dataset, row, col) in keyed:
            assert theirs["state"] == "ok" and ours["state"] == "ok", (tid, dataset, row, col)
            assert ours["value"] == theirs["value"], (tid, dataset, row, col, ours, theirs)  # exactly
            assert pp.cell_text(ours, column) == pp.cell_text(theirs, column)
            checked += 1
        else:  # nothing filled in where the paper file has no number
            assert ours["state"] == "missing", (tid, dataset, row, col, ours)
            assert theirs["state"] in ("missing", "not_applicable"), (tid, dataset, row, col, theirs)
    assert checked == len(paper["numbers"])  # every number landed in exactly one cell
    md = _markdown_cells(markdown)
    for n in paper["numbers"]:  # and the Markdown shows it on both lines of its row
        table = paper["tables"][n["table"]]
        label = next(r.get("label", r["id"]) for r in table["rows"] if pp.norm(r["id"]) == pp.norm(n["row"]))
        column = pp._column(n["column"])
        head = column["label"] + (column["arrow"] or "")
        want = pp.cell_text({"value": n["value"], "state": "ok"}, column)
        assert md[(n["table"], n.get("dataset"), label, "ours")][head] == want, n
        assert md[(n["table"], n.get("dataset"), label, "paper")][head] == want, n
    return checked


def test_reproduces_the_papers_own_numbers(tmp_path: Path) -> None:
    paper = pp.load_paper_numbers()
    assert {n["column"] for n in paper["numbers"]} == {"trainable_params_m", "seconds_per_image"}
    tables, markdown = pp.paper_tables(results_from_numbers(paper, tmp_path / "r"))
    assert _check_reproduces(paper, tables, markdown) == 2
    vi = next(t for t in tables["tables"] if t["id"] == "VI")["blocks"][0]
    assert vi["rows"][0]["paper"]["trainable_params_m"]["value"] == 997.80
    assert "| SSP-IR | ours | 997.80 | 8.82 | missing |" in markdown
    assert "|  | paper | 997.80 | 8.82 | missing |" in markdown


def _full_fixture() -> dict[str, Any]:
    """The real layout with a made-up number in every kind of table (not the paper's: the
    real file has Table VI's only), to exercise Tables I–V the same way."""
    paper = copy.deepcopy(pp.load_paper_numbers())
    src = "test fixture, not the paper"
    paper["numbers"] += [
        {"table": "I", "row": "SSP-IR", "dataset": "DIV2K-Val", "column": "psnr", "value": 23.54, "source": src},
        {"table": "I", "row": "SSP-IR", "dataset": "DIV2K-Val", "column": "lpips", "value": 0.3113, "source": src},
        {"table": "I", "row": "SSP-IR", "dataset": "LSDIR-Val", "column": "fid", "value": 27.15, "source": src},
        {"table": "II", "row": "SSP-IR", "dataset": "RealLR200", "column": "musiq", "value": 70.03, "source": src},
        {"table": "II", "row": "SSP-IR", "dataset": "RealLR200", "column": "maniqa", "value": 0.6598, "source": src},
        {"table": "III", "row": "text_null", "dataset": "DRealSR", "column": "clip_i", "value": 0.8876, "source": src},
        {"table": "IV", "row": "no_fft", "dataset": "DRealSR", "column": "ssim", "value": 0.7012, "source": src},
        {"table": "V", "row": "no_attention", "dataset": "DRealSR", "column": "psnr", "value": 27.8, "source": src},
    ]
    return paper


def test_reproduces_numbers_in_every_kind_of_table(tmp_path: Path) -> None:
    paper = _full_fixture()
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(paper))
    tables, markdown = pp.paper_tables(results_from_numbers(paper, tmp_path / "r"), path)
    assert _check_reproduces(paper, tables, markdown) == len(paper["numbers"])
    assert "| SSP-IR | ours | 23.54 | missing | 0.3113 |" in markdown
    assert "|  | paper | n/a | n/a | n/a | n/a | n/a | missing | 0.6598 | 70.03 | missing | n/a |" in markdown
    assert "| without image and structure attention | ours | 27.80 |" in markdown
    assert "### DRealSR" in markdown.split("## Table V")[1]


def test_our_extra_rows_and_states(tmp_path: Path) -> None:
    """A method the paper file has no row for is shown with its paper line missing; a
    not-computed metric is `-`, a not-applicable one `n/a`, an absent one `missing`."""
    folder = tmp_path / "r"
    folder.mkdir()
    table = new_table()
    add_row(table, "reallr200", {"method": "SeeSR", "scores": {"musiq": 68.1}, "not_computed": {"maniqa": "no file"},
                                 "not_applicable": ["psnr", "ssim", "lpips", "dists", "clip_i", "fid"]})
    add_row(table, "DRealSR", {"method": "no-image-attention", "scores": {"psnr": 28.1234}})
    (folder / "a.json").write_text(json.dumps(table))
    (folder / "notes.json").write_text(json.dumps({"what": "something else"}))
    (folder / "no_attention.summary.json").write_text(json.dumps({"trainable_total": 612_345_678}))
    tables, md = pp.paper_tables(folder)
    assert "| SeeSR | ours | n/a | n/a | n/a | n/a | n/a | missing | - | 68.10 | missing | n/a |" in md
    real = md.split("### RealLR200")[1]
    assert "|  | paper | n/a | n/a | n/a | n/a | n/a | missing | missing | missing | missing | n/a |" in real
    v = md.split("## Table V")[1].split("## Table VI")[0]
    assert "### DRealSR" in v and "| without image attention | ours | 28.12 |" in v
    assert "| no_attention | ours | 612.35 | missing | missing |" in md.split("## Table VI")[1]
    assert tables["ignored_files"] == [str(folder / "notes.json")] and "notes.json" in md


def test_bad_results_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    (folder / "sub").mkdir(parents=True)
    table = new_table()
    add_row(table, "DIV2K-Val", {"method": "SSP-IR", "scores": {"psnr": 1.0}})
    (folder / "a.json").write_text(json.dumps(table))
    (folder / "sub" / "b.json").write_text(json.dumps(table))
    with pytest.raises(pp.ResultsError, match=r"b\.json and .*a\.json both give"):
        pp.collect_results(folder)
    (folder / "sub" / "b.json").write_text("{not json")
    with pytest.raises(pp.ResultsError, match=r"b\.json: not readable JSON"):
        pp.collect_results(folder)
    (folder / "sub" / "b.json").unlink()
    (folder / "x.summary.json").write_text(json.dumps({"trainable": 3}))
    with pytest.raises(pp.ResultsError, match="no integer trainable_total"):
        pp.collect_results(folder)
    bad = pp.load_paper_numbers()
    bad["numbers"].append({"table": "VI", "row": "SSP-IR", "column": "seconds_per_image", "value": 1.0})
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(pp.ResultsError, match="needs its source"):
        pp.load_paper_numbers(tmp_path / "p.json")
    bad["numbers"][-1].update(source="x", row="Nobody")
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(pp.ResultsError, match="has no row 'Nobody'"):
        pp.load_paper_numbers(tmp_path / "p.json")


def test_cli_writes_both_files_and_reruns_cleanly(tmp_path: Path) -> None:
    folder = results_from_numbers(pp.load_paper_numbers(), tmp_path / "r")
    first = run_script("jobs/paper_tables.py", "--results", str(folder))
    assert first.returncode == 0, first.stderr
    assert "## Table VI: Complexity" in first.stdout
    again = run_script("jobs/paper_tables.py", "--results", str(folder))  # its own outputs are not results
    assert again.returncode == 0 and again.stdout == first.stdout
    data = json.loads((folder / "paper_tables.json").read_text())
    assert [t["id"] for t in data["tables"]] == ["I", "II", "III", "IV", "V", "VI"]
    assert (folder / "paper_tables.md").read_text() + "\n" == first.stdout
    missing = run_script("jobs/paper_tables.py", "--results", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr
    assert run_script("jobs/paper_tables.py", "--help").returncode == 0
