"""proxyng: the HTTP edge DAP clients point at (issue 4, docs/data-path.md).

Two ways in, on C{http.proxy_port} (or C{components.proxyng.port}):

  - forward proxy: an absolute-URI request line, C{GET http://host/path?query
    HTTP/1.1}, which is what DAP clients send with C{http_proxy} set or
    C{HTTP.PROXY.SERVER} in C{.dodsrc}. The URL goes to the controller as it
    came, query string byte for byte.
  - a saved version: C{GET /datasets/NAME@VERSION.SUFFIX} (VERSION as the
    persister names them, or C{latest}; SUFFIX .das .dds .dods .nc): the
    persister (C{persister.open_version}) streams the file saved on disk,
    byte for byte; no constraint but on the .das (400), an unknown version 404.
  - by name: C{GET /datasets/NAME.SUFFIX?CONSTRAINT}. The proxy names the
    dataset, suffix and constraint to the controller, which resolves them
    (C{BASE + SUFFIX + "?" + CONSTRAINT}) from its registry. C{.csv} goes to
    the csv component instead (C{BASE.dods?CONSTRAINT} as CSV; the base URL
    read from the dataset record, C{attribute_store.get(key="dataset:NAME")}).

For each request the proxy makes a listen address C{L} of its own, asks
(C{controller.route}, C{csv.render} or C{persister.open_version}) for the answer to be sent there,
waits (bounded) for the stream or an error reply, and closes C{L}.

Hot responses: a small answer the cache served (status 200, at most
C{HOT_ENTRY_BYTES}) is also held here, in memory (at most C{HOT_BYTES} in
all, headers counted with the body, least recently used dropped first,
expired ones swept every C{record_interval}), keyed by method and URL, for at most
C{hot_ttl} seconds (never more than the cache's C{max_age}). A request for it
is answered at once, without the bus. Held answers are dropped when the
dataset changes: the events C{event.purged|registered|fetched|refreshed.NAME}
and C{event.cached.NAME} (its URL) on the C{notification} fanout, and the
cache's purge broadcast on C{cache.purge}. The requests answered here are
counted in the controller's statistics all the same: one C{record} post a
second with their count (C{count}, C{requests}), per dataset and URL.

What one client may hold (a client that asks and never reads must not take
the data path from everyone else):

  - at most C{max_per_client} requests in progress per client address
    (C{components.proxyng.max_per_client}, default 100): more are answered
    429 with C{Retry-After} at once;
  - a client whose connection takes nothing (its buffers full, the stream
    paused) for C{stall_timeout} seconds (C{components.proxyng.stall_timeout},
    default 5) is cut off with a reset; its stream and listen address go,
    and with them the fetch feeding it. (The fetcher settles a request as
    its transfer starts and bounds its transfers on its own, so no message
    slot waits on a client either.)

What the client gets:

  - the upstream's status with the standard reason phrase (the upstream's
    is never passed on), its headers less the hop-by-hop ones and
    C{Set-Cookie}, with control characters taken out of values, plus
    C{Content-Security-Policy: sandbox} (upstream HTML is served from the
    proxy's origin); an answer with more than C{MAX_HEADERS} header fields
    or C{MAX_HEADER_BYTES} of them is a 502; the body
    streamed with backpressure: the stream waits while the client's
    transport is paused, so nothing is buffered whole;
  - if the stream breaks (stream-error, a stall, fewer bytes than the
    declared Content-Length) after the headers went out: the connection
    is closed short of the declared length, or without the final chunk; the
    client sees a failed transfer, never a clean end;
  - errors before the headers: for a DAP request (C{.das .dds .dods .ascii
    .csv}) a DAP 2 error object (C{Error { code = 404; message = "..."; };},
    C{Content-Description: dods_error}) that ncdump and pydap print, for
    C{.dmr}/C{.dap} the DAP 4 C{<Error>} XML, otherwise C{text/plain}: 400 (InvalidName,
    InvalidURL, malformed requests), 403 (Forbidden), 404 (UnknownDataset,
    no such path), 405 (methods other than GET and HEAD), 502
    (UpstreamError, any other remote error), 503 (the bus or the controller
    is not there; C{BrokerBlocked} with C{Retry-After} at once while the
    broker blocks publishers, a memory or disk alarm, naming it, for new
    requests and those waiting for their answer), 504 (UpstreamTimeout, no
    answer within C{answer_timeout}).

The parts, one thing each: L{ooidx.datapath.proxy_url} (what a request asks
for), L{ooidx.datapath.bases} (a dataset's base URL), L{ooidx.datapath.exchange}
(the request's listen address and its answer), L{ooidx.datapath.relay} (the
answer to the client), L{ooidx.datapath.hot} (the answers held here); this
module is the component that ties them to the HTTP port.
"""
from __future__ import annotations

