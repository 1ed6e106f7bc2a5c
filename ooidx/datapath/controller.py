"""The controller: the dataset registry, the routing of proxied requests, the statistics.

Operations (docs/data-path.md is the contract):

- C{register(name, url, refresh=None, check=True, replace=False, expect_every=None)} -> the
  dataset record. C{check}: the upstream's C{.dds} and C{.das} are fetched first, through the
  fetcher (its URL policy, its HTTP client; within C{check_timeout} seconds and C{check_max_bytes}
  bytes each) and an answer that is not DAP refuses the registration with its reason
  (C{UpstreamError} 502, C{UpstreamTimeout} 504, C{Forbidden} 403, C{InvalidURL} 400). Moving
  a registered name to another URL needs C{replace} (the record's C{replaced} says the URL it
  had). A C{failed} event leaves C{last_error} (reason, stage, time) in the record.
- C{purge(name)} -> the record, marked C{purged}; the cache is told to drop the dataset
- C{list(pattern=None)} -> records (sorted by name); C{pattern} a regex on names
- C{get(name)} -> one record
- C{route(url=None, dataset=None, suffix="", query=None, method="GET", address=, request_id=)}:
  the data path's one call (issue 15), the proxy's and csv's, sent with L{magnet.Bus.tell}:
  the name resolved from the registry in memory, the URL checked, and one post to the cache
  (C{cache.answer}) with the caller's address, which streams or fetches it. Its return value,
  C{{"via", "dataset", "url"}}, reaches the caller as a reply, and its errors
  (C{UnknownDataset}, C{Forbidden}, C{InvalidURL}, C{InvalidName}) as an error reply.
- C{record(dataset, url, hit, bytes, status)}: counts what the cache and fetchers served
- C{get_dataset(name, to=None)}: has a fetcher fetch the dataset's .das/.dds/.dods for
  pub_sub's subscribers (or, with C{to}, for those addresses only)
- C{get_stats()} -> usage statistics, summed over every controller

Periodic refresh (issue 5): a dataset registered with C{refresh: SECONDS} is
asked for (C{get_dataset}) every that many seconds, on a timer of the
component's clock; the timers follow the registry (registered, changed,
purged, reloaded). With several controllers, the one whose timer fires first
marks the record (C{refreshed}) and the others skip that round. The record's
C{status}, C{last_fetch}, C{size} and C{versions} follow the C{fetched},
C{saved} and C{failed} events (docs/dissemination.md); the controller emits
C{registered} and C{purged}.

Freshness (issue 16): a dataset registered with C{expect_every: SECONDS} is
marked C{stale} (with C{stale_since}) when no C{fetched} or C{saved} event came
for 1.5 times that period (C{fresh_since} is when the clock last started); one
C{stale} event says so, and the next version clears the mark. The controllers
look every C{freshness_interval} seconds.

The registry lives in the attribute store (C{dataset:NAME}); each controller
keeps it in memory too, so that C{route} needs no store round trip. Several
controllers (several nodes) see each other's registrations: a name the
memory copy lacks is looked up in the store before the answer is "unknown",
and a URL under no known base URL reloads the registry (at most once per
L{Controller.reload_interval}) before it is refused.

Not an open proxy: a URL is served only when it is under a registered
dataset's base URL (L{ooidx.urlpolicy.check_registered}), or its host is in
C{security.allow_hosts}.

Statistics are counted in memory and saved to the attribute store under one
key per controller process (C{stats:controller:NODE:ID}) every
L{Controller.stats_interval} seconds and at stop; C{get_stats} adds up every
such key, this controller's own live counters in place of its saved ones.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import BadArguments, MagnetError, RemoteError, Unroutable, operation

from ooidx.datapath.answer import StreamAnswer
from ooidx.datapath.controller_events import STALE_FACTOR, FollowsEvents  # noqa: F401 (STALE_FACTOR: docs)
from ooidx.datapath.controller_stats import COUNTERS, Statistics, _counters  # noqa: F401
from ooidx import dap, events, urlpolicy
from ooidx.component import Component
from ooidx.config import ControllerOptions, SecurityConfig
from ooidx.errors import Forbidden, InvalidName, InvalidURL, UnknownDataset, UpstreamError, UpstreamTimeout
from ooidx import wire

__all__ = ["Controller", "DATASET_PREFIX", "STATS_PREFIX", "dataset_key", "check_name", "check_base_url"]

DATASET_PREFIX = wire.DATASET_KEY
STATS_PREFIX = wire.STATS_KEY
STATUSES = ("registered", "fetched", "failed", "purged")
METHODS = ("GET", "HEAD")
MAX_PATTERN_LENGTH = 256
#: The suffixes a by-name route takes (the proxy's, less .csv: that goes to the csv component).
ROUTE_SUFFIXES = dap.DAP_SUFFIXES + (".nc",)
#: The longest constraint (query string) a by-name route takes (the proxy's URI bound).
MAX_QUERY = 8192
MAX_REFRESH = 366 * 24 * 3600.0
MIN_REFRESH = 1.0
#: how long a registration's check waits for the .dds and .das (fetched at once; seconds):
#: under the web port's 10 s call timeout, so that the answer is the upstream's reason
CHECK_TIMEOUT = 8.0
#: the most bytes a registration's check reads of each of the .dds and .das
CHECK_MAX_BYTES = 1024 * 1024
#: what each checked response starts with when it is DAP
CHECK_SIGNATURES = {".dds": b"Dataset", ".das": b"Attributes"}
#: the fetcher's refusals a check passes on as they are (others become UpstreamError)
CHECK_ERRORS = {"Forbidden": Forbidden, "InvalidURL": InvalidURL, "UpstreamTimeout": UpstreamTimeout}


def dataset_key(name: str) -> str:
    return DATASET_PREFIX + name


def check_name(name: Any) -> str:
    """C{name} if it is a safe dataset name, else L{InvalidName}."""
    if not dap.valid_name(name):
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidName(f"a dataset name is 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or "
                          f"digit, got {shown}")
    return name


def check_base_url(url: Any, allow_hosts: Any = (), allow_private: bool = False) -> str:
    """A dataset's base URL: http(s), a host, no credentials, no query or
    fragment, a path L{urlpolicy.check_path} accepts; a DAP suffix (C{.dds}, ...) is taken off.
    L{InvalidURL} if it is malformed, L{Forbidden} if its host is an address the
    exchange may not reach."""
    target = urlpolicy.check_url(url, allow_private=allow_private, allow_hosts=allow_hosts)
    if "?" in url or "#" in url:
        raise InvalidURL("a base URL has no query or fragment (register the dataset's URL, not a request)")
    split = dap.split_url(target.url)
    base = split.base if split.suffix in dap.DAP_SUFFIXES else target.url
    urlpolicy.check_path(base)  # the same path rule as every request's (no . / .. / %2f / ; ...)
    return base


class Controller(FollowsEvents, Statistics, Component):
    """Registers datasets and routes every proxied request to the cache or a fetcher."""

    log = Logger()

    #: seconds between two full reloads of the registry caused by unknown URLs
    reload_interval = 1.0
    #: seconds between two saves of the statistics
    stats_interval = 60.0
    #: seconds between two reloads of the whole registry (purges made by other controllers)
    registry_interval = 10.0
    #: how long the statistics' save at stop may take (seconds)
    stop_timeout = 5.0
    #: seconds between two looks for datasets that stopped updating (expect_every)
    freshness_interval = 60.0
    #: a registration's check: seconds and bytes for each of the .dds and .das
    check_timeout = CHECK_TIMEOUT
    check_max_bytes = CHECK_MAX_BYTES

    def __init__(self, name: str, bus: Any, *, peers: Optional[Dict[str, str]] = None,
                 security: Optional[SecurityConfig] = None, options: Optional[ControllerOptions] = None,
                 **kwargs: Any) -> None:
        """C{security}: the config's C{security} section (which upstream hosts
        a registration may name); C{options}: C{components.controller} (the
        registration check's bounds, how often freshness is looked at)."""
        super().__init__(name, bus, **kwargs)
        if options is not None:
            self.check_timeout = options.check_timeout
            self.check_max_bytes = options.check_max_bytes
            self.freshness_interval = options.freshness_interval
        self.security = security if security is not None else SecurityConfig()
        #: the names of the components this one talks to (tests rename them)
        self.peers = {"attribute_store": "attribute_store", "cache": "cache", "fetcher": "fetcher",
                      "pub_sub": "pub_sub"}
        self.peers.update(peers or {})
        self.datasets: Dict[str, Dict[str, Any]] = {}
        self._record_locks: Dict[str, DeferredLock] = {}
        self.instance_id = f"{self.node}:{uuid.uuid4().hex[:12]}"
        self.stats_key = f"{STATS_PREFIX}controller:{self.instance_id}"
        self.since = time.time()
        self.totals = _counters()
        self.per_dataset: Dict[str, Dict[str, int]] = {}
        self._stats_dirty = False
        self._loops: List[LoopingCall] = []
        self._reloading: Optional[List[Deferred]] = None
        self._last_reload = -float("inf")
        #: dataset -> (interval, LoopingCall) of the periodic refreshes this controller runs
        self.refreshers: Dict[str, Tuple[float, LoopingCall]] = {}
        self._events: Any = None

    # configuration -------------------------------------------------------------------

    @property
    def allow_hosts(self) -> Tuple[str, ...]:
        return tuple(self.security.allow_hosts)

    @property
    def allow_private(self) -> bool:
        return bool(self.security.allow_private)

    # lifecycle -----------------------------------------------------------------------

    def setUp(self) -> None:
        self.since = time.time()
        # Not waited for: the store may be on a node still starting. A request
        # that comes before the registry is loaded waits for this same load.
        self.reload().addErrback(lambda f: self.log.warn(
            "{component}: could not load the registry yet ({reason}); it loads on first use",
            component=self.name, reason=f.getErrorMessage()))
        self._every(self.stats_interval, self.save_stats, "saving statistics")
        self._every(self.registry_interval, self.reload, "reloading the registry")
        self._every(self.freshness_interval, self.check_freshness, "looking for out-of-date datasets")
        d = self.bus.subscribe(events.NOTIFICATION, self._on_event)
        d.addCallback(lambda subscription: setattr(self, "_events", subscription))
        return d.addErrback(lambda f: self.log.warn(
            "{component}: not following dataset events ({reason}); records will not show fetches and versions",
            component=self.name, reason=f.getErrorMessage()))

    def _every(self, interval: float, work: Any, what: str) -> None:
        """Run C{work} every C{interval} seconds; a failure is logged, the loop goes on."""
        def run() -> Deferred:
            d = work()
            d.addErrback(lambda f: self.log.warn("{component}: {what} failed: {reason}", component=self.name,
                                                 what=what, reason=f.getErrorMessage()))
            return d

        loop = LoopingCall(run)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    @inlineCallbacks
    def tearDown(self) -> Any:
        loops, self._loops = self._loops, []
        loops += [loop for _, loop in self.refreshers.values()]
        self.refreshers = {}
        for loop in loops:
            if loop.running:
                loop.stop()
        subscription, self._events = self._events, None
        if subscription is not None:
            try:
                yield subscription.cancel()
            except Exception as e:
                self.log.debug("{component}: cancelling the event subscription: {reason}", component=self.name,
                               reason=e)
        try:
            yield self.save_stats(timeout=self.stop_timeout)
        except Exception as e:
            self.log.warn("{component}: statistics not saved at stop: {reason}", component=self.name, reason=e)

    # the store -----------------------------------------------------------------------

    def _store(self, op: str, timeout: Optional[float] = None, **kwargs: Any) -> Deferred:
        return self.bus.call(self.peers["attribute_store"], op, timeout=timeout, **kwargs)

    def reload(self) -> Deferred:
        """Load every dataset record from the store into memory. One query at a
        time: callers that come while one runs get its result."""
        if self._reloading is not None:
            waiter: Deferred = Deferred()
            self._reloading.append(waiter)
            return waiter
        waiters: List[Deferred] = []
        self._reloading = waiters
        self._last_reload = self._now()

        def loaded(found: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
            datasets = {}
            for key, record in found.items():
                name = key[len(DATASET_PREFIX):]
                if isinstance(record, dict) and dap.valid_name(name):
                    datasets[name] = record
            self.datasets = datasets
            self._schedule_refreshes()
            return datasets

        def done(result: Any) -> Any:
            self._reloading = None
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        d = self._store("query", regex="^" + re.escape(DATASET_PREFIX))
        d.addCallback(loaded)
        d.addBoth(done)  # may run at once: a call can fail before it is sent
        return d

    def _now(self) -> float:
        return self.clock.seconds() if hasattr(self.clock, "seconds") else time.time()

    @inlineCallbacks
    def _lookup(self, name: str) -> Any:
        """The record of C{name}: from memory, else from the store (another
        controller may have registered it); None if there is none."""
        record = self.datasets.get(name)
        if record is not None:
            return record
        record = yield self._stored(name)
        if isinstance(record, dict):
            self.datasets[name] = record
            return record
        return None

    @inlineCallbacks
    def _stored(self, name: str) -> Any:
        """The store's record of C{name}, None if it has none (not this controller's memory)."""
        try:
            record = yield self._store("get", key=dataset_key(name))
        except RemoteError as e:
            if e.remote_type != "KeyError":
                raise
            return None
        return record

    @inlineCallbacks
    def _live(self, name: str) -> Any:
        """The record of a dataset that is registered and not purged, else L{UnknownDataset}."""
        record = yield self._lookup(check_name(name))
        if record is not None and record.get("status") == "purged":
            # it may have been registered again elsewhere since
            self.datasets.pop(name, None)
            record = yield self._lookup(name)
        if record is None or record.get("status") == "purged":
            raise UnknownDataset(f"no dataset {name!r} is registered")
        return record

    # the registry --------------------------------------------------------------------

    @operation
    @inlineCallbacks
    def register(self, name: str, url: str, refresh: Optional[float] = None, check: bool = True,
                 replace: bool = False, expect_every: Optional[float] = None) -> Any:
        """Register (or re-register) dataset C{name} at base URL C{url}; C{refresh}
        is a period in seconds for issue 5's periodic fetch, kept in the record.

        C{check} (default true): the fetcher gets the dataset's C{.dds} and
        C{.das} first (each within L{check_timeout} seconds and
        L{check_max_bytes} bytes), and an upstream that does not answer them
        as DAP refuses the registration with its reason (L{UpstreamError},
        L{UpstreamTimeout}, L{Forbidden}, L{InvalidURL}), so that a typo is
        found now, not in the daemon's log later. C{replace}: a name already
        registered at another URL moves only with it (the record's
        C{replaced} says the URL it had). C{expect_every}: the period in
        seconds the dataset is expected to update in; no new version within
        L{STALE_FACTOR} times it marks it C{stale} (L{check_freshness})."""
        check_name(name)
        base = check_base_url(url, self.allow_hosts, self.allow_private)
        refresh = _period("refresh", refresh)
        expect_every = _period("expect_every", expect_every)
        for flag, value in (("check", check), ("replace", replace)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} is true or false, got {value!r}"[:200])
        existing = yield self._lookup(name)
        live = existing is not None and existing.get("status") != "purged"
        if live and existing.get("url") != base and not replace:
            raise ValueError(f"dataset {name!r} is registered at {existing.get('url')}; "
                             f"register it again with replace (--replace) to move it to {base}")
        if check:
            yield self.check_upstream(base)
        now = self._now()
        if live:
            record = dict(existing, url=base, refresh=refresh, expect_every=expect_every)
            record.pop("replaced", None)
            if existing.get("url") != base:  # a new upstream: what was fetched is no longer known
                record.update(status="registered", last_fetch=None, size=0, versions=0, replaced=existing.get("url"),
                              last_error=None, stale=False, fresh_since=now)
        else:
            record = {"name": name, "url": base, "status": "registered", "registered": time.time(),
                      "last_fetch": None, "size": 0, "versions": 0, "hits": 0, "misses": 0, "refresh": refresh,
                      "expect_every": expect_every, "last_error": None, "stale": False, "fresh_since": now}
        record.setdefault("fresh_since", now)
        yield self._store("set", key=dataset_key(name), value=record)
        self.datasets[name] = record
        self._schedule_refreshes()
        self.log.info("{component}: dataset {name} registered at {url}{replaced}", component=self.name, name=name,
                      url=base, replaced=f" (was {record['replaced']})" if record.get("replaced") else "")
        yield events.emit(self.bus, "registered", name, component=self.name, url=base, refresh=refresh,
                          replaced=record.get("replaced"))
        return record

    @inlineCallbacks
    def check_upstream(self, base: str) -> Any:
        """Fetch C{base}.dds and C{base}.das through the fetcher (its URL
        policy, its HTTP client) and fail with the upstream's reason unless
        both are DAP. Fires with None."""
        checks = [self._check_one(base + suffix, suffix) for suffix in (".dds", ".das")]
        results = yield DeferredList(checks, consumeErrors=True)
        for ok, result in results:  # the .dds's reason first
            if not ok:
                result.raiseException()
        return None

    @inlineCallbacks
    def _check_one(self, url: str, suffix: str) -> Any:
        request_id = uuid.uuid4().hex
        answer = StreamAnswer(request_id)
        listener = yield self.bus.listen(answer.on_message, on_stream=answer.on_stream)
        timeout = self.check_timeout

        def too_slow(result: Any, t: float) -> None:
            raise UpstreamTimeout(f"{url}: no answer within {t:g} s")

        try:
            try:
                yield self.bus.post(self.peers["fetcher"], "fetch", url=url, method="GET",
                                    address=listener.address, request_id=request_id)
            except Unroutable:
                raise UpstreamError("no fetcher is running to check the upstream (register with check false "
                                    "to skip the check)") from None
            answer.answer.addTimeout(timeout, self.clock, onTimeoutCancel=too_slow)
            try:
                stream = yield answer.answer
            except RemoteError as e:
                cls = CHECK_ERRORS.get(e.remote_type, UpstreamError)
                raise cls(f"{url}: {e.message}"[:500]) from None
            meta = stream.metadata if isinstance(stream.metadata, dict) else {}
            body = stream.read_all(limit=self.check_max_bytes)
            body.addTimeout(timeout, self.clock, onTimeoutCancel=too_slow)
            try:
                data = yield body
            except MagnetError as e:
                raise UpstreamError(f"{url}: {e}"[:500]) from None
            status = meta.get("status")
            if status != 200:
                first = data[:200].decode("utf-8", "replace").strip().splitlines()
                raise UpstreamError(f"{url}: the upstream answered {status} {meta.get('reason') or ''}".rstrip()
                                    + (f": {first[0]}" if first else ""))
            if not data.lstrip().startswith(CHECK_SIGNATURES[suffix]):
                raise UpstreamError(f"{url}: not DAP (the {suffix} does not start with "
                                    f"{CHECK_SIGNATURES[suffix].decode()})")
        finally:
            listener.close().addErrback(lambda _: None)
        return None

    def _record_lock(self, name: str) -> DeferredLock:
        """The lock a dataset's record is read and written under in this
        controller: an event's update (read, change, write) and a purge never
        interleave, so an event of a fetch that ends just after a purge cannot
        write the record back as not purged."""
        lock = self._record_locks.get(name)
        if lock is None:
            lock = self._record_locks[name] = DeferredLock()
        return lock

    @inlineCallbacks
    def _mark_purged(self, name: str) -> Any:
        record = yield self._live(name)
        record = dict(record, status="purged", purged=time.time())
        yield self._store("set", key=dataset_key(name), value=record)
        self.datasets[name] = record
        return record

    @operation
    @inlineCallbacks
    def purge(self, name: str) -> Any:
        """Take dataset C{name} out of the exchange: its record is marked
        C{purged} (requests for it are refused) and the cache drops what it holds."""
        record = yield self._record_lock(check_name(name)).run(self._mark_purged, name)
        try:
            yield self.bus.post(self.peers["cache"], "purge", name=name, base_url=record.get("url"))
        except Unroutable:
            self.log.info("{component}: no cache to purge {name} from", component=self.name, name=name)
        except MagnetError as e:
            self.log.warn("{component}: could not ask the cache to purge {name}: {reason}",
                          component=self.name, name=name, reason=e)
        self._schedule_refreshes()
        self.log.info("{component}: dataset {name} purged", component=self.name, name=name)
        yield events.emit(self.bus, "purged", name, component=self.name, url=record.get("url"))
        return record

    @operation
    @inlineCallbacks
    def list(self, pattern: Optional[str] = None) -> Any:
        """Every dataset record (purged ones included, by their status), sorted by
        name; C{pattern}: a regular expression the name must match (C{re.search})."""
        matcher = None
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_LENGTH:
                raise ValueError(f"pattern is a regular expression of at most {MAX_PATTERN_LENGTH} characters")
            try:
                matcher = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {pattern!r}: {e}") from None
        datasets = yield self.reload()
        return [self._with_counts(record) for name, record in sorted(datasets.items())
                if matcher is None or matcher.search(name)]

    @operation
    @inlineCallbacks
    def get(self, name: str) -> Any:
        """The record of dataset C{name} (C{UnknownDataset} if there is none)."""
        check_name(name)
        self.datasets.pop(name, None)  # an operator asks rarely: take the store's word
        record = yield self._lookup(name)
        if record is None:
            raise UnknownDataset(f"no dataset {name!r} is registered")
        return self._with_counts(record)

    def _with_counts(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record with this controller's counts for it (hits, misses since it started)."""
        counts = self.per_dataset.get(record.get("name", ""))
        if not counts:
            return record
        return dict(record, hits=record.get("hits", 0) + counts["hits"],
                    misses=record.get("misses", 0) + counts["misses"])

    # the data path -------------------------------------------------------------------

    @operation
    @inlineCallbacks
    def route(self, url: Optional[str] = None, dataset: Optional[str] = None, suffix: str = "",
              query: Optional[str] = None, method: str = "GET", *, address: str,
              request_id: Optional[str] = None) -> Any:
        """The proxy's one call for a request (docs/data-path.md, "route"): what it
        names (an absolute C{url}, or a C{dataset} by name with the request's DAP
        C{suffix} and C{query}, the constraint: None for no "?") is resolved here,
        from the registry in memory, checked, counted, and handed to the cache in
        one post (C{cache.answer}, with the proxy's C{address}): the cache streams
        a fresh stored answer, or fetches it and stores it as it goes. Without a
        cache on the bus a fetcher fetches it, not stored. Returns C{{"via",
        "dataset", "url"}} (a reply at C{address}, only logged there)."""
        try:
            if method not in METHODS:
                raise InvalidURL(f"method {str(method)[:16]!r} is not supported (GET or HEAD)")
            if not isinstance(address, str) or not address:
                raise ValueError("route needs the address to answer at")
            if dataset is not None:
                if url is not None:
                    raise ValueError("route takes a url or a dataset, not both")
                record = yield self._live(dataset)
                url = _by_name_url(record.get("url"), suffix, query)
            elif not isinstance(url, str):
                raise InvalidURL("route needs a url or a dataset")
            name = yield self._route(url, dataset)
        except Exception:
            self._count(None, errors=1)
            raise
        self._count(name, requests=1)
        try:
            via = yield self._answer(url, method, address, request_id, name)
        except Exception:
            self._count(name, errors=1)
            raise
        return {"via": via, "dataset": name, "url": url}

    @inlineCallbacks
    def _answer(self, url: str, method: str, address: str, request_id: Optional[str], name: Optional[str]) -> Any:
        """Hand a routed request to the cache (one post), or to a fetcher when no cache runs."""
        try:
            yield self.bus.post(self.peers["cache"], "answer", url=url, method=method, address=address,
                                request_id=request_id, dataset=name)
            return "cache"
        except Unroutable:
            self.log.info("{component}: no cache on the bus; fetching {url} unstored", component=self.name, url=url)
        yield self.bus.post(self.peers["fetcher"], "fetch", url=url, method=method, address=address,
                            request_id=request_id, store=None, validators=None)
        return "fetcher"

    @inlineCallbacks
    def _route(self, url: Any, dataset: Optional[str]) -> Any:
        """The dataset C{url} belongs to (None for an allowed host), or the error to answer."""
        if dataset is not None:
            record = yield self._live(dataset)
            bases = {dataset: record.get("url")}
            return urlpolicy.check_registered(url, bases, self.allow_hosts, self.allow_private) and dataset
        try:
            return urlpolicy.check_registered(url, self._bases(), self.allow_hosts, self.allow_private)
        except Forbidden:
            # perhaps registered on another node since: reload (not too often) and look again
            if self._now() - self._last_reload < self.reload_interval and self._reloading is None:
                raise
            yield self.reload()
            return urlpolicy.check_registered(url, self._bases(), self.allow_hosts, self.allow_private)

    def _bases(self) -> Dict[str, str]:
        return {name: record.get("url") for name, record in self.datasets.items()
                if record.get("status") != "purged" and isinstance(record.get("url"), str)}

    @operation
    @inlineCallbacks
    def get_dataset(self, name: str, to: Optional[List[str]] = None) -> Any:
        """Have a fetcher fetch dataset C{name} (.das, .dds, .dods) for every
        subscription pub_sub routes it to, or, given C{to} (a list of
        addresses), for those addresses only: a persister asking again for a
        version it could not save names its own address, so that no other
        subscriber gets a second copy."""
        if to is not None and not (isinstance(to, list) and to and all(isinstance(a, str) and a for a in to)):
            raise BadArguments("BadArguments", f"to must be a non-empty list of addresses, got {str(to)[:100]}")
        record = yield self._live(name)
        extra = {} if to is None else {"to": to}
        yield self.bus.post(self.peers["fetcher"], "fetch_dataset", name=name, url=record["url"],
                            address=self.peers["pub_sub"], **extra)
        return {"name": name, "url": record["url"], "address": self.peers["pub_sub"], **extra}

    # periodic refresh ----------------------------------------------------------------

    def _schedule_refreshes(self) -> None:
        """Make the refresh timers match the registry: one per live dataset with a
        C{refresh} interval; a changed interval restarts its timer."""
        if not self.running and not self._loops:
            return  # not started (or stopped): no timers
        wanted: Dict[str, float] = {}
        for name, record in self.datasets.items():
            interval = record.get("refresh")
            if record.get("status") != "purged" and isinstance(interval, (int, float)) and \
                    not isinstance(interval, bool) and MIN_REFRESH <= interval <= MAX_REFRESH:
                wanted[name] = float(interval)
        for name, (interval, loop) in list(self.refreshers.items()):
            if wanted.get(name) != interval:
                if loop.running:
                    loop.stop()
                del self.refreshers[name]
        for name, interval in wanted.items():
            if name not in self.refreshers:
                loop = LoopingCall(self._refresh, name, interval)
                loop.clock = self.clock
                loop.start(interval, now=False)
                self.refreshers[name] = (interval, loop)
                self.log.info("{component}: dataset {name} refreshed every {interval} s", component=self.name,
                              name=name, interval=interval)

    def _refresh(self, name: str, interval: float) -> Deferred:
        """One scheduled refresh of C{name}. Never fails (the timer goes on)."""
        d = self._claim_refresh(name, interval)

        def failed(failure: Failure) -> None:
            self.log.warn("{component}: scheduled refresh of {name} failed: {reason}", component=self.name,
                          name=name, reason=failure.getErrorMessage())

        return d.addErrback(failed)

    @inlineCallbacks
    def _claim_refresh(self, name: str, interval: float) -> Any:
        now = self._now()
        record = yield self._stored(name)
        if not isinstance(record, dict) or record.get("status") == "purged" or record.get("refresh") != interval:
            return None  # purged or changed elsewhere; the next reload fixes the timers
        refreshed = record.get("refreshed")
        if isinstance(refreshed, (int, float)) and 0 <= now - refreshed < interval / 2:
            self.log.debug("{component}: {name} was refreshed by another controller", component=self.name,
                           name=name)
            return None
        record = dict(record, refreshed=now)
        yield self._store("set", key=dataset_key(name), value=record)
        self.datasets[name] = record
        self.log.info("{component}: refreshing dataset {name}", component=self.name, name=name)
        result = yield self.get_dataset(name)
        return result


def _by_name_url(base: Any, suffix: Any, query: Any) -> str:
    """The URL a by-name request asks for: the dataset's base URL, the request's
    DAP suffix, and C{"?" + query} when the request had a "?"."""
    if not isinstance(base, str) or not base:
        raise InvalidURL("the dataset's record has no base URL")
    if not isinstance(suffix, str) or (suffix and suffix not in ROUTE_SUFFIXES):
        raise InvalidURL(f"not a DAP suffix: {str(suffix)[:20]!r}")
    if query is not None and (not isinstance(query, str) or len(query) > MAX_QUERY
                              or any(not 0x21 <= ord(c) <= 0x7E for c in query)):
        raise InvalidURL("the constraint is printable ASCII, percent-encoded, of at most "
                         f"{MAX_QUERY} characters")
    return base + suffix + ("?" + query if query is not None else "")


def _period(what: str, value: Any) -> Optional[float]:
    """A period in seconds from MIN_REFRESH to MAX_REFRESH, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (MIN_REFRESH <= value <= MAX_REFRESH):
        raise ValueError(f"{what} is a number of seconds in [{MIN_REFRESH:g}, {MAX_REFRESH:g}] or null, "
                         f"got {value!r}"[:200])
    return float(value)
