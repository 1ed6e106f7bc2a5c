"""The web edge: health, metrics and the operator's API on the web port.

    GET  /healthz                  200 + JSON health when the node is healthy, else 503
    GET  /metrics                  Prometheus text format (the bus's PrometheusObserver)
    GET  /api/status               JSON {"nodes": [...]}: every daemon on the bus and its components
    POST /api/call/SERVICE/OP      JSON object body = keyword arguments; token required
    /api/people, /api/subscriptions, /api/events/stream
                                   people's subscriptions and the event tail:
                                   L{ooidx.people.api.SubscriptionsApi}
    GET  /api/datasets/NAME/versions[/V[/diff/V2]]
                                   saved versions and what changed: L{ooidx.web.versions.VersionsApi}
    GET  /feeds/datasets/NAME.atom, /feeds/events.atom?regex=
                                   Atom feeds of events: L{ooidx.web.feeds}

C{/api/call} answers 200 with C{{"result": ...}} (or the raw bytes, as
C{application/octet-stream}, when the operation returns bytes), or a JSON
error C{{"error": {"type": ..., "message": ...}}} with a status that says
what went wrong:

    400  bad JSON, a body that is not an object, a bad service or operation name
    401  no token, or a wrong one (C{Authorization: Bearer TOKEN})
    404  no such path, a service not in the component table or with nobody
         serving it (Unroutable), or an unknown operation
    405  a method the path does not take
    413  a body larger than C{max_body}
    422  arguments that do not fit the operation (BadArguments)
    400/403/404/502/504  the operation refused or failed remotely: the status of
         its error type as the rest of the API answers it (L{ooidx.errors.HTTP_STATUS}:
         Forbidden 403, UnknownDataset 404, InvalidURL 400 ...), 502 for any other
    503  the broker link is down (ConnectionLost, NotConnected, NotConfirmed)
    504  no reply in time (Timeout)

An optional C{?timeout=SECONDS} query parameter shortens the call's timeout.

Every answer, errors included, is JSON (except /metrics and raw bytes
results), so clients never parse an HTML error page.
"""
from __future__ import annotations

import io
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from magnet import (BadArguments, ConnectionLost, NotConfirmed, NotConnected, RemoteError, Timeout,
                    UnknownOperation, Unroutable)

from ooidx.component import Component
from ooidx.http.answers import (Answer, HTTPError, answer, check_bearer, error_answer, json_answer,
                                json_arguments, printable, result_answer)
from ooidx.http.edge import (EdgePort, Listens, TrackingSite, listen_spec, mask_query,
                             masking_log_formatter)
from ooidx.http.listen import ListenSpec, is_loopback, parse_listen
from ooidx.people.api import SubscriptionsApi
from ooidx.web.thredds import ThreddsCatalog
from ooidx.web.feeds import Feeds
from ooidx.web.page import ManagementPage
from ooidx.web.versions import VersionsApi
from ooidx.errors import HTTP_STATUS
from ooidx.wire import BUS_TABLE, operations_address

__all__ = ["Web", "NAME", "MAX_BODY", "ping_components", "MetricsRenderer", "TokenSource"]

#: What /metrics is made by: given which components are up, the exposition's body and content type.
MetricsRenderer = Callable[[Mapping[str, bool]], Any]  # (body, content type), or a Deferred of them
#: The operator token, or a function that finds (or makes) it when the edge starts.
TokenSource = Union[str, Callable[[], str]]

#: What a service or operation name may look like.
NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}\Z")
#: The largest request body the API takes.
MAX_BODY = 1024 * 1024
#: A client that keeps sending far past the limit is cut off.
DRAIN_FACTOR = 16
#: Longest C{?timeout=} a caller may ask for.
MAX_CALL_TIMEOUT = 600.0
#: Idle HTTP connections are closed after this many seconds.
IDLE_TIMEOUT = 60
#: How long /api/status waits for the daemons to answer.
STATUS_TIMEOUT = 1.5



class _LimitedRequest(server.Request):
    """A request that keeps at most C{max_body} bytes of its body.

    Past the limit the rest is read and dropped (the request is answered 413
    once it is all in); a client that keeps sending far past it is cut off.
    """

    max_body = MAX_BODY
    too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            self.content = io.BytesIO()
        else:
            server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            if not self.too_large:
                self.too_large = True
                self.content = io.BytesIO()
            if self._received > self.max_body * DRAIN_FACTOR and self.channel is not None:
                self.channel.transport.loseConnection()
            return
        self.content.write(data)

    def __repr__(self) -> str:
        # Twisted's names the URI, which may hold a stream ticket (?ticket=).
        return (f"<{type(self).__name__} at 0x{id(self):x} method={self.method.decode('ascii', 'replace')} "
                f"uri={mask_query(self.uri or b'').decode('ascii', 'replace')}>")




