"""The person-facing HTTP API (mounted by the web edge, L{ooidx.web.app}).

A person is a name and a token. The operator makes one (C{POST /api/people});
the person then subscribes to dataset topics (C{kind: "datasets"}, served by
user_pub_sub) or event topics (C{kind: "events"}, served by
user_notification), and receives what matches as a Server-Sent Events stream
(L{ooidx.people.sse}, opened with the token or a stream ticket,
L{ooidx.people.tickets}) or as webhook POSTs (L{ooidx.people.webhooks}).
See docs/dissemination.md, "People".

The HTTP toolkit comes in as functions: the operator token check and the
JSON body reader are passed to L{SubscriptionsApi}, which knows nothing of
the web component that mounts it.
"""
from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web import server

from magnet import Message, RemoteError, Unroutable

from ooidx import events
from ooidx.errors import InvalidRegex
from ooidx.http.answers import HTTPError, json_answer
from ooidx.people.records import (ID_HEADER, KINDS, MAX_STREAMS_PER_PERSON, PERSON_KEY, PERSON_NAME,
                                  SUBSCRIPTION_ID, SUBSCRIPTION_KEY,
                                  InvalidSubscription, check_person, hash_token)
from ooidx.people.records import public_record as _public
from ooidx.people.webhook_api import WebhookEndpoints, http_error as _http_error, secret_field as _secret_field
from ooidx.people.sse import SSE, gone
from ooidx.people.tickets import TICKET_LIFETIME, TicketError, make_ticket, parse_ticket, ticket_key, ticket_mac
from ooidx.routing import validate

__all__ = ["SubscriptionsApi", "STREAMING"]

