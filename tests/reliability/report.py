"""Print the reliability suite's results as one table.

    python -m tests.reliability.report [FILE]

FILE defaults to ``$OOIDX_RELIABILITY_RESULTS`` or ``.reliability/results.jsonl``.
A scenario run more than once shows its latest line. Exit status: 0 when
nothing was lost and no scenario reports an error; 1 otherwise (a lost
message, an error, a crash or a forbidden request); 2 when there is no
result to show.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from tests.reliability.results import results_path

COLUMNS = [("suite", "suite"), ("scenario", "scenario"), ("faults_injected", "faults"), ("inputs_tried", "inputs"),
           ("sent", "sent"), ("confirmed", "confirmed"), ("processed", "processed"), ("lost", "lost"),
           ("duplicated", "dup"), ("errors", "errors"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]
COUNTS = ["faults_injected", "inputs_tried", "sent", "confirmed", "processed", "lost", "duplicated", "errors"]


def load(path: Path) -> List[Dict[str, Any]]:
    latest: Dict[tuple, Dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            print(f"{path}:{number}: not JSON, skipped", file=sys.stderr)
            continue
        if isinstance(row, dict) and "scenario" in row:
            latest[(row.get("suite"), row.get("scenario"))] = row
    return list(latest.values())


def _cell(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def render(rows: List[Dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: (str(r.get("suite")), str(r.get("scenario"))))
    totals: Dict[str, Any] = {"suite": "TOTAL", "scenario": f"{len(rows)} scenarios"}
    for key in COUNTS:
        totals[key] = sum(_int(r.get(key)) for r in rows)
    table = [[title for _, title in COLUMNS]]
    table += [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    table.append([_cell(totals, key) for key, _ in COLUMNS])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = []
    for i, line in enumerate(table):
        if i == len(table) - 1:
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.get('suite')}/{r.get('scenario')}: {r.get('notes')}" for r in rows if r.get("notes")]
    if notes:
        out.append("")
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


def bad(rows: List[Dict[str, Any]]) -> List[str]:
    return [f"{r.get('suite')}/{r.get('scenario')}: lost {_int(r.get('lost'))}, errors {_int(r.get('errors'))}"
            for r in rows if _int(r.get("lost")) or _int(r.get("errors"))]


def main(argv: List[str]) -> int:
    path = Path(argv[0]) if argv else results_path()
    if not path.exists():
        print(f"no results at {path}: run the reliability suite first (pytest tests/reliability)", file=sys.stderr)
        return 2
    rows = load(path)
    if not rows:
        print(f"{path}: no results", file=sys.stderr)
        return 2
    print(render(rows))
    problems = bad(rows)
    if problems:
        print("\nFAILED: " + "; ".join(problems))
        return 1
    print("\nOK: nothing lost, nothing crashed, no forbidden request made")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
