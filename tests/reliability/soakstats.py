"""The soak's samples, its verdict, its table and its plot (scripts/soak).

Pure: no broker, no daemon, no reactor, so the fast tier checks the verdict
on made-up samples (tests/fast/reliability/test_soak_verdict.py). The soak
itself is tests/reliability/soak.py.

The verdict (issue 17, scenario 6), on the samples taken after the warm-up:

  - RSS: the median of the last window grows less than 10 % over the
    median of the first window after the warm-up;
  - descriptors flat: the last window's median at most
    max(FD_SLACK, 10 %) over the first window's;
  - Deferreds pending (magnet_pending: calls, sends, listen addresses,
    streams, unconfirmed and held publishes) do not pile up: the last
    window's median at most max(PENDING_SLACK, 50 %) over the largest seen in the first window,
    and back to PENDING_IDLE or fewer once the load has stopped (the fewest seen while the
    queues drain: periodic work goes on then);
  - queues drain: once the load stops, every queue but the dead-letter
    ones is empty within the drain time;
  - no message dead-lettered, and no proxied request failed.

A window is WINDOW_SECONDS of samples (at least three).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: RSS may grow this much (a fraction) from the first window after the warm-up to the last.
RSS_GROWTH = 0.10
#: Descriptors may grow this many, or FD_GROWTH of the baseline, whichever is more.
FD_SLACK = 8
FD_GROWTH = 0.10
#: Pending work may be this much (or PENDING_GROWTH) above the first window's largest at the end.
PENDING_SLACK = 5
PENDING_GROWTH = 0.5
#: What is still pending once the load stopped and the queues drained (the web edge's own listen
#: address, an SSE stream's consumer: a few).
PENDING_IDLE = 3
#: Seconds of samples the first and the last window take (at least MIN_WINDOW samples).
WINDOW_SECONDS = 60.0
MIN_WINDOW = 3


@dataclass
class Sample:
    """One look at the node from outside, C{t} seconds into the run."""

    t: float
    rss_mb: float
    fds: int
    pending: float  # magnet_pending summed over its kinds (NaN when /metrics did not answer)
    queued: int  # messages in every queue of the vhost but the dead-letter ones
    deepest: int  # messages in the fullest of them
    dead: int = 0  # messages in the dead-letter queues
    pending_kinds: Dict[str, float] = field(default_factory=dict)
    deepest_queue: str = ""
    requests: int = 0  # proxied requests answered so far
    errors: int = 0  # of which failed
    phase: str = "load"  # "load" or "drain"


@dataclass
class Check:
    name: str
    ok: bool
    measured: str
    bound: str


def window(samples: Sequence[Sample], every: float) -> int:
    """How many samples a window takes."""
    return max(MIN_WINDOW, int(round(WINDOW_SECONDS / max(every, 0.001))))


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # NaN: /metrics did not answer
    return statistics.median(values) if values else float("nan")


def verdict(samples: Sequence[Sample], warmup: float, every: float, drained_after: Optional[float],
            drain_timeout: float) -> List[Check]:
    """The checks, in the table's order. C{drained_after}: seconds from the end of
    the load until every queue was empty (None: not within C{drain_timeout})."""
    load = [s for s in samples if s.phase == "load"]
    steady = [s for s in load if s.t >= warmup]
    checks: List[Check] = []
    n = window(steady, every)
    if len(steady) < 2 * MIN_WINDOW:
        return [Check("samples after the warm-up", False, f"{len(steady)}",
                      f">= {2 * MIN_WINDOW} (run longer, or sample more often)")]
    n = min(n, len(steady) // 2)
    first, last = steady[:n], steady[-n:]

    base, end = _median([s.rss_mb for s in first]), _median([s.rss_mb for s in last])
    growth = (end - base) / base if base > 0 else float("inf")
    checks.append(Check("RSS growth after warm-up", growth < RSS_GROWTH,
                        f"{base:.1f} -> {end:.1f} MB ({growth * 100:+.1f} %)", f"< {RSS_GROWTH * 100:.0f} %"))

    fd_base, fd_end = _median([s.fds for s in first]), _median([s.fds for s in last])
    fd_bound = fd_base + max(FD_SLACK, FD_GROWTH * fd_base)
    checks.append(Check("open descriptors flat", fd_end <= fd_bound,
                        f"{fd_base:.0f} -> {fd_end:.0f}", f"<= {fd_bound:.0f}"))

    p_first = [s.pending for s in first if s.pending == s.pending]
    p_base = max(p_first) if p_first else float("nan")
    p_end = _median([s.pending for s in last])
    p_bound = p_base + max(PENDING_SLACK, PENDING_GROWTH * p_base)
    checks.append(Check("Deferreds pending do not pile up", p_end == p_end and p_base == p_base and p_end <= p_bound,
                        f"max {p_base:.0f} in the first window, median {p_end:.0f} in the last", f"<= {p_bound:.0f}"))
    # the fewest seen while the queues drain: the node still does its periodic work then (a
    # scheduled refresh, statistics saved), but what a leak holds never goes
    idle_seen = [s.pending for s in samples if s.phase == "drain" and s.pending == s.pending]
    idle = min(idle_seen) if idle_seen else float("nan")
    checks.append(Check("Deferreds pending after the load", idle == idle and idle <= PENDING_IDLE,
                        f"{idle:.0f} (fewest while draining)", f"<= {PENDING_IDLE}"))

    deepest = max(load, key=lambda s: s.deepest)
    checks.append(Check("queues drain after the load", drained_after is not None,
                        (f"empty {drained_after:.0f} s after the load stopped" if drained_after is not None
                         else f"not empty after {drain_timeout:.0f} s")
                        + f" (deepest during the run: {deepest.deepest} in {deepest.deepest_queue or '-'})",
                        f"empty within {drain_timeout:.0f} s"))
    dead = max((s.dead for s in samples), default=0)
    checks.append(Check("messages dead-lettered", dead == 0, f"{dead}", "0"))
    final = samples[-1]
    checks.append(Check("proxied requests failed", final.errors == 0, f"{final.errors} of {final.requests}", "0"))
    return checks


def passed(checks: Sequence[Check]) -> bool:
    return bool(checks) and all(c.ok for c in checks)


def table(checks: Sequence[Check]) -> str:
    """The verdict as a Markdown table (what docs/reliability.md shows)."""
    lines = ["| check | measured | bound | verdict |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.measured} | {c.bound} | {'pass' if c.ok else '**FAIL**'} |")
    lines.append(f"| **soak** | | | {'**pass**' if passed(checks) else '**FAIL**'} |")
    return "\n".join(lines)


def write_samples(samples: Sequence[Sample], path: Path) -> None:
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def read_samples(path: Path) -> List[Sample]:
    return [Sample(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(samples: Sequence[Sample], warmup: float, path: Path, title: str = "") -> None:
    """Four panels over time (minutes): RSS, descriptors, Deferreds pending, queue depths;
    the warm-up shaded, the drain after the load marked. A small PNG (about 50 KB)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(7, 7.5), sharex=True, dpi=72)
    panels = [("RSS (MB)", [s.rss_mb for s in samples], None),
              ("open descriptors", [s.fds for s in samples], None),
              ("Deferreds pending", [s.pending for s in samples], None),
              ("messages queued", [s.queued for s in samples], [s.deepest for s in samples])]
    drain_at = next((s.t / 60 for s in samples if s.phase == "drain"), None)
    for ax, (label, values, second) in zip(axes, panels):
        ax.plot(t, values, lw=1.2, color="tab:blue", label="all queues" if second is not None else None)
        if second is not None:
            ax.plot(t, second, lw=1.0, color="tab:orange", label="deepest queue")
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        ax.set_ylabel(label, fontsize=9)
        ax.axvspan(0, warmup / 60, color="0.9", lw=0)
        if drain_at is not None:
            ax.axvline(drain_at, color="0.5", lw=0.8, ls="--")
        ax.tick_params(labelsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes (grey: warm-up; dashed: load stopped)", fontsize=9)
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def summary(checks: Sequence[Check], extra: Dict[str, Any]) -> Dict[str, Any]:
    return {"passed": passed(checks), "checks": [asdict(c) for c in checks], **extra}
