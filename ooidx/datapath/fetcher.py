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
  The request is settled (its message acknowledged) as soon as the transfer
  starts, not when it ends: a message slot (the bus prefetch) is never tied
  to how fast the client reads. Transfers run at once are bounded on their
  own (C{max_transfers}); past the bound a request waits, holding its slot,
  for a transfer to end. C{wait=True}: the reply comes when the transfer is
  over, with its summary (for tools and tests).
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
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urljoin

from twisted.internet import error as net_error, tcp
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, DeferredSemaphore,
                                    TimeoutError as DeferredTimeout, fail, inlineCallbacks, succeed)
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from magnet import operation
from magnet.errors import BadArguments, MagnetError, RemoteError, Unroutable
from magnet.rpc import error_reply

from ooidx import dap, events, urlpolicy
from ooidx import wire
from ooidx.component import Component
from ooidx.config import FetcherOptions, SecurityConfig
from ooidx.datapath.waiting import ended_within
from ooidx.errors import Forbidden, InvalidName, InvalidURL, UpstreamError, UpstreamTimeout

METHODS = ("GET", "HEAD")
REDIRECTS = (301, 302, 303, 307, 308)
#: Removed from every answer (RFC 9110 section 7.6.1), with what Connection names.
HOP_BY_HOP = wire.HOP_BY_HOP
USER_AGENT = b"ooidx-fetcher/0.1"
#: The pub_sub component fetch_dataset routes with, unless told another.
PUB_SUB = "pub_sub"
#: The most addresses a fetch_dataset may name in C{to}.
MAX_DIRECT_ADDRESSES = 100
#: The largest .das / .dds fetch_dataset reads (they travel whole, in the stream's start).
MAX_METADATA_BYTES = 16 * 1024 * 1024
#: The HTTP status the proxy answers for each error type (for the record).
_ERROR_STATUS = {"Forbidden": 403, "InvalidURL": 400, "InvalidName": 400, "BadArguments": 400,
                 "UpstreamTimeout": 504}
#: Bytes asked of the upstream's socket per read while a body streams (Twisted reads
#: 64 KiB at a time; each read costs a trip through the HTTP client's parser).
UPSTREAM_READ_SIZE = 512 * 1024
#: The largest chunk of a fetch's streams: a piece read from the upstream (at
#: most UPSTREAM_READ_SIZE) goes on as one chunk, not copied into smaller ones.
STREAM_CHUNK_SIZE = UPSTREAM_READ_SIZE
#: Chunks of a fetch's stream awaiting the broker's confirm (the bytes in
#: flight: STREAM_WINDOW times STREAM_CHUNK_SIZE at most).
STREAM_WINDOW = 4
#: The most header fields, and bytes of the status line and header fields, an
#: upstream's answer may have: more is refused (Twisted's client has no bound).
MAX_UPSTREAM_HEADERS = 100
MAX_UPSTREAM_HEADER_BYTES = 64 * 1024
#: Characters left as they are when a URL is made ASCII for the request line.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~-._\"<>^`{|}\\"


class _Refused(Exception):
    """A transfer that ended with an error reply (nothing was streamed)."""


