"""The reliability suite's results: one JSON line per scenario.

Shared by the fault, hostile-input and load tests. Each scenario appends one
line to the file named by ``OOIDX_RELIABILITY_RESULTS`` (default
``.reliability/results.jsonl`` in the checkout); ``python -m
tests.reliability.report`` prints them as a table.

    from tests.reliability.results import record
    record("hostile", "http-proxy-garbage", inputs_tried=412, errors=0, notes="...")
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]

FIELDS = ("suite", "scenario", "faults_injected", "inputs_tried", "sent", "confirmed", "processed", "lost",
          "duplicated", "errors", "p50_ms", "p99_ms", "notes")


def results_path() -> Path:
    return Path(os.environ.get("OOIDX_RELIABILITY_RESULTS") or ROOT / ".reliability" / "results.jsonl")


def percentile(values: Iterable[float], p: float) -> Optional[float]:
    """The C{p}-th percentile (0-100, nearest rank) of C{values}, or None."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(round(p / 100.0 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def record(suite: str, scenario: str, **fields: Any) -> Dict[str, Any]:
    """Append one scenario's line; missing counts are 0, latencies null."""
    unknown = set(fields) - set(FIELDS) - {"extra"}
    if unknown:
        raise TypeError(f"unknown result fields: {sorted(unknown)}")
    line: Dict[str, Any] = {"suite": suite, "scenario": scenario}
    for name in FIELDS[2:]:
        default: Any = None if name in ("p50_ms", "p99_ms") else ("" if name == "notes" else 0)
        line[name] = fields.get(name, default)
    for name in ("p50_ms", "p99_ms"):
        if line[name] is not None:
            line[name] = round(float(line[name]), 2)
    if "extra" in fields:
        line["extra"] = fields["extra"]
    line["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=False) + "\n")
    return line


def latencies_ms(seconds: Iterable[float]) -> Dict[str, Optional[float]]:
    values = [s * 1000.0 for s in seconds]
    return {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99),
            **({"mean_ms": statistics.fmean(values)} if values else {})}