import io
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from ooidx import events
from ooidx import wire
from ooidx.component import Component
from ooidx.config import CacheOptions, ProxyOptions
from ooidx.datapath import splice
from ooidx.datapath.bases import BASE_TTL, BaseURLs
from ooidx.datapath.exchange import Exchange, as_http_error, blocked_error
from ooidx.datapath.hot import (HOT_BYTES, HOT_TTL, AnsweredCounts, Held, HotResponses, answer_held, drop_on_event,
                                drop_on_purge, held_from)
from ooidx.datapath.proxy_url import (DAP_SUFFIXES, ProxyError, Target, dap2_error_body, dap4_error_body,
                                     error_dialect, parse_target, printable)
from ooidx.datapath.relay import HOP_BY_HOP, abort, passed_on_headers, relay
from ooidx.http.edge import EdgePort, Listens, TrackingSite, listen_spec

__all__ = ["Proxy", "ProxyError", "DAP_SUFFIXES", "HOP_BY_HOP", "parse_target", "passed_on_headers", "Target"]

#: How long the proxy waits for the answer to start (the fetcher's own timeout is shorter).
DEFAULT_ANSWER_TIMEOUT = 75.0
#: Seconds a client connection may be idle (Twisted's HTTP timeout).
IDLE_TIMEOUT = 60
#: Most request-body bytes the proxy reads (and drops) before it answers 413 and closes.
MAX_REQUEST_BODY = 64 * 1024
#: Seconds between the posts that count the requests answered at the proxy.
RECORD_INTERVAL = 1.0
#: Requests in progress from one client address (components.proxyng.max_per_client);
#: past it a request is answered 429 at once.
MAX_PER_CLIENT = 100
#: The fanout the caches tell each other about purges on (ooidx.datapath.cache.PURGE_FANOUT).
CACHE_PURGE_FANOUT = wire.CACHE_PURGE_FANOUT
#: The Content-Type of a DAP 4 error response.
DAP4_ERROR_TYPE = b"application/vnd.opendap.dap4.error+xml; charset=utf-8"


class _ProxyRequest(server.Request):
    """No default Content-Type: a passed-on answer keeps exactly the upstream's.

    The proxy takes GET and HEAD, which carry no body: a request body is never
    kept (twisted.web would spool one over 100 kB to a temporary file, and
    answer only once all of it arrived), and a body longer than
    C{MAX_REQUEST_BODY} is answered 413 at once and the connection closed."""

    defaultContentType = None
    _body_seen = 0

    def gotLength(self, length: Optional[int]) -> None:
        self.content = io.BytesIO()
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > MAX_REQUEST_BODY:
            self._refuse_body()

    def _refuse_body(self) -> None:
        transport = getattr(self.channel, "transport", None)
        if transport is None or getattr(self, "_body_refused", False):
            return
        self._body_refused = True
        body = b"413 Payload Too Large: the proxy takes no request body (GET and HEAD only)\n"
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"X-Ooidx-Error: PayloadTooLarge\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()




class _Root(Resource):
    isLeaf = True

    def __init__(self, proxy: "Proxy") -> None:
        super().__init__()
        self.proxy = proxy

    def render(self, request: server.Request) -> Any:
        return self.proxy.render(request)



