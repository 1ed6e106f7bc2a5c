"""Webhooks: a person's subscription delivered as HTTP POSTs.

L{http_poster} makes the POSTs through an Agent whose every connection goes
to an address checked by L{ooidx.urlpolicy} (no DNS rebinding, no redirects
followed); L{WebhookDelivery} delivers one subscription's queue with it, one
message at a time, retrying with exponential backoff.

Every POST is signed by the Standard Webhooks convention
(U{https://www.standardwebhooks.com/}): C{webhook-id} (the message's id,
the same on every retry, so a receiver can drop duplicates),
C{webhook-timestamp} (Unix seconds) and C{webhook-signature}
(C{v1,BASE64(HMAC-SHA256(secret, "ID.TIMESTAMP.BODY"))}, made by the
C{standardwebhooks} package; during a rotation's grace period the old
secret's signature is sent too, space-separated, as the convention allows).
A receiver verifies with C{standardwebhooks.Webhook(secret).verify(body, headers)}.

Before a webhook is stored (and again before a disabled one is enabled) its
callback is verified (L{verify_callback}): a signed POST whose JSON body is
C{{"type": "webhook.verification", "challenge": C, "expires": T}} (C{C}
also in the C{webhook-challenge} header); the receiver proves it is
there, and willing, by answering 2xx within the timeout with either
C{{"challenge": C}} as JSON or the C{webhook-challenge-response} header of
the Standard Webhooks endpoint verification. No redirect is followed (a 3xx
is a refusal), and an answer larger than L{MAX_CHALLENGE_ANSWER} is one too.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from standardwebhooks import Webhook, WebhookVerificationError

from magnet import Message, Refusal, Timeout

from ooidx import events, urlpolicy
from ooidx.errors import DXError
from ooidx.people.records import ID_HEADER, WEBHOOK_DETAIL

__all__ = ["http_poster", "http_exchange", "WebhookDelivery", "failure_event", "disabled_event", "expired_event", "webhook_host",
           "Report", "Logged", "new_secret", "check_secret", "signature_headers", "verify_callback",
           "InvalidSecret", "WebhookNotVerified", "AnswerTooLarge", "signing_keys", "SECRET_PREFIX",
           "MAX_CHALLENGE_ANSWER", "VERIFICATION_TYPE"]

#: Where a failure goes: C{report(record, event)}, the event an L{events.event_message}.
Report = Callable[[Dict[str, Any], Message], Any]
#: Where each attempt is logged: C{logged(record, entry)} (L{WebhookDelivery}); may fire with
#: C{True}, meaning "the subscription is now disabled: stop".
Logged = Callable[[Dict[str, Any], Dict[str, Any]], Any]

#: What a Standard Webhooks secret starts with; then base64 of the key.
SECRET_PREFIX = "whsec_"
#: The key's size when the exchange makes it, and the sizes a person may bring.
SECRET_BYTES = 32
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{32,88}={0,2}\Z")
#: The body type of the verification POST.
VERIFICATION_TYPE = "webhook.verification"
#: The largest answer to a challenge looked at (bytes); a larger one is a refusal.
MAX_CHALLENGE_ANSWER = 4096
#: The largest response body read after a delivery (the rest is not read: the connection is closed).
MAX_ANSWER = 64 * 1024


class InvalidSecret(DXError):
    """A webhook secret that is not C{whsec_} and base64 of 24 to 64 bytes (400)."""


class WebhookNotVerified(Refusal):
    """The callback did not answer its verification challenge as it should (422); the message says how."""


def new_secret() -> str:
    """A fresh secret: C{whsec_} and base64 of 32 random bytes (the form C{standardwebhooks} reads)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def check_secret(secret: Any) -> str:
    """C{secret} if it is a Standard Webhooks secret of 24 to 64 bytes; otherwise L{InvalidSecret}, whose
    message never repeats it."""
    if not isinstance(secret, str) or not _SECRET.match(secret):
        raise InvalidSecret("a webhook secret is whsec_ followed by the base64 of 24 to 64 random bytes "
                            "(or leave it out and the exchange makes one)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a webhook secret's part after whsec_ is not valid base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidSecret(f"a webhook secret's key is {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
                            f"not {len(key)}")
    return secret


def signature_headers(keys: Iterable[str], msg_id: str, timestamp: float, body: bytes) -> Dict[str, str]:
    """The three Standard Webhooks headers of C{body}, signed with each secret of C{keys} (space-separated)."""
    when = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    signatures = [Webhook(key).sign(msg_id, when, body) for key in keys]
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)), "webhook-signature": " ".join(signatures)}


