"""The soak's verdict (tests/reliability/soakstats.py) on made-up samples:
what passes, what each check catches (a leak of memory, of descriptors, of
Deferreds, queues that do not drain, dead letters, failed requests), and the
table and samples it writes. The soak itself runs real daemons
(scripts/soak; tests/reliability/test_soak.py runs a minute of it)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.fast.core.support import FastCase
from tests.reliability import soakstats
from tests.reliability.soakstats import Sample


def run(minutes: float = 30, every: float = 10, rss: Any = None, fds: Any = None, pending: Any = None,
        drain_pending: float = 1, **last: Any) -> List[Sample]:
    """Samples of a steady node (100 MB, 25 descriptors, 4 pending), each figure
    a function of the time (minutes) when given, then three drain samples."""
    out = []
    n = int(minutes * 60 / every)
    for i in range(n):
        t = i * every
        m = t / 60
        out.append(Sample(t=t, rss_mb=rss(m) if rss else 100.0, fds=int(fds(m)) if fds else 25,
                          pending=pending(m) if pending else 4.0, queued=i % 3, deepest=i % 2,
                          deepest_queue="fetcher", requests=10 * i))
    for j in range(3):
        out.append(Sample(t=n * every + j * 5, rss_mb=out[-1].rss_mb, fds=out[-1].fds, pending=drain_pending,
                          queued=0, deepest=0, requests=10 * n, phase="drain"))
    for key, value in last.items():
        setattr(out[-1], key, value)
    return out


def verdict(samples: List[Sample], drained_after: Optional[float] = 4.0) -> Dict[str, soakstats.Check]:
    checks = soakstats.verdict(samples, warmup=300, every=10, drained_after=drained_after, drain_timeout=60)
    return {c.name: c for c in checks}


class VerdictTests(SynchronousTestCase):
    def test_a_steady_node_passes(self) -> None:
        checks = verdict(run())
        self.assertTrue(all(c.ok for c in checks.values()), checks)
        self.assertTrue(soakstats.passed(list(checks.values())))
        self.assertEqual(len(checks), 7)

    def test_memory_that_keeps_growing_fails(self) -> None:
        # 1 MB a minute from 100 MB: +25 % over the 25 minutes after the warm-up
        checks = verdict(run(rss=lambda m: 100 + m))
        self.assertFalse(checks["RSS growth after warm-up"].ok)
        self.assertIn("+2", checks["RSS growth after warm-up"].measured)

    def test_growth_during_the_warm_up_is_left_out(self) -> None:
        # caches filling in the first minutes, then flat
        checks = verdict(run(rss=lambda m: 60 + 40 * min(m, 4) / 4))
        self.assertTrue(checks["RSS growth after warm-up"].ok, checks["RSS growth after warm-up"])

    def test_growth_just_under_the_bound_passes(self) -> None:
        checks = verdict(run(rss=lambda m: 100 + 9 * max(0.0, m - 5) / 25))
        self.assertTrue(checks["RSS growth after warm-up"].ok, checks["RSS growth after warm-up"])

    def test_descriptors_that_leak_fail(self) -> None:
        checks = verdict(run(fds=lambda m: 25 + m))
        self.assertFalse(checks["open descriptors flat"].ok)

    def test_a_few_descriptors_up_and_down_pass(self) -> None:
        checks = verdict(run(fds=lambda m: 25 + (3 if int(m) % 2 else 0)))
        self.assertTrue(checks["open descriptors flat"].ok)

    def test_deferreds_that_pile_up_fail(self) -> None:
        checks = verdict(run(pending=lambda m: 4 + 2 * m))
        self.assertFalse(checks["Deferreds pending do not pile up"].ok)

    def test_deferreds_left_after_the_load_fail(self) -> None:
        checks = verdict(run(drain_pending=40))
        self.assertFalse(checks["Deferreds pending after the load"].ok)
        self.assertTrue(checks["Deferreds pending do not pile up"].ok)

    def test_periodic_work_while_draining_is_not_a_leak(self) -> None:
        samples = run()
        samples[-1].pending = 9  # a scheduled refresh, in the last look
        self.assertTrue(verdict(samples)["Deferreds pending after the load"].ok)

    def test_metrics_that_never_answered_fail(self) -> None:
        checks = verdict(run(pending=lambda m: math.nan, drain_pending=math.nan))
        self.assertFalse(checks["Deferreds pending do not pile up"].ok)
        self.assertFalse(checks["Deferreds pending after the load"].ok)

    def test_queues_that_do_not_drain_fail(self) -> None:
        checks = verdict(run(), drained_after=None)
        self.assertFalse(checks["queues drain after the load"].ok)
        self.assertIn("not empty after 60 s", checks["queues drain after the load"].measured)

    def test_dead_letters_and_failed_requests_fail(self) -> None:
        checks = verdict(run(dead=2, errors=3))
        self.assertFalse(checks["messages dead-lettered"].ok)
        self.assertFalse(checks["proxied requests failed"].ok)
        self.assertEqual(checks["proxied requests failed"].measured, "3 of 1800")

    def test_too_few_samples_after_the_warm_up_fail_saying_so(self) -> None:
        checks = soakstats.verdict(run(minutes=5.5), warmup=300, every=10, drained_after=1, drain_timeout=60)
        self.assertEqual([c.name for c in checks], ["samples after the warm-up"])
        self.assertFalse(soakstats.passed(checks))

    def test_a_short_run_uses_smaller_windows(self) -> None:
        # the CI's minute: sampled every 5 s, warm-up 20 s
        samples = run(minutes=1, every=5)
        checks = soakstats.verdict(samples, warmup=20, every=5, drained_after=2, drain_timeout=30)
        self.assertTrue(soakstats.passed(checks), checks)


class TableTests(FastCase):
    def test_the_table_says_each_check_and_the_verdict(self) -> None:
        checks = soakstats.verdict(run(rss=lambda m: 100 + m), warmup=300, every=10, drained_after=3,
                                   drain_timeout=60)
        text = soakstats.table(checks)
        lines = text.splitlines()
        self.assertEqual(lines[0], "| check | measured | bound | verdict |")
        self.assertEqual(len(lines), 2 + len(checks) + 1)
        self.assertIn("| RSS growth after warm-up |", lines[2])
        self.assertTrue(lines[2].endswith("| **FAIL** |"))
        self.assertEqual(lines[-1], "| **soak** | | | **FAIL** |")

    def test_samples_are_written_and_read_back(self) -> None:
        samples = run(minutes=1)
        path = self.tmp_path() / "samples.jsonl"
        soakstats.write_samples(samples, path)
        self.assertEqual(soakstats.read_samples(path), samples)