class Fetcher(Component):
    """The C{fetcher} component: see the module docstring."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, config: Any = None,
                 clock: Any = None, resolver: Optional[urlpolicy.Resolver] = None, reactor: Any = None,
                 tls_policy: Any = None) -> None:
        super().__init__(name, bus, node=node, instances=instances, config=config, clock=clock)
        component = config.components.get(name) if config is not None else None
        options = getattr(component, "options", None)
        self.options: FetcherOptions = options if isinstance(options, FetcherOptions) else FetcherOptions()
        security = getattr(config, "security", None) or SecurityConfig()
        self.allow_private: bool = security.allow_private
        self.allow_hosts: Tuple[str, ...] = tuple(security.allow_hosts)
        self._resolver = resolver
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._pool: Optional[HTTPConnectionPool] = None
        self._agent: Optional[Agent] = None
        self.active = 0  # transfers in progress
        self.pauses = 0  # times an upstream was paused for want of room downstream
        #: transfers run at once (max_transfers), apart from the bus's message slots
        self.room = DeferredSemaphore(self.options.max_transfers)
        self._running: set = set()  # the Deferreds of transfers whose request is settled

    # lifecycle ---------------------------------------------------------------

    def setUp(self) -> None:
        self._make_agent()

    def tearDown(self) -> Any:
        """Let the running transfers (their requests are settled already) end,
        for at most the shutdown timeout, then close the connection pool."""
        timeout = getattr(getattr(self.config, "timeouts", None), "shutdown", None) or 10.0
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
            self._pool._factory = _BoundedClientFactory
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
              store: Any = None, validators: Any = None, store_limit: Any = None, wait: Any = False) -> Deferred:
        """GET or HEAD C{url} and stream the answer to C{address} (and a 200
        GET's to C{store} too, when the body is at most C{store_limit} bytes, the
        largest the cache will keep; null: no limit known). Never fails: problems
        are answered at C{address}. Fires once the transfer has started (it goes
        on, bounded by C{max_transfers}, after the request is settled), with
        C{{"started": true}}; with C{wait} true, once it is over, with its summary."""
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
        transfer = _Transfer(self, url, method, address, request_id, store=store, validators=validators,
                             store_limit=store_limit)
        return self.room.acquire().addCallback(self._start, transfer, bool(wait))

    def _start(self, _: Any, transfer: "_Transfer", wait: bool) -> Any:
        """Run a transfer that has room; its request is settled now unless C{wait}."""
        try:
            d = transfer.run()
        except Exception:  # noqa: BLE001 - run is inlineCallbacks; this is a bug, logged by _bug
            d = fail()
        d.addCallback(self._recorded, transfer.url, transfer).addErrback(self._bug, transfer.url)
        d.addBoth(self._ended, d)
        if wait:
            return d
        self._running.add(d)
        return {"started": True}

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
        fetch = _DatasetFetch(self, name, url, pub_sub, request_id, to)
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
        summary = {"error": kind, "message": message, "status": _ERROR_STATUS.get(kind, 502), "bytes": 0}
        if record and isinstance(url, str):
            d.addCallback(lambda _: self._record(url, summary))
        return d.addCallback(lambda _: summary)

    def _recorded(self, summary: Dict[str, Any], url: str, transfer: "_Transfer") -> Any:
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


class _Sink:
    """One stream being written (to the client's address, or the store)."""

    def __init__(self, writer: Any, role: str) -> None:
        self.writer = writer
        self.role = role
        self.failure: Optional[Failure] = None

    def write(self, data: bytes) -> Optional[Deferred]:
        """Write; a Deferred if the writer has no room yet, else None."""
        if self.failure is not None:
            return None
        d = self.writer.write(data)
        d.addErrback(self._broken)
        if d.called:
            return None
        return d

    def _broken(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure

    def finish(self) -> Deferred:
        if self.failure is not None:
            return succeed(None)
        return self.writer.finish().addErrback(self._broken)

    def abort(self, exc: BaseException) -> Deferred:
        return self.writer.abort(exc)


class _Transfer:
    """One fetch: request (following redirects), then stream the answer."""

    def __init__(self, fetcher: Fetcher, url: str, method: str, address: str, request_id: Optional[str], *,
                 store: Optional[str] = None, validators: Optional[Dict[str, Optional[str]]] = None,
                 extra: Optional[Dict[str, Any]] = None, store_limit: Optional[int] = None) -> None:
        self.fetcher = fetcher
        self.log = fetcher.log
        self.name = fetcher.name
        self.url = url
        self.method = method
        self.address = address
        self.request_id = request_id
        self.store = store
        self.store_limit = store_limit
        self.validators = validators or {}
        self.extra = extra or {}
        self.options = fetcher.options
        self.clock = fetcher.clock
        self.revalidated = False

    @inlineCallbacks
    def run(self) -> Any:
        self.fetcher.active += 1
        try:
            try:
                response = yield self._request()
            except Exception:  # noqa: BLE001 - every failure is answered
                exc = _classify(Failure(), self.url, self.options.timeout)
                result = yield self.fetcher._refuse(self.address, self.request_id, self.url, exc, record=False)
                return result
            try:
                result = yield self._answer(response)
            except Exception:  # noqa: BLE001 - a bug: say so at the address rather than leave it waiting
                self.log.failure("{component}: answering {url} failed", component=self.name, url=self.url)
                result = yield self.fetcher._refuse(self.address, self.request_id, self.url,
                                                    UpstreamError("internal error in the fetcher"), record=False)
            return result
        finally:
            self.fetcher.active -= 1

    # the request -------------------------------------------------------------------

    @inlineCallbacks
    def _request(self) -> Any:
        agent = self.fetcher._make_agent()
        current = self.url
        method = self.method
        for hop in range(self.options.max_redirects + 1):
            urlpolicy.check_url(current, self.fetcher.allow_private, self.fetcher.allow_hosts)
            headers = Headers({b"User-Agent": [USER_AGENT]})
            if self.validators.get("etag"):
                headers.addRawHeader(b"If-None-Match", self.validators["etag"].encode("latin-1"))
            if self.validators.get("last_modified"):
                headers.addRawHeader(b"If-Modified-Since", self.validators["last_modified"].encode("latin-1"))
            response = yield self._with_timeout(agent.request(method.encode("ascii"), _ascii(current), headers))
            location = response.headers.getRawHeaders(b"location")
            if response.code not in REDIRECTS or not location:
                self.final_url = current
                return response
            _discard(response)
            if hop == self.options.max_redirects:
                raise UpstreamError(f"more than {self.options.max_redirects} redirects")
            target = urljoin(current, location[0].decode("latin-1").strip())
            try:
                urlpolicy.check_url(target, self.fetcher.allow_private, self.fetcher.allow_hosts)
            except InvalidURL as e:
                raise UpstreamError(f"bad redirect to {target[:200]}: {e}") from None
            except Forbidden as e:
                raise Forbidden(f"redirect to {target[:200]} refused: {e}") from None
            self.log.debug("{component}: {url} redirects ({status}) to {target}", component=self.name,
                           url=current, status=response.code, target=target)
            if response.code == 303 and method != "HEAD":
                method = "GET"
            current = target
        raise UpstreamError("redirect loop")  # not reached

    def _with_timeout(self, d: Deferred) -> Deferred:
        """C{d}, cancelled (an L{UpstreamTimeout}) if no answer came within the fetch timeout."""

        def timed_out(result: Any, timeout: float) -> None:
            raise UpstreamTimeout(f"no answer within {timeout:g} s")

        return d.addTimeout(self.options.timeout, self.clock, onTimeoutCancel=timed_out)

    # the answer ---------------------------------------------------------------------

    def _answer(self, response: Any) -> Deferred:
        status = response.code
        if status == 304 and self.store and self.validators and any(self.validators.values()):
            _discard(response)
            self.revalidated = True
            d = self.fetcher.bus.post(self.store, "serve", url=self.url, method=self.method, address=self.address,
                                      request_id=self.request_id, revalidated=True)

            def not_sent(f: Failure) -> Deferred:
                self.revalidated = False
                self.log.warn("{component}: cache {store} unreachable after a 304 for {url}: {reason}",
                              component=self.name, store=self.store, url=self.url, reason=f.getErrorMessage())
                return self.fetcher._refuse(self.address, self.request_id, self.url,
                                            UpstreamError("cache unreachable after revalidation"), record=False)

            return d.addCallbacks(lambda _: {"status": 304, "bytes": 0, "revalidated": True}, not_sent)
        headers = _end_to_end(response.headers, _connection_header(response))
        declared = _content_length(response.headers)
        length = declared if self.method == "HEAD" else (
            None if response.length is UNKNOWN_LENGTH else response.length)
        if self.method == "GET" and length is not None and declared is None:
            # Twisted's client keeps Content-Length to itself (a connection
            # header to it); the upstream declared it, so pass it on.
            headers.append(["Content-Length", str(length)])
        if self.method == "GET" and length is not None and length > self.options.max_bytes:
            _discard(response)
            return self.fetcher._refuse(self.address, self.request_id, self.url, UpstreamError(
                f"response of {length} bytes is over the limit of {self.options.max_bytes}"), record=False)
        metadata = {"status": status, "reason": response.phrase.decode("latin-1", "replace"),
                    "headers": headers, "url": self.url, "source": "fetcher", "length": length, **self.extra}
        bus = self.fetcher.bus
        sinks = [_Sink(bus.open_stream(self.address, metadata, correlation_id=self.request_id,
                                       chunk_size=STREAM_CHUNK_SIZE, window=STREAM_WINDOW), "client")]
        if self.store and self.method == "GET" and status == 200 and not (
                self.store_limit is not None and length is not None and length > self.store_limit):
            validators = {"etag": _header(response.headers, b"etag"),
                          "last_modified": _header(response.headers, b"last-modified")}
            store_metadata = {**metadata, "store": True, "validators": validators}
            sinks.append(_Sink(bus.open_stream(self.store, store_metadata, correlation_id=self.request_id,
                                               chunk_size=STREAM_CHUNK_SIZE, window=STREAM_WINDOW), "store"))
        elif self.store and self.method == "GET" and status == 200:
            self.log.debug("{component}: {url}: {length} bytes, over the cache's limit of {limit}; not stored",
                           component=self.name, url=self.url, length=length, limit=self.store_limit)
        pump = _BodyPump(self, sinks, status, store_limit=self.store_limit)
        response.deliverBody(pump)
        return pump.done


class _BodyPump(Protocol):
    """Receives the body; writes each chunk to the streams, pausing the
    upstream while they have no room, and ends or aborts them."""

    def __init__(self, transfer: _Transfer, sinks: List[_Sink], status: int, *,
                 store_limit: Optional[int] = None) -> None:
        self.transfer = transfer
        self.status = status
        self.sinks = sinks
        self.client = sinks[0]
        #: past this many bytes the store streams (sinks[1:]) are aborted: the cache would not keep them
        self.store_limit = store_limit
        self.clock = transfer.clock
        self.timeout = transfer.options.timeout
        self.max_bytes = transfer.options.max_bytes
        self.bytes = 0
        self.finished = False
        self.paused = False
        self.done: Deferred = Deferred()
        self._idle: Any = None

    # the upstream side -----------------------------------------------------------

    def connectionMade(self) -> None:
        _widen_reads(self.transport)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._fail(UpstreamError(f"body over the limit of {self.max_bytes} bytes"))
            return
        if self.store_limit is not None and self.bytes > self.store_limit and len(self.sinks) > 1:
            self._drop_stores(f"body over the cache's limit of {self.store_limit} bytes")
        waits = [d for d in (sink.write(data) for sink in self.sinks) if d is not None]
        if self._check_sinks():
            return
        if waits:
            self._disarm()
            if not self.paused:
                self.paused = True
                self.transfer.fetcher.pauses += 1
                self.transport.pauseProducing()
            DeferredList(waits, consumeErrors=True).addCallback(self._room)
        else:
            self._arm()

    def _room(self, _: Any) -> None:
        if self.finished or self._check_sinks():
            return
        if self.paused:
            self.paused = False
            self._arm()
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished:
            return
        if reason is None or reason.check(ResponseDone):
            self._finish()
        elif reason.check(PotentialDataLoss):
            # Delimited by the connection's close: what the upstream sent, but
            # unverifiable; the client gets it, the cache does not keep it.
            for sink in self.sinks[1:]:
                sink.abort(UpstreamError("body delimited by connection close (unverifiable)"))
            self.sinks = self.sinks[:1]
            self._finish()
        else:
            self._fail(UpstreamError(f"upstream broke off the body after {self.bytes} bytes: {_reason(reason)}"),
                       stop=False)

    # the streams' side ---------------------------------------------------------------

    def _drop_stores(self, why: str) -> None:
        """Stop feeding the store streams: aborted, so the cache drops what it got."""
        self.transfer.log.debug("{component}: {url}: store stream aborted: {why}", component=self.transfer.name,
                                url=self.transfer.url, why=why)
        for sink in self.sinks[1:]:
            sink.abort(UpstreamError(why))
        self.sinks = self.sinks[:1]

    def _check_sinks(self) -> bool:
        """Drop a broken store stream; give up if the client's broke. True if given up."""
        for sink in self.sinks[1:]:
            if sink.failure is not None:
                self.transfer.log.warn("{component}: store stream for {url} broke: {reason}",
                                       component=self.transfer.name, url=self.transfer.url,
                                       reason=sink.failure.getErrorMessage())
                sink.abort(UpstreamError("store stream broke"))
                self.sinks.remove(sink)
        if self.client.failure is not None:
            self._fail(UpstreamError(f"stream to the client broke: {self.client.failure.getErrorMessage()}"))
            return True
        return False

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        d = DeferredList([sink.finish() for sink in self.sinks], consumeErrors=True)

        def ended(_: Any) -> Dict[str, Any]:
            if self.client.failure is not None:
                return {"error": "UpstreamError", "message": "stream to the client broke", "status": 502,
                        "bytes": self.bytes}
            return {"status": self.status, "bytes": self.bytes}

        d.addCallback(ended).chainDeferred(self.done)

    def _fail(self, exc: Exception, stop: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self._disarm()
        self.transfer.log.info("{component}: {url}: {kind}: {message}", component=self.transfer.name,
                               url=self.transfer.url, kind=type(exc).__name__, message=str(exc))
        if stop and self.transport is not None:
            self.transport.stopProducing()
        d = DeferredList([sink.abort(exc) for sink in self.sinks], consumeErrors=True)
        kind = type(exc).__name__
        d.addCallback(lambda _: {"error": kind, "message": str(exc), "status": _ERROR_STATUS.get(kind, 502),
                                 "bytes": self.bytes})
        d.chainDeferred(self.done)

    # idle timeout -------------------------------------------------------------------

    def _arm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.timeout)
        else:
            self._idle = self.clock.callLater(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _timed_out(self) -> None:
        self._idle = None
        self._fail(UpstreamTimeout(f"no data from upstream for {self.timeout:g} s after {self.bytes} bytes"))


class _DatasetFetch:
    """One fetch_dataset: .das and .dds whole, route, .dods to every address."""

    def __init__(self, fetcher: Fetcher, name: str, base: str, pub_sub: str, request_id: Optional[str],
                 to: Optional[List[str]] = None) -> None:
        self.fetcher = fetcher
        self.to = to
        self.log = fetcher.log
        self.name = name
        self.base = base
        self.pub_sub = pub_sub
        self.request_id = request_id
        self.topic = f"dataset.{name}"
        self.stage = "das"

    @inlineCallbacks
    def run(self) -> Any:
        fetcher = self.fetcher
        fetcher.active += 1
        try:
            try:
                texts = {}
                for part in ("das", "dds"):
                    self.stage = part
                    texts[part] = yield self._whole(dap.dataset_url(self.base, part))
                self.stage = "route"
                addresses = _unique(self.to) if self.to else (yield self._route())
                if not addresses:
                    self.log.info("{component}: dataset {dataset}: no subscription matches {topic}; "
                                  ".dods not fetched", component=fetcher.name, dataset=self.name, topic=self.topic)
                    summary = {"dataset": self.name, "addresses": [], "bytes": 0, "status": None}
                    yield self._event("fetched", url=self.base, addresses=0, delivered=0, bytes=0)
                    return summary
                self.stage = "dods"
                summary = yield self._stream_dods(texts, addresses)
            except Exception:  # noqa: BLE001 - every failure becomes an event
                failure = Failure()
                exc = failure.value if failure.check(RemoteError, Unroutable, MagnetError) and \
                    self.stage == "route" else _classify(failure, self.base, fetcher.options.timeout)
                summary = {"dataset": self.name, "error": type(exc).__name__, "message": str(exc),
                           "stage": self.stage}
            if "error" in summary:
                self.log.warn("{component}: dataset {dataset} not fetched ({stage}): {error}: {message}",
                              component=fetcher.name, dataset=self.name, stage=summary.get("stage", self.stage),
                              error=summary["error"], message=summary["message"])
                yield self._event("failed", url=self.base, stage=summary.get("stage", self.stage),
                                  error=summary["error"], reason=summary["message"][:500],
                                  bytes=summary.get("bytes", 0))
            else:
                self.log.info("{component}: dataset {dataset} fetched: {bytes} bytes of .dods to {count} "
                              "address(es)", component=fetcher.name, dataset=self.name, bytes=summary["bytes"],
                              count=len(summary["addresses"]))
                yield self._event("fetched", url=self.base, addresses=len(summary["addresses"]),
                                  delivered=len(summary["delivered"]), bytes=summary["bytes"],
                                  length=summary.get("length"))
            return summary
        finally:
            fetcher.active -= 1

    def _event(self, kind: str, **details: Any) -> Deferred:
        return events.emit(self.fetcher.bus, kind, self.name, component=self.fetcher.name, **details)

    def _transfer(self, url: str) -> "_Transfer":
        return _Transfer(self.fetcher, url, "GET", "", self.request_id)

    @inlineCallbacks
    def _whole(self, url: str) -> Any:
        """The text of a small answer (.das, .dds): 200 only, at most 16 MiB."""
        transfer = self._transfer(url)
        response = yield transfer._request()
        if response.code != 200:
            _discard(response)
            raise UpstreamError(f"{url[-200:]} answered {response.code}")
        limit = min(MAX_METADATA_BYTES, self.fetcher.options.max_bytes)
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            _discard(response)
            raise UpstreamError(f"{url[-200:]} is {response.length} bytes, over the limit of {limit}")
        collect = _Collect(limit, self.fetcher.options.timeout, transfer.clock)
        response.deliverBody(collect)
        body = yield collect.done
        return body.decode("utf-8", "replace")

    def _route(self) -> Deferred:
        d = self.fetcher.bus.call(self.pub_sub, "route", topic=self.topic)

        def check(addresses: Any) -> List[str]:
            if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
                raise UpstreamError(f"{self.pub_sub}.route answered {str(addresses)[:200]}, not a list of addresses")
            return _unique(addresses)

        return d.addCallback(check)

    @inlineCallbacks
    def _stream_dods(self, texts: Dict[str, str], addresses: List[str]) -> Any:
        url = dap.dataset_url(self.base, "dods")
        transfer = self._transfer(url)
        response = yield transfer._request()
        if response.code != 200:
            _discard(response)
            raise UpstreamError(f"{url[-200:]} answered {response.code}")
        max_bytes = self.fetcher.options.max_bytes
        length = None if response.length is UNKNOWN_LENGTH else response.length
        if length is not None and length > max_bytes:
            _discard(response)
            raise UpstreamError(f"{url[-200:]} is {length} bytes, over the limit of {max_bytes}")
        headers = _end_to_end(response.headers, _connection_header(response))
        if length is not None and _content_length(response.headers) is None:
            headers.append(["Content-Length", str(length)])
        metadata = {"topic": self.topic, "dataset": self.name, "url": self.base,
                    "fetched": self.fetcher.clock.seconds(), "das": texts["das"], "dds": texts["dds"],
                    "status": response.code, "headers": headers, "length": length}
        bus = self.fetcher.bus
        sinks = [_Sink(bus.open_stream(a, metadata, correlation_id=self.request_id), a) for a in addresses]
        pump = _DodsPump(transfer, sinks, response.code)
        response.deliverBody(pump)
        summary = yield pump.done
        summary.update(dataset=self.name, addresses=addresses, length=length)
        if "error" in summary:
            summary["stage"] = "dods"
        return summary


def _unique(addresses: List[str]) -> List[str]:
    """The addresses in their order, each once."""
    return list(dict.fromkeys(addresses))


class _Collect(Protocol):
    """A small body, whole: at most C{limit} bytes, each piece within C{timeout} of the last."""

    def __init__(self, limit: int, timeout: float, clock: Any) -> None:
        self.limit = limit
        self.timeout = timeout
        self.clock = clock
        self.parts: List[bytes] = []
        self.size = 0
        self.done: Deferred = Deferred()
        self._idle: Any = None

    def connectionMade(self) -> None:
        self._idle = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._end(UpstreamError(f"body over the limit of {self.limit} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            self._end(UpstreamError(f"upstream broke off the body after {self.size} bytes: {_reason(reason)}"))

    def _timed_out(self) -> None:
        self._end(UpstreamTimeout(f"no data from upstream for {self.timeout:g} s after {self.size} bytes"))
        if self.transport is not None:
            self.transport.stopProducing()

    def _end(self, exc: Optional[Exception]) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.done.called:
            return
        if exc is None:
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(Failure(exc))


class _DodsPump(_BodyPump):
    """The .dods to every subscriber's stream: a stream that breaks is
    dropped (the others go on); the transfer fails when none is left. A body
    the upstream delimits by closing the connection cannot be verified, so
    every stream is aborted (nothing half is passed as whole)."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.finished and reason is not None and reason.check(PotentialDataLoss):
            self._fail(UpstreamError("body delimited by connection close (unverifiable)"), stop=False)
            return
        super().connectionLost(reason)

    def _check_sinks(self) -> bool:
        for sink in list(self.sinks):
            if sink.failure is not None:
                self.transfer.log.warn("{component}: dataset stream to {address} broke: {reason}",
                                       component=self.transfer.name, address=sink.role,
                                       reason=sink.failure.getErrorMessage())
                sink.abort(UpstreamError("stream broke"))
                self.sinks.remove(sink)
        if not self.sinks:
            self._fail(UpstreamError("every subscriber's stream broke"))
            return True
        return False

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        d = DeferredList([sink.finish() for sink in self.sinks], consumeErrors=True)

        def ended(_: Any) -> Dict[str, Any]:
            delivered = [sink.role for sink in self.sinks if sink.failure is None]
            if not delivered:
                return {"error": "UpstreamError", "message": "every subscriber's stream broke", "status": 502,
                        "bytes": self.bytes}
            return {"status": self.status, "bytes": self.bytes, "delivered": delivered}

        d.addCallback(ended).chainDeferred(self.done)


# --------------------------------------------------------------------------- #
# a bounded answer head


class _BoundedClientProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client, with a bound on the answer's head: at most
    C{MAX_UPSTREAM_HEADERS} header fields and C{MAX_UPSTREAM_HEADER_BYTES} bytes
    of status line and fields (each line is at most 16 KiB already). An
    upstream past either gets no further: the request fails (ResponseFailed,
    an UpstreamError for the proxy, 502) and the connection is dropped."""

    def request(self, request: Any) -> Deferred:
        d = super().request(request)
        parser = self._parser
        if parser is not None:
            _bound_head(parser)
        return d


def _bound_head(parser: Any) -> None:
    """Count the lines C{parser} takes until its body starts; raise past the bounds."""
    from twisted.web._newclient import BODY

    line_received = parser.lineReceived
    seen = [0, 0]  # lines, bytes

    def lineReceived(line: bytes) -> None:
        if parser.state != BODY:
            seen[0] += 1
            seen[1] += len(line) + 2
            if seen[0] > MAX_UPSTREAM_HEADERS + 2:  # the status line, the fields, the empty line
                raise UpstreamError(f"the answer has more than {MAX_UPSTREAM_HEADERS} header fields")
            if seen[1] > MAX_UPSTREAM_HEADER_BYTES:
                raise UpstreamError(f"the answer's head is over {MAX_UPSTREAM_HEADER_BYTES} bytes")
        line_received(line)

    parser.lineReceived = lineReceived


class _BoundedClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: Any) -> _BoundedClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback)


# --------------------------------------------------------------------------- #
# helpers


def _ascii(url: str) -> bytes:
    return quote(url, safe=_URL_SAFE).encode("ascii")


def _discard(response: Any) -> None:
    """Drop a response's body (redirects, 304, refusals) by closing its connection."""

    class Discard(Protocol):
        def connectionMade(self) -> None:
            self.transport.stopProducing()

        def connectionLost(self, reason: Any = None) -> None:
            pass

    response.deliverBody(Discard())


def _widen_reads(transport: Any, size: int = UPSTREAM_READ_SIZE) -> None:
    """Have the TCP connection under a response's body read up to C{size} bytes at a
    time (fewer, larger pieces for the pump). Best effort: Twisted's client wraps the
    connection in a producer proxy (and TLS); if its insides have moved, nothing changes."""
    current = getattr(transport, "_producer", transport)
    for _ in range(3):
        if isinstance(current, tcp.Connection):
            if current.bufferSize < size:
                current.bufferSize = size
            return
        current = getattr(current, "transport", None)
        if current is None:
            return


def _header(headers: Headers, name: bytes) -> Optional[str]:
    values = headers.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else None


def _content_length(headers: Headers) -> Optional[int]:
    value = _header(headers, b"content-length")
    if value is not None and value.strip().isdigit():
        return int(value.strip())
    return None


def _connection_header(response: Any) -> List[bytes]:
    """The response's Connection header values. Twisted's client keeps
    connection headers to itself, off C{response.headers}; the parser has
    them. Best effort: an empty list if Twisted's insides have moved."""
    try:
        protocol = response._transport._producer.protocol
        protocol = getattr(protocol, "_wrappedProtocol", protocol)  # endpoints wrap it
        return list(protocol._parser.connHeaders.getRawHeaders(b"connection") or [])
    except AttributeError:
        return []


def _end_to_end(headers: Headers, connection: List[bytes] = ()) -> List[List[str]]:  # type: ignore[assignment]
    """The headers as [name, value] pairs, repeats kept, hop-by-hop ones
    removed, and those the Connection header names."""
    drop = set(HOP_BY_HOP)
    for value in list(headers.getRawHeaders(b"connection") or []) + list(connection):
        drop.update(token.strip().lower() for token in value.decode("latin-1").split(","))
    pairs = []
    for name, values in headers.getAllRawHeaders():
        text = name.decode("latin-1")
        lowered = text.lower()
        if lowered in drop or lowered.startswith("proxy-"):
            continue
        for value in values:
            pairs.append([text, value.decode("latin-1")])
    return pairs


def _reason(failure: Failure) -> str:
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in reasons) or "response failed"
    return failure.getErrorMessage() or failure.type.__name__


def _classify(failure: Failure, url: str, timeout: float) -> Exception:
    """The data-path error for a failure before the first byte."""
    if failure.check(Forbidden, InvalidURL, InvalidName, UpstreamError, UpstreamTimeout):
        return failure.value
    if failure.check(DeferredTimeout, net_error.TimeoutError, CancelledError):
        return UpstreamTimeout(f"no answer within {timeout:g} s")
    if failure.check(net_error.ConnectionRefusedError):
        return UpstreamError("connection refused")
    if failure.check(net_error.DNSLookupError):
        return UpstreamError("cannot resolve the host")
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        for r in reasons:
            if r.check(Forbidden, UpstreamError, UpstreamTimeout):
                return r.value
        return UpstreamError(f"no valid answer: {_reason(failure)}")
    if failure.check(OSError, net_error.ConnectError, net_error.ConnectionLost):
        return UpstreamError(f"cannot connect: {failure.getErrorMessage() or failure.type.__name__}")
    return UpstreamError(f"{failure.type.__name__}: {failure.getErrorMessage()}"[:300])
