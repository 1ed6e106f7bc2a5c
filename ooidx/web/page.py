"""The management page and its JSON API, served by the web edge (L{ooidx.web.app.Web}).

    GET    /                           the page (ooidx/web/static/index.html)
    GET    /static/NAME                its script, style sheet and icon
    GET    /api/datasets               {"datasets": [record, ...]}           (controller.list)
    POST   /api/datasets               {"name", "url", "refresh"?} -> 201 {"dataset": record}  token
    GET    /api/datasets/NAME          {"dataset": record}                   (controller.get)
    DELETE /api/datasets/NAME          {"dataset": record} (status purged)   (controller.purge)   token
    POST   /api/datasets/NAME/refresh  202 {"refresh": {...}}                (controller.get_dataset) token
    GET    /api/stats                  controller.get_stats + "time" (the server's clock)
    GET    /api/pub_sub/subscriptions  {"subscriptions": [...], "people": N}  (pub_sub.list; people's own
                                       subscriptions, named user.PERSON.ID, only with the token: else counted)
    GET    /api/user_subscriptions     {"subscriptions": [...], "unavailable": [...]}  token
                                       people's subscriptions (user_pub_sub.list + user_notification.list)
    GET    /api/events?limit=&regex=   {"events": [...]}                     (notification.api recent)

Reading is open on a web port bound to loopback and needs the operator
token on any other (C{security.read_token} decides instead when set: the web
edge passes C{read_token}); changes always need the operator token
(C{Authorization: Bearer TOKEN}).
Every input is checked here before it goes on the bus (dataset names as
L{ooidx.dap.valid_name}, base URLs http(s)), and the components check again.

Errors are the web edge's JSON error, C{{"error": {"type", "message"}}}, the
message written for a person (the page shows it as it is). A service nobody
runs is C{503 Unavailable}, "... is not available on this node", so the
page can say so and go on with the rest. docs/openapi.yaml describes it all.
"""
from __future__ import annotations

import time
from importlib import resources
from typing import Any, Callable, Dict, Optional
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from magnet import BadArguments, ConnectionLost, NotConfirmed, NotConnected, RemoteError, Timeout, \
    UnknownOperation, Unroutable

from ooidx import dap
from ooidx.errors import HTTP_STATUS
from ooidx import wire
from ooidx.http.answers import Answer, HTTPError, error_answer, json_answer
from ooidx.people.records import QUEUE_PREFIX

__all__ = ["ManagementPage", "STATIC_FILES", "EVENTS_SERVICE", "MAX_URL_LENGTH", "MAX_EVENTS", "MAX_REGEX"]

log = Logger(namespace="ooidx.web.page")

#: The files of the page: name -> content type. Nothing else under /static/ is served.
STATIC_FILES: Dict[str, bytes] = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "charts.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}
#: Where notification answers C{recent} (docs/dissemination.md).
EVENTS_SERVICE = wire.NOTIFICATION_API
#: Longest base URL taken.
MAX_URL_LENGTH = 2048
#: Most events one request may ask for.
MAX_EVENTS = 1000
#: Longest event filter regex (in characters; percent-encoded it stays
#: within twisted.web's 16 KiB request line).
MAX_REGEX = 1024
#: Refresh periods the controller takes (seconds).
MIN_REFRESH, MAX_REFRESH = 1.0, 366 * 86400.0
#: How long the API waits for a component.
CALL_TIMEOUT = 10.0

#: The page may load its own files and talk to its own origin, nothing else.
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
}

#: What a person is told when a component does not run anywhere on the bus.
UNAVAILABLE = {
    "controller": "The dataset registry (controller) is not available on this node",
    "pub_sub": "Subscriptions (pub_sub) are not available on this node",
    "user_pub_sub": "People's dataset subscriptions (user_pub_sub) are not available on this node",
    "user_notification": "People's event subscriptions (user_notification) are not available on this node",
    EVENTS_SERVICE: "Recent events are not available on this node",
}
#: Services the page can do without: asked with a short timeout, since a
#: declared queue nobody consumes holds a call until it times out.
OPTIONAL_TIMEOUT = 3.0


#: What the page shows of a person's subscription.
PERSON_FIELDS = ("person", "id", "kind", "regex", "webhook", "max_length", "created")


def person_row(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: record.get(k) for k in PERSON_FIELDS}


def _load_static() -> Dict[str, bytes]:
    folder = resources.files("ooidx.web").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