class _Api(Resource):
    """Every path of the web edge, in one leaf resource with a route table."""

    isLeaf = True

    def __init__(self, web: "Web", page: ManagementPage, feeds: Optional[Feeds] = None) -> None:
        super().__init__()
        self.web = web
        self.feeds = feeds
        self.routes: Dict[bytes, Dict[bytes, Callable[[server.Request], Any]]] = {
            b"/healthz": {b"GET": web.render_healthz, b"HEAD": web.render_healthz},
            b"/metrics": {b"GET": web.render_metrics, b"HEAD": web.render_metrics},
            b"/api/status": {b"GET": web.render_status},
        }
        # The management page: /, /static/..., /api/datasets..., /api/stats, /api/events, ...
        self.page = page

    def render(self, request: server.Request) -> Any:
        path = request.path
        people = self.web.subscriptions
        if people is not None and people.handles(path):
            try:
                result = people.render(request)
            except HTTPError as e:
                result = error_answer(e)
            return answer(request, result)
        if path.startswith(b"/api/call/"):
            methods = {b"POST": self.web.render_call}
        elif self.feeds is not None and path.startswith(Feeds.PREFIX):
            methods = self.feeds.methods(path)
        else:
            methods = (self.routes.get(path) or self.page.methods(path) or self.web.versions.methods(path)
                       or self.web.thredds.methods(path))
        try:
            if methods is None:
                raise HTTPError(404, "NotFound", f"no such path: {printable(path)}")
            handler = methods.get(request.method)
            if handler is None:
                allow = b", ".join(sorted(methods))
                raise HTTPError(405, "MethodNotAllowed", f"{printable(path)} takes {allow.decode('ascii')}",
                                {b"Allow": allow})
            result = handler(request)
        except HTTPError as e:
            result = error_answer(e)
        return answer(request, result)


