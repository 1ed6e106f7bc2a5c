"""The fetcher: GET / HEAD a URL upstream and stream the answer to an address.

Many fetchers share the C{fetcher} worker queue. Each request names the
address to answer (the proxy's per-request listen address) and, for a cache
miss, the cache node to store the response at. See docs/data-path.md, the
contract this module keeps:

- C{fetch(url, method, address, request_id, store, validators, wait=False)}: the status
  and headers become the start of a magnet stream to C{address}, the body
  its chunks as they arrive, with backpressure: while the stream writer has
  no room the upstream connection is paused, so memory stays bounded
  whatever the size of the body. A 200 to a GET with C{store} set goes to
  the cache as a second stream, unless it is larger than C{store_limit}
  (the largest body the cache will keep): then there is no second stream
  (a declared length over it), or the second stream is aborted as soon as
  the body passes it (length unknown). A body that breaks off aborts the streams;
  a failure before the first byte is an error reply to C{address}.
  The request is settled (its message acknowledged) when the transfer is
  over, with its summary as the reply: a fetcher that dies mid-transfer
  leaves its requests to the broker, which gives them to another fetcher.
  How fast a client reads does not decide how many fetches run: the fetcher
  takes as many requests at once as it runs transfers (its consumer's
  prefetch is C{max_transfers}, not the bus-wide one), and the proxy cuts a
  client that reads nothing for C{stall_timeout} seconds, which ends its
  transfer.
- an upstream's answer head is bounded: more than C{MAX_UPSTREAM_HEADERS}
  header fields or C{MAX_UPSTREAM_HEADER_BYTES} bytes of them is an
  C{UpstreamError} (a 502 at the proxy), read no further.
- C{fetch_dataset(name, url)}: a dataset for its subscribers
  (docs/dissemination.md): the C{.das} and C{.dds} whole, the addresses
  from C{pub_sub.route(topic="dataset.NAME")}, then the C{.dods} streamed to
  all of them at once (one stream each, the same chunks; the upstream is
  paused until every stream has room, so the slowest sets the pace). Events
  C{fetched} / C{failed} tell how it went.

Every connection goes through L{ooidx.urlpolicy.PolicyEndpointFactory}:
the host is resolved once, refused if any address is forbidden, and the
connection made to the checked address; redirects are followed here, one
checked hop at a time.

The parts: L{ooidx.datapath.transfer} (one fetch), L{ooidx.datapath.dataset_fetch}
(fetch_dataset), L{ooidx.datapath.upstream} (the HTTP client and what is read
from an answer).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from magnet import operation
from magnet.errors import BadArguments, MagnetError, Unroutable
from magnet.rpc import error_reply

from ooidx import dap, events, urlpolicy
from ooidx.component import Component
from ooidx.config import FetcherOptions, SecurityConfig
from ooidx.datapath.stopping import ended_within
from ooidx.errors import InvalidName, InvalidURL
# the parts (their constants re-exported: tests and benches name them here)
from ooidx.datapath.dataset_fetch import MAX_METADATA_BYTES, DatasetFetch  # noqa: F401 - re-exported
from ooidx.datapath.transfer import ERROR_STATUS, STREAM_CHUNK_SIZE, STREAM_WINDOW, Transfer  # noqa: F401
from ooidx.datapath.upstream import (HOP_BY_HOP, MAX_UPSTREAM_HEADER_BYTES, MAX_UPSTREAM_HEADERS,  # noqa: F401
                                     UPSTREAM_READ_SIZE, BoundedClientFactory)

METHODS = ("GET", "HEAD")
#: The pub_sub component fetch_dataset routes with, unless told another.
PUB_SUB = "pub_sub"
#: The most addresses a fetch_dataset may name in C{to}.
MAX_DIRECT_ADDRESSES = 100


class _Refused(Exception):
    """A transfer that ended with an error reply (nothing was streamed)."""


class Fetcher(Component):
    """The C{fetcher} component: see the module docstring."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, options: Optional[FetcherOptions] = None,
                 security: Optional[SecurityConfig] = None, shutdown_timeout: float = 10.0,
                 resolver: Optional[urlpolicy.Resolver] = None, tls_policy: Any = None) -> None:
        """C{options}: the config's C{components.fetcher}; C{security}: its
        C{security} section (which upstreams may be reached); C{shutdown_timeout}:
        how long a stop waits for the transfers under way."""
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        self.options: FetcherOptions = options if options is not None else FetcherOptions()
        security = security if security is not None else SecurityConfig()
        self.allow_private: bool = security.allow_private
        self.allow_hosts: Tuple[str, ...] = tuple(security.allow_hosts)
        self.shutdown_timeout = shutdown_timeout
        self._resolver = resolver
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._pool: Optional[HTTPConnectionPool] = None
        self._agent: Optional[Agent] = None
        self.active = 0  # transfers in progress
        self.pauses = 0  # times an upstream was paused for want of room downstream
        self.spliced = 0  # bodies moved socket to socket by the kernel (ooidx.datapath.splice)
        #: transfers run at once (max_transfers), apart from the bus's message slots
        self.room = DeferredSemaphore(self.options.max_transfers)
        #: as many requests taken at once as transfers run (each is settled when its transfer ends)
        self.prefetch = self.options.max_transfers
        self._running: set = set()  # the Deferreds of the transfers under way

    # lifecycle ---------------------------------------------------------------

    def setUp(self) -> None:
        self._make_agent()

    def tearDown(self) -> Any:
        """Let the running transfers (their requests are settled already) end,
        for at most the shutdown timeout, then close the connection pool."""
        timeout = self.shutdown_timeout
        running = list(self._running)
        if running:
            self.log.info("{component}: waiting up to {timeout:g} s for {count} transfer(s)", component=self.name,
                          timeout=timeout, count=len(running))
        d = ended_within(running, timeout, self.clock)
        d.addCallback(self._stopped_waiting, timeout)
        return d.addCallback(lambda _: self._close_pool())

    def _stopped_waiting(self, ended: bool, timeout: float) -> None:
        if not ended:
            self.log.warn("{component}: {count} transfer(s) still running after {timeout:g} s; stopping anyway",
                          component=self.name, count=len(self._running), timeout=timeout)

    def _close_pool(self) -> Any:
        pool, self._pool, self._agent = self._pool, None, None
        if pool is not None:
            return pool.closeCachedConnections()
        return None

    @property
    def network(self) -> Any:
        """The reactor the fetches connect with (the agent's): a spliced body is read on it."""
        self._make_agent()
        return self._reactor

    def _make_agent(self) -> Agent:
        if self._agent is None:
            reactor = self._reactor
            if reactor is None:
                if IReactorTCP.providedBy(self.clock):
                    reactor = self.clock
                else:
                    from twisted.internet import reactor as global_reactor
                    reactor = global_reactor
            self._reactor = reactor
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool._factory = BoundedClientFactory
            self._pool.maxPersistentPerHost = 4
            self._pool.cachedConnectionTimeout = 30
            self.endpoints = urlpolicy.PolicyEndpointFactory(
                reactor, allow_private=self.allow_private, allow_hosts=self.allow_hosts,
                timeout=self.options.timeout, resolver=self._resolver, tls_policy=self._tls_policy)
            self._agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self._pool)
        return self._agent

    # operations ------------------------------------------------------------------

    @operation
    def fetch(self, url: Any = None, method: Any = "GET", address: Any = None, request_id: Any = None,
              store: Any = None, validators: Any = None, store_limit: Any = None) -> Deferred:
        """GET or HEAD C{url} and stream the answer to C{address} (and a 200
        GET's to C{store} too, when the body is at most C{store_limit} bytes, the
        largest the cache will keep; null: no limit known). Never fails: problems
        are answered at C{address}. Fires once the transfer is over, with its
        summary (so the request's message is settled then: see the module
        docstring); transfers at once are bounded by C{max_transfers}."""
        if not isinstance(address, str) or not address:
            self.log.error("{component}: fetch without an address to answer (url {url!r}); dropped",
                           component=self.name, url=url)
            return succeed({"error": "BadArguments", "message": "no address"})
        try:
            method, validators = self._check_fetch(url, method, request_id, store, validators)
            if store_limit is not None and (not isinstance(store_limit, int) or isinstance(store_limit, bool)
                                            or store_limit < 0):
                raise BadArguments("BadArguments", "store_limit must be a byte count (integer >= 0) or null")
        except (InvalidURL, BadArguments) as e:
            return self._refuse(address, request_id, url, e, record=False)
        transfer = Transfer(self, url, method, address, request_id, store=store, validators=validators,
                             store_limit=store_limit)
        return self.room.acquire().addCallback(self._start, transfer)

    def run_transfer(self, transfer: "Transfer") -> Deferred:
        """Run a transfer made elsewhere (the cache's miss path, which fetches where the
        body is stored) under this fetcher's bound on transfers at once."""
        return self.room.acquire().addCallback(self._start, transfer)

    def _start(self, _: Any, transfer: "Transfer") -> Deferred:
        """Run a transfer that has room; its request is settled when it ends."""
        try:
            d = transfer.run()
        except Exception:  # noqa: BLE001 - run is inlineCallbacks; this is a bug, logged by _bug
            d = fail()
        d.addCallback(self._recorded, transfer.url, transfer).addErrback(self._bug, transfer.url)
        d.addBoth(self._ended, d)
        if not d.called:
            self._running.add(d)
        return d

    def _ended(self, result: Any, d: Deferred) -> Any:
        self._running.discard(d)
        self.room.release()
        return result

    def _bug(self, failure: Failure, url: Any) -> Dict[str, Any]:
        """A failure nothing else caught: logged, never retried (the request was answered or aborted)."""
        self.log.failure("{component}: fetch of {url} failed", failure, component=self.name, url=url)
        return {"error": failure.type.__name__, "message": failure.getErrorMessage(), "status": 502, "bytes": 0}

    @operation
    def fetch_dataset(self, name: Any = None, url: Any = None, address: Any = None,
                      request_id: Any = None, to: Any = None) -> Deferred:
        """Fetch dataset C{name} at base URL C{url} for its subscribers
        (docs/dissemination.md): the C{.das} and C{.dds} whole, then
        C{route(topic="dataset.NAME")} on pub_sub, then the C{.dods} streamed to
        every routed address at once. C{address} names the pub_sub component
        to route with (default C{pub_sub}). C{to}, a list of addresses, skips
        the routing: the dataset goes to those addresses only (a persister
        asking again for a version its full disk lost must not send every
        other subscriber a copy). Never fails (a post is not retried for an
        upstream's fault): the outcome is an event, C{fetched} or C{failed},
        and the summary this returns."""
        pub_sub = address if isinstance(address, str) and address else PUB_SUB
        try:
            if request_id is not None and not isinstance(request_id, str):
                raise BadArguments("BadArguments", "request_id must be a string or null")
            if to is not None and not (isinstance(to, list) and 0 < len(to) <= MAX_DIRECT_ADDRESSES and
                                       all(isinstance(a, str) and 0 < len(a) <= 255 for a in to)):
                raise BadArguments("BadArguments", f"to must be a list of 1 to {MAX_DIRECT_ADDRESSES} "
                                   "addresses (strings of at most 255 characters) or null")
            if not dap.valid_name(name):
                raise InvalidName(f"not a valid dataset name: {name!r}"[:200])
            if not isinstance(url, str):
                raise InvalidURL(f"fetch_dataset needs a base url, got {url!r}"[:200])
            urlpolicy.parse_url(url)
            if dap.split_url(url).constraint is not None:
                raise InvalidURL("a dataset's base URL has no query string")
        except (InvalidURL, InvalidName, BadArguments) as e:
            kind = e.remote_type if isinstance(e, BadArguments) else type(e).__name__
            message = e.message if isinstance(e, BadArguments) else str(e)
            self.log.warn("{component}: fetch_dataset refused: {kind}: {message}", component=self.name, kind=kind,
                          message=message)
            summary = {"dataset": name if dap.valid_name(name) else None, "error": kind, "message": message}
            d = events.emit(self.bus, "failed", summary["dataset"], component=self.name, stage="request",
                            url=url if isinstance(url, str) else None, error=kind, reason=message[:500])
            return d.addCallback(lambda _: summary)
        fetch = DatasetFetch(self, name, url, pub_sub, request_id, to)
        return fetch.run().addErrback(self._bug, url)

    # helpers -----------------------------------------------------------------------

    def _check_fetch(self, url: Any, method: Any, request_id: Any, store: Any,
                     validators: Any) -> Tuple[str, Dict[str, Optional[str]]]:
        if not isinstance(url, str) or not url:
            raise InvalidURL(f"fetch needs a url, got {url!r}"[:200])
        urlpolicy.parse_url(url)
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise BadArguments("BadArguments", f"method must be GET or HEAD, got {method!r}"[:200])
        if request_id is not None and not isinstance(request_id, str):
            raise BadArguments("BadArguments", "request_id must be a string or null")
        if store is not None and (not isinstance(store, str) or not store):
            raise BadArguments("BadArguments", "store must be an address (string) or null")
        checked: Dict[str, Optional[str]] = {}
        if validators is not None:
            if not isinstance(validators, dict):
                raise BadArguments("BadArguments", "validators must be an object or null")
            for key in ("etag", "last_modified"):
                value = validators.get(key)
                if value is not None and (not isinstance(value, str) or "\n" in value or "\r" in value):
                    raise BadArguments("BadArguments", f"validators.{key} must be a string or null")
                checked[key] = value
        return method.upper(), checked

    def _refuse(self, address: str, request_id: Optional[str], url: Any, exc: Exception,
                *, record: bool = True) -> Deferred:
        """Answer C{address} with an error reply; fires with the summary."""
        kind = exc.remote_type if isinstance(exc, MagnetError) and hasattr(exc, "remote_type") else type(exc).__name__
        message = exc.message if hasattr(exc, "remote_type") else str(exc)
        self.log.info("{component}: {url} refused: {kind}: {message}", component=self.name, url=url,
                      kind=kind, message=message)
        d = self.bus.send(address, error_reply(Failure(exc), request_id))
        d.addErrback(lambda f: self.log.info("{component}: error reply to {address} not delivered: {reason}",
                                             component=self.name, address=address,
                                             reason=f.getErrorMessage()))
        summary = {"error": kind, "message": message, "status": ERROR_STATUS.get(kind, 502), "bytes": 0}
        if record and isinstance(url, str):
            d.addCallback(lambda _: self._record(url, summary))
        return d.addCallback(lambda _: summary)

    def _recorded(self, summary: Dict[str, Any], url: str, transfer: "Transfer") -> Any:
        if transfer.revalidated:
            return summary
        return self._record(url, summary).addCallback(lambda _: summary)

    def _record(self, url: str, summary: Dict[str, Any]) -> Deferred:
        d = self.bus.post("controller", "record", dataset=None, url=url, hit=False,
                          bytes=summary.get("bytes", 0), status=summary.get("status"))

        def failed(f: Failure) -> None:
            if not f.check(Unroutable):
                self.log.warn("{component}: record for {url} not sent: {reason}", component=self.name, url=url,
                              reason=f.getErrorMessage())

        return d.addErrback(failed)
