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

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from magnet import Message, RemoteError, Unroutable, operation

from ooidx import urlpolicy
from ooidx.component import Component
from ooidx.errors import InvalidRegex, InvalidURL
from ooidx.events import EVENT, TOPIC_HEADER
from ooidx.people.records import (CHANGED_FANOUT, ID_HEADER, MAX_LENGTH, MAX_LENGTH_LIMIT,
                                  MAX_QUEUED_PER_PERSON, MAX_REGEX_PROGRAM_PER_PERSON, MAX_SUBSCRIPTIONS, MAX_URL,
                                  SUBSCRIPTION_KEY, InvalidSubscription, OverBudget, UnknownSubscription, check_id,
                                  check_person, message_id, queue_name, regex_program_size, security_of)
from ooidx.people.webhooks import WebhookDelivery, http_poster
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

    def __init__(self, name: str, bus: Any, *, node: str, instances: int = 1, config: Any = None,
                 clock: Any = None, max_length: int = MAX_LENGTH, webhook_attempts: int = 8,
                 webhook_base_delay: float = 1.0, webhook_max_delay: float = 300.0, webhook_timeout: float = 10.0,
                 poster: Optional[Callable[..., Deferred]] = None, resolver: Any = None,
                 max_queued_per_person: int = MAX_QUEUED_PER_PERSON,
                 max_regex_program_per_person: int = MAX_REGEX_PROGRAM_PER_PERSON) -> None:
        super().__init__(name, bus, node=node, instances=instances, config=config, clock=clock)
        self.max_length = max_length
        self.max_queued_per_person = max_queued_per_person
        self.max_regex_program_per_person = max_regex_program_per_person
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
        if record.get("webhook"):
            delivery = WebhookDelivery(self.bus, record, self.poster, self.clock, attempts=self.webhook_attempts,
                                       base_delay=self.webhook_base_delay, max_delay=self.webhook_max_delay,
                                       component=self.name, report=self.report_failure)
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
        sent = 0
        for other in (found or {}).values():
            if not isinstance(other, dict) or other.get("kind") != "events" or other.get("webhook") \
                    or other.get("person") != person or not isinstance(other.get("queue"), str):
                continue
            try:
                if not compile_filter(other.get("regex"))(topic):
                    continue
            except InvalidRegex:
                continue
            out = Message(body=event.body, content_type=event.content_type, type=EVENT,
                          headers={TOPIC_HEADER: topic, ID_HEADER: message_id(self.clock.seconds())})
            try:
                yield self.bus.send(other["queue"], out)
                sent += 1
            except Unroutable:
                pass  # the subscription went meanwhile
        return sent

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
        program = self.check_budget(person, regex, max_length, [r for r in (mine or {}).values() if isinstance(r, dict)])
        sid = secrets.token_hex(6)
        record = {"id": sid, "person": person, "kind": self.kind, "regex": regex, "webhook": webhook,
                  "queue": queue_name(person, sid), "max_length": max_length, "created": time.time(),
                  "regex_program": program}
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