class Web(Listens, Component):
    """The web edge of a node: /healthz, /metrics and the operator's /api.

    It has no queue of its own (pattern None): it listens on the web port
    (C{components.web.port} / C{.interface}, else C{http.web_port} /
    C{http.interface}; a port number or an endpoint string such as
    C{ssl:8443:privateKey=KEY.pem:certKey=CERT.pem}, L{ooidx.http.listen}),
    answers only for its own names (C{http.allowed_hosts}, L{ooidx.http.edge})
    and reaches the components through the bus.

    Health and cluster status come from the daemon (C{self.parent.health()},
    C{self.parent.cluster_status()}); tests may pass C{health} and
    C{cluster_status} callables instead. What the web edge needs of the node
    comes in as values and functions, never by importing the node: the
    operator C{token} (or a function reading it at C{setUp}: the node passes
    one that finds or makes it in the data directory) and C{metrics}, the
    function that renders /metrics (without it /metrics answers 404).
    """

    log = Logger()

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, port: Any = None, interface: Optional[str] = None,
                 allowed_hosts: Tuple[str, ...] = (), read_token: Optional[bool] = None,
                 token: Optional[TokenSource] = None, metrics: Optional[MetricsRenderer] = None,
                 health: Optional[Callable[[], Any]] = None,
                 cluster_status: Optional[Callable[..., Any]] = None, max_body: int = MAX_BODY,
                 status_timeout: float = STATUS_TIMEOUT, access_log: bool = False,
                 proxy_port: Any = None, proxy_interface: Optional[str] = None,
                 public_proxy_url: Optional[str] = None) -> None:
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        #: Where it listens: a port number or an endpoint string (tcp:, tcp6:, ssl:), ooidx.http.listen.
        self.listen = listen_spec(port, interface, default_port=8080)
        self.edge = EdgePort(self.listen)
        self.allowed_hosts = tuple(allowed_hosts)
        self.access_log = access_log  # a line per request (logging.access)
        self._read_token = read_token
        self._token_source = token
        self._token: Optional[str] = token if isinstance(token, str) else None
        self._metrics = metrics
        self._health = health
        self._cluster_status = cluster_status
        self.max_body = max_body
        self.status_timeout = status_timeout
        #: People's subscriptions and the event tail (ooidx.people.api), mounted at setUp.
        self.subscriptions: Optional[SubscriptionsApi] = None
        #: A dataset's saved versions (ooidx.web.versions), mounted at setUp.
        self.versions: Optional[VersionsApi] = None
        #: Where the proxy listens (http.proxy_port / interface), for the THREDDS catalog's
        #: OPeNDAP base (ooidx.web.thredds); its key files are the proxy's to read.
        self.proxy: Optional[ListenSpec] = (None if proxy_port is None else parse_listen(
            proxy_port, "127.0.0.1" if proxy_interface is None else proxy_interface, read_files=False))
        self.public_proxy_url = public_proxy_url
        self.thredds = ThreddsCatalog(bus, check_operator=self._check_token, read_token=False, proxy=self.proxy,
                                      public_url=public_proxy_url)

    # where it listens ------------------------------------------------------------


    @property
    def _interface(self) -> str:
        return self.listen.interface

    @property
    def read_token(self) -> bool:
        """Whether reading the management API needs the token: C{security.read_token}
        if set, else yes unless the port listens on loopback only (where only
        this machine's users can read it)."""
        if self._read_token is not None:
            return bool(self._read_token)
        return not is_loopback(self._interface)

    # lifecycle -------------------------------------------------------------------

    def setUp(self) -> Deferred:
        if self._token is None:
            if not callable(self._token_source):
                raise ValueError("Web needs the operator token: token=TOKEN, or a function that reads it")
            self._token = self._token_source()
        self.subscriptions = SubscriptionsApi(self.bus, self.clock, check_operator=self._check_token,
                                              arguments=self._arguments, operator_token=lambda: self._token)
        page = ManagementPage(self.bus, check_operator=self._check_token, arguments=self._arguments,
                              max_body=self.max_body, read_token=self.read_token)
        self.versions = VersionsApi(self.bus, check_operator=self._check_token, read_token=self.read_token)
        self.thredds.read_token = self.read_token
        request_factory = type("Request", (_LimitedRequest,), {"max_body": self.max_body})
        # The access log masks ?ticket= (a person's stream ticket, user_subscriptions).
        feeds = Feeds(self.bus, check_operator=self._check_token, read_token=self.read_token, clock=self.clock)
        site = TrackingSite(_Api(self, page, feeds), requestFactory=request_factory, parsePOSTFormSubmission=False,
                            reactor=self.clock, timeout=IDLE_TIMEOUT, logFormatter=masking_log_formatter(),
                            allowed_hosts=self.allowed_hosts, access_log=self.access_log)
        site.displayTracebacks = False
        site.noisy = False

        def listening(port: Any) -> None:
            self.log.info("{component} listening on {url} (/healthz, /metrics, /api)", component=self.name,
                          url=self.url)

        return self.edge.listen(self.reactor, site).addCallback(listening)

    def tearDown(self) -> Any:
        return self.edge.stop()

    # health and status -------------------------------------------------------------

    def health(self) -> Deferred:
        """The node's health, from the daemon (or the injected callable)."""
        if self._health is not None:
            return maybeDeferred(self._health)
        if self.parent is not None and hasattr(self.parent, "health"):
            return maybeDeferred(self.parent.health)
        # Standing alone (no daemon): say only what this component knows.
        return maybeDeferred(lambda: {"ok": self.started, "components": {self.name: self.started}})

    def cluster_status(self) -> Deferred:
        """Every daemon on the bus and its components, from the daemon (or the injected callable)."""
        if self._cluster_status is not None:
            return maybeDeferred(self._cluster_status, timeout=self.status_timeout)
        if self.parent is not None and hasattr(self.parent, "cluster_status"):
            return maybeDeferred(self.parent.cluster_status, timeout=self.status_timeout)
        return ping_components(self.bus, timeout=self.status_timeout)

    # endpoints ---------------------------------------------------------------------

    def render_healthz(self, request: server.Request) -> Deferred:
        def answer(health: Any) -> Answer:
            if not isinstance(health, dict):
                health = {"ok": False, "error": f"health is not a mapping: {type(health).__name__}"}
            return json_answer(health, 200 if health.get("ok") is True else 503)

        def failed(failure: Failure) -> Answer:
            self.log.failure("checking health", failure)
            return json_answer({"ok": False, "error": failure.getErrorMessage()}, 503)

        return self.health().addCallbacks(answer, failed)

    def render_metrics(self, request: server.Request) -> Deferred:
        render = self._metrics
        if render is None:
            raise HTTPError(404, "NotFound", "this web edge serves no metrics")

        def answer(health: Any) -> Answer:
            components = health.get("components") if isinstance(health, dict) else None
            up: Dict[str, bool] = {}
            if isinstance(components, dict):
                up = {name: up is True or (isinstance(up, dict) and up.get("started") is True)
                      for name, up in components.items()}
            # The renderer may read per-dataset figures first (a Deferred, bounded: ooidx.node.metrics).
            return maybeDeferred(render, up).addCallback(lambda rendered: Answer(200, *rendered))

        def failed(failure: Failure) -> Any:
            self.log.failure("reading health for /metrics", failure)
            return answer(None)

        return self.health().addCallbacks(answer, failed)

    def render_status(self, request: server.Request) -> Deferred:
        def answer(nodes: Any) -> Answer:
            return json_answer({"nodes": list(nodes or [])})

        def failed(failure: Failure) -> Answer:
            self.log.failure("collecting cluster status", failure)
            return error_answer(HTTPError(503, failure.type.__name__, failure.getErrorMessage()))

        return self.cluster_status().addCallbacks(answer, failed)

    def render_call(self, request: server.Request) -> Deferred:
        self._check_token(request)
        if getattr(request, "too_large", False):
            raise HTTPError(413, "PayloadTooLarge", f"the request body is larger than {self.max_body} bytes")
        parts = request.path.split(b"/")
        if len(parts) != 5:  # b"", b"api", b"call", SERVICE, OP
            raise HTTPError(404, "NotFound", "expected /api/call/SERVICE/OP")
        service, op = _name(parts[3], "service"), _name(parts[4], "operation")
        if service not in BUS_TABLE:
            raise HTTPError(404, "UnknownService",
                            f"no service {service!r} (callable: {', '.join(callable_services())})")
        kwargs = self._arguments(request)
        timeout = self._call_timeout(request)
        d = self.bus.call_with(operations_address(service), op, kwargs, timeout=timeout)
        return d.addCallbacks(result_answer, lambda failure: error_answer(self._call_error(service, op, failure)))

    # call helpers --------------------------------------------------------------------

    def _check_token(self, request: server.Request) -> None:
        check_bearer(request, self._token)

    def _arguments(self, request: server.Request) -> Dict[str, Any]:
        return json_arguments(request, self.max_body)

    def _call_timeout(self, request: server.Request) -> Optional[float]:
        values = (request.args or {}).get(b"timeout")
        if not values:
            return None
        try:
            timeout = float(values[-1])
        except ValueError:
            timeout = math.nan
        if not (0 < timeout <= MAX_CALL_TIMEOUT):
            raise HTTPError(400, "BadRequest", f"timeout must be a number of seconds in (0, {MAX_CALL_TIMEOUT:g}]")
        return timeout

    def _call_error(self, service: str, op: str, failure: Failure) -> HTTPError:
        exc = failure.value
        if isinstance(exc, Unroutable):
            return HTTPError(404, "Unroutable", f"no {service} is running to take the call ({exc})")
        if isinstance(exc, UnknownOperation):
            return HTTPError(404, "UnknownOperation", exc.message)
        if isinstance(exc, BadArguments):
            return HTTPError(422, "BadArguments", exc.message)
        if isinstance(exc, RemoteError):
            # the statuses the rest of the API answers with (Forbidden 403, UnknownDataset 404, ...)
            return HTTPError(HTTP_STATUS.get(exc.remote_type, 502), exc.remote_type, exc.message)
        if isinstance(exc, Timeout):
            return HTTPError(504, "Timeout", str(exc))
        if isinstance(exc, (ConnectionLost, NotConnected, NotConfirmed)):
            return HTTPError(503, type(exc).__name__, str(exc))
        if isinstance(exc, CancelledError):
            return HTTPError(503, "Cancelled", "the call was cancelled")
        self.log.failure("calling {service}.{op} for the web API", failure, service=service, op=op)
        return HTTPError(500, "InternalError", f"{type(exc).__name__} while calling {service}.{op}")


