"""proxyng: the HTTP edge DAP clients point at (issue 4, docs/data-path.md).

Two ways in, on C{http.proxy_port} (or C{components.proxyng.port}):

  - forward proxy: an absolute-URI request line, C{GET http://host/path?query
    HTTP/1.1}, which is what DAP clients send with C{http_proxy} set or
    C{HTTP.PROXY.SERVER} in C{.dodsrc}. The URL goes to the controller as it
    came, query string byte for byte.
  - by name: C{GET /datasets/NAME.SUFFIX?CONSTRAINT}. The proxy reads the
    dataset record (C{attribute_store.get(key="dataset:NAME")}) for its base
    URL and asks for C{BASE + SUFFIX + "?" + CONSTRAINT}. C{.csv} goes to the
    csv component instead (C{BASE.dods?CONSTRAINT} as CSV).

For each request the proxy makes a listen address C{L} of its own, asks
(C{controller.get_url} or C{csv.render}) for the answer to be sent there,
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
    (C{components.proxyng.max_per_client}, default 32): more are answered
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
  - errors before the headers, as C{text/plain}: 400 (InvalidName,
    InvalidURL, malformed requests), 403 (Forbidden), 404 (UnknownDataset,
    no such path), 405 (methods other than GET and HEAD), 502
    (UpstreamError, any other remote error), 503 (the bus or the controller
    is not there), 504 (UpstreamTimeout, no answer within C{answer_timeout}).
"""
from __future__ import annotations

import io
import re
import time
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from magnet import (ConnectionLost, MagnetError, NotConfirmed, NotConnected, RemoteError, StreamError, Timeout,
                    Unroutable, decode_reply)
from magnet.rpc import ERROR, REPLY, decode_request

from ooidx import events

from ooidx.component import Component
from ooidx.http.edge import TrackingSite, listen_address
from ooidx.errors import http_status
from ooidx import wire

__all__ = ["Proxy", "ProxyError", "DAP_SUFFIXES", "HOP_BY_HOP", "parse_target", "passed_on_headers", "Target"]

#: A dataset name (docs/data-path.md; the same as ooidx.dap.valid_name).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: The suffixes a by-name path may end in; the longest match wins.
DAP_SUFFIXES = (".dods", ".das", ".dds", ".asc", ".ascii", ".html", ".info", ".ver", ".csv", ".nc")
#: Headers that concern one connection only; never passed on.
HOP_BY_HOP = wire.HOP_BY_HOP_BYTES
#: What the datasets path looks like.
DATASETS_PREFIX = b"/datasets/"
#: How long the proxy waits for the answer to start (the fetcher's own timeout is shorter).
DEFAULT_ANSWER_TIMEOUT = 75.0
#: How long a by-name base URL is remembered (a purge reaches the controller anyway).
BASE_TTL = 5.0
IDLE_TIMEOUT = 60
MAX_URI = 8192
#: Most request-body bytes the proxy reads (and drops) before it answers 413 and closes.
MAX_REQUEST_BODY = 64 * 1024
#: Seconds a hot response is held at the proxy (capped by the cache's max_age).
HOT_TTL = 10.0
#: Largest body held at the proxy, and all held bodies together.
HOT_ENTRY_BYTES = 256 * 1024
HOT_BYTES = 32 * 1024 * 1024
#: For a big body, the client's connection buffers up to this much before it
#: pauses the stream (Twisted's default is 64 KiB, less than one stream chunk:
#: every chunk paused the stream and the socket went idle until the next), and
#: hands the kernel up to STREAM_SEND_LIMIT per send (Twisted's: 128 KiB).
STREAM_WRITE_BUFFER = 1024 * 1024
STREAM_SEND_LIMIT = 1024 * 1024
#: Seconds between the posts that count the requests answered at the proxy.
RECORD_INTERVAL = 1.0
#: Requests in progress from one client address (components.proxyng.max_per_client);
#: past it a request is answered 429 at once.
MAX_PER_CLIENT = 32
#: Seconds a client may leave its answer unread (its connection's buffers full)
#: before it is cut off (components.proxyng.stall_timeout): a client that never
#: reads must not hold the answer's stream, its listen address and the fetch.
STALL_TIMEOUT = 5.0
#: The most header fields (and bytes of them) an answer may pass on: more is a 502.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
#: Never passed on from an upstream: cookies would be set for the proxy's own origin.
_DROPPED_HEADERS = frozenset((b"set-cookie", b"set-cookie2"))
#: Every proxied answer is sandboxed: upstream HTML served from the proxy's origin
#: runs no script there and reads none of its storage.
SANDBOX = b"sandbox"
#: A header field name (RFC 9110 token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Control characters other than tab, dropped from passed-on header values.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: The fanout the caches tell each other about purges on (ooidx.datapath.cache.PURGE_FANOUT).
CACHE_PURGE_FANOUT = wire.CACHE_PURGE_FANOUT
#: Events after which what the proxy holds for a dataset may be out of date.
_INVALIDATING = frozenset(("purged", "registered", "fetched", "refreshed", "cached"))
#: Response headers never held: the connection's own, and those Twisted sets on each request.
_NOT_HELD = HOP_BY_HOP | {b"date", b"server"}
#: by-name suffixes, longest first
_SUFFIXES_LONGEST_FIRST = tuple(s.encode("ascii") for s in sorted(DAP_SUFFIXES, key=len, reverse=True))