class SubscriptionsApi(WebhookEndpoints):
    """The person-facing part of the web API (and the operator's event tail).

        POST   /api/people                    operator: {"name"} -> 201 {"name", "token"}
        GET    /api/people                    operator: {"people": [{"name", "created"}]}
        DELETE /api/people/NAME               operator: the person and all their subscriptions
        POST   /api/subscriptions             person: {"kind", "regex", "webhook"?, "max_length"?} -> 201 record
        GET    /api/subscriptions             person: {"subscriptions": [record, ...]}
        GET    /api/subscriptions/ID          person: the record
        DELETE /api/subscriptions/ID          person: {"deleted": ID}
        POST   /api/subscriptions/ID/secret   person: {"secret"?} -> {"id", "secret", "previous_valid_until"}: a
                                              webhook's new signing secret (shown this once)
        POST   /api/subscriptions/ID/verify   person: challenge the webhook again; active once it echoes
        GET    /api/subscriptions/ID/deliveries
                                              person: {"deliveries": [{time, status, attempt, latency, ok}],
                                              "consecutive_failures", "state"} (the newest, bounded)
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

    def __init__(self, bus: Any, reactor: Any, *, check_operator: Callable[[server.Request], None],
                 arguments: Callable[[server.Request], Dict[str, Any]], operator_token: Callable[[], Optional[str]],
                 keepalive: float = 15.0, prefetch: int = 20, clock: Any = None,
                 ticket_lifetime: int = TICKET_LIFETIME, max_streams_per_person: int = MAX_STREAMS_PER_PERSON) -> None:
        """C{check_operator(request)} raises an L{HTTPError} (401) unless the
        request carries the operator token; C{arguments(request)} reads its JSON
        body; C{operator_token()} is the token stream tickets are keyed by.
        C{reactor} runs the streams' keep-alive timers."""
        self.bus = bus
        self.reactor = reactor
        self._check_operator = check_operator
        self._arguments = arguments
        self._operator_token = operator_token
        self.keepalive = keepalive
        self.prefetch = prefetch
        #: What tickets are issued and checked by (C{seconds()}: Unix time); the reactor by default.
        self.clock = clock if clock is not None else reactor
        self.ticket_lifetime = ticket_lifetime
        #: How long a call that challenges a webhook may take (the challenge's own timeout, and some).
        self.verify_call_timeout = 45.0  # the longest challenge (webhook_verify_timeout, at most 30 s), and some
        self.streams: set = set()
        #: person -> their open event streams (at most max_streams_per_person each).
        self.max_streams_per_person = max_streams_per_person
        self.streams_of: Dict[str, set] = {}
        #: The MACs of tickets used (single use), until they expire, in order of expiry.
        self._used: Dict[str, int] = {}
        self._used_order: Deque[Tuple[int, str]] = deque()

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
            if len(rest) == 2 and rest[1] == "secret":
                return self._methods(request, {b"POST": lambda r: self.rotate_secret(r, rest[0])})
            if len(rest) == 2 and rest[1] == "verify":
                return self._methods(request, {b"POST": lambda r: self.verify_webhook(r, rest[0])})
            if len(rest) == 2 and rest[1] == "deliveries":
                return self._methods(request, {b"GET": lambda r: self.deliveries(r, rest[0])})
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
        self._check_operator(request)

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

        token = self._operator_token()
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
        self._use_ticket(mac, expires, ticket_sid, challenge)
        return person

    def _use_ticket(self, mac: str, expires: int, sid: str, challenge: Dict[bytes, bytes]) -> None:
        """A ticket opens one stream, once: one seen before (until it expires) is
        refused, so a ticket that leaked (a log, a Referer, a shoulder) after its
        stream opened opens nothing. Remembered by this web edge (its MAC, until
        it expires)."""
        now = self.clock.seconds()
        while self._used_order and self._used_order[0][0] <= now:
            _, old = self._used_order.popleft()
            self._used.pop(old, None)
        if mac in self._used:
            raise HTTPError(401, "TicketUsed", "this stream ticket has opened its stream already (a ticket opens "
                            f"one stream, once); ask for a new one with POST /api/subscriptions/{sid}/ticket",
                            challenge)
        self._used[mac] = expires
        self._used_order.append((expires, mac))

    def _body(self, request: server.Request) -> Dict[str, Any]:

        if getattr(request, "too_large", False):
            raise HTTPError(413, "PayloadTooLarge", "the request body is too large")
        body = self._arguments(request)
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
        unknown = set(body) - {"kind", "regex", "webhook", "max_length", "secret"}
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
        if "secret" in body:
            if webhook is None:
                raise HTTPError(400, "BadRequest", "a secret signs webhook POSTs: give it with a webhook")
            kwargs["secret"] = _secret_field(body["secret"])
        try:
            # With a webhook the component first challenges the callback (bounded by its own timeout).
            record = yield self.bus.call_with(KINDS[kind], "subscribe", kwargs, timeout=self.verify_call_timeout)
        except RemoteError as e:
            raise _http_error(e) from None
        except Unroutable:
            raise HTTPError(503, "Unavailable", f"no {KINDS[kind]} is running to take the subscription") from None
        out = _public(record)
        if isinstance(record, dict) and record.get("secret"):
            out["secret"] = record["secret"]  # shown this once; POST .../secret makes a new one
        return json_answer(out, 201)

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
        if request.finished or gone(request):
            return STREAMING
        mine = self.streams_of.setdefault(person, set())
        if len(mine) >= self.max_streams_per_person:
            raise HTTPError(429, "TooManyStreams", f"{person} has {len(mine)} event streams open here, the most a "
                            "person may; close one first", {b"Retry-After": b"5"})
        state: Dict[str, Any] = {"subscription": None}

        def closed() -> None:
            self.streams.discard(sse)
            mine.discard(sse)
            if not mine and self.streams_of.get(person) is mine:
                del self.streams_of[person]
            subscription = state["subscription"]
            state["subscription"] = None
            if subscription is not None:
                subscription.cancel()
            for _, delivery in held:
                delivery.nack(requeue=True)
            held.clear()

        sse = SSE(request, self.reactor, self.keepalive, closed)
        if not sse.closed:
            self.streams.add(sse)
            mine.add(sse)
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
            return STREAMING
        if sse.closed:
            subscription.cancel()
        else:
            state["subscription"] = subscription
        return STREAMING

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

        sse = SSE(request, self.reactor, self.keepalive, closed)
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
            return STREAMING
        if sse.closed:
            closed()
            return STREAMING
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
        return STREAMING

    def close_streams(self) -> None:
        for sse in list(self.streams):
            sse.finish()


#: What a streaming handler returns: the answer is already under way.
STREAMING = object()


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