class ManagementPage:
    """The page's routes, for the web edge's route table.

    C{methods(path)} answers the handlers of C{path} by method (or None when
    the path is not the page's); each handler takes the request and returns
    an L{ooidx.http.answers.Answer} or a Deferred firing with one, or raises
    L{ooidx.http.answers.HTTPError}, as the web edge's own handlers do.
    """

    def __init__(self, bus: Any, *, check_operator: Callable[[server.Request], None],
                 arguments: Callable[[server.Request], Dict[str, Any]], max_body: int, read_token: bool = False,
                 files: Optional[Dict[str, bytes]] = None) -> None:
        """C{check_operator(request)} raises an L{HTTPError} (401) unless the
        request carries the operator token; C{arguments(request)} reads its JSON
        body (at most C{max_body} bytes); C{read_token} puts reading behind the token too."""
        self.bus = bus
        self._check_operator = check_operator
        self._arguments = arguments
        self.max_body = max_body
        self.read_token = read_token
        self.files = files if files is not None else _load_static()

    # routing -------------------------------------------------------------------------

    def methods(self, path: bytes) -> Optional[Dict[bytes, Callable[[server.Request], Any]]]:
        if path == b"/" or path == b"/index.html":
            return {b"GET": self.render_index, b"HEAD": self.render_index}
        if path.startswith(b"/static/"):
            name = path[len(b"/static/"):].decode("ascii", "replace")
            if name in STATIC_FILES and name != "index.html":
                handler = self._static(name)
                return {b"GET": handler, b"HEAD": handler}
            return None
        if path == b"/api/datasets":
            return {b"GET": self.render_list, b"POST": self.render_register}
        if path.startswith(b"/api/datasets/"):
            rest = path[len(b"/api/datasets/"):].split(b"/")
            if len(rest) == 1 and rest[0]:
                return {b"GET": self.render_get, b"DELETE": self.render_purge}
            if len(rest) == 2 and rest[0] and rest[1] == b"refresh":
                return {b"POST": self.render_refresh}
            return None
        if path == b"/api/stats":
            return {b"GET": self.render_stats}
        if path == b"/api/pub_sub/subscriptions":
            return {b"GET": self.render_pub_sub}
        if path == b"/api/user_subscriptions":
            return {b"GET": self.render_user_subscriptions}
        if path == b"/api/events":
            return {b"GET": self.render_events}
        return None

    # the page ------------------------------------------------------------------------

    def render_index(self, request: server.Request) -> Any:
        return self._file("index.html")

    def _static(self, name: str) -> Callable[[server.Request], Any]:
        return lambda request: self._file(name)

    def _file(self, name: str) -> Any:
        return Answer(200, self.files[name], STATIC_FILES[name], dict(SECURITY_HEADERS))

    # datasets ------------------------------------------------------------------------

    def render_list(self, request: server.Request) -> Deferred:
        self._check_read(request)
        return self._call("controller", "list", {}, lambda records: {"datasets": list(records or [])})

    def render_get(self, request: server.Request) -> Deferred:
        self._check_read(request)
        name = self._name_in_path(request)
        return self._call("controller", "get", {"name": name}, lambda record: {"dataset": record})

    def render_register(self, request: server.Request) -> Deferred:
        self._check_operator(request)
        body = self._body(request)
        unknown = sorted(set(body) - {"name", "url", "refresh", "check", "replace", "expect_every"})
        if unknown:
            raise self._error(400, "BadRequest", f"unknown field(s): {', '.join(map(str, unknown))} "
                                                 "(a dataset takes name, url, refresh, check, replace and "
                                                 "expect_every)")
        name = check_name(body.get("name"))
        url = check_url(body.get("url"))
        kwargs: Dict[str, Any] = {"name": name, "url": url}
        refresh = check_refresh(body.get("refresh"))
        if refresh is not None:
            kwargs["refresh"] = refresh
        expect_every = check_refresh(body.get("expect_every"), "expect_every")
        if expect_every is not None:
            kwargs["expect_every"] = expect_every
        for flag in ("check", "replace"):
            if flag in body:
                if not isinstance(body[flag], bool):
                    raise self._error(400, "BadRequest", f"{flag} is true or false")
                kwargs[flag] = body[flag]
        log.info("web page: register {name} at {url}", name=name, url=url)
        return self._call("controller", "register", kwargs, lambda record: {"dataset": record}, status=201)

    def render_purge(self, request: server.Request) -> Deferred:
        self._check_operator(request)
        name = self._name_in_path(request)
        log.info("web page: purge {name}", name=name)
        return self._call("controller", "purge", {"name": name}, lambda record: {"dataset": record})

    def render_refresh(self, request: server.Request) -> Deferred:
        self._check_operator(request)
        name = self._name_in_path(request)
        log.info("web page: refresh {name}", name=name)
        return self._call("controller", "get_dataset", {"name": name}, lambda result: {"refresh": result},
                          status=202)

    # statistics, subscriptions, events ----------------------------------------------

    def render_stats(self, request: server.Request) -> Deferred:
        self._check_read(request)

        def shaped(stats: Any) -> Dict[str, Any]:
            stats = dict(stats) if isinstance(stats, dict) else {}
            stats["time"] = time.time()
            return stats

        return self._call("controller", "get_stats", {}, shaped)

    def render_pub_sub(self, request: server.Request) -> Deferred:
        """pub_sub's subscriptions. People's (C{user.PERSON.ID}) name a person
        and their regex: shown with the operator token only, else just counted."""
        self._check_read(request)
        operator = self._is_operator(request)

        def shaped(subs: Any) -> Dict[str, Any]:
            rows = list(subs or [])
            shown = rows if operator else [r for r in rows if not _is_persons(r)]
            return {"subscriptions": shown, "people": sum(1 for r in rows if _is_persons(r))}

        return self._call("pub_sub", "list", {}, shaped)

    def render_user_subscriptions(self, request: server.Request) -> Deferred:
        """Every person's subscriptions, of both kinds. Always behind the
        token: a webhook URL may carry the person's secret."""

        self._check_operator(request)
        services = ("user_pub_sub", "user_notification")
        calls = [self.bus.call_with(service, "list", {}, timeout=_timeout(service)) for service in services]

        def merged(results: Any) -> Any:
            found, missing = [], []
            for service, (ok, value) in zip(services, results):
                if ok:
                    found.extend(person_row(r) for r in (value or []) if isinstance(r, dict))
                    continue
                error = self._failed(service, "list", value)
                if getattr(error, "status", None) != 503:
                    return error_answer(error)
                missing.append(service)
            if len(missing) == len(services):
                return error_answer(self._error(503, "Unavailable", "People's subscriptions are not available on "
                                                                    "this node: neither user_pub_sub nor "
                                                                    "user_notification answered."))
            found.sort(key=lambda r: (str(r.get("person")), r.get("created") or 0))
            return json_answer({"subscriptions": found, "unavailable": missing})

        return DeferredList(calls, consumeErrors=True).addCallback(merged)

    def render_events(self, request: server.Request) -> Deferred:
        self._check_read(request)
        args = request.args or {}
        unknown = sorted(k.decode("ascii", "replace") for k in args if k not in (b"limit", b"regex"))
        if unknown:
            raise self._error(400, "BadRequest", f"unknown query parameter(s): {', '.join(unknown)} "
                                                 "(events take limit and regex)")
        kwargs: Dict[str, Any] = {"limit": 100}
        if b"limit" in args:
            raw = args[b"limit"][-1].decode("ascii", "replace")
            if not raw.isdigit() or not (1 <= int(raw) <= MAX_EVENTS):
                raise self._error(400, "BadRequest", f"limit is a whole number from 1 to {MAX_EVENTS}")
            kwargs["limit"] = int(raw)
        if b"regex" in args:
            try:
                regex = args[b"regex"][-1].decode("utf-8")
            except UnicodeDecodeError:
                raise self._error(400, "BadRequest", "regex is not UTF-8 text") from None
            if len(regex) > MAX_REGEX or "\x00" in regex:
                raise self._error(400, "InvalidRegex", f"regex is at most {MAX_REGEX} characters, without NUL")
            if regex:
                kwargs["regex"] = regex
        return self._call(EVENTS_SERVICE, "recent", kwargs, lambda events: {"events": list(events or [])})

    # helpers -------------------------------------------------------------------------

    def _error(self, status: int, kind: str, message: str) -> Exception:
        return HTTPError(status, kind, message)

    def _is_operator(self, request: server.Request) -> bool:
        """Whether the request carries the operator token (401 if it carries a wrong one)."""
        if not request.getHeader(b"authorization"):
            return False
        self._check_operator(request)
        return True

    def _check_read(self, request: server.Request) -> None:
        if self.read_token:
            self._check_operator(request)

    def _name_in_path(self, request: server.Request) -> str:
        raw = request.path.split(b"/")[3]
        try:
            name = unquote(raw.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            name = None
        return check_name(name)

    def _body(self, request: server.Request) -> Dict[str, Any]:
        if getattr(request, "too_large", False):
            raise self._error(413, "PayloadTooLarge", f"the request body is larger than {self.max_body} bytes")
        body = self._arguments(request)
        if not body:
            raise self._error(400, "BadRequest", "send the dataset as a JSON object: "
                                                 '{"name": "sst", "url": "https://server/path/sst.nc"}')
        return body

    def _call(self, service: str, op: str, kwargs: Dict[str, Any], shape: Callable[[Any], Any],
              status: int = 200) -> Deferred:

        d = self.bus.call_with(service, op, kwargs, timeout=_timeout(service))

        def answer(result: Any) -> Any:
            try:
                return json_answer(shape(result), status)
            except (TypeError, ValueError) as e:
                return error_answer(self._error(502, "BadReply", f"{service} answered something that is not "
                                                                 f"JSON: {e}"))

        return d.addCallbacks(answer, lambda failure: error_answer(self._failed(service, op, failure)))

    def _failed(self, service: str, op: str, failure: Failure) -> Exception:
        exc = failure.value
        what = UNAVAILABLE.get(service, f"{service} is not available on this node")
        if isinstance(exc, Unroutable) or (isinstance(exc, UnknownOperation) and service != "controller"):
            return self._error(503, "Unavailable", f"{what}: no {service.split('.')[0]} is running.")
        if isinstance(exc, Timeout) and service != "controller":
            return self._error(503, "Unavailable", f"{what}: {service} did not answer within "
                                                   f"{_timeout(service):g} seconds.")
        if isinstance(exc, BadArguments):
            return self._error(400, "BadRequest", exc.message)
        if isinstance(exc, RemoteError):
            status = HTTP_STATUS.get(exc.remote_type)
            if status is None:
                status = 400 if exc.remote_type in ("ValueError", "TypeError") else 502
            return self._error(status, exc.remote_type, exc.message)
        if isinstance(exc, Timeout):
            return self._error(504, "Timeout", f"{service} did not answer within {_timeout(service):g} seconds")
        if isinstance(exc, (ConnectionLost, NotConnected, NotConfirmed)):
            return self._error(503, type(exc).__name__, f"the message bus is not reachable: {exc}")
        if isinstance(exc, CancelledError):
            return self._error(503, "Cancelled", "the request was cancelled")
        log.failure("web page: calling {service}.{op}", failure, service=service, op=op)
        return self._error(500, "InternalError", f"{type(exc).__name__} while calling {service}.{op}")


def _is_persons(row: Any) -> bool:
    return isinstance(row, dict) and str(row.get("name", "")).startswith(QUEUE_PREFIX)


def _timeout(service: str) -> float:
    return CALL_TIMEOUT if service == "controller" else OPTIONAL_TIMEOUT


# --------------------------------------------------------------------------- #
# input checks: a person's words in every refusal


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise HTTPError(400, "InvalidName", "a dataset needs a name")
    if not dap.valid_name(name):
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise HTTPError(400, "InvalidName", f"{shown!r} is not a dataset name: use 1 to 64 letters, digits, "
                                            "'_', '.' or '-', starting with a letter or digit")
    return name


def check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise HTTPError(400, "InvalidURL", "a dataset needs its base URL (http:// or https://)")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise HTTPError(400, "InvalidURL", f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise HTTPError(400, "InvalidURL", "the URL has spaces or control characters in it")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise HTTPError(400, "InvalidURL", f"not a URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise HTTPError(400, "InvalidURL", "the URL must start with http:// or https://")
    if not parts.hostname:
        raise HTTPError(400, "InvalidURL", "the URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise HTTPError(400, "InvalidURL", "the URL must not carry a user name or password")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise HTTPError(400, "InvalidURL", "register the dataset's base URL, without a query or fragment")
    return url


def check_refresh(refresh: Any, what: str = "refresh") -> Optional[float]:
    if refresh is None:
        return None
    if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or \
            not (MIN_REFRESH <= refresh <= MAX_REFRESH):
        raise HTTPError(400, "BadRequest", f"{what} is a number of seconds from {MIN_REFRESH:g} to "
                                           f"{MAX_REFRESH:g} (366 days), or null for none")
    return float(refresh)