def callable_services() -> List[str]:
    """The services /api/call reaches: the component table."""
    return sorted(BUS_TABLE)


@inlineCallbacks
def ping_components(bus: Any, timeout: float = STATUS_TIMEOUT) -> Any:
    """Who answers: ping every component of the table (a fanout one at its
    operations queue), grouped by
    node and process. The stand-in for the daemon's cluster status where no
    daemon is at hand (a web edge standing alone, C{ooidx --broker status}).
    Each queue answers once, so a component running on several nodes shows
    on the one that answered."""
    names = sorted(BUS_TABLE)
    results = yield DeferredList([bus.call(operations_address(name), "ping", timeout=timeout) for name in names],
                                 consumeErrors=True)
    nodes: Dict[Tuple[str, Any], Dict[str, Any]] = {}
    for name, (ok, value) in zip(names, results):
        if not ok or not isinstance(value, dict):
            continue
        key = (str(value.get("node", "?")), value.get("pid"))
        entry = nodes.setdefault(key, {"node": key[0], "pid": key[1], "components": {}, "broker": "up"})
        entry["components"][name] = {"started": True, "instances": None, "process": None}
    return sorted(nodes.values(), key=lambda n: (n["node"], str(n["pid"])))


# --------------------------------------------------------------------------- #
# answering


def _name(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is None or not NAME.match(text):
        raise HTTPError(400, "BadRequest",
                        f"bad {what} name {printable(raw)}: expected [a-z_][a-z0-9_]{{0,63}}")
    return text


