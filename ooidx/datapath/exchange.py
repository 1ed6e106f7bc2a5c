"""One proxy request's exchange over the bus (docs/data-path.md): a listen
address of its own, where the answer arrives as a stream (with the request id
as correlation id) or as an error reply, and how any failure before the
answer's headers becomes an HTTP error (L{as_http_error})."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import (Blocked, ConnectionLost, MagnetError, NotConfirmed, NotConnected, RemoteError, StreamError, Timeout,
                    Unroutable, decode_reply)
from magnet.rpc import ERROR, REPLY

from ooidx.datapath.proxy_url import ProxyError
from ooidx.errors import http_status as _errors_status

__all__ = ["Exchange", "as_http_error", "blocked_error", "RETRY_AFTER_BLOCKED"]

log = Logger()

#: the persister's refusals of a saved version (NAME@VERSION), by remote type
_SAVED_STATUS = {"UnknownVersion": 404, "InvalidVersion": 400}


def http_status(error_type: str) -> int:
    """The HTTP status for a remote error type: the data path's (ooidx.errors),
    and the persister's for saved versions."""
    return _SAVED_STATUS.get(error_type) or _errors_status(error_type)


class Exchange:
    """One request's listen address and what arrives at it."""

    def __init__(self, proxy: Any, request_id: str) -> None:
        self.proxy = proxy
        self.request_id = request_id
        self.listener: Any = None
        self.answer: Deferred = Deferred()  # fires with a Stream, or fails with ProxyError
        self.stream: Any = None  # the answer being relayed
        self.via: Optional[str] = None
        self.error: Optional[ProxyError] = None  # why it ended before its answer (L{_fail})
        self._racing: List[Deferred] = []
        #: this request's client, offered to a fetch in this process (ooidx.datapath.splice)
        self.end: Any = None

    def unless_failed(self, d: Deferred) -> Deferred:
        """C{d}'s result, or this exchange's error if it fails first (the broker
        blocked publishers, the link went): a step before the answer (a lookup,
        the request's publish) need not run to its own timeout then. What C{d}
        gives later is dropped."""
        if self.error is not None:
            d.addErrback(lambda _: None)
            return fail(self.error)
        out: Deferred = Deferred()
        self._racing.append(out)

        def settled(result: Any) -> None:
            if out in self._racing:
                self._racing.remove(out)
            if out.called:
                return None  # lost the race: dropped (a failure too)
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return None

        d.addBoth(settled)
        return out

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
        if self.error is None and not self.answer.called:
            self.error = error
        racing, self._racing = self._racing, []
        for d in racing:
            if not d.called:
                d.errback(Failure(error))
        if not self.answer.called:
            self.answer.errback(Failure(error))



#: Seconds a client is asked to wait (Retry-After) while the broker blocks publishers.
RETRY_AFTER_BLOCKED = 10


def blocked_error(reason: str) -> ProxyError:
    """The 503 for a request the exchange cannot ask anyone about while the broker
    blocks publishers (RabbitMQ's memory or disk alarm, C{connection.blocked}):
    answered at once, naming the alarm as /healthz does, with a Retry-After."""
    return ProxyError(503, "BrokerBlocked", f"the message broker blocks publishers ({reason}): a resource alarm "
                      f"on the broker; try again later",
                      {b"Retry-After": str(RETRY_AFTER_BLOCKED).encode("ascii")})


def as_http_error(e: BaseException, component: str = "proxyng") -> ProxyError:
    """The HTTP error for a failure before the answer's headers; an
    unexpected one is logged (with its traceback) and answered 502."""
    if isinstance(e, ProxyError):
        return e
    if isinstance(e, RemoteError):
        return ProxyError(http_status(e.remote_type), e.remote_type, e.message)
    if isinstance(e, Blocked):
        return blocked_error(str(e))
    if isinstance(e, Unroutable):
        return ProxyError(503, "Unavailable", f"nobody serves the request now ({e})")
    if isinstance(e, (ConnectionLost, NotConnected, NotConfirmed)):
        return ProxyError(503, "Unavailable", f"the message bus is not reachable ({e})")
    if isinstance(e, Timeout):
        return ProxyError(504, "GatewayTimeout", str(e))
    if isinstance(e, CancelledError):
        return ProxyError(503, "Unavailable", "cancelled")
    log.failure("{component}: unexpected error", Failure(e), component=component)
    return ProxyError(502, type(e).__name__, str(e))
