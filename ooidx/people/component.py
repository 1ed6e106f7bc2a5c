"""The shared component base of user_pub_sub and user_notification.

Each subscription is a durable queue C{user.PERSON.ID} bounded with
C{x-max-length} (overflow drops the oldest), so what arrives while the
person is away is kept, up to the bound. A subscription with a webhook is
delivered by the component of its kind (L{ooidx.people.webhooks}); one
without a webhook is read by the person's SSE stream (L{ooidx.people.api}).
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from magnet import Message, RemoteError, operation

from ooidx import urlpolicy
from ooidx.component import Component
from ooidx.config import SecurityConfig, WebhookOptions
from ooidx.errors import InvalidRegex, InvalidURL
from ooidx.events import EVENT, TOPIC_HEADER
from ooidx.people.records import (CHANGED_FANOUT, ID_HEADER, MAX_LENGTH, MAX_LENGTH_LIMIT,
                                  MAX_QUEUED_PER_PERSON, MAX_REGEX_PROGRAM_PER_PERSON, MAX_SUBSCRIPTIONS, MAX_URL,
                                  SUBSCRIPTION_KEY, WEBHOOK_DISABLE_AFTER, WEBHOOK_LOG_KEY, WEBHOOK_LOG_SIZE,
                                  WEBHOOK_DISABLED_TTL, WEBHOOK_SECRET_GRACE, WEBHOOK_VERIFY_TIMEOUT, InvalidSubscription, OverBudget,
                                  UnknownSubscription, check_id, check_person, message_id, queue_name,
                                  regex_program_size)
from ooidx.people.webhooks import (WebhookDelivery, check_secret, disabled_event, expired_event, http_exchange,
                                   http_poster, new_secret, verify_callback)
from ooidx.routing import compile_filter, validate

__all__ = ["PersonalSubscriptions"]

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

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, max_length: int = MAX_LENGTH, webhook_attempts: Optional[int] = None,
                 webhook_base_delay: float = 1.0, webhook_max_delay: float = 300.0, webhook_timeout: float = 10.0,
                 poster: Optional[Callable[..., Deferred]] = None, resolver: Any = None,
                 max_queued_per_person: int = MAX_QUEUED_PER_PERSON,
                 max_regex_program_per_person: int = MAX_REGEX_PROGRAM_PER_PERSON,
                 exchange: Optional[Callable[..., Deferred]] = None,
                 webhook_verify_timeout: Optional[float] = None, webhook_disable_after: Optional[int] = None,
                 webhook_log_size: Optional[int] = None,
                 webhook_secret_grace: float = WEBHOOK_SECRET_GRACE,
                 webhook_disabled_ttl: Optional[float] = None, options: Optional[WebhookOptions] = None,
                 security: Optional[SecurityConfig] = None) -> None:
        """C{options}: the config's C{components.user_pub_sub} /
        C{user_notification} (L{ooidx.config.WebhookOptions}); a webhook
        setting given here wins over it, and the defaults of
        L{ooidx.people.records} stand for what neither says. C{security}: the
        config's C{security} section (which hosts a person's webhooks may name)."""
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)

        def setting(given: Any, key: str, default: Any) -> Any:
            if given is not None:
                return given
            value = getattr(options, key, None)
            return default if value is None else value

        self._exchange = exchange
        self.webhook_verify_timeout = float(setting(webhook_verify_timeout, "webhook_verify_timeout",
                                                    WEBHOOK_VERIFY_TIMEOUT))
        self.webhook_disable_after = int(setting(webhook_disable_after, "webhook_disable_after",
                                                 WEBHOOK_DISABLE_AFTER))
        self.webhook_log_size = int(setting(webhook_log_size, "webhook_log_size", WEBHOOK_LOG_SIZE))
        self.webhook_secret_grace = webhook_secret_grace
        self.webhook_disabled_ttl = float(setting(webhook_disabled_ttl, "webhook_disabled_ttl",
                                                  WEBHOOK_DISABLED_TTL))
        self._expiry: Optional[LoopingCall] = None
        #: Log writes per subscription, one after the other (a read-modify-write of the store).
        self._log_writes: Dict[str, DeferredLock] = {}
        self.max_length = max_length
        self.max_queued_per_person = max_queued_per_person
        self.max_regex_program_per_person = max_regex_program_per_person
        self.webhook_attempts = int(setting(webhook_attempts, "webhook_attempts", 8))
        self.webhook_base_delay = webhook_base_delay
        self.webhook_max_delay = webhook_max_delay
        self.webhook_timeout = webhook_timeout
        security = security if security is not None else SecurityConfig()
        self.allow_private, self.allow_hosts = bool(security.allow_private), tuple(security.allow_hosts)
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
        if self.webhook_disabled_ttl > 0:
            self._expiry = LoopingCall(self.expire_disabled)
            self._expiry.clock = self.clock
            d = self._expiry.start(min(3600.0, self.webhook_disabled_ttl / 4), now=False)
            d.addErrback(lambda f: self.log.failure("{component}: expiring disabled webhooks", f,
                                                    component=self.name))

    @inlineCallbacks
    def tearDown(self) -> Any:
        expiry, self._expiry = self._expiry, None
        if expiry is not None and expiry.running:
            expiry.stop()
        for queue in list(self.records):
            yield self._deactivate(queue)

    @inlineCallbacks
    def expire_disabled(self) -> Any:
        """Remove the webhook subscriptions (queue, record, log) disabled for C{webhook_disabled_ttl}
        seconds and not verified again since, telling their person first: a callback nobody fixes
        must not hold a queue for ever. Never fails (it runs on a timer); how many were removed."""
        now = self.clock.seconds()
        removed = 0
        for record in list(self.records.values()):
            since = record.get("disabled")
            if record.get("state") != "disabled" or not isinstance(since, (int, float)) or \
                    now - since < self.webhook_disabled_ttl:
                continue
            try:
                yield self.report_failure(record, expired_event(self.bus, record, disabled_for=now - since,
                                                                now=time.time()))
            except Exception as e:  # noqa: BLE001 - it goes all the same
                self.log.warn("{component}: the expiry of {queue} not reported: {error}", component=self.name,
                              queue=record["queue"], error=e)
            try:
                yield self.unsubscribe(record["person"], record["id"])
                removed += 1
                self.log.info("{component}: webhook subscription {queue} removed: disabled since {since} and "
                              "not verified again", component=self.name, queue=record["queue"], since=since)
            except UnknownSubscription:
                pass  # another instance removed it
            except Exception as e:  # noqa: BLE001 - tried again at the next round
                self.log.warn("{component}: cannot remove the expired webhook subscription {queue}: {error}",
                              component=self.name, queue=record["queue"], error=e)
        return removed

    @property
    def poster(self) -> Callable[..., Deferred]:
        if self._poster is None:
            self._poster = http_poster(self.clock, allow_private=self.allow_private, allow_hosts=self.allow_hosts,
                                       timeout=self.webhook_timeout, resolver=self._resolver)
        return self._poster

    @property
    def exchange(self) -> Callable[..., Deferred]:
        if self._exchange is None:
            self._exchange = http_exchange(self.clock, allow_private=self.allow_private,
                                           allow_hosts=self.allow_hosts, timeout=self.webhook_verify_timeout,
                                           resolver=self._resolver)
        return self._exchange

    def verify_webhook(self, url: str, secret: str) -> Deferred:
        """Send C{url} its challenge (L{ooidx.people.webhooks.verify_callback}): None once echoed, else
        L{ooidx.people.webhooks.WebhookNotVerified}."""
        return verify_callback(self.exchange, url, secret, now=self.clock.seconds(),
                               lifetime=self.webhook_verify_timeout, allow_private=self.allow_private,
                               allow_hosts=self.allow_hosts)

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
        # A local name: a reload that ends at once (the store unroutable) runs done() and clears
        # self._reloading before the next line.
        reloading = self._reloading = self._reload()

        def done(result: Any) -> Any:
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                return self.reload()
            return result

        reloading.addBoth(done)
        d: Deferred = Deferred()
        reloading.addBoth(lambda r: (d.callback(None), r)[1] if not d.called else r)
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
        if record.get("webhook") and record.get("state", "active") == "active":
            delivery = WebhookDelivery(self.bus, record, self.poster, self.clock, attempts=self.webhook_attempts,
                                       base_delay=self.webhook_base_delay, max_delay=self.webhook_max_delay,
                                       component=self.name, report=self.report_failure,
                                       logged=self.log_delivery)
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

    @inlineCallbacks
    def report_failure(self, record: Dict[str, Any], event: Message) -> Any:
        """Put the failure C{event} of C{record}'s webhook into the streams of
        that person only (their event subscriptions without a webhook whose
        regex matches it): a failure names their subscription and webhook host,
        which are nobody else's business, so it never goes to the notification
        fanout, other people or the event ring."""
        person = record["person"]
        topic = event.headers.get(TOPIC_HEADER)
        found = yield self.bus.call("attribute_store", "query", regex=f"^{SUBSCRIPTION_KEY}{check_person(person)}:")
        targets = []
        for other in (found or {}).values():
            if not isinstance(other, dict) or other.get("kind") != "events" or other.get("webhook") \
                    or other.get("person") != person or not isinstance(other.get("queue"), str):
                continue
            try:
                if not compile_filter(other.get("regex"))(topic):
                    continue
            except InvalidRegex:
                continue
            targets.append(other["queue"])
        if not targets:
            return 0
        out = Message(body=event.body, content_type=event.content_type, type=EVENT,
                      headers={TOPIC_HEADER: topic, ID_HEADER: message_id(self.clock.seconds())})
        # one multicast; a subscription that went meanwhile is unroutable, not an error
        result = yield self.bus.multicast(sorted(set(targets)), out)
        return len(result.delivered)

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
                  max_length: Optional[int] = None, secret: Optional[str] = None) -> Any:
        """Make a subscription for C{person}: its record
        C{{"id", "person", "kind", "regex", "webhook", "queue", "max_length", "created"}}.
        With a webhook, the record has its C{secret} (C{secret} if given, else a new one) and
        C{state: "active"}: nothing is stored until the callback has answered its challenge
        (L{verify_webhook}); the caller shows the secret once and never again."""
        check_person(person)
        validate(regex)
        if secret is not None and webhook is None:
            raise InvalidSubscription("a secret signs webhook POSTs: give it with a webhook, or not at all")
        if webhook is not None:
            secret = check_secret(secret) if secret is not None else new_secret()
            webhook = yield self.check_webhook(webhook)
        if max_length is None:
            max_length = self.max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= MAX_LENGTH_LIMIT:
            raise InvalidSubscription(f"max_length is a whole number from 1 to {MAX_LENGTH_LIMIT}")
        mine = yield self.bus.call("attribute_store", "query", regex=f"^{SUBSCRIPTION_KEY}{person}:")
        if len(mine or {}) >= MAX_SUBSCRIPTIONS:
            raise InvalidSubscription(f"{person} has {MAX_SUBSCRIPTIONS} subscriptions already (the most allowed)")
        program = self.check_budget(person, regex, max_length, [r for r in (mine or {}).values() if isinstance(r, dict)])
        if webhook is not None:
            yield self.verify_webhook(webhook, secret)  # refused: nothing made, nothing stored
        sid = secrets.token_hex(6)
        record = {"id": sid, "person": person, "kind": self.kind, "regex": regex, "webhook": webhook,
                  "queue": queue_name(person, sid), "max_length": max_length, "created": time.time(),
                  "regex_program": program}
        if webhook is not None:
            record.update(secret=secret, state="active", verified=self.clock.seconds())
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

    def check_budget(self, person: str, regex: str, max_length: int, mine: List[Dict[str, Any]]) -> int:
        """L{OverBudget} if a new subscription (C{regex}, C{max_length}) would
        take C{person} past their budgets, given their subscriptions C{mine} (of
        both kinds): the messages their queues may hold together, and the size of
        their regexes compiled. Its regex's compiled size otherwise."""
        queued = sum(r.get("max_length") or 0 for r in mine if isinstance(r.get("max_length"), int))
        if queued + max_length > self.max_queued_per_person:
            raise OverBudget(f"{person}'s queues may hold {self.max_queued_per_person} messages together; "
                             f"{queued} are taken, and this subscription asks for {max_length}: ask for a smaller "
                             "max_length, or remove a subscription")
        program = regex_program_size(regex)
        taken = 0
        for r in mine:
            size = r.get("regex_program")
            if not isinstance(size, int):
                try:
                    size = regex_program_size(r.get("regex"))
                except (InvalidRegex, TypeError):  # a record the store should not hold: it costs nothing
                    size = 0
            taken += size
        if taken + program > self.max_regex_program_per_person:
            raise OverBudget(f"{person}'s regexes may compile to {self.max_regex_program_per_person} RE2 "
                             f"instructions together; {taken} are taken, and this regex needs {program}: use a "
                             "simpler regex (large counted repetitions of classes such as \\pL{400} are the "
                             "costly part), or remove a subscription")
        return program

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
        if record.get("webhook"):  # after its delivery here stopped, so no attempt writes it again
            try:
                yield self.bus.call("attribute_store", "delete", key=f"{WEBHOOK_LOG_KEY}{person}:{id}")
            except Exception as e:  # noqa: BLE001 - a log left behind is harmless and bounded
                self.log.warn("{component}: the delivery log of {person}:{id} not removed: {error}",
                              component=self.name, person=person, id=id, error=e)
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
        # Never the webhook secrets (shown once, to the person, when made): not even to the operator.
        records = [_public_state(v) for v in (found or {}).values()
                   if isinstance(v, dict) and v.get("kind") == self.kind]
        return sorted(records, key=lambda r: (r.get("person", ""), r.get("created", 0)))

    @inlineCallbacks
    def _webhook_record(self, person: str, id: str) -> Any:
        check_person(person)
        check_id(id)
        try:
            record = yield self.bus.call("attribute_store", "get", key=f"{SUBSCRIPTION_KEY}{person}:{id}")
        except RemoteError as e:
            if e.remote_type == "KeyError":
                raise UnknownSubscription(f"{person} has no subscription {id}") from None
            raise
        if not isinstance(record, dict) or record.get("kind") != self.kind:
            raise UnknownSubscription(f"{person} has no {self.kind} subscription {id}")
        if not record.get("webhook"):
            raise InvalidSubscription(f"subscription {id} has no webhook (it is read as a stream)")
        return record

    @operation
    @inlineCallbacks
    def rotate_secret(self, person: str, id: str, secret: Optional[str] = None) -> Any:
        """Give C{person}'s webhook subscription C{id} a new secret (C{secret}, or a new one):
        C{{"id", "secret", "previous_valid_until"}}. For C{webhook_secret_grace} seconds its POSTs
        carry the old secret's signature too, so the receiver can switch without losing any."""
        secret = check_secret(secret) if secret is not None else new_secret()
        record = yield self._webhook_record(person, id)
        now = self.clock.seconds()
        until = now + self.webhook_secret_grace
        updated = dict(record, secret=secret, rotated=now)
        if isinstance(record.get("secret"), str) and record["secret"] != secret:
            updated["previous_secret"] = {"secret": record["secret"], "until": until}
        yield self.bus.call("attribute_store", "set", key=f"{SUBSCRIPTION_KEY}{person}:{id}", value=updated)
        yield self._changed()
        self.log.info("{component}: {person} rotated the secret of {id}", component=self.name, person=person, id=id)
        return {"id": id, "secret": secret, "previous_valid_until": until if "previous_secret" in updated else None}

    @operation
    @inlineCallbacks
    def verify(self, person: str, id: str) -> Any:
        """Send C{person}'s webhook C{id} a challenge again; once echoed it is active (a disabled one
        delivers again, from what its queue kept). L{WebhookNotVerified} otherwise, and nothing changes."""
        record = yield self._webhook_record(person, id)
        secret = record.get("secret") if isinstance(record.get("secret"), str) else new_secret()
        yield self.verify_webhook(record["webhook"], secret)
        updated = dict(record, state="active", verified=self.clock.seconds(), secret=secret)
        for key in ("disabled", "disabled_reason"):
            updated.pop(key, None)
        yield self.bus.call("attribute_store", "set", key=f"{SUBSCRIPTION_KEY}{person}:{id}", value=updated)
        yield self._update_log(person, id, lambda log: dict(log, consecutive_failures=0))
        yield self._changed()
        out = _public_state(updated)
        if secret != record.get("secret"):
            out["secret"] = secret  # a subscription made before webhooks were signed: its first secret, once
        return out

    def log_delivery(self, record: Dict[str, Any], entry: Dict[str, Any]) -> Deferred:
        """Add C{entry} (one attempt: time, status, attempt, latency, ok) to C{record}'s delivery log,
        keeping the newest C{webhook_log_size}; after C{webhook_disable_after} failures in a row the
        webhook is disabled (L{disable_webhook})."""
        person, sid = record["person"], record["id"]
        failures: List[int] = []

        def change(log: Dict[str, Any]) -> Dict[str, Any]:
            entries = [e for e in (log.get("entries") or []) if isinstance(e, dict)][-(self.webhook_log_size - 1):]
            entries.append(entry)
            consecutive = 0 if entry.get("ok") else int(log.get("consecutive_failures") or 0) + 1
            failures.append(consecutive)
            return {"entries": entries, "consecutive_failures": consecutive}

        d = self._update_log(person, sid, change)

        def check(_: Any) -> Any:
            if failures and failures[0] >= self.webhook_disable_after:
                return self.disable_webhook(record, failures[0], str(entry.get("error") or "failed"))
            return None

        return d.addCallback(check)

    def _update_log(self, person: str, sid: str, change: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Deferred:
        """Read, change and write a delivery log, after this instance's previous write of it."""
        key = f"{WEBHOOK_LOG_KEY}{person}:{sid}"

        @inlineCallbacks
        def write() -> Any:
            try:
                log = yield self.bus.call("attribute_store", "get", key=key)
            except RemoteError as e:
                if e.remote_type != "KeyError":
                    raise
                log = {}
            log = change(log if isinstance(log, dict) else {})
            yield self.bus.call("attribute_store", "set", key=key, value=log)
            return log

        lock = self._log_writes.setdefault(key, DeferredLock())
        d = lock.run(write)

        def settled(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._log_writes.get(key) is lock:
                del self._log_writes[key]
            return result

        return d.addBoth(settled)

    @inlineCallbacks
    def disable_webhook(self, record: Dict[str, Any], failures: int, reason: str) -> Any:
        """Mark C{record}'s webhook disabled (it stops; its queue keeps what arrives, within its bound)
        and tell its person (an C{event.failed.-} with C{disabled: true}). Once only."""
        key = f"{SUBSCRIPTION_KEY}{record['person']}:{record['id']}"
        try:
            current = yield self.bus.call("attribute_store", "get", key=key)
        except RemoteError as e:
            if e.remote_type == "KeyError":
                return False  # removed meanwhile
            raise
        if not isinstance(current, dict) or current.get("state") == "disabled":
            return False
        now = self.clock.seconds()
        updated = dict(current, state="disabled", disabled=now,
                       disabled_reason=f"{failures} failed deliveries in a row; the last: {reason}"[:400])
        yield self.bus.call("attribute_store", "set", key=key, value=updated)
        self.log.warn("{component}: webhook of {queue} disabled after {failures} failures in a row",
                      component=self.name, queue=record["queue"], failures=failures)
        try:
            yield self.report_failure(record, disabled_event(self.bus, record, failures=failures, reason=reason,
                                                             now=time.time()))
        except Exception as e:  # noqa: BLE001 - the record says it anyway
            self.log.warn("{component}: the disabling of {queue} not reported: {error}", component=self.name,
                          queue=record["queue"], error=e)
        yield self._changed()
        return True

    def _changed(self) -> Deferred:
        d = self.bus.send(CHANGED_FANOUT, Message.of_json({"component": self.name}, type="changed",
                                                          persistent=False), mandatory=False)
        d.addErrback(lambda f: self.log.warn("{component}: change not announced: {error}", component=self.name,
                                             error=f.getErrorMessage()))
        # This instance need not wait for the fanout to come round.
        d.addCallback(lambda _: self.reload())
        return d


def _public_state(record: Dict[str, Any]) -> Dict[str, Any]:
    """What L{PersonalSubscriptions.verify} answers: the record without its secrets."""
    return {k: v for k, v in record.items() if k not in ("secret", "previous_secret")}
