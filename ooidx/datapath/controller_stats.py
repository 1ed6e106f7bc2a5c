"""The controller's request statistics: counts per dataset, posted by the
proxies and caches (C{record}), saved to the attribute store now and then and
added up across every controller (C{get_stats}). A part of
L{ooidx.datapath.controller.Controller}, kept apart because it is one thing."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from magnet import MagnetError, operation

from ooidx import dap, urlpolicy
from ooidx import wire


__all__ = ["Statistics", "COUNTERS"]

STATS_PREFIX = wire.STATS_KEY
#: What is counted, per dataset and in all.
COUNTERS = ("requests", "hits", "misses", "bytes", "errors")


def _counters() -> Dict[str, int]:
    return {k: 0 for k in COUNTERS}


class Statistics:
    """The statistics operations of the controller (a mixin of its class: it
    uses the controller's bus, store, clock and names)."""


    @operation
    def record(self, dataset: Optional[str] = None, url: Optional[str] = None, hit: bool = False, bytes: int = 0,
               status: Optional[int] = None, count: int = 1, requests: int = 0, **extra: Any) -> None:
        """Count one answered request (posted by the cache and the fetchers).
        Without a dataset name, the dataset is the one whose base URL C{url} is under.
        C{count}: how many answered requests this stands for (the proxy posts its
        held answers once a second); C{requests}: how many of them to add to the
        routed requests too (they never reached route)."""
        name = dataset if dap.valid_name(dataset) else None
        if name is None and isinstance(url, str):
            try:
                name = urlpolicy.check_registered(url, self._bases(), self.allow_hosts, self.allow_private)
            except Exception:
                name = None
        size = bytes if isinstance(bytes, int) and not isinstance(bytes, bool) and bytes > 0 else 0
        failed = isinstance(status, int) and not isinstance(status, bool) and status >= 400
        # proxyng (hot answers held at the proxy): one record for many requests
        n = count if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= 10**9 else 1
        routed = requests if isinstance(requests, int) and not isinstance(requests, bool) and 0 < requests <= n else 0
        self._count(name, hits=n if hit else 0, misses=0 if hit else n, bytes=size, errors=n if failed else 0,
                    requests=routed)

    def _count(self, name: Optional[str], **counts: int) -> None:
        for key, n in counts.items():
            self.totals[key] += n
        if name is not None:
            per = self.per_dataset.setdefault(name, _counters())
            for key, n in counts.items():
                per[key] += n
        self._stats_dirty = True

    def _snapshot(self) -> Dict[str, Any]:
        return {"node": self.node, "since": self.since, "totals": dict(self.totals),
                "datasets": {k: dict(v) for k, v in self.per_dataset.items()}}

    def save_stats(self, timeout: Optional[float] = None) -> Deferred:
        """Write this controller's counters to the store (if they changed)."""
        if not self._stats_dirty:
            return succeed(None)
        self._stats_dirty = False
        d = self._store("set", timeout=timeout, key=self.stats_key, value=self._snapshot())

        def failed(failure: Any) -> Any:
            self._stats_dirty = True
            return failure

        return d.addErrback(failed)

    @operation
    @inlineCallbacks
    def get_stats(self) -> Any:
        """Requests, hits, misses, bytes and errors, in total and per dataset,
        of every controller since it started (C{since}: the earliest start)."""
        snapshots = [self._snapshot()]
        try:
            saved = yield self._store("query", regex="^" + re.escape(STATS_PREFIX + "controller:"))
        except MagnetError as e:
            self.log.warn("{component}: other controllers' statistics unavailable: {reason}",
                          component=self.name, reason=e)
            saved = {}
        snapshots += [v for k, v in saved.items() if k != self.stats_key and isinstance(v, dict)]
        out: Dict[str, Any] = dict(_counters(), datasets={}, since=self.since)
        for snap in snapshots:
            totals = snap.get("totals") or {}
            for key in COUNTERS:
                out[key] += _int(totals.get(key))
            if isinstance(snap.get("since"), (int, float)):
                out["since"] = min(out["since"], snap["since"])
            for name, counts in (snap.get("datasets") or {}).items():
                if not isinstance(counts, dict):
                    continue
                per = out["datasets"].setdefault(name, {k: 0 for k in ("requests", "hits", "misses", "bytes")})
                for key in per:
                    per[key] += _int(counts.get(key))
        return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
