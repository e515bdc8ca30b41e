#!/usr/bin/env python
"""The paper's Tables I–VI from a folder of results, the paper's own numbers beside ours.

  python jobs/paper_tables.py --results results/ [--markdown FILE] [--json FILE]

The folder holds evaluation tables written by model/evaluate.py (`--out`), and for Table VI
`<row>.summary.json` (`python -m model.summary --manifest M --json`) and
`<row>.complexity.json` files; docs/evaluation.md ("Paper tables") describes them and how
rows are matched. Numbers nobody has are shown as `missing`, never filled in. Writes
<results>/paper_tables.md and <results>/paper_tables.json unless told otherwise, and prints
the Markdown.

Exit status: 0 done; 2 the folder or a file in it is not as documented (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.evaluation.paper import PAPER_NUMBERS, ResultsError, paper_tables  # noqa: E402
from model.evaluation.tables import atomic_write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, type=Path, help="folder of results files (searched recursively)")
    ap.add_argument("--paper", type=Path, default=PAPER_NUMBERS,
                    help="the paper's layout and numbers (default: model/evaluation/paper_numbers.json)")
    ap.add_argument("--markdown", type=Path, help="Markdown output (default: <results>/paper_tables.md)")
    ap.add_argument("--json", type=Path, help="JSON output (default: <results>/paper_tables.json)")
    args = ap.parse_args(argv)
    try:
        tables, markdown = paper_tables(args.results, args.paper)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write(args.markdown or args.results / "paper_tables.md", markdown)
    atomic_write(args.json or args.results / "paper_tables.json",
                 json.dumps(tables, indent=1, ensure_ascii=False) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