def signing_keys(record: Dict[str, Any], now: float) -> List[str]:
    """The secrets C{record}'s POSTs are signed with: its own, and the one it replaced until its grace ends."""
    keys = [record["secret"]] if isinstance(record.get("secret"), str) else []
    previous = record.get("previous_secret")
    if isinstance(previous, dict) and isinstance(previous.get("secret"), str) and \
            isinstance(previous.get("until"), (int, float)) and now < previous["until"]:
        keys.append(previous["secret"])
    return keys


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


def disabled_event(bus: Any, record: Dict[str, Any], *, failures: int, reason: str, now: float) -> Message:
    """The event saying C{record}'s webhook was disabled after C{failures} failed attempts in a row
    (an C{event.failed.-} with C{disabled: true}, so a regex watching failures sees it too)."""
    url = str(record.get("webhook") or "")
    return events.event_message("failed", None, node=bus.node, now=now, **{
        WEBHOOK_DETAIL: record["id"], "host": webhook_host(url), "disabled": True, "given_up": True,
        "consecutive_failures": failures, "reason": _scrub(reason, url)[:500],
        "enable": f"POST /api/subscriptions/{record['id']}/verify"})


def expired_event(bus: Any, record: Dict[str, Any], *, disabled_for: float, now: float) -> Message:
    """The event saying C{record}'s webhook, disabled C{disabled_for} seconds and never verified again,
    has been removed (an C{event.failed.-} with C{expired: true})."""
    url = str(record.get("webhook") or "")
    return events.event_message("failed", None, node=bus.node, now=now, **{
        WEBHOOK_DETAIL: record["id"], "host": webhook_host(url), "expired": True, "given_up": True,
        "reason": f"disabled for {int(disabled_for)} s and not verified again: the subscription is removed"})


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


class AnswerTooLarge(ValueError):
    """An answer past the size L{http_exchange} reads."""


class _Keep(Protocol):
    """Reads a response body of at most C{limit} bytes; a longer one fails C{done} (and is hung up on)."""

    def __init__(self, done: Deferred, limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: List[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(Failure(AnswerTooLarge(f"the answer is larger than {self.limit} bytes")))
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))


#: What L{http_exchange} answers: C{(status, headers (lower-case name -> first value), body)}.
Exchanged = Tuple[int, Dict[str, str], bytes]


def http_exchange(reactor: Any, *, allow_private: bool = False, allow_hosts: Iterable[str] = (),
                  timeout: float = 5.0, limit: int = MAX_CHALLENGE_ANSWER,
                  resolver: Any = None) -> Callable[[str, bytes, Dict[str, str]], Deferred]:
    """C{exchange(url, body, headers) -> Deferred((status, headers, body))}: one
    POST, like L{http_poster}'s (checked addresses, no redirects followed), that
    also reads the answer: at most C{limit} bytes of it, all within C{timeout}
    seconds, or it fails (a verification answer is small, and slow is no answer)."""
    factory = urlpolicy.PolicyEndpointFactory(reactor, allow_private=allow_private, allow_hosts=allow_hosts,
                                              timeout=timeout, resolver=resolver)
    agent = Agent.usingEndpointFactory(reactor, factory, pool=HTTPConnectionPool(reactor, persistent=False))

    def exchange(url: str, body: bytes, headers: Dict[str, str]) -> Deferred:
        h = Headers({k.encode("ascii"): [v.encode("utf-8")] for k, v in headers.items()})
        d = agent.request(b"POST", url.encode("ascii"), h, _BytesProducer(body))

        def answered(response: Any) -> Deferred:
            done: Deferred = Deferred()
            response.deliverBody(_Keep(done, limit))
            found = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                     for k, v in response.headers.getAllRawHeaders() if v}
            return done.addCallback(lambda content: (response.code, found, content))

        d.addCallback(answered)

        def timed_out(result: Any, seconds: float) -> None:
            raise Timeout(f"no answer within {seconds:g} s")

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        return d

    return exchange


