"""The two ways the C{ooidx} command reaches the components: the daemon's web
API (L{HttpClient}, blocking urllib, already-fired Deferreds) or the broker
itself (L{BrokerClient}, magnet in the reactor). Both turn what goes wrong
into the command's errors (L{RemoteFailure}, L{Unreachable}, L{UsageError})."""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ooidx.wire import operations_address
from ooidx.cli.registry import HTTP_GRACE, TOKEN_ENV, CliError, RemoteFailure, Unreachable, UsageError

class HttpClient:
    """The daemon's web API, with a blocking urllib client. Its methods
    return already-fired Deferreds, so commands run without a reactor."""

    def __init__(self, url: str, token: Optional[str], timeout: Optional[float] = None,
                 config_path: Optional[str] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        #: the config this command read (its ports, its token): named in errors that say to edit a config
        self.config_path = config_path
        #: whether C{url} is the config's web port (not --url or OOIDX_URL)
        self.url_from_config = False

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
        path = "/api/call/{}/{}".format(urllib.parse.quote(service, safe=""), urllib.parse.quote(op, safe=""))
        if self.timeout is not None:
            path += "?" + urllib.parse.urlencode({"timeout": f"{self.timeout:g}"})
        body = json.dumps(kwargs).encode("utf-8")
        return self._request("POST", path, body, authorize=True).addCallback(self._result)

    def status(self) -> Deferred:
        def nodes(answer: Tuple[str, bytes]) -> Any:
            value = _json_of(answer[1], "/api/status")
            if not isinstance(value, dict) or not isinstance(value.get("nodes"), list):
                raise RemoteFailure("BadReply", "the status answer has no list of nodes")
            return value["nodes"]

        return self._request("GET", "/api/status", None, authorize=False).addCallback(nodes)

    def _result(self, answer: Tuple[str, bytes]) -> Any:
        content_type, body = answer
        if content_type.split(";")[0].strip() == "application/octet-stream":
            return body
        value = _json_of(body, "the call")
        if not isinstance(value, dict) or "result" not in value:
            raise RemoteFailure("BadReply", "the answer has no result")
        return value["result"]

    def _request(self, method: str, path: str, body: Optional[bytes], *, authorize: bool) -> Deferred:
        """(content type, body) of a 200 answer, as a fired Deferred."""
        headers = {"Accept": "application/json", "User-Agent": "ooidx-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if authorize and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        wait = None if self.timeout is None else self.timeout + HTTP_GRACE
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        try:
            with opener.open(request, timeout=wait if wait is not None else 60.0) as response:
                return succeed((response.headers.get("Content-Type", ""), response.read()))
        except urllib.error.HTTPError as e:
            try:
                return fail(self._http_error(e, authorize))
            finally:
                e.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, socket.timeout) or isinstance(e, socket.timeout):
                reason = f"no answer within {wait or 60.0:g} s"
            return fail(Unreachable(f"cannot reach the daemon at {self.url}: {reason}{self.where_hint()}"))

    def where_hint(self) -> str:
        """Why this URL: what to check when no daemon answers there."""
        if self.config_path and self.url_from_config:
            return (f" (the web port of {self.config_path}; is that daemon running? "
                    f"twistd -n ooidx --config {self.config_path})")
        return (" (is a daemon running? `twistd -n ooidx --config FILE` or `ooidx demo` starts one; "
                "--config FILE or --url tell where it listens)")

    def _http_error(self, e: urllib.error.HTTPError, authorize: bool) -> CliError:
        try:
            info = json.loads(e.read(64 * 1024))["error"]
            kind, message = str(info["type"]), str(info["message"])
        except (ValueError, KeyError, TypeError, OSError):
            kind, message = f"HTTP {e.code}", str(e.reason)
        if "security.allow_hosts" in message and self.config_path:
            message += f" (the config this command read: {os.path.abspath(self.config_path)})"
        if e.code == 401 and authorize and not self.token:
            message += (f" (no token found: set {TOKEN_ENV}, pass --token, or run on the daemon's machine "
                        "with --config pointing at its config)")
        return RemoteFailure(kind, message, e.code)


def _json_of(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteFailure("BadReply", f"the answer to {what} is not JSON") from None


class BrokerClient:
    """Straight through the broker with magnet: for RabbitMQ, where the bus
    does not live inside one daemon."""

    def __init__(self, bus: Any, timeout: Optional[float] = None, status_timeout: float = 1.5) -> None:
        self.bus = bus
        self.timeout = timeout
        self.status_timeout = status_timeout

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Deferred:
        return self.bus.call_with(operations_address(service), op, kwargs,
                                  timeout=self.timeout).addErrback(self._translate)

    def status(self) -> Deferred:
        from ooidx.node.daemon import cluster_status
        return cluster_status(self.bus, self.status_timeout).addErrback(self._translate)

    @staticmethod
    def _translate(failure: Failure) -> Any:
        import magnet
        exc = failure.value
        if isinstance(exc, magnet.RemoteError):
            raise RemoteFailure(exc.remote_type, exc.message)
        if isinstance(exc, (magnet.NotConnected, magnet.ConnectionLost)):
            raise Unreachable(f"cannot reach the broker: {exc}")
        if isinstance(exc, magnet.MagnetError):
            raise RemoteFailure(type(exc).__name__, str(exc))
        if isinstance(exc, TypeError):
            raise UsageError(str(exc))
        return failure
