"""Subscriptions for people: what user_pub_sub and user_notification share.

A person is a name and a token. The operator makes one (C{POST /api/people});
the person then subscribes, over HTTP on the web port, to dataset topics
(C{kind: "datasets"}, served by user_pub_sub) or event topics (C{kind:
"events"}, served by user_notification), and receives what matches as a
Server-Sent Events stream or as webhook POSTs. See docs/dissemination.md,
"People".

Each subscription is a durable queue C{user.PERSON.ID} bounded with
C{x-max-length} (overflow drops the oldest), so what arrives while the
person is away is kept, up to the bound. A subscription with a webhook is
delivered by the component of its kind (one POST per message, retried with
exponential backoff, given up after a limit, each failure an
C{event.failed.-} event; the message is acked only after a 2xx or giving
up); one without a webhook is read by the person's SSE stream.

Attribute store keys:

    person:NAME                       {"name", "token_sha256", "created"}
    user_subscription:NAME:ID         the subscription record (L{PersonalSubscriptions.subscribe})

This module holds the shared component base (L{PersonalSubscriptions}), the
webhook delivery (L{WebhookDelivery}), the HTTP API mounted by the web edge
(L{SubscriptionsApi}) and its SSE streams, and the stream tickets a browser
opens a stream with (L{make_ticket}, L{parse_ticket}): an EventSource cannot
send an Authorization header, so a page trades the person's token for a
short-lived ticket (C{POST /api/subscriptions/ID/ticket}) that opens that one
stream only (C{GET /api/subscriptions/ID/events?ticket=...}).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from magnet import Message, Refusal, RemoteError, Timeout, Unroutable, operation

from ooidx import events, urlpolicy
from ooidx.component import Component
from ooidx.errors import InvalidRegex, InvalidURL
from ooidx.routing import validate
from ooidx import wire
from ooidx.http.answers import HTTPError, json_answer

__all__ = ["PersonalSubscriptions", "WebhookDelivery", "SubscriptionsApi", "InvalidSubscription",
           "UnknownSubscription", "PERSON_NAME", "queue_name", "hash_token", "KINDS", "MAX_LENGTH",
           "CHANGED_FANOUT", "TICKET_LIFETIME", "TicketError", "ticket_key", "make_ticket", "parse_ticket",
           "ticket_mac"]

#: kind -> the component that serves it.
KINDS = {"datasets": "user_pub_sub", "events": "user_notification"}
#: What a person's name may look like (it is part of queue names).
PERSON_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
SUBSCRIPTION_ID = re.compile(r"[0-9a-f]{12}\Z")
#: Default bound of a person's queue (messages); the largest one may ask for.
MAX_LENGTH = 10_000
MAX_LENGTH_LIMIT = 100_000
MAX_SUBSCRIPTIONS = 100
MAX_URL = 2048
#: The fanout every instance of both components hears after a subscription changes.
CHANGED_FANOUT = wire.USER_SUBSCRIPTIONS_CHANGED
#: The header stamping every message in a person's queue with a sortable id (SSE's C{id:}).
ID_HEADER = wire.ID_HEADER
PERSON_KEY = wire.PERSON_KEY
SUBSCRIPTION_KEY = wire.USER_SUBSCRIPTION_KEY
#: Details of an event that a failing webhook caused: such events are never
#: routed to webhook subscriptions, so failing webhooks cannot feed each other.
WEBHOOK_DETAIL = "webhook_subscription"


class InvalidSubscription(Refusal):
    """A subscription request that does not hold together (400)."""


class UnknownSubscription(Refusal):
    """No such subscription of this person (404)."""


def queue_name(person: str, sid: str) -> str:
    return f"user.{person}.{sid}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def message_id(now: float) -> str:
    """Sortable (fixed width): microseconds since the epoch, then randomness."""
    return f"{int(now * 1_000_000):017d}-{secrets.token_hex(3)}"


def check_person(name: Any) -> str:
    if not isinstance(name, str) or not PERSON_NAME.match(name):
        raise InvalidSubscription(f"a person's name is 1-32 characters of a-z 0-9 _ - (starting with a letter "
                                  f"or digit), not {str(name)[:40]!r}")
    return name


def check_id(sid: Any) -> str:
    if not isinstance(sid, str) or not SUBSCRIPTION_ID.match(sid):
        raise UnknownSubscription(f"no subscription {str(sid)[:40]!r}")
    return sid


def security_of(config: Any) -> Tuple[bool, Tuple[str, ...]]:
    security = getattr(config, "security", None)
    return bool(getattr(security, "allow_private", False)), tuple(getattr(security, "allow_hosts", ()) or ())


# --------------------------------------------------------------------------- #
# Stream tickets
#
# A ticket is C{v1.PERSON.ID.EXPIRES.NONCE.MAC}: the MAC (HMAC-SHA256,
# base64url) covers the purpose (this subscription's event stream, GET),
# the person, the subscription, the expiry (Unix seconds), the nonce and the
# person's current token hash, so a ticket dies with the person (or their
# token), cannot be moved to another subscription or person, and opens
# nothing but that stream. Nothing is stored: any web node whose key is the
# same checks it. The key is derived from the operator token (shared by
# nodes whose config sets C{security.token}) with scrypt: any person can
# obtain tickets, so a ticket must not be a fast offline oracle for the
# operator token.

#: How long a ticket opens its stream (seconds).
TICKET_LIFETIME = 60
#: The longest ticket looked at (a real one is about 100 characters).
TICKET_MAX = 256
TICKET_VERSION = "v1"
_TICKET_SALT = b"ooidx stream ticket v1"
_TICKET_PURPOSE = "GET /api/subscriptions/{id}/events"
_NONCE = re.compile(r"[A-Za-z0-9_-]{16}\Z")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_EXPIRES = re.compile(r"[0-9]{1,12}\Z")
_keys: Dict[str, bytes] = {}


class TicketError(ValueError):
    """A ticket that is not even shaped like one; the message says how (it never repeats the ticket)."""


def ticket_key(operator_token: str) -> bytes:
    """The MAC key of stream tickets, derived from the operator token (once a process: scrypt is slow on purpose)."""
    key = _keys.get(operator_token)
    if key is None:
        secret = operator_token.encode("utf-8")
        try:
            key = hashlib.scrypt(secret, salt=_TICKET_SALT, n=2 ** 14, r=8, p=1, dklen=32)
        except (AttributeError, ValueError):  # pragma: no cover - an OpenSSL without scrypt
            key = hashlib.pbkdf2_hmac("sha256", secret, _TICKET_SALT, 300_000)
        _keys.clear()
        _keys[operator_token] = key
    return key


def ticket_mac(key: bytes, person: str, sid: str, expires: int, nonce: str, token_sha256: str) -> str:
    text = "\n".join([TICKET_VERSION, _TICKET_PURPOSE.format(id=sid), person, sid, str(expires), nonce,
                      token_sha256])
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_ticket(key: bytes, person: str, sid: str, token_sha256: str, expires: int,
                nonce: Optional[str] = None) -> str:
    """A ticket opening C{person}'s subscription C{sid}'s stream until C{expires} (Unix seconds)."""
    nonce = nonce or secrets.token_urlsafe(12)
    mac = ticket_mac(key, person, sid, expires, nonce, token_sha256)
    return ".".join([TICKET_VERSION, person, sid, str(expires), nonce, mac])


def parse_ticket(raw: Any) -> Tuple[str, str, int, str, str]:
    """C{(person, id, expires, nonce, mac)} of a ticket's text (bytes or str),
    not yet checked against its MAC; L{TicketError} if it is malformed."""
    if isinstance(raw, bytes):
        if len(raw) > TICKET_MAX:
            raise TicketError(f"the stream ticket is too long (at most {TICKET_MAX} characters)")
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise TicketError("the stream ticket is not ASCII text") from None
    if not isinstance(raw, str):
        raise TicketError("the stream ticket is not text")
    if not raw:
        raise TicketError("the stream ticket is empty")
    if len(raw) > TICKET_MAX:
        raise TicketError(f"the stream ticket is too long (at most {TICKET_MAX} characters)")
    if not raw.isascii():
        raise TicketError("the stream ticket is not ASCII text")
    parts = raw.split(".")
    if len(parts) != 6:
        raise TicketError(f"a stream ticket has 6 parts separated by dots ({TICKET_VERSION}.PERSON.ID.EXPIRES."
                          f"NONCE.MAC); this one has {len(parts)}")
    version, person, sid, expires, nonce, mac = parts
    if version != TICKET_VERSION:
        raise TicketError(f"not a {TICKET_VERSION} stream ticket")
    if not (PERSON_NAME.match(person) and SUBSCRIPTION_ID.match(sid) and _EXPIRES.match(expires)
            and _NONCE.match(nonce) and _MAC.match(mac)):
        raise TicketError("the stream ticket is malformed")
    return person, sid, int(expires), nonce, mac


# --------------------------------------------------------------------------- #
# Webhooks


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
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

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
    C{event.failed.-} event is emitted and the POST is tried again after
    C{base_delay * 2**(n-1)} seconds (at most C{max_delay}), until C{attempts}
    tries have failed; then it is given up (one more event) and acked. While
    one message is being delivered the next waits (prefetch 1), so the
    person gets them in order, and the queue's bound applies meanwhile.
    """

    log = Logger()

    def __init__(self, bus: Any, record: Dict[str, Any], post: Callable[[str, bytes, Dict[str, str]], Deferred],
                 clock: Any, *, attempts: int = 8, base_delay: float = 1.0, max_delay: float = 300.0,
                 component: str = "user_subscriptions") -> None:
        self.bus = bus
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
        d.addCallbacks(lambda status: self._answered(message, delivery, attempt, status),
                       lambda f: self._failed(message, delivery, attempt, _reason(f)))
        d.addErrback(lambda f: self.log.failure("webhook delivery of {queue}", f, queue=self.queue,
                                                component=self.component))

    def _answered(self, message: Message, delivery: Any, attempt: int, status: Any) -> None:
        self._request = None
        if isinstance(status, int) and 200 <= status < 300:
            self.delivered += 1
            delivery.ack()
            return
        self._failed(message, delivery, attempt, f"the webhook answered HTTP {status}")

    def _failed(self, message: Message, delivery: Any, attempt: int, reason: str) -> None:
        self._request = None
        if self.stopped:
            return  # stop() gave the message back
        give_up = attempt >= self.attempts
        self.log.warn("{component}: webhook of {queue} failed (attempt {attempt} of {attempts}): {reason}",
                      component=self.component, queue=self.queue, attempt=attempt, attempts=self.attempts,
                      reason=reason)
        details = {WEBHOOK_DETAIL: self.record["id"], "person": self.record["person"],
                   "url": self.record["webhook"], "attempt": attempt, "attempts": self.attempts,
                   "reason": reason[:500], "given_up": give_up}
        events.emit(self.bus, "failed", None, **details)
        if give_up:
            self.given_up += 1
            delivery.ack()
            return
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        self._timer = self.clock.callLater(delay, self._attempt, message, delivery, attempt + 1)
        self._current = (message, delivery)

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