class ProxyError(Exception):
    """An answer other than the upstream's, before any header went out."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[Dict[bytes, bytes]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}


class ClientGone(Exception):
    """The HTTP client went away while its answer was streaming."""


class Target:
    """What a request asks for: a URL (forward proxy) or a dataset by name."""

    __slots__ = ("url", "name", "suffix", "query", "csv")

    def __init__(self, url: Optional[str] = None, name: Optional[str] = None, suffix: str = "",
                 query: Optional[str] = None) -> None:
        self.url = url
        self.name = name
        self.suffix = suffix
        self.query = query  # None: no "?" at all; "" : a "?" with nothing after it
        self.csv = suffix == ".csv"

    def __repr__(self) -> str:
        return f"Target(url={self.url!r}, name={self.name!r}, suffix={self.suffix!r}, query={self.query!r})"


def _printable(raw: bytes, limit: int = 120) -> str:
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("..." if len(raw) > limit else "")


def _ascii(raw: bytes, what: str) -> str:
    """Bytes of a URI as text: printable ASCII only (clients percent-encode the rest)."""
    if any(b < 0x21 or b > 0x7E for b in raw):
        raise ProxyError(400, "InvalidURL", f"{what} has bytes that must be percent-encoded: {_printable(raw)}")
    return raw.decode("ascii")


def parse_target(uri: bytes, own: Tuple[str, ...] = ()) -> Target:
    """The target of a request line's URI. C{own}: host:port spellings of this
    proxy, so that an absolute URI naming the proxy itself is served by name."""
    if len(uri) > MAX_URI:
        raise ProxyError(414, "URITooLong", f"the request target is longer than {MAX_URI} bytes")
    if uri.startswith(b"/"):
        return _by_name(uri)
    scheme, sep, rest = uri.partition(b"://")
    if not sep:
        raise ProxyError(400, "InvalidURL", f"not a path or an absolute http:// URL: {_printable(uri)}")
    if scheme.lower() not in (b"http", b"https"):
        raise ProxyError(400, "InvalidURL", f"scheme {_printable(scheme)!r} is not proxied (http and https only)")
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if not authority or authority.startswith(b":") or b"@" in authority:
        raise ProxyError(400, "InvalidURL", f"no host (or userinfo given) in {_printable(uri)}")
    text = _ascii(uri, "the URL")
    if authority.decode("ascii").lower() in own:
        path = rest[len(authority):] or b"/"
        return _by_name(path)
    return Target(url=text)


def _by_name(path_and_query: bytes) -> Target:
    path, sep, query = path_and_query.partition(b"?")
    if not path.startswith(DATASETS_PREFIX):
        raise ProxyError(404, "NotFound", f"no such path: {_printable(path)} (datasets are under /datasets/NAME.SUFFIX)")
    rest = path[len(DATASETS_PREFIX):]
    suffix = b""
    for candidate in _SUFFIXES_LONGEST_FIRST:
        if rest.endswith(candidate) and len(rest) > len(candidate):
            suffix = candidate
            rest = rest[: -len(candidate)]
            break
    try:
        name = rest.decode("ascii")
    except UnicodeDecodeError:
        name = None
    if name is None or not NAME.match(name):
        raise ProxyError(400, "InvalidName", f"bad dataset name {_printable(rest)}: expected "
                                             "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    return Target(name=name, suffix=suffix.decode("ascii"),
                  query=_ascii(query, "the constraint expression") if sep else None)


@implementer(IPushProducer)
class _Pump:
    """Between a stream and an HTTP response: the sink returns a Deferred
    while the client's transport is paused, which holds the stream back."""

    def __init__(self, request: server.Request, proxy: "Proxy") -> None:
        self.request = request
        self.proxy = proxy
        self.paused = False
        self.stopped = False
        self._waiting: Optional[Deferred] = None
        self._stall: Any = None
        self.written = 0
        #: why the client was cut off, if it was
        self.cut: Optional[str] = None
        #: the body so far, while it may still be held as a hot response
        self.kept: Optional[List[bytes]] = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self._stall is None and not self.stopped:
            self._stall = self.proxy.clock.callLater(self.proxy.stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        self._disarm()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self._disarm()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(Failure(ClientGone(self.cut or "the client went away")))

    def _disarm(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()

    def _stalled(self) -> None:
        """The client has read nothing for stall_timeout seconds: cut it off
        (a reset: its unread bytes would hold a graceful close forever)."""
        self._stall = None
        if self.stopped:
            return
        self.cut = f"the client read nothing for {self.proxy.stall_timeout:g} s"
        self.proxy.stalled += 1
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()
        self.stopProducing()

    def sink(self, data: bytes) -> Optional[Deferred]:
        if self.stopped or self.request.finished or self.request.channel is None:
            raise ClientGone(self.cut or "the client went away")
        self.written += len(data)
        self.proxy.relayed += len(data)
        if self.kept is not None:
            if self.written <= HOT_ENTRY_BYTES:
                self.kept.append(data)
            else:
                self.kept = None
        self.request.write(data)
        if self.paused and not self.stopped:
            self._waiting = Deferred()
            return self._waiting
        return None


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


class _Exchange:
    """One request's listen address and what arrives at it."""

    def __init__(self, proxy: "Proxy", request_id: str) -> None:
        self.proxy = proxy
        self.request_id = request_id
        self.listener: Any = None
        self.answer: Deferred = Deferred()  # fires with a Stream, or fails with ProxyError
        self.stream: Any = None  # the answer being relayed
        self.via: Optional[str] = None

    def on_message(self, message: Any) -> None:
        if message.correlation_id != self.request_id:
            self.proxy.log.info("{component}: dropping a message for another request at {address}",
                                component=self.proxy.name, address=self.listener.address if self.listener else "?")
            return
        if message.type == ERROR:
            try:
                decode_reply(message)
            except RemoteError as e:
                self._fail(ProxyError(http_status(e.remote_type), e.remote_type, e.message))
            except MagnetError as e:
                self._fail(ProxyError(502, type(e).__name__, str(e)))
            return
        if message.type == REPLY:
            try:
                value = decode_reply(message)
            except MagnetError:
                value = None
            if isinstance(value, dict):
                self.via = str(value.get("via"))
            self.proxy.log.debug("{component}: request {rid} goes via {via}", component=self.proxy.name,
                                 rid=self.request_id, via=self.via)
            return
        self.proxy.log.info("{component}: ignoring a {type} message at a request address",
                            component=self.proxy.name, type=message.type)

    def on_stream(self, stream: Any) -> None:
        if stream.correlation_id != self.request_id or self.answer.called:
            # not ours, or a second answer: take it and drop it
            stream.deliver(lambda data: None).addErrback(lambda _: None)
            if stream.correlation_id == self.request_id and self.stream is not None:
                # A second answer to one request is the request delivered again:
                # the sender of the first died (its node was killed), so the first
                # stream will never end. Cut the client's transfer now, not at the
                # stream's idle timeout; the client's retry is served whole.
                self.stream.fail(StreamError("the sender of the answer is gone (the request was delivered again)"))
            return
        self.stream = stream
        self.answer.callback(stream)

    def _fail(self, error: ProxyError) -> None:
        if not self.answer.called:
            self.answer.errback(Failure(error))


class _Held:
    """One answer held at the proxy."""

    __slots__ = ("status", "reason", "headers", "body", "dataset", "url", "expires", "size")

    def __init__(self, status: int, reason: Optional[bytes], headers: List[Tuple[bytes, List[bytes]]], body: bytes,
                 dataset: Optional[str], url: str, expires: float) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.dataset = dataset
        self.url = url
        self.expires = expires
        #: what holding it costs, counted against HOT_BYTES: body, headers, URL and a fixed share
        self.size = (len(body) + len(url) + 256
                     + sum(len(name) + sum(len(v) + 16 for v in values) for name, values in headers))


class HotResponses:
    """Small answers held in memory: bounded bytes, least recently used out first."""

    def __init__(self, max_bytes: int = HOT_BYTES, max_entry: int = HOT_ENTRY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.size = 0
        self.hits = 0
        self._entries: "OrderedDict[Tuple[bytes, str], _Held]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, method: bytes, url: str, now: float) -> Optional[_Held]:
        key = (method, url)
        held = self._entries.get(key)
        if held is None:
            return None
        if held.expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return held

    def put(self, method: bytes, url: str, held: _Held) -> None:
        if len(held.body) > self.max_entry or held.size - len(held.body) > MAX_HEADER_BYTES + MAX_URI + 256:
            return
        key = (method, url)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = held
        self.size += held.size
        while self.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def sweep(self, now: float) -> int:
        """Drop every expired answer (not only those asked for again); how many went."""
        return self._drop_where(lambda held: held.expires <= now)

    def drop_url(self, url: str) -> int:
        return self._drop_where(lambda held: held.url == url)

    def drop_dataset(self, name: Optional[str], base_url: Optional[str]) -> int:
        """Drop what belongs to dataset C{name} or lies under C{base_url}."""
        def under(held: _Held) -> bool:
            if name is not None and held.dataset == name:
                return True
            if base_url:
                url = held.url
                return url == base_url or (url.startswith(base_url) and url[len(base_url)] in "./?")
            return False

        return self._drop_where(under)

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0

    def _drop_where(self, test: Any) -> int:
        keys = [key for key, held in self._entries.items() if test(held)]
        for key in keys:
            self._drop(key)
        return len(keys)

    def _drop(self, key: Tuple[bytes, str]) -> None:
        held = self._entries.pop(key, None)
        if held is not None:
            self.size -= held.size


class Proxy(Component):
    """The HTTP edge for DAP clients: forward proxy and datasets by name."""

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, config: Any = None,
                 clock: Any = None, port: Optional[int] = None, interface: Optional[str] = None,
                 answer_timeout: Optional[float] = None, lookup_timeout: Optional[float] = None,
                 base_ttl: float = BASE_TTL, hot_ttl: Optional[float] = None, hot_bytes: int = HOT_BYTES,
                 record_interval: float = RECORD_INTERVAL, max_per_client: Optional[int] = None,
                 stall_timeout: Optional[float] = None) -> None:
        super().__init__(name, bus, node=node, instances=instances, config=config, clock=clock)
        self._port_number, self._interface = listen_address(self.config, self.name, port, interface,
                                                              http_port="proxy_port", default_port=8100)
        if answer_timeout is None:
            fetcher = getattr(getattr(config, "components", None) or {}, "get", lambda _: None)("fetcher")
            fetch_timeout = getattr(getattr(fetcher, "options", None), "timeout", None)
            answer_timeout = max(DEFAULT_ANSWER_TIMEOUT, (fetch_timeout or 0) + 15.0)
        self.answer_timeout = answer_timeout
        rpc = getattr(getattr(config, "timeouts", None), "rpc", None)
        self.lookup_timeout = lookup_timeout if lookup_timeout is not None else (rpc or 30.0)
        self.base_ttl = base_ttl
        self._bases: Dict[str, Tuple[float, str]] = {}
        self._listening: Any = None
        self._site: Optional[TrackingSite] = None
        self._own: Tuple[str, ...] = ()
        self.active = 0  # requests in progress
        self._waiting: set = set()  # exchanges waiting for their answer to start
        self._following_link = False
        self.relayed = 0  # body bytes handed to HTTP transports, in all
        options = _own_options(config, name)
        self.max_per_client: int = (max_per_client if max_per_client is not None
                                    else getattr(options, "max_per_client", MAX_PER_CLIENT))
        self.stall_timeout: float = (stall_timeout if stall_timeout is not None
                                     else getattr(options, "stall_timeout", STALL_TIMEOUT))
        self._per_client: Dict[str, int] = {}  # client address -> requests in progress
        self.refused = 0  # requests answered 429 (max_per_client)
        self.stalled = 0  # clients cut off for reading nothing (stall_timeout)
        # hot responses: held no longer than the cache keeps an answer fresh
        max_age = _cache_max_age(config)
        self.hot_ttl = min(HOT_TTL if hot_ttl is None else hot_ttl, max_age)
        self.hot = HotResponses(hot_bytes) if self.hot_ttl > 0 and hot_bytes > 0 else None
        self.record_interval = record_interval
        self._answered: Dict[Tuple[Optional[str], str], List[int]] = {}  # (dataset, url) -> [count, bytes]
        self._recorder: Optional[LoopingCall] = None
        self._hot_subscriptions: List[Any] = []

    # where it listens ----------------------------------------------------------------


    @property
    def port(self) -> int:
        if self._listening is None:
            return self._port_number
        return self._listening.getHost().port

    @property
    def url(self) -> str:
        address = self._interface
        if address in ("", "0.0.0.0", "::"):
            address = "127.0.0.1" if address != "::" else "::1"
        if ":" in address:
            address = f"[{address}]"
        return f"http://{address}:{self.port}"

    # lifecycle -------------------------------------------------------------------------

    def setUp(self) -> None:
        site = TrackingSite(_Root(self), requestFactory=_ProxyRequest, reactor=self.clock, timeout=IDLE_TIMEOUT)
        site.displayTracebacks = False
        site.noisy = False
        self._listening = self.clock.listenTCP(self._port_number, site, interface=self._interface)
        self._site = site
        port = self.port
        hosts = {"127.0.0.1", "localhost", self._interface.lower()} - {"", "0.0.0.0", "::"}
        self._own = tuple(sorted(f"{h}:{port}" for h in hosts))
        self.log.info("{component} listening on {url} (forward proxy; /datasets/NAME.SUFFIX)",
                      component=self.name, url=self.url)
        if not self._following_link:
            self._following_link = True
            self.bus.transport.add_link_listener(self._link_changed)
        if self.hot is not None:
            self._follow_changes()
            self._recorder = LoopingCall(self._record_answered)
            self._recorder.clock = self.clock
            self._recorder.start(self.record_interval, now=False)

    def tearDown(self) -> Any:
        if self._recorder is not None and self._recorder.running:
            self._recorder.stop()
        self._recorder = None
        self._record_answered()
        subscriptions, self._hot_subscriptions = self._hot_subscriptions, []
        for subscription in subscriptions:
            subscription.cancel().addErrback(lambda _: None)
        if self.hot is not None:
            self.hot.clear()
        listening, self._listening = self._listening, None
        site, self._site = self._site, None
        if site is not None:
            site.close_connections()
        if listening is not None:
            return listening.stopListening()
        return None

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
        if hot is not None and not target.csv:
            url = target.url if target.url is not None else self._url_now(target)
            if url is not None:
                held = hot.get(request.method, url, self.clock.seconds())
                if held is not None:
                    return self._answer_held(request, held)
        client = _client_host(request)
        count = self._per_client.get(client, 0)
        if count >= self.max_per_client:
            self.refused += 1
            self.log.info("{component}: {client} has {count} requests in progress; {uri} answered 429",
                          component=self.name, client=client, count=count, uri=_printable(request.uri))
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
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Ooidx-Error", error.kind.encode("ascii", "replace"))
        for name, value in error.headers.items():
            request.setHeader(name, value)
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
                         uri=_printable(request.uri))
        if request.startedWriting:
            _abort(request)
        else:
            self._send_error(request, ProxyError(500, "InternalError", "internal error"))

    @inlineCallbacks
    def _serve(self, request: server.Request, target: Target) -> Any:
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        request_id = uuid.uuid4().hex
        exchange = _Exchange(self, request_id)
        method = request.method.decode("ascii")
        self.active += 1
        started = time.monotonic()
        try:
            try:
                url = yield self._resolve(target)
                exchange.listener = yield _bounded(
                    self.bus.listen(exchange.on_message, on_stream=exchange.on_stream),
                    self.lookup_timeout, self.clock, "making a listen address")
                address = exchange.listener.address
                if target.csv:
                    yield _bounded(self.bus.post("csv", "render", url=url, dataset=target.name, method=method,
                                                 address=address, request_id=request_id),
                                   self.lookup_timeout, self.clock, "asking csv")
                else:
                    yield _bounded(self.bus.tell("controller", "get_url", address, correlation_id=request_id,
                                                 url=url, method=method, dataset=target.name,
                                                 address=address, request_id=request_id),
                                   self.lookup_timeout, self.clock, "asking the controller")
                self._waiting.add(exchange)
                try:
                    stream = yield _bounded(exchange.answer, self.answer_timeout, self.clock,
                                            "waiting for the answer", status=504, kind="GatewayTimeout")
                finally:
                    self._waiting.discard(exchange)
            except Exception as e:  # noqa: BLE001 - every failure before the headers is an HTTP error
                error = self._as_http_error(e)
                if not gone:
                    self._send_error(request, error)
                self.log.info("{component} {method} {uri} -> {status} {kind}: {message}", component=self.name,
                              method=method, uri=_printable(request.uri), status=error.status, kind=error.kind,
                              message=error.message)
                return
            if gone:
                stream.deliver(lambda data: None).addErrback(lambda _: None)
                return
            yield self._relay(request, stream, method, exchange.via, started, url, target.name)
        finally:
            self.active -= 1
            if exchange.listener is not None:
                exchange.listener.close().addErrback(
                    lambda f: self.log.info("{component}: closing {address}: {reason}", component=self.name,
                                            address=exchange.listener.address, reason=f.getErrorMessage()))

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

    def _as_http_error(self, e: BaseException) -> ProxyError:
        if isinstance(e, ProxyError):
            return e
        if isinstance(e, RemoteError):
            return ProxyError(http_status(e.remote_type), e.remote_type, e.message)
        if isinstance(e, Unroutable):
            return ProxyError(503, "Unavailable", f"nobody serves the request now ({e})")
        if isinstance(e, (ConnectionLost, NotConnected, NotConfirmed)):
            return ProxyError(503, "Unavailable", f"the message bus is not reachable ({e})")
        if isinstance(e, Timeout):
            return ProxyError(504, "GatewayTimeout", str(e))
        if isinstance(e, CancelledError):
            return ProxyError(503, "Unavailable", "cancelled")
        self.log.failure("{component}: unexpected error", Failure(e), component=self.name)
        return ProxyError(502, type(e).__name__, str(e))

    @inlineCallbacks
    def _resolve(self, target: Target) -> Any:
        """The URL to ask for: as given, or the dataset's base + suffix + query."""
        if target.url is not None:
            return target.url
        base = yield self._base(target.name)
        suffix = ".dods" if target.csv else target.suffix
        return base + suffix + ("?" + target.query if target.query is not None else "")

    @inlineCallbacks
    def _base(self, name: str) -> Any:
        now = self.clock.seconds()
        known = self._bases.get(name)
        if known is not None and known[0] > now:
            return known[1]
        try:
            record = yield self.bus.call("attribute_store", "get", key=wire.dataset_key(name),
                                         timeout=self.lookup_timeout)
        except RemoteError as e:
            if e.remote_type in ("KeyError", "NotFound", "UnknownKey", "UnknownDataset"):
                raise ProxyError(404, "UnknownDataset", f"no dataset named {name!r}") from None
            raise
        if isinstance(record, str):
            import json
            try:
                record = json.loads(record)
            except ValueError:
                record = None
        if not isinstance(record, dict) or not isinstance(record.get("url"), str) \
                or record.get("status") == "purged":
            raise ProxyError(404, "UnknownDataset", f"no dataset named {name!r}")
        base = record["url"]
        self._bases[name] = (now + self.base_ttl, base)
        if len(self._bases) > 4096:
            self._bases = {k: v for k, v in self._bases.items() if v[0] > now}
        return base

    def forget(self, name: Optional[str] = None) -> None:
        """Drop remembered base URLs (one dataset's, or all)."""
        if name is None:
            self._bases.clear()
        else:
            self._bases.pop(name, None)

    # hot responses ----------------------------------------------------------------------

    def _url_now(self, target: Target) -> Optional[str]:
        """The URL of a by-name target if its base URL is remembered, else None."""
        known = self._bases.get(target.name)  # type: ignore[arg-type]
        if known is None or known[0] <= self.clock.seconds():
            return None
        return known[1] + target.suffix + ("?" + target.query if target.query is not None else "")

    def _hold(self, request: server.Request, method: str, url: str, dataset: Optional[str], body: bytes) -> None:
        headers = [(name, list(values)) for name, values in request.responseHeaders.getAllRawHeaders()
                   if name.lower() not in _NOT_HELD]
        self.hot.put(method.encode("ascii"), url, _Held(  # type: ignore[union-attr]
            request.code, request.code_message, headers, body, dataset, url,
            self.clock.seconds() + self.hot_ttl))

    def _answer_held(self, request: server.Request, held: _Held) -> bytes:
        request.setResponseCode(held.status, held.reason)
        headers = request.responseHeaders
        for name, values in held.headers:
            headers.setRawHeaders(name, values)
        key = (held.dataset, held.url)
        counts = self._answered.get(key)
        size = len(held.body) if request.method != b"HEAD" else 0
        if counts is None:
            self._answered[key] = [1, size]
        else:
            counts[0] += 1
            counts[1] += size
        self.relayed += size
        return held.body

    def _record_answered(self) -> None:
        """Count the requests answered here in the controller's statistics
        (and drop the held answers that expired meanwhile)."""
        if self.hot is not None:
            self.hot.sweep(self.clock.seconds())
        answered, self._answered = self._answered, {}
        for (dataset, url), (count, size) in answered.items():
            d = self.bus.post("controller", "record", dataset=dataset, url=url, hit=True, bytes=size, status=200,
                              count=count, requests=count)
            d.addErrback(lambda f: self.log.debug("{component}: record not delivered: {reason}",
                                                  component=self.name, reason=f.getErrorMessage()))

    def _follow_changes(self) -> None:
        def subscribed(subscription: Any) -> None:
            if self._listening is None:
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
        hot = self.hot
        if hot is None or message.type != events.EVENT:
            return
        topic = message.headers.get(events.TOPIC_HEADER)
        if not isinstance(topic, str):
            return
        parts = topic.split(".", 2)
        if len(parts) != 3 or parts[1] not in _INVALIDATING:
            return
        name = parts[2] if parts[2] != "-" else None
        try:
            body = message.json()
        except MagnetError:
            body = None
        url = body.get("url") if isinstance(body, dict) and isinstance(body.get("url"), str) else None
        if parts[1] == "cached":
            if url is not None:
                hot.drop_url(url)
            return
        if name is not None:
            self.forget(name)
        hot.drop_dataset(name, url)

    def _on_cache_purge(self, message: Any) -> None:
        hot = self.hot
        if hot is None:
            return
        try:
            op, kwargs = decode_request(message)
        except MagnetError:
            hot.clear()  # cannot tell what went: drop it all
            return
        if op != "purge":
            return
        name = kwargs.get("name") if isinstance(kwargs.get("name"), str) else None
        base_url = kwargs.get("base_url") if isinstance(kwargs.get("base_url"), str) else None
        if name is not None:
            self.forget(name)
        hot.drop_dataset(name, base_url)

    # relaying an answer -------------------------------------------------------------

    @inlineCallbacks
    def _relay(self, request: server.Request, stream: Any, method: str, via: Optional[str], started: float,
               url: Optional[str] = None, dataset: Optional[str] = None) -> Any:
        meta = stream.metadata if isinstance(stream.metadata, dict) else {}
        status = meta.get("status")
        if not isinstance(status, int) or not 100 <= status <= 599:
            stream.deliver(lambda data: None).addErrback(lambda _: None)
            self._send_error(request, ProxyError(502, "BadAnswer", f"the answer has no valid status ({status!r})"))
            return
        try:
            grouped = passed_on_headers(meta.get("headers"))
        except ProxyError as e:
            stream.deliver(lambda data: None).addErrback(lambda _: None)
            self._send_error(request, e)
            return
        if request.channel is None or request.finished:
            stream.deliver(lambda data: None).addErrback(lambda _: None)  # the client left meanwhile
            return
        # the standard reason phrase: the upstream's is never passed on (it could carry anything)
        request.setResponseCode(status)
        declared: Optional[int] = None
        for value in grouped.get(b"content-length", ()):
            try:
                declared = int(value)
            except ValueError:
                declared = None
        for name, values in grouped.items():
            request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.addRawHeader(b"Content-Security-Policy", SANDBOX)
        if declared is None and isinstance(meta.get("length"), int) and status not in (204, 304) \
                and status >= 200:
            declared = meta["length"]
            request.responseHeaders.setRawHeaders(b"content-length", [str(declared).encode("ascii")])
        if grouped.get(b"content-length") and declared is None:
            request.responseHeaders.removeHeader(b"content-length")  # unusable: let it be chunked
        request.setHeader(b"Via", f"1.1 ooidx-{self.node}".encode("ascii", "replace"))
        source = meta.get("source") or via
        if source:
            request.setHeader(b"X-Ooidx-Source", str(source).encode("ascii", "replace"))
        pump = _Pump(request, self)
        keep = (self.hot is not None and url is not None and status == 200 and meta.get("source") == "cache"
                and (declared is None or declared <= HOT_ENTRY_BYTES or method == "HEAD"))
        if keep:
            pump.kept = []
        if method != "HEAD" and (declared is None or declared > HOT_ENTRY_BYTES):
            _widen_writes(request)
        request.registerProducer(pump, True)
        ok = False
        try:
            count = yield stream.deliver(pump.sink)
            ok = True
        except (StreamError, Timeout) as e:
            why = str(e)
        except ClientGone as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        if ok and method != "HEAD" and declared is not None and count != declared and status not in (204, 304):
            ok = False
            why = f"the body has {count} bytes, {declared} were declared"
        if request.producer is pump:
            if request.channel is not None:
                request.unregisterProducer()
            else:  # the client left: its channel is gone, and the producer with it
                request.producer = None
        elapsed = time.monotonic() - started
        if ok:
            if keep and pump.kept is not None and (method == "HEAD" or declared is not None):
                self._hold(request, method, url, dataset, b"".join(pump.kept))
            if not request.finished and request.channel is not None:
                request.finish()
            self.log.info("{component} {method} {uri} -> {status} ({bytes} bytes, {source}, {elapsed:.3f} s)",
                          component=self.name, method=method, uri=_printable(request.uri), status=status,
                          bytes=pump.written, source=source or "?", elapsed=elapsed)
        elif not request.startedWriting and request.channel is not None and not request.finished:
            # nothing went out yet: the client can still be told properly
            request.responseHeaders = Headers()
            self._send_error(request, ProxyError(502, "UpstreamError", f"the answer broke: {why}"))
            self.log.warn("{component} {method} {uri} -> 502: the answer broke before its body: {why}",
                          component=self.name, method=method, uri=_printable(request.uri), why=why)
        else:
            if pump.cut is None:
                _abort(request)
            self.log.warn("{component} {method} {uri}: transfer failed after {bytes} bytes: {why}",
                          component=self.name, method=method, uri=_printable(request.uri), bytes=pump.written,
                          why=why)


def _cache_max_age(config: Any) -> float:
    """The cache's max_age from the config (the default when the config has no cache)."""
    from ooidx.config import CacheOptions

    components = getattr(config, "components", None)
    settings = components.get("cache") if hasattr(components, "get") else None
    options = getattr(settings, "options", None)
    max_age = getattr(options, "max_age", None)
    if isinstance(max_age, (int, float)) and not isinstance(max_age, bool):
        return float(max_age)
    return CacheOptions().max_age


def _widen_writes(request: server.Request) -> None:
    """Fewer, larger writes to the client for a big body (see STREAM_WRITE_BUFFER).
    Best effort: only a plain TCP connection is changed (it keeps the setting for
    the rest of its life; memory per connection stays bounded by it)."""
    transport = getattr(request.channel, "transport", None)
    if isinstance(transport, tcp.Connection):
        if transport.bufferSize < STREAM_WRITE_BUFFER:
            transport.bufferSize = STREAM_WRITE_BUFFER
        if transport.SEND_LIMIT < STREAM_SEND_LIMIT:
            transport.SEND_LIMIT = STREAM_SEND_LIMIT


def _abort(request: server.Request) -> None:
    """End a response that went wrong after its headers: the connection
    closes without the rest of the body or the final chunk."""
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if transport is not None:
        # FIN, not RST: what was sent stays readable, and the client sees the
        # connection end short of the declared length (or of the last chunk).
        transport.loseConnection()


def _bounded(d: Deferred, timeout: float, clock: Any, what: str, status: int = 504,
             kind: str = "GatewayTimeout") -> Deferred:
    """C{d}, failing with a L{ProxyError} if it has not fired within C{timeout}."""

    def timed_out(result: Any, t: float) -> None:
        raise ProxyError(status, kind, f"no answer within {t:g} s ({what})")

    d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
    return d


def _own_options(config: Any, name: str) -> Any:
    """This component's options from the config (None without a config)."""
    components = getattr(config, "components", None)
    settings = components.get(name) if hasattr(components, "get") else None
    return getattr(settings, "options", None)


def _client_host(request: server.Request) -> str:
    """The client's address, as the per-client bound counts it."""
    address = request.getClientAddress()
    return str(getattr(address, "host", None) or address)


def passed_on_headers(pairs: Any) -> Dict[bytes, List[bytes]]:
    """An answer's [name, value] pairs as they may go out to the client, by
    lower-case name: hop-by-hop fields, cookies and fields whose name is not a
    token or whose value holds CR or LF are dropped; other control characters
    are taken out of values. More than MAX_HEADERS fields, or MAX_HEADER_BYTES,
    is a L{ProxyError} 502: the answer is refused, not cut short."""
    grouped: Dict[bytes, List[bytes]] = {}
    if not isinstance(pairs, (list, tuple)):
        return grouped
    if len(pairs) > MAX_HEADERS:
        raise ProxyError(502, "BadAnswer", f"the answer has {len(pairs)} header fields (at most {MAX_HEADERS})")
    size = 0
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            continue
        name, value = (str(pair[0]).encode("latin-1", "replace"), str(pair[1]).encode("latin-1", "replace"))
        size += len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            raise ProxyError(502, "BadAnswer", f"the answer's header fields are over {MAX_HEADER_BYTES} bytes")
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _DROPPED_HEADERS or not _TOKEN.match(name) \
                or b"\n" in value or b"\r" in value:
            continue
        grouped.setdefault(lowered, []).append(_CONTROL.sub(b"", value))
    return grouped
