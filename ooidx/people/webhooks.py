"""Webhooks: a person's subscription delivered as HTTP POSTs.

L{http_poster} makes the POSTs through an Agent whose every connection goes
to an address checked by L{ooidx.urlpolicy} (no DNS rebinding, no redirects
followed); L{WebhookDelivery} delivers one subscription's queue with it, one
message at a time, retrying with exponential backoff.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from magnet import Message, Timeout

from ooidx import events, urlpolicy
from ooidx.people.records import ID_HEADER, WEBHOOK_DETAIL

__all__ = ["http_poster", "WebhookDelivery", "failure_event", "webhook_host", "Report"]

#: Where a failure goes: C{report(record, event)}, the event an L{events.event_message}.
Report = Callable[[Dict[str, Any], Message], Any]


def webhook_host(url: str) -> str:
    """The host (and port, if any) of a webhook URL: all of it a failure event may name."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port is not None else host


def _scrub(reason: str, url: str) -> str:
    """C{reason} without the webhook's URL, path or query (they may carry the person's secret)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    secrets = [url]
    if parts is not None:
        secrets += [p for p in (parts.path, parts.query, parts.fragment, parts.netloc) if p and p != "/"]
    for secret in sorted(set(secrets), key=len, reverse=True):
        reason = reason.replace(secret, "***")
    return reason


def failure_event(bus: Any, record: Dict[str, Any], *, attempt: int, attempts: int, reason: str,
                  given_up: bool, now: float) -> Message:
    """The C{event.failed.-} event of a failed webhook POST. It names the
    subscription and the webhook's host, never the person or the URL (which
    may carry the person's secret), and goes to that person's own streams only."""
    url = str(record.get("webhook") or "")
    return events.event_message("failed", None, node=bus.node, now=now, **{
        WEBHOOK_DETAIL: record["id"], "host": webhook_host(url), "attempt": attempt, "attempts": attempts,
        "reason": _scrub(reason, url)[:500], "given_up": given_up})


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Reads a response body and throws it away (at most C{limit} bytes, then hangs up)."""

    def __init__(self, done: Deferred, limit: int = 64 * 1024) -> None:
        self.done = done
        self.left = limit

    def dataReceived(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0 and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(None)


def http_poster(reactor: Any, *, allow_private: bool = False, allow_hosts: Iterable[str] = (),
                timeout: float = 10.0, resolver: Any = None) -> Callable[[str, bytes, Dict[str, str]], Deferred]:
    """C{post(url, body, headers) -> Deferred(status)}: one POST through an
    Agent whose every connection goes to an address checked by
    L{urlpolicy.PolicyEndpointFactory} (no DNS rebinding, no redirects
    followed). Fails on a timeout, a refused address or a broken connection."""
    factory = urlpolicy.PolicyEndpointFactory(reactor, allow_private=allow_private, allow_hosts=allow_hosts,
                                              timeout=timeout, resolver=resolver)
    agent = Agent.usingEndpointFactory(reactor, factory, pool=HTTPConnectionPool(reactor, persistent=False))

    def post(url: str, body: bytes, headers: Dict[str, str]) -> Deferred:
        h = Headers({k.encode("ascii"): [v.encode("utf-8")] for k, v in headers.items()})
        d = agent.request(b"POST", url.encode("ascii"), h, _BytesProducer(body))

        def answered(response: Any) -> Deferred:
            done: Deferred = Deferred()
            response.deliverBody(_Discard(done))
            return done.addCallback(lambda _: response.code)

        d.addCallback(answered)

        def timed_out(result: Any, seconds: float) -> None:
            raise Timeout(f"no answer within {seconds:g} s")

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        return d

    return post


class WebhookDelivery:
    """Delivers one subscription's queue to its webhook, one message at a time.

    Each message is POSTed (JSON). A 2xx answer acks it. Anything else (a
    status, a refused or unreachable address, a timeout) is a failure: an
    C{event.failed.-} event is reported (L{failure_event}, handed to
    C{report}: the component puts it in the person's own streams) and the POST is tried again after
    C{base_delay * 2**(n-1)} seconds (at most C{max_delay}), until C{attempts}
    tries have failed; then it is given up (one more event) and acked. While
    one message is being delivered the next waits (prefetch 1), so the
    person gets them in order, and the queue's bound applies meanwhile.
    """

    log = Logger()

    def __init__(self, bus: Any, record: Dict[str, Any], post: Callable[[str, bytes, Dict[str, str]], Deferred],
                 clock: Any, *, attempts: int = 8, base_delay: float = 1.0, max_delay: float = 300.0,
                 component: str = "user_subscriptions", report: Optional[Report] = None) -> None:
        self.bus = bus
        self.report = report
        self.record = record
        self.post = post
        self.clock = clock
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.component = component
        self.subscription: Any = None
        self._current: Optional[Tuple[Any, Deferred]] = None
        self._timer: Any = None
        self._request: Optional[Deferred] = None
        self.stopped = False
        self.delivered = 0
        self.given_up = 0

    @property
    def queue(self) -> str:
        return self.record["queue"]

    def start(self) -> Deferred:
        d = self.bus.consume_deliveries(self.queue, self._on_message, prefetch=1)

        def started(subscription: Any) -> None:
            self.subscription = subscription
            if self.stopped:
                subscription.cancel()

        return d.addCallback(started)

    def _on_message(self, message: Message, delivery: Any) -> None:
        if self.stopped:
            delivery.nack(requeue=True)
            return
        self._attempt(message, delivery, 1)

    def _attempt(self, message: Message, delivery: Any, attempt: int) -> None:
        self._timer = None
        if self.stopped:
            return
        headers = {"Content-Type": "application/json", "User-Agent": "ooidx-webhook",
                   "X-Ooidx-Subscription": self.record["id"], "X-Ooidx-Attempt": str(attempt)}
        mid = message.headers.get(ID_HEADER)
        if isinstance(mid, str):
            headers["X-Ooidx-Event-Id"] = mid
        try:
            d = maybeDeferred(self.post, self.record["webhook"], message.body, headers)
        except Exception:  # pragma: no cover - maybeDeferred catches
            d = Deferred()
            d.errback(Failure())
        self._request = d
        self._current = (message, delivery)  # in flight: stop() gives it back
        d.addCallbacks(lambda status: self._answered(message, delivery, attempt, status),
                       lambda f: self._failed(message, delivery, attempt, _reason(f)))
        d.addErrback(lambda f: self.log.failure("webhook delivery of {queue}", f, queue=self.queue,
                                                component=self.component))

    def _answered(self, message: Message, delivery: Any, attempt: int, status: Any) -> None:
        self._request = None
        if isinstance(status, int) and 200 <= status < 300:
            self.delivered += 1
            self._current = None
            delivery.ack()
            return
        self._failed(message, delivery, attempt, f"the webhook answered HTTP {status}")

    def _failed(self, message: Message, delivery: Any, attempt: int, reason: str) -> None:
        self._request = None
        if self.stopped:
            return  # stop() gave the message back
        give_up = attempt >= self.attempts
        event = failure_event(self.bus, self.record, attempt=attempt, attempts=self.attempts, reason=reason,
                              given_up=give_up, now=time.time())
        self.log.warn("{component}: webhook of {queue} failed (attempt {attempt} of {attempts}): {reason}",
                      component=self.component, queue=self.queue, attempt=attempt, attempts=self.attempts,
                      reason=event.json()["reason"])
        if self.report is not None:
            d = maybeDeferred(self.report, self.record, event)
            d.addErrback(lambda f: self.log.warn("{component}: the failure of {queue}'s webhook not reported: "
                                                 "{error}", component=self.component, queue=self.queue,
                                                 error=f.getErrorMessage()))
        if give_up:
            self.given_up += 1
            self._current = None
            delivery.ack()
            return
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        self._timer = self.clock.callLater(delay, self._attempt, message, delivery, attempt + 1)

    def stop(self) -> Deferred:
        """Stop delivering; a message in progress goes back to the queue."""
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        if self._current is not None:
            _, delivery = self._current
            self._current = None
            try:
                delivery.nack(requeue=True)
            except Exception:  # pragma: no cover - the link may be gone; the broker requeues anyway
                pass
        return self.subscription.cancel() if self.subscription is not None else succeed(None)


def _reason(failure: Failure) -> str:
    if failure.check(CancelledError, Timeout):
        return "the webhook did not answer in time"
    text = failure.getErrorMessage() or failure.type.__name__
    return f"{failure.type.__name__}: {text}"