# --------------------------------------------------------------------------- #
# The components


class PersonalSubscriptions(Component):
    """The shared half of user_pub_sub and user_notification (worker queues).

    Operations: C{subscribe}, C{unsubscribe}, C{list}. The records live in the
    attribute store; every instance loads them at start and again when the
    C{user_subscriptions.changed} fanout says something changed, and runs
    the webhook deliveries of its kind. Subclasses say what feeds a person's
    queue (L{activate} / L{deactivate}, L{prepare} / L{release}).
    """

    log = Logger()
    kind = ""

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, config: Any = None,
                 clock: Any = None, max_length: int = MAX_LENGTH, webhook_attempts: int = 8,
                 webhook_base_delay: float = 1.0, webhook_max_delay: float = 300.0, webhook_timeout: float = 10.0,
                 poster: Optional[Callable[..., Deferred]] = None, resolver: Any = None) -> None:
        super().__init__(name, bus, node=node, instances=instances, config=config, clock=clock)
        self.max_length = max_length
        self.webhook_attempts = webhook_attempts
        self.webhook_base_delay = webhook_base_delay
        self.webhook_max_delay = webhook_max_delay
        self.webhook_timeout = webhook_timeout
        self.allow_private, self.allow_hosts = security_of(config)
        self._poster = poster
        self._resolver = resolver
        self.records: Dict[str, Dict[str, Any]] = {}  # queue -> record (this kind only)
        self.webhooks: Dict[str, WebhookDelivery] = {}
        self._reloading: Optional[Deferred] = None
        self._reload_again = False

    # lifecycle -------------------------------------------------------------------

    @inlineCallbacks
    def setUp(self) -> Any:
        yield self.bus.declare_fanout(CHANGED_FANOUT)
        self._subscriptions.append((yield self.bus.subscribe(CHANGED_FANOUT, self._on_changed)))
        yield self.reload()

    @inlineCallbacks
    def tearDown(self) -> Any:
        for queue in list(self.records):
            yield self._deactivate(queue)

    @property
    def poster(self) -> Callable[..., Deferred]:
        if self._poster is None:
            self._poster = http_poster(self.clock, allow_private=self.allow_private, allow_hosts=self.allow_hosts,
                                       timeout=self.webhook_timeout, resolver=self._resolver)
        return self._poster

    # keeping up with the store -----------------------------------------------------

    def _on_changed(self, message: Message) -> Deferred:
        return self.reload()

    def reload(self) -> Deferred:
        """Bring the running subscriptions in line with the attribute store."""
        if self._reloading is not None:
            self._reload_again = True
            out: Deferred = Deferred()
            self._reloading.addBoth(lambda r: (out.callback(None), r)[1])
            return out
        self._reloading = self._reload()

        def done(result: Any) -> Any:
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                return self.reload()
            return result

        self._reloading.addBoth(done)
        d: Deferred = Deferred()
        self._reloading.addBoth(lambda r: (d.callback(None), r)[1] if not d.called else r)
        return d

    @inlineCallbacks
    def _reload(self) -> Any:
        try:
            found = yield self.bus.call("attribute_store", "query", regex="^" + SUBSCRIPTION_KEY)
        except Exception as e:
            self.log.warn("{component}: cannot load people's subscriptions: {error}", component=self.name,
                          error=e)
            return
        wanted = {}
        for value in (found or {}).values():
            if isinstance(value, dict) and value.get("kind") == self.kind and isinstance(value.get("queue"), str):
                wanted[value["queue"]] = value
        for queue in [q for q in self.records if q not in wanted]:
            yield self._deactivate(queue)
        for queue, record in wanted.items():
            current = self.records.get(queue)
            if current == record:
                continue
            if current is not None:
                yield self._deactivate(queue)
            try:
                yield self._activate(record)
            except Exception as e:
                self.log.error("{component}: cannot start subscription {queue}: {error}", component=self.name,
                               queue=queue, error=e)

    @inlineCallbacks
    def _activate(self, record: Dict[str, Any]) -> Any:
        self.records[record["queue"]] = record
        yield maybeDeferred(self.activate, record)
        if record.get("webhook"):
            delivery = WebhookDelivery(self.bus, record, self.poster, self.clock, attempts=self.webhook_attempts,
                                       base_delay=self.webhook_base_delay, max_delay=self.webhook_max_delay,
                                       component=self.name)
            self.webhooks[record["queue"]] = delivery
            yield delivery.start()

    @inlineCallbacks
    def _deactivate(self, queue: str) -> Any:
        record = self.records.pop(queue, None)
        delivery = self.webhooks.pop(queue, None)
        if delivery is not None:
            yield delivery.stop()
        if record is not None:
            yield maybeDeferred(self.deactivate, record)

    # what subclasses add -----------------------------------------------------------

    def activate(self, record: Dict[str, Any]) -> Any:
        """Start feeding the person's queue (on every instance)."""

    def deactivate(self, record: Dict[str, Any]) -> Any:
        """Stop feeding it."""

    def prepare(self, record: Dict[str, Any]) -> Any:
        """Once, at subscribe: set up what feeds the queue (may add to C{record})."""

    def release(self, record: Dict[str, Any]) -> Any:
        """Once, at unsubscribe: undo L{prepare}."""

    # checking ----------------------------------------------------------------------

    @inlineCallbacks
    def check_webhook(self, url: Any) -> Any:
        """L{InvalidURL} or L{Forbidden} unless C{url} is an http(s) URL whose
        host is (or resolves only to) an address the exchange may reach."""
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise InvalidURL(f"a webhook is an http(s) URL of at most {MAX_URL} characters")
        target = urlpolicy.check_url(url, allow_private=self.allow_private, allow_hosts=self.allow_hosts)
        if target.ip is None and not self.allow_private:
            resolve = self._resolver or urlpolicy.getaddrinfo_resolver(self.clock)
            try:
                addresses = yield resolve(target.host, target.port)
            except Exception as e:
                raise InvalidURL(f"{target.host}: cannot be resolved ({type(e).__name__})") from None
            for address in addresses:
                ip = urlpolicy.parse_ip(str(address))
                if ip is None:
                    raise InvalidURL(f"{target.host}: resolved to something that is not an address")
                urlpolicy.check_address(ip, target.host, target.port, allow_private=self.allow_private,
                                        allow_hosts=self.allow_hosts)
        return target.url

    # operations --------------------------------------------------------------------

    @operation
    @inlineCallbacks
    def subscribe(self, person: str, regex: str, webhook: Optional[str] = None,
                  max_length: Optional[int] = None) -> Any:
        """Make a subscription for C{person}: its record
        C{{"id", "person", "kind", "regex", "webhook", "queue", "max_length", "created"}}."""
        check_person(person)
        validate(regex)
        if webhook is not None:
            webhook = yield self.check_webhook(webhook)
        if max_length is None:
            max_length = self.max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= MAX_LENGTH_LIMIT:
            raise InvalidSubscription(f"max_length is a whole number from 1 to {MAX_LENGTH_LIMIT}")
        mine = yield self.bus.call("attribute_store", "query", regex=f"^{SUBSCRIPTION_KEY}{person}:")
        if len(mine or {}) >= MAX_SUBSCRIPTIONS:
            raise InvalidSubscription(f"{person} has {MAX_SUBSCRIPTIONS} subscriptions already (the most allowed)")
        sid = secrets.token_hex(6)
        record = {"id": sid, "person": person, "kind": self.kind, "regex": regex, "webhook": webhook,
                  "queue": queue_name(person, sid), "max_length": max_length, "created": time.time()}
        yield self.bus.transport.declare_queue(record["queue"], durable=True, arguments={
            "x-max-length": max_length, "x-overflow": "drop-head"})
        try:
            yield maybeDeferred(self.prepare, record)
            yield self.bus.call("attribute_store", "set", key=f"{SUBSCRIPTION_KEY}{person}:{sid}", value=record)
        except Exception:
            yield self.bus.transport.delete_queue(record["queue"])
            raise
        yield self._changed()
        self.log.info("{component}: {person} subscribed to {kind} matching {regex!r} ({queue})",
                      component=self.name, person=person, kind=self.kind, regex=regex, queue=record["queue"])
        return record

    @operation
    @inlineCallbacks
    def unsubscribe(self, person: str, id: str) -> Any:
        """Remove C{person}'s subscription C{id} and its queue; L{UnknownSubscription} if there is none."""
        check_person(person)
        check_id(id)
        key = f"{SUBSCRIPTION_KEY}{person}:{id}"
        try:
            record = yield self.bus.call("attribute_store", "get", key=key)
        except RemoteError as e:
            if e.remote_type == "KeyError":
                raise UnknownSubscription(f"{person} has no subscription {id}") from None
            raise
        if not isinstance(record, dict) or record.get("kind") != self.kind:
            raise UnknownSubscription(f"{person} has no {self.kind} subscription {id}")
        yield self.bus.call("attribute_store", "delete", key=key)
        yield self._deactivate(record["queue"])
        try:
            yield maybeDeferred(self.release, record)
        except Exception as e:
            self.log.warn("{component}: releasing {queue}: {error}", component=self.name, queue=record["queue"],
                          error=e)
        yield self.bus.transport.delete_queue(record["queue"])
        yield self._changed()
        return True

    @operation
    @inlineCallbacks
    def list(self, person: Optional[str] = None) -> Any:
        """The subscriptions of this kind (of C{person}, if given)."""
        prefix = SUBSCRIPTION_KEY + (check_person(person) + ":" if person is not None else "")
        found = yield self.bus.call("attribute_store", "query", regex="^" + prefix)
        records = [v for v in (found or {}).values() if isinstance(v, dict) and v.get("kind") == self.kind]
        return sorted(records, key=lambda r: (r.get("person", ""), r.get("created", 0)))

    def _changed(self) -> Deferred:
        d = self.bus.send(CHANGED_FANOUT, Message.of_json({"component": self.name}, type="changed",
                                                          persistent=False), mandatory=False)
        d.addErrback(lambda f: self.log.warn("{component}: change not announced: {error}", component=self.name,
                                             error=f.getErrorMessage()))
        # This instance need not wait for the fanout to come round.
        d.addCallback(lambda _: self.reload())
        return d


