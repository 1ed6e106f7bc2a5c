"""Per-dataset series for C{/metrics} (L{ooidx.node.metrics.renderer_for} adds them).

L{DatasetMetrics} adds, per dataset, what the controllers count (summed
over every controller, C{controller.get_stats}) and how old its newest
version is (C{controller.list}):

    ooidx_dataset_requests_total{dataset}   requests answered for it
    ooidx_dataset_bytes_total{dataset}      bytes answered
    ooidx_dataset_hits_total{dataset}       answered from the cache
    ooidx_dataset_misses_total{dataset}     fetched from the upstream
    ooidx_dataset_age_seconds{dataset}      seconds since its newest version was fetched (datasets
                                            with a version only; under C{other}: the oldest of them)
    ooidx_dataset_series_datasets{labelled="yes"|"no"}
                                            how many datasets are labelled by name, and how many summed
    ooidx_dataset_metrics_up                1 if the last read of the controller succeeded

At most C{http.metrics_datasets} datasets (default L{DATASET_CAP}; 0: none)
are labelled by name, so a registry of thousands of datasets cannot swell
/metrics; the rest are summed under C{dataset="other"}. The labelled ones
are the most requested, and once labelled a dataset keeps its label while it
is registered (its counters never jump from one series to another); a slot
freed by a purge goes to the most requested of the rest. /metrics is open
to all: set C{metrics_datasets: 0} if dataset names are not for everyone.

The figures are read with one bounded call each (L{DATASET_TIMEOUT}) and
reused for L{DATASET_TTL} seconds, so scrapes never pile calls on the
controller; if the controller does not answer, the last figures are served
and C{ooidx_dataset_metrics_up} is 0.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

__all__ = ["DatasetMetrics", "DATASET_CAP", "DATASET_TTL", "DATASET_TIMEOUT", "OTHER"]

log = Logger(namespace="ooidx.node.metrics")

#: Datasets labelled by name in /metrics unless C{http.metrics_datasets} says otherwise.
DATASET_CAP = 50
#: Seconds the per-dataset figures are reused; seconds one read of them may take.
DATASET_TTL = 5.0
DATASET_TIMEOUT = 2.0
#: The label value of the datasets past the cap.
OTHER = "other"
_COUNTED = ("requests", "bytes", "hits", "misses")
#: Record fields that may say when a dataset's newest version was made, the best first.
_NEWEST = ("last_version", "last_saved", "saved", "last_fetch")


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class DatasetMetrics:
    """Per-dataset series for /metrics, read from the controller (see the module's docstring)."""

    def __init__(self, bus: Any, clock: Any, *, cap: int = DATASET_CAP, ttl: float = DATASET_TTL,
                 timeout: float = DATASET_TIMEOUT) -> None:
        self.bus = bus
        self.clock = clock
        self.cap = max(0, int(cap))
        self.ttl = ttl
        self.timeout = timeout
        self.read_at: Optional[float] = None
        self.up = False
        self.counts: Dict[str, Dict[str, int]] = {}
        self.newest: Dict[str, float] = {}
        #: The datasets labelled by name (sticky: see the module's docstring).
        self.labelled: Set[str] = set()
        self._reading: Optional[Deferred] = None

    def fresh(self) -> bool:
        return self.read_at is not None and 0 <= self.clock.seconds() - self.read_at < self.ttl

    def refresh(self) -> Deferred:
        """Read the figures (one call each, bounded); fires with None whether or not they came.
        Scrapes arriving meanwhile wait for the same read."""
        if self._reading is not None:
            waiting: Deferred = Deferred()
            self._reading.addBoth(lambda r: (waiting.callback(None), r)[1])
            return waiting
        calls = [self.bus.call("controller", "get_stats", timeout=self.timeout),
                 self.bus.call("controller", "list", timeout=self.timeout)]
        d = DeferredList(calls, consumeErrors=True)
        self._reading = d

        def read(results: Any) -> None:
            (stats_ok, stats), (list_ok, records) = results
            self.read_at = self.clock.seconds()
            self.up = bool(stats_ok and list_ok)
            if not self.up:
                failure = stats if not stats_ok else records
                log.warn("metrics: per-dataset figures not read from the controller: {error}",
                         error=failure.getErrorMessage())
                return
            self._take(stats, records)

        def done(result: Any) -> None:
            self._reading = None

        d.addCallback(read)
        d.addErrback(lambda f: log.failure("metrics: reading per-dataset figures", f))
        d.addBoth(done)
        return d

    def _take(self, stats: Any, records: Any) -> None:
        counts: Dict[str, Dict[str, int]] = {}
        per = stats.get("datasets") if isinstance(stats, dict) else None
        for name, values in (per or {}).items():
            if isinstance(name, str) and isinstance(values, dict):
                counts[name] = {k: int(_number(values.get(k)) or 0) for k in _COUNTED}
        newest: Dict[str, float] = {}
        live: Set[str] = set()
        for record in records or []:
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                continue
            name = record["name"]
            if record.get("status") == "purged":
                continue
            live.add(name)
            counts.setdefault(name, {k: 0 for k in _COUNTED})
            if (_number(record.get("versions")) or 0) > 0:
                for key in _NEWEST:
                    when = _number(record.get(key))
                    if when is not None:
                        newest[name] = when
                        break
        self.counts, self.newest = counts, newest
        # sticky labels: keep those still registered, fill free slots with the most requested
        self.labelled = {name for name in self.labelled if name in live or name in counts}
        if len(self.labelled) > self.cap:
            self.labelled = set(sorted(self.labelled)[:self.cap])
        candidates = sorted((n for n in counts if n not in self.labelled),
                            key=lambda n: (-counts[n]["requests"], n))
        for name in candidates[:max(0, self.cap - len(self.labelled))]:
            self.labelled.add(name)

    def families(self) -> List[Metric]:
        """The series, from the figures last read."""
        now = self.clock.seconds()
        families = {key: CounterMetricFamily(f"ooidx_dataset_{key}", f"{key.capitalize()} of the dataset, "
                                             "summed over every controller", labels=["dataset"])
                    for key in _COUNTED}
        age = GaugeMetricFamily("ooidx_dataset_age_seconds", "Seconds since the dataset's newest version was "
                                "fetched (under other: the oldest)", labels=["dataset"])
        other = {k: 0 for k in _COUNTED}
        others = 0
        other_age: Optional[float] = None
        for name in sorted(self.counts):
            values = self.counts[name]
            when = self.newest.get(name)
            if name in self.labelled:
                for key in _COUNTED:
                    families[key].add_metric([name], values[key])
                if when is not None:
                    age.add_metric([name], max(0.0, now - when))
            else:
                others += 1
                for key in _COUNTED:
                    other[key] += values[key]
                if when is not None:
                    other_age = max(other_age or 0.0, max(0.0, now - when))
        if others:
            for key in _COUNTED:
                families[key].add_metric([OTHER], other[key])
            if other_age is not None:
                age.add_metric([OTHER], other_age)
        count = GaugeMetricFamily("ooidx_dataset_series_datasets", "Datasets labelled by name (yes) and summed "
                                  "under other (no), at most http.metrics_datasets labelled", labels=["labelled"])
        count.add_metric(["yes"], len(self.counts) - others)
        count.add_metric(["no"], others)
        up = GaugeMetricFamily("ooidx_dataset_metrics_up", "1 if the last read of the per-dataset figures from "
                               "the controller succeeded")
        up.add_metric([], 1 if self.up else 0)
        return [*families.values(), age, count, up]