def verify_callback(exchange: Callable[[str, bytes, Dict[str, str]], Deferred], url: str, secret: str, *,
                    now: float, lifetime: float, allow_private: bool = False,
                    allow_hosts: Iterable[str] = ()) -> Deferred:
    """Send C{url} its verification challenge (signed with C{secret}) through
    C{exchange} (L{http_exchange}); fires with None when the receiver echoed
    it, else fails with L{WebhookNotVerified} saying what was wrong. The
    challenge expires C{lifetime} seconds after C{now} (the exchange's own
    timeout should be no longer)."""
    challenge = secrets.token_urlsafe(24)
    msg_id = "msg_verify_" + secrets.token_hex(8)
    body = json.dumps({"type": VERIFICATION_TYPE, "challenge": challenge, "expires": int(now + lifetime)},
                      separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "ooidx-webhook", "webhook-challenge": challenge}
    headers.update(signature_headers([secret], msg_id, now, body))
    d = maybeDeferred(exchange, url, body, headers)

    def answered(result: Exchanged) -> None:
        status, found, content = result
        if 300 <= status < 400:
            location = found.get("location", "")
            where = ""
            if location:
                try:
                    urlpolicy.check_url(urljoin(url, location), allow_private=allow_private, allow_hosts=allow_hosts)
                    where = f" to {webhook_host(urljoin(url, location))}"
                except Exception as e:  # noqa: BLE001 - the policy's refusal, in words
                    where = f" to a forbidden address ({_scrub(str(e), location)[:200]})"
            raise WebhookNotVerified(f"the callback answered the verification with a redirect (HTTP {status}"
                                     f"{where}); redirects are not followed: register the final URL")
        if not 200 <= status < 300:
            raise WebhookNotVerified(f"the callback answered the verification with HTTP {status}, not 2xx")
        response = found.get("webhook-challenge-response")
        if response is not None:
            try:
                Webhook(secret).verify_endpoint_verification_response(challenge, response)
                return None
            except WebhookVerificationError:
                raise WebhookNotVerified("the callback's webhook-challenge-response header does not match the "
                                         "challenge") from None
        try:
            echoed = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise WebhookNotVerified('the callback did not echo the challenge: answer 2xx with the JSON '
                                     '{"challenge": "..."} of the verification POST') from None
        given = echoed.get("challenge") if isinstance(echoed, dict) else None
        if not isinstance(given, str) or not hmac_equal(given, challenge):
            raise WebhookNotVerified('the callback answered with another challenge than the one it was sent: '
                                     'echo the "challenge" of the verification POST')
        return None

    def failed(failure: Failure) -> None:
        """The exchange failed (not the answer's checks, which raise their own refusal): say how."""
        if failure.check(AnswerTooLarge):
            raise WebhookNotVerified(f"the callback's answer to the verification is too large (at most "
                                     f"{MAX_CHALLENGE_ANSWER} bytes)")
        if failure.check(CancelledError, Timeout):
            raise WebhookNotVerified(f"the callback did not answer the verification within {lifetime:g} s "
                                     "(the challenge expired)")
        raise WebhookNotVerified(f"the callback could not be verified: {_scrub(_reason(failure), url)[:300]}")

    return d.addCallbacks(answered, failed)


def hmac_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


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
                 component: str = "user_subscriptions", report: Optional[Report] = None,
                 logged: Optional[Logged] = None) -> None:
        self.logged = logged
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
        self._started = 0.0
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
        now = self.clock.seconds()
        keys = signing_keys(self.record, now)
        if keys:
            # The same webhook-id on every attempt of a message: the receiver's key for dropping duplicates.
            msg_id = "msg_" + (mid if isinstance(mid, str) and len(mid) <= 64 else self._message_id(message))
            headers.update(signature_headers(keys, msg_id, now, message.body))
        self._started = now
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

    def _message_id(self, message: Message) -> str:
        """An id for a message without one (kept on the message, so its retries share it)."""
        mid = getattr(message, "_webhook_id", None)
        if mid is None:
            mid = secrets.token_hex(12)
            try:
                message._webhook_id = mid  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover - a message class with slots
                pass
        return mid

    def _log(self, attempt: int, status: Optional[int], ok: bool, error: Optional[str] = None) -> None:
        """Tell C{logged} how this attempt went (time, status, attempt, latency); never fails."""
        if self.logged is None:
            return
        now = self.clock.seconds()
        entry: Dict[str, Any] = {"time": now, "status": status, "attempt": attempt, "ok": ok,
                                 "latency": round(max(0.0, now - self._started), 6)}
        if error is not None:
            entry["error"] = _scrub(error, str(self.record.get("webhook") or ""))[:300]
        d = maybeDeferred(self.logged, self.record, entry)
        d.addErrback(lambda f: self.log.warn("{component}: a delivery of {queue} not logged: {error}",
                                             component=self.component, queue=self.queue,
                                             error=f.getErrorMessage()))

    def _answered(self, message: Message, delivery: Any, attempt: int, status: Any) -> None:
        self._request = None
        if isinstance(status, int) and 200 <= status < 300:
            self.delivered += 1
            self._current = None
            delivery.ack()
            self._log(attempt, status, True)
            return
        self._failed(message, delivery, attempt, f"the webhook answered HTTP {status}",
                     status if isinstance(status, int) else None)

    def _failed(self, message: Message, delivery: Any, attempt: int, reason: str,
                status: Optional[int] = None) -> None:
        self._request = None
        if self.stopped:
            return  # stop() gave the message back
        self._log(attempt, status, False, reason)
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