# --------------------------------------------------------------------------- #
# The HTTP API (mounted by ooidx.web.app)


class _SSE:
    """One Server-Sent Events response: C{send} writes an event, a comment
    every C{keepalive} seconds keeps proxies from closing it, and the
    client's going (or the web edge's stopping) calls C{on_close} once.

    It is the request's producer: while the client cannot keep up, C{paused}
    is set and the feeder stops taking messages (they stay in the queue)."""

    def __init__(self, request: server.Request, clock: Any, keepalive: float,
                 on_close: Callable[[], Any]) -> None:
        from twisted.internet.task import LoopingCall

        self.request = request
        self.closed = False
        self.paused = False
        self._on_close = on_close
        self._resumed: List[Callable[[], None]] = []
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.registerProducer(_SSEProducer(self), True)
        request.write(b": ooidx event stream\nretry: 3000\n\n")
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self._keepalive.start(keepalive, now=False)
        request.notifyFinish().addBoth(lambda _: self.close())

    def _ping(self) -> None:
        if not self.closed:
            self.request.write(b": keep-alive\n\n")

    def send(self, data: Any, event_id: Optional[str] = None) -> None:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        out = b""
        if event_id:
            out += b"id: " + event_id.encode("ascii", "replace") + b"\n"
        out += b"data: " + text.encode("utf-8") + b"\n\n"
        self.request.write(out)

    def when_resumed(self, f: Callable[[], None]) -> None:
        self._resumed.append(f)

    def resume(self) -> None:
        self.paused = False
        waiting, self._resumed = self._resumed, []
        for f in waiting:
            f()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._keepalive.running:
            self._keepalive.stop()
        try:
            self.request.unregisterProducer()
        except Exception:  # pragma: no cover
            pass
        self._on_close()

    def finish(self) -> None:
        if not self.closed and not self.request.finished and not _gone(self.request):
            # Unregistered first: finishing with a producer still registered makes
            # Twisted log a failure naming the request's URI (and its ?ticket=).
            try:
                self.request.unregisterProducer()
            except Exception:  # pragma: no cover
                pass
            self.request.finish()
        self.close()