class Proxy(Listens, Component):
    """The HTTP edge for DAP clients: forward proxy and datasets by name."""

    log = Logger()
    #: the daemon stops it before its other components: the requests it drains at stop need them
    stop_first = True

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, options: Optional[ProxyOptions] = None, port: Any = None,
                 interface: Optional[str] = None, allowed_hosts: Tuple[str, ...] = (),
                 fetch_timeout: Optional[float] = None, rpc_timeout: float = 30.0,
                 cache_max_age: float = CacheOptions().max_age,
                 answer_timeout: Optional[float] = None, lookup_timeout: Optional[float] = None,
                 base_ttl: float = BASE_TTL, hot_ttl: Optional[float] = None, hot_bytes: int = HOT_BYTES,
                 record_interval: float = RECORD_INTERVAL, max_per_client: Optional[int] = None,
                 stall_timeout: Optional[float] = None, access_log: bool = False,
                 shutdown_timeout: float = 10.0) -> None:
        """What the config gives it (L{ooidx.config.component_arguments}):
        C{options} (C{components.proxyng}), where it listens (C{port}: a number
        or an endpoint string, on C{interface}), the extra Host names it answers
        for (C{http.allowed_hosts}), the fetcher's timeout (an answer may take
        that long to start, and 15 s more), the RPC timeout (its lookups) and
        the cache's C{max_age} (no answer is held here longer), and
        C{timeouts.shutdown} (C{shutdown_timeout}: at stop, requests already
        read are served for at most so long; L{tearDown})."""
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        options = options if options is not None else ProxyOptions()
        self.edge = EdgePort(listen_spec(port, interface, default_port=8100))
        self._interface = self.edge.spec.interface
        self.allowed_hosts = tuple(allowed_hosts)
        self.access_log = access_log  # a line per request (logging.access)
        self.shutdown_timeout = shutdown_timeout
        if answer_timeout is None:
            answer_timeout = max(DEFAULT_ANSWER_TIMEOUT, (fetch_timeout or 0) + 15.0)
        self.answer_timeout = answer_timeout
        self.lookup_timeout = lookup_timeout if lookup_timeout is not None else rpc_timeout
        self.bases = BaseURLs(bus, self.clock, ttl=base_ttl, timeout=self.lookup_timeout)
        self._own: Tuple[str, ...] = ()
        self.active = 0  # requests in progress
        self._waiting: set = set()  # exchanges waiting for their answer to start
        self._exchanges: set = set()  # every request's exchange until it ends (the broker's blocks fail them)
        self._following_link = False
        self.relayed = 0  # body bytes handed to HTTP transports, in all
        self.max_per_client: int = max_per_client if max_per_client is not None else options.max_per_client
        self.stall_timeout: float = stall_timeout if stall_timeout is not None else options.stall_timeout
        self._per_client: Dict[str, int] = {}  # client address -> requests in progress
        self.refused = 0  # requests answered 429 (max_per_client)
        self.stalled = 0  # clients cut off for reading nothing (stall_timeout)
        # hot responses: held no longer than the cache keeps an answer fresh
        self.hot_ttl = min(HOT_TTL if hot_ttl is None else hot_ttl, cache_max_age)
        self.hot = HotResponses(hot_bytes) if self.hot_ttl > 0 and hot_bytes > 0 else None
        self.record_interval = record_interval
        self._answered = AnsweredCounts()
        self._recorder: Optional[LoopingCall] = None
        self._hot_subscriptions: List[Any] = []

    # where it listens ----------------------------------------------------------------


    @property
    def _site(self) -> Optional[TrackingSite]:
        return self.edge.site

    # lifecycle -------------------------------------------------------------------------

    def setUp(self) -> Deferred:
        site = TrackingSite(_Root(self), requestFactory=_ProxyRequest, reactor=self.reactor, timeout=IDLE_TIMEOUT,
                            allowed_hosts=self.allowed_hosts, access_log=self.access_log)
        site.displayTracebacks = False
        site.noisy = False
        # a request read while stopping: its 503 in the request's error dialect (DAP 2, DAP 4, text)
        site.stopping_answer = lambda request, error: self._error_now(
            request, ProxyError(error.status, error.kind, error.message, error.headers))
        return self.edge.listen(self.reactor, site).addCallback(lambda _: self._listening_now())

    def _listening_now(self) -> None:
        port = self.port
        hosts = {"127.0.0.1", "localhost", self._interface.lower()} - {"", "0.0.0.0", "::"}
        self._own = tuple(sorted(f"{h}:{port}" for h in hosts))
        self.log.info("{component} listening on {url} (forward proxy; /datasets/NAME.SUFFIX)",
                      component=self.name, url=self.url)
        if not self._following_link:
            self._following_link = True
            self.bus.transport.add_link_listener(self._link_changed)
            add_block_listener = getattr(self.bus, "add_block_listener", None)
            if callable(add_block_listener):
                add_block_listener(self._blocked_changed)
        if self.hot is not None:
            self._follow_changes()
            self._recorder = LoopingCall(self._record_answered)
            self._recorder.clock = self.clock
            self._recorder.start(self.record_interval, now=False)

    def tearDown(self) -> Any:
        """Stop as a well-run HTTP daemon does on SIGTERM (L{ooidx.http.edge}):
        every request read from now on is answered 503 (C{Connection: close},
        C{Retry-After}), the port stops listening (its backlog answered, not
        reset), idle keep-alive connections close, and the requests in
        progress are served for at most C{timeouts.shutdown} (the rest of the
        node, the proxy's bus included, still runs meanwhile: the proxy stops
        first); past it, one not answered yet gets its 503, one being relayed
        is cut. Then what the hot answers need stops."""
        d = maybeDeferred(self.edge.stop, self.shutdown_timeout, self.clock)
        d.addCallback(self._stopped_serving)
        return d

    def _stopped_serving(self, ended: Optional[int]) -> None:
        if ended:
            self.log.warn("{component}: {count} request(s) still in progress after {bound:g} s (timeouts.shutdown) "
                          "answered 503 or cut", component=self.name, count=ended, bound=self.shutdown_timeout)
        # their clients are answered (or cut): nobody waits for these answers now, and each
        # request's listen address is closed before the bus stops
        for exchange in [e for e in self._exchanges if not e.answer.called]:
            exchange._fail(ProxyError(503, "ShuttingDown", "the node stopped before the answer started"))
        if self._recorder is not None and self._recorder.running:
            self._recorder.stop()
        self._recorder = None
        self._record_answered()
        subscriptions, self._hot_subscriptions = self._hot_subscriptions, []
        for subscription in subscriptions:
            subscription.cancel().addErrback(lambda _: None)
        if self.hot is not None:
            self.hot.clear()

    # HTTP ------------------------------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            return self._error_now(request, ProxyError(405, "MethodNotAllowed", "only GET and HEAD are proxied",
                                                       {b"Allow": b"GET, HEAD"}))
        try:
            target = parse_target(request.uri, self._own)
        except ProxyError as e:
            return self._error_now(request, e)
        hot = self.hot
        if hot is not None and not target.csv and target.version is None:
            url = target.url if target.url is not None else self.bases.remembered_url(target)
            if url is not None:
                held = hot.get(request.method, url, self.clock.seconds())
                if held is not None:
                    return self._answer_held(request, held)
        client = _client_host(request)
        count = self._per_client.get(client, 0)
        if count >= self.max_per_client:
            self.refused += 1
            self.log.info("{component}: {client} has {count} requests in progress; {uri} answered 429",
                          component=self.name, client=client, count=count, uri=printable(request.uri))
            return self._error_now(request, ProxyError(
                429, "TooManyRequests", f"{count} requests from {client} are in progress (at most "
                f"{self.max_per_client})", {b"Retry-After": b"1"}))
        self._per_client[client] = count + 1
        d = self._serve(request, target)
        d.addErrback(self._unexpected, request)
        d.addBoth(self._client_done, client)
        return server.NOT_DONE_YET

    def _client_done(self, _: Any, client: str) -> None:
        count = self._per_client.get(client, 0) - 1
        if count > 0:
            self._per_client[client] = count
        else:
            self._per_client.pop(client, None)

    def _error_now(self, request: server.Request, error: ProxyError) -> bytes:
        body = self._prepare_error(request, error)
        return body

    def _prepare_error(self, request: server.Request, error: ProxyError) -> bytes:
        request.setResponseCode(error.status)
        request.responseHeaders.removeHeader(b"content-type")
        dialect = error_dialect(request.uri)
        if dialect == "dap4":
            request.setHeader(b"Content-Type", DAP4_ERROR_TYPE)
        else:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if dialect == "dap2":
            # the OPeNDAP 2 convention: clients look for this to read the body as an error object
            request.setHeader(b"Content-Description", b"dods_error")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Ooidx-Error", error.kind.encode("ascii", "replace"))
        for name, value in error.headers.items():
            request.setHeader(name, value)
        if dialect == "dap2":
            body = dap2_error_body(error.status, error.kind, error.message)
        elif dialect == "dap4":
            body = dap4_error_body(error.status, error.kind, error.message)
        else:
            phrase = http.RESPONSES.get(error.status, b"Error").decode("ascii")
            body = f"{error.status} {phrase}: {error.kind}: {error.message}\n".encode("utf-8", "replace")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return body

    def _send_error(self, request: server.Request, error: ProxyError) -> None:
        if request.finished or request.channel is None:
            return
        body = self._prepare_error(request, error)
        request.write(body)
        request.finish()

    def _unexpected(self, failure: Failure, request: server.Request) -> None:
        self.log.failure("{component}: answering {uri}", failure, component=self.name,
                         uri=printable(request.uri))
        if request.startedWriting:
            abort(request)
        else:
            self._send_error(request, ProxyError(500, "InternalError", "internal error"))

    @inlineCallbacks
    def _serve(self, request: server.Request, target: Target) -> Any:
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        request_id = uuid.uuid4().hex
        exchange = Exchange(self, request_id)
        method = request.method.decode("ascii")
        self.active += 1
        started = time.monotonic()
        self._exchanges.add(exchange)
        try:
            try:
                blocked = getattr(self.bus, "blocked", None)
                if blocked:
                    # every step from here needs a publish, which the broker would hold for
                    # as long as its alarm lasts: answer now, as /healthz says
                    raise blocked_error(blocked)
                # by name, the controller resolves the dataset (no store read here); csv needs the URL
                url = (yield exchange.unless_failed(self.bases.url_of(target))) if target.csv else target.url
                exchange.listener = yield self.bus.listen(exchange.on_message, on_stream=exchange.on_stream) \
                    .addTimeout(self.lookup_timeout, self.clock, _gateway_timeout("making a listen address"))
                address = exchange.listener.address
                if target.version is None and not target.csv:
                    # a large body answered in this process may go socket to socket (splice)
                    exchange.end = splice.client_end(request_id, request)
                    if exchange.end is not None:
                        splice.HANDOFFS.expect(exchange.end)
                if target.version is not None:
                    # a saved version: any persister of the node's data directory streams it from disk
                    asked = self.bus.tell("persister", "open_version", address, correlation_id=request_id,
                                          name=target.name, version=target.version, part=target.suffix,
                                          method=method, address=address, request_id=request_id)
                elif target.csv:
                    asked = self.bus.post("csv", "render", url=url, dataset=target.name, method=method,
                                          address=address, request_id=request_id)
                else:
                    # one call names what is asked; the controller routes it to the cache in one more
                    asked = self.bus.tell("controller", "route", address, correlation_id=request_id,
                                          url=target.url, dataset=target.name, suffix=target.suffix,
                                          query=target.query, method=method, address=address,
                                          request_id=request_id)
                asking = ("asking the persister" if target.version is not None else
                          "asking csv" if target.csv else "asking the controller")
                yield exchange.unless_failed(asked.addTimeout(self.lookup_timeout, self.clock,
                                                              _gateway_timeout(asking)))
                self._waiting.add(exchange)
                try:
                    stream = yield exchange.answer.addTimeout(self.answer_timeout, self.clock,
                                                              _gateway_timeout("waiting for the answer"))
                finally:
                    self._waiting.discard(exchange)
            except Exception as e:  # noqa: BLE001 - every failure before the headers is an HTTP error
                error = as_http_error(e, self.name)
                blocked = getattr(self.bus, "blocked", None)
                if blocked and error.status in (502, 503, 504):
                    # a publish written just before the broker said it blocks (its confirm held) fails
                    # as a timeout: the client is told why, and when to come back
                    error = blocked_error(blocked)
                if not gone:
                    self._send_error(request, error)
                self.log.info("{component} {method} {uri} -> {status} {kind}: {message}", component=self.name,
                              method=method, uri=printable(request.uri), status=error.status, kind=error.kind,
                              message=error.message)
                return
            if gone:
                stream.deliver(lambda data: None).addErrback(lambda _: None)
                return
            if url is None and target.version is None:
                url = self._asked_url(target, stream)
            yield self._relay(request, stream, method, exchange.via, started, url, target.name, exchange.end)
        finally:
            self.active -= 1
            self._exchanges.discard(exchange)
            if exchange.end is not None:
                exchange.end.close()
            # failed while a step before it ran (a block, a lost link): nobody waits for the answer now
            exchange.answer.addErrback(lambda _: None)
            if exchange.listener is not None:
                exchange.listener.close().addErrback(
                    lambda f: self.log.info("{component}: closing {address}: {reason}", component=self.name,
                                            address=exchange.listener.address, reason=f.getErrorMessage()))

    def _asked_url(self, target: Target, stream: Any) -> Optional[str]:
        """The URL a by-name request was answered for (its stream's C{url}): the
        key its answer may be held under; the dataset's base URL is remembered
        from it, for the held answers of the next requests."""
        meta = stream.metadata if isinstance(stream.metadata, dict) else {}
        url = meta.get("url")
        if not isinstance(url, str) or target.name is None:
            return None
        tail = target.suffix + ("?" + target.query if target.query is not None else "")
        if tail and not url.endswith(tail):
            return None
        self.bases.remember(target.name, url[:len(url) - len(tail)] if tail else url)
        return url

    def _blocked_changed(self, reason: Optional[str]) -> None:
        """The broker blocks publishers (a memory or disk alarm): no request
        waiting for its answer (or still asking for it) can get one until the
        alarm clears, since every answer is published; each is answered 503
        now, naming the alarm, with a Retry-After, not at the answer timeout.
        New requests are answered so at once while the block lasts (L{_serve}).
        Answers already being relayed go on."""
        if not reason:
            return
        exchanges = [e for e in self._exchanges if not e.answer.called]
        if exchanges:
            self.log.warn("{component}: the broker blocks publishers ({reason}); {count} request(s) waiting for "
                          "their answer are answered 503", component=self.name, reason=reason, count=len(exchanges))
        for exchange in exchanges:
            exchange._fail(blocked_error(reason))

    def _link_changed(self, up: bool) -> None:
        """The bus link went down: the private addresses of the requests waiting
        for an answer went with it (and with them whatever was on its way), so
        they are answered 503 now, not at the answer timeout. (Streams already
        being relayed fail in magnet, and the client's transfer is cut.)"""
        if up:
            return
        waiting, self._waiting = self._waiting, set()
        for exchange in waiting:
            exchange._fail(ProxyError(503, "Unavailable",
                                      "the link to the message bus was lost while waiting for the answer"))
    def forget(self, name: Optional[str] = None) -> None:
        """Drop remembered base URLs (one dataset's, or all)."""
        self.bases.forget(name)

    # hot responses ----------------------------------------------------------------------

    def _hold(self, request: server.Request, method: str, url: str, dataset: Optional[str], body: bytes) -> None:
        if self.hot is not None:
            self.hot.put(method.encode("ascii"), url,
                         held_from(request, dataset, url, body, self.clock.seconds() + self.hot_ttl))

    def _answer_held(self, request: server.Request, held: Held) -> bytes:
        body = answer_held(request, held)
        size = len(body) if request.method != b"HEAD" else 0
        self._answered.add(held.dataset, held.url, size)
        self.relayed += size
        return body

    def _record_answered(self) -> None:
        """Count the requests answered here in the controller's statistics
        (and drop the held answers that expired meanwhile)."""
        if self.hot is not None:
            self.hot.sweep(self.clock.seconds())
        self._answered.post(self.bus, self.log, self.name)

    def _follow_changes(self) -> None:
        def subscribed(subscription: Any) -> None:
            if self.edge.listening is None:
                subscription.cancel().addErrback(lambda _: None)
            else:
                self._hot_subscriptions.append(subscription)

        def not_subscribed(failure: Failure, fanout: str) -> None:
            # without the change notices nothing may be held
            self.log.warn("{component}: not following {fanout} ({reason}); answers are not held at the proxy",
                          component=self.name, fanout=fanout, reason=failure.getErrorMessage())
            self.hot = None

        for fanout, handler in ((events.NOTIFICATION, self._on_event), (CACHE_PURGE_FANOUT, self._on_cache_purge)):
            self.bus.subscribe(fanout, handler).addCallbacks(subscribed, not_subscribed, errbackArgs=(fanout,))

    def _on_event(self, message: Any) -> None:
        self._dropped(drop_on_event, message)

    def _on_cache_purge(self, message: Any) -> None:
        self._dropped(drop_on_purge, message)

    def _dropped(self, drop: Callable[[HotResponses, Any], Optional[str]], message: Any) -> None:
        hot = self.hot
        if hot is None:
            return
        name = drop(hot, message)
        if name is not None:
            self.forget(name)

    # relaying an answer -------------------------------------------------------------

    def _relay(self, request: server.Request, stream: Any, method: str, via: Optional[str], started: float,
               url: Optional[str] = None, dataset: Optional[str] = None,
               end: Optional[splice.ClientEnd] = None) -> Deferred:
        return relay(self, request, stream, method, via, started, url, dataset, end)


def _gateway_timeout(what: str) -> Callable[[Any, float], Any]:
    """For Deferred.addTimeout: a timeout is a 504 that says what was waited for."""

    def timed_out(result: Any, timeout: float) -> Any:
        raise ProxyError(504, "GatewayTimeout", f"no answer within {timeout:g} s ({what})")

    return timed_out


def _client_host(request: server.Request) -> str:
    """The client's address, as the per-client bound counts it."""
    address = request.getClientAddress()
    return str(getattr(address, "host", None) or address)