@implementer(IPushProducer)
class _SSEProducer:
    def __init__(self, sse: _SSE) -> None:
        self.sse = sse

    def pauseProducing(self) -> None:
        self.sse.paused = True

    def resumeProducing(self) -> None:
        self.sse.resume()

    def stopProducing(self) -> None:
        self.sse.close()


class SubscriptionsApi:
    """The person-facing part of the web API (and the operator's event tail).

        POST   /api/people                    operator: {"name"} -> 201 {"name", "token"}
        GET    /api/people                    operator: {"people": [{"name", "created"}]}
        DELETE /api/people/NAME               operator: the person and all their subscriptions
        POST   /api/subscriptions             person: {"kind", "regex", "webhook"?, "max_length"?} -> 201 record
        GET    /api/subscriptions             person: {"subscriptions": [record, ...]}
        GET    /api/subscriptions/ID          person: the record
        DELETE /api/subscriptions/ID          person: {"deleted": ID}
        POST   /api/subscriptions/ID/ticket   person: {"ticket", "expires", "expires_in", "url"}: a stream
                                              ticket for a browser (valid TICKET_LIFETIME seconds)
        GET    /api/subscriptions/ID/events   person (or ?ticket=): text/event-stream of what arrives in the queue
        GET    /api/events/stream?regex=R&recent=N
                                              operator: text/event-stream of live events (``ooidx events``),
                                              after the N most recent (notification's ring)
    """

    log = Logger()
    PREFIXES = (b"/api/people", b"/api/subscriptions")
    #: The event tail; /api/events itself (recent events as JSON) is the management page's.
    TAIL = b"/api/events/stream"

    def __init__(self, web: Any, *, keepalive: float = 15.0, prefetch: int = 20, clock: Any = None,
                 ticket_lifetime: int = TICKET_LIFETIME) -> None:
        self.web = web
        self.bus = web.bus
        self.keepalive = keepalive
        self.prefetch = prefetch
        #: What tickets are issued and checked by (C{seconds()}: Unix time); the web edge's reactor by default.
        self.clock = clock if clock is not None else web.clock
        self.ticket_lifetime = ticket_lifetime
        self.streams: set = set()

    def handles(self, path: bytes) -> bool:
        return path == self.TAIL or any(path == p or path.startswith(p + b"/") for p in self.PREFIXES)

    # routing --------------------------------------------------------------------------

    def render(self, request: server.Request) -> Any:

        parts = request.path.split(b"/")[2:]  # after b"", b"api"
        try:
            segments = [p.decode("ascii") for p in parts]
        except UnicodeDecodeError:
            raise HTTPError(404, "NotFound", "no such path") from None
        head, rest = segments[0], segments[1:]
        if head == "people":
            if not rest:
                return self._methods(request, {b"POST": self.create_person, b"GET": self.list_people})
            if len(rest) == 1:
                return self._methods(request, {b"DELETE": lambda r: self.delete_person(r, rest[0])})
        elif head == "subscriptions":
            if not rest:
                return self._methods(request, {b"POST": self.create_subscription, b"GET": self.list_subscriptions})
            if len(rest) == 1:
                return self._methods(request, {b"GET": lambda r: self.get_subscription(r, rest[0]),
                                               b"DELETE": lambda r: self.delete_subscription(r, rest[0])})
            if len(rest) == 2 and rest[1] == "events":
                return self._methods(request, {b"GET": lambda r: self.subscription_events(r, rest[0])})
            if len(rest) == 2 and rest[1] == "ticket":
                return self._methods(request, {b"POST": lambda r: self.create_ticket(r, rest[0])})
        elif head == "events" and rest == ["stream"]:
            return self._methods(request, {b"GET": self.tail_events})
        raise HTTPError(404, "NotFound", f"no such path: {request.path[:80].decode('ascii', 'replace')}")

    def _methods(self, request: server.Request, methods: Dict[bytes, Callable[[server.Request], Any]]) -> Any:

        handler = methods.get(request.method)
        if handler is None:
            allow = b", ".join(sorted(methods))
            raise HTTPError(405, "MethodNotAllowed", f"this path takes {allow.decode('ascii')}", {b"Allow": allow})
        return handler(request)

    # who is asking -------------------------------------------------------------------

    def _bearer(self, request: server.Request, who: str) -> str:

        challenge = {b"WWW-Authenticate": b'Bearer realm="ooidx"'}
        header = request.getHeader(b"authorization")
        if not header:
            raise HTTPError(401, "Unauthorized", f"{who} token is required (Authorization: Bearer TOKEN)", challenge)
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise HTTPError(401, "Unauthorized", f"{who} token is required (Authorization: Bearer TOKEN)", challenge)
        try:
            return given.strip().decode("ascii")
        except UnicodeDecodeError:
            raise HTTPError(401, "Unauthorized", "the token is not valid", challenge) from None

    def _operator(self, request: server.Request) -> None:
        self.web._check_token(request)

    def _person(self, request: server.Request) -> Deferred:
        """The name of the person whose token the request carries; 401 otherwise."""
        return self._person_and_hash(request).addCallback(lambda found: found[0])

    @inlineCallbacks
    def _person_and_hash(self, request: server.Request) -> Any:
        """C{(name, token_sha256)} of the person whose token the request carries; 401 otherwise."""

        token = self._bearer(request, "a person's")
        name, dot, _ = token.partition(".")
        unauthorized = HTTPError(401, "Unauthorized", "the token is not valid",
                                 {b"WWW-Authenticate": b'Bearer realm="ooidx", error="invalid_token"'})
        if not dot or not PERSON_NAME.match(name) or len(token) > 256:
            raise unauthorized
        expected = yield self._token_hash(name)
        if expected is None or not hmac.compare_digest(hash_token(token).encode("ascii"), expected.encode("ascii")):
            raise unauthorized
        return name, expected

    @inlineCallbacks
    def _token_hash(self, name: str) -> Any:
        """The stored token hash of person C{name}; None if there is no such person."""
        try:
            record = yield self.bus.call("attribute_store", "get", key=PERSON_KEY + name)
        except RemoteError as e:
            if e.remote_type == "KeyError":
                return None
            raise
        expected = record.get("token_sha256") if isinstance(record, dict) else None
        return expected if isinstance(expected, str) and expected.isascii() and expected else None

    def _ticket_key(self) -> bytes:

        token = getattr(self.web, "_token", None)
        if not token:  # pragma: no cover - the web edge always has one once started
            raise HTTPError(503, "Unavailable", "stream tickets need the operator token, which is not set")
        return ticket_key(token)

    @inlineCallbacks
    def _ticket_person(self, request: server.Request, values: List[bytes], sid: str) -> Any:
        """The person whose valid ticket for subscription C{sid}'s stream the
        request carries (C{?ticket=}); 400/401/403 otherwise. Only the
        stream's GET calls this: a ticket opens nothing else."""

        challenge = {b"WWW-Authenticate": b'Bearer realm="ooidx", error="invalid_token"'}
        if len(values) != 1:
            raise HTTPError(400, "BadRequest", "give one ticket (?ticket=...), not several")
        try:
            person, ticket_sid, expires, nonce, mac = parse_ticket(values[0])
        except TicketError as e:
            raise HTTPError(401, "InvalidTicket", f"{e}; ask for one with POST /api/subscriptions/ID/ticket",
                            challenge) from None
        token_sha256 = yield self._token_hash(person)
        # One answer for a forged MAC, an unknown person and a person whose token changed since (deleted and
        # made again): none of them says whether the person exists.
        expected = ticket_mac(self._ticket_key(), person, ticket_sid, expires, nonce, token_sha256 or "")
        if token_sha256 is None or not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):
            raise HTTPError(401, "InvalidTicket", "the stream ticket is not valid (altered, or its person is "
                            "gone); ask for a new one with POST /api/subscriptions/ID/ticket", challenge)
        if self.clock.seconds() >= expires:
            raise HTTPError(401, "TicketExpired", f"the stream ticket expired at {expires} (Unix time); ask for a "
                            f"new one with POST /api/subscriptions/{ticket_sid}/ticket", challenge)
        if ticket_sid != sid:
            raise HTTPError(403, "Forbidden", f"this ticket opens the stream of subscription {ticket_sid} only")
        return person

    def _body(self, request: server.Request) -> Dict[str, Any]:

        if getattr(request, "too_large", False):
            raise HTTPError(413, "PayloadTooLarge", "the request body is too large")
        body = self.web._arguments(request)
        return body

    # people ----------------------------------------------------------------------------

    @inlineCallbacks
    def create_person(self, request: server.Request) -> Any:

        self._operator(request)
        body = self._body(request)
        unknown = set(body) - {"name"}
        if unknown:
            raise HTTPError(400, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
        try:
            name = check_person(body.get("name"))
        except InvalidSubscription as e:
            raise HTTPError(400, "BadRequest", str(e)) from None
        existing = yield self.bus.call("attribute_store", "query", regex=f"^{PERSON_KEY}{name}$")
        if existing:
            raise HTTPError(409, "Conflict", f"a person named {name!r} exists already")
        token = f"{name}.{secrets.token_urlsafe(32)}"
        yield self.bus.call("attribute_store", "set", key=PERSON_KEY + name,
                            value={"name": name, "token_sha256": hash_token(token), "created": time.time()})
        self.log.info("made person {person}", person=name, component="web")
        return json_answer({"name": name, "token": token}, 201)

    @inlineCallbacks
    def list_people(self, request: server.Request) -> Any:

        self._operator(request)
        found = yield self.bus.call("attribute_store", "query", regex="^" + PERSON_KEY)
        people = sorted(({"name": v.get("name"), "created": v.get("created")} for v in (found or {}).values()
                         if isinstance(v, dict)), key=lambda p: str(p["name"]))
        return json_answer({"people": people})

    @inlineCallbacks
    def delete_person(self, request: server.Request, name: str) -> Any:

        self._operator(request)
        if not PERSON_NAME.match(name):
            raise HTTPError(404, "NotFound", f"no person {name[:40]!r}")
        found = yield self.bus.call("attribute_store", "query", regex=f"^{PERSON_KEY}{name}$")
        if not found:
            raise HTTPError(404, "NotFound", f"no person {name!r}")
        records = yield self._records(name)
        for record in records:
            yield self._unsubscribe(record)
        yield self.bus.call("attribute_store", "delete", key=PERSON_KEY + name)
        return json_answer({"deleted": name, "subscriptions": len(records)})

    # subscriptions ------------------------------------------------------------------------

    def _records(self, person: str) -> Deferred:
        d = self.bus.call("attribute_store", "query", regex=f"^{SUBSCRIPTION_KEY}{person}:")
        return d.addCallback(lambda found: sorted((v for v in (found or {}).values() if isinstance(v, dict)),
                                                  key=lambda r: r.get("created", 0)))

    @inlineCallbacks
    def _record(self, person: str, sid: str) -> Any:

        if not SUBSCRIPTION_ID.match(sid):
            raise HTTPError(404, "NotFound", f"no subscription {sid[:40]!r}")
        try:
            record = yield self.bus.call("attribute_store", "get", key=f"{SUBSCRIPTION_KEY}{person}:{sid}")
        except RemoteError as e:
            if e.remote_type == "KeyError":
                raise HTTPError(404, "NotFound", f"no subscription {sid}") from None
            raise
        return record

    @inlineCallbacks
    def create_subscription(self, request: server.Request) -> Any:

        person = yield self._person(request)
        body = self._body(request)
        unknown = set(body) - {"kind", "regex", "webhook", "max_length"}
        if unknown:
            raise HTTPError(400, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
        kind = body.get("kind")
        if kind not in KINDS:
            raise HTTPError(400, "BadRequest", f"kind must be one of {', '.join(sorted(KINDS))}, not "
                                               f"{str(kind)[:40]!r}")
        regex = body.get("regex")
        try:
            validate(regex)
        except InvalidRegex as e:
            raise HTTPError(400, "InvalidRegex", str(e)) from None
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise HTTPError(400, "InvalidURL", "webhook must be an http(s) URL (a string)")
        kwargs: Dict[str, Any] = {"person": person, "regex": regex, "webhook": webhook}
        if "max_length" in body:
            kwargs["max_length"] = body["max_length"]
        try:
            record = yield self.bus.call_with(KINDS[kind], "subscribe", kwargs)
        except RemoteError as e:
            raise _http_error(e) from None
        except Unroutable:
            raise HTTPError(503, "Unavailable", f"no {KINDS[kind]} is running to take the subscription") from None
        return json_answer(_public(record), 201)

    @inlineCallbacks
    def list_subscriptions(self, request: server.Request) -> Any:

        person = yield self._person(request)
        records = yield self._records(person)
        return json_answer({"subscriptions": [_public(r) for r in records]})

    @inlineCallbacks
    def get_subscription(self, request: server.Request, sid: str) -> Any:

        person = yield self._person(request)
        record = yield self._record(person, sid)
        return json_answer(_public(record))

    @inlineCallbacks
    def delete_subscription(self, request: server.Request, sid: str) -> Any:

        person = yield self._person(request)
        record = yield self._record(person, sid)
        yield self._unsubscribe(record)
        return json_answer({"deleted": sid})

    @inlineCallbacks
    def _unsubscribe(self, record: Dict[str, Any]) -> Any:

        component = KINDS.get(record.get("kind", ""))
        try:
            yield self.bus.call(component, "unsubscribe", person=record["person"], id=record["id"])
        except RemoteError as e:
            raise _http_error(e) from None
        except Unroutable:
            raise HTTPError(503, "Unavailable", f"no {component} is running to remove the subscription") from None

    # event streams --------------------------------------------------------------------------

    @inlineCallbacks
    def create_ticket(self, request: server.Request, sid: str) -> Any:
        """A short-lived ticket opening this subscription's stream (for an
        EventSource, which cannot send the person's token)."""

        person, token_sha256 = yield self._person_and_hash(request)
        record = yield self._record(person, sid)
        if record.get("webhook"):
            raise HTTPError(409, "Conflict", "this subscription is delivered to its webhook, not as a stream")
        expires = int(self.clock.seconds()) + self.ticket_lifetime
        ticket = make_ticket(self._ticket_key(), person, sid, token_sha256, expires)
        return json_answer({"ticket": ticket, "expires": expires, "expires_in": self.ticket_lifetime,
                            "url": f"/api/subscriptions/{sid}/events?ticket={ticket}"})

    @inlineCallbacks
    def subscription_events(self, request: server.Request, sid: str) -> Any:

        tickets = (request.args or {}).get(b"ticket")
        if tickets is not None:
            person = yield self._ticket_person(request, tickets, sid)
        else:
            person = yield self._person(request)
        record = yield self._record(person, sid)
        if record.get("webhook"):
            raise HTTPError(409, "Conflict", "this subscription is delivered to its webhook, not as a stream")
        # A reconnecting EventSource sends Last-Event-ID; a page opening a new one (its ticket expired) can
        # only say it in the query.
        last = request.getHeader(b"last-event-id")
        if not last:
            values = (request.args or {}).get(b"last_event_id")
            last = values[-1] if values else None
        last_id = last.decode("ascii", "replace").strip() if last else None
        if request.finished or _gone(request):
            return _STREAMING
        state: Dict[str, Any] = {"subscription": None}

        def closed() -> None:
            self.streams.discard(sse)
            subscription = state["subscription"]
            state["subscription"] = None
            if subscription is not None:
                subscription.cancel()
            for _, delivery in held:
                delivery.nack(requeue=True)
            held.clear()

        sse = _SSE(request, self.web.clock, self.keepalive, closed)
        self.streams.add(sse)
        held: Deque[Tuple[Message, Any]] = deque()

        def write(message: Message, delivery: Any) -> None:
            mid = message.headers.get(ID_HEADER)
            mid = mid if isinstance(mid, str) else None
            if last_id is not None and mid is not None and mid <= last_id:
                delivery.ack()  # delivered before, by the client's own word
                return
            try:
                data = message.json()
            except Exception:
                self.log.warn("dropping a message that is not JSON from {queue}", queue=record["queue"])
                delivery.ack()
                return
            sse.send(data, mid)
            delivery.ack()

        def drain() -> None:
            while held and not sse.paused and not sse.closed:
                write(*held.popleft())
            if held and sse.paused and not sse.closed:
                sse.when_resumed(drain)

        def on_message(message: Message, delivery: Any) -> None:
            if sse.closed:
                delivery.nack(requeue=True)
                return
            held.append((message, delivery))
            drain()

        try:
            subscription = yield self.bus.consume_deliveries(record["queue"], on_message, prefetch=self.prefetch)
        except Exception as e:
            self.log.warn("cannot read {queue}: {error}", queue=record["queue"], error=e)
            sse.finish()
            return _STREAMING
        if sse.closed:
            subscription.cancel()
        else:
            state["subscription"] = subscription
        return _STREAMING

    @inlineCallbacks
    def tail_events(self, request: server.Request) -> Any:
        """The operator's live tail: every event matching C{?regex=} from now on
        (after the C{?recent=N} most recent ones from notification's ring)."""

        self._operator(request)
        regex = _query(request, b"regex") or ""
        try:
            validate(regex)
        except InvalidRegex as e:
            raise HTTPError(400, "InvalidRegex", str(e)) from None
        recent = _int_query(request, b"recent", 0, 0, 1000)
        state: Dict[str, Any] = {"subscription": None}

        def closed() -> None:
            self.streams.discard(sse)
            subscription = state["subscription"]
            state["subscription"] = None
            if subscription is not None:
                subscription.cancel()

        sse = _SSE(request, self.web.clock, self.keepalive, closed)
        self.streams.add(sse)
        live: List[Any] = []
        replaying = [True]

        def handler(event: Any) -> None:
            if sse.closed:
                return
            if replaying[0]:
                live.append(event)
            else:
                sse.send(event)

        try:
            state["subscription"] = yield events.subscribe(self.bus, regex or ".", handler)
        except Exception as e:
            self.log.warn("cannot tail events: {error}", error=e)
            sse.finish()
            return _STREAMING
        if sse.closed:
            closed()
            return _STREAMING
        if recent:
            try:
                past = yield self.bus.call("notification.api", "recent", regex=regex or None, limit=recent,
                                           timeout=5)
            except Exception as e:
                self.log.info("no recent events for the tail: {error}", error=e)
                past = []
            seen = {json.dumps(e, sort_keys=True) for e in live}
            for event in past or []:
                if json.dumps(event, sort_keys=True) not in seen and not sse.closed:
                    sse.send(event)
        replaying[0] = False
        for event in live:
            if not sse.closed:
                sse.send(event)
        return _STREAMING

    def close_streams(self) -> None:
        for sse in list(self.streams):
            sse.finish()


#: What a streaming handler returns: the answer is already under way.
_STREAMING = object()


def _gone(request: server.Request) -> bool:
    return getattr(request, "_disconnected", False) or getattr(request.channel, "transport", None) is None


def _public(record: Any) -> Any:
    if not isinstance(record, dict):
        return record
    out = {k: record.get(k) for k in ("id", "kind", "regex", "webhook", "max_length", "created", "queue")}
    out["events"] = None if record.get("webhook") else f"/api/subscriptions/{record.get('id')}/events"
    return out


def _http_error(e: RemoteError) -> Exception:

    status = {"InvalidRegex": 400, "InvalidURL": 400, "InvalidSubscription": 400, "BadArguments": 400,
              "Forbidden": 403, "UnknownSubscription": 404}.get(e.remote_type, 502)
    return HTTPError(status, e.remote_type, e.message)


def _query(request: server.Request, name: bytes) -> Optional[str]:

    values = (request.args or {}).get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "BadRequest", f"{name.decode()} is not UTF-8") from None


def _int_query(request: server.Request, name: bytes, default: int, low: int, high: int) -> int:

    text = _query(request, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise HTTPError(400, "BadRequest", f"{name.decode()} must be a whole number from {low} to {high}")
    return value
