"""pub_sub: regex subscriptions to topics, each with a durable address.

Operations on the worker queue C{pub_sub} (docs/dissemination.md):

    sub = yield bus.call("pub_sub", "subscribe", regex=r"^dataset\\.", name="persister")
    # sub == {"name": "persister", "regex": "^dataset\\.", "address": "pubsub.sub.persister"}
    addresses = yield bus.call("pub_sub", "route", topic="dataset.sst")
    yield bus.call("pub_sub", "publish", topic="dataset.sst", message={...})
    yield bus.call("pub_sub", "unsubscribe", name="persister")
    subs = yield bus.call("pub_sub", "list")

A subscription's address is a durable queue C{pubsub.sub.NAME}, declared
with L{magnet.Bus.declare_address}, as C{bus.listen(name=ADDRESS, durable=True)}
declares it (durable, single active consumer, so streams arrive whole), so a subscriber may consume it either way and what arrives while
it is away is kept. Subscriptions live in the attribute store
(C{subscription:NAME}); every pub_sub instance keeps them in memory in an
L{ooidx.routing.Router} (one RE2 Set pass per topic), loads them at start,
applies the change a C{pubsub.changed} fanout message names, and reloads
them all every C{reload_interval} seconds (to catch changes sent while its
link was down).

C{publish} delivers a publication to every matching subscription in one
publish to the direct exchange C{pubsub.topics} (L{TOPICS}), routing key the
topic: pub_sub binds each topic on its first publication (the topic's own
fanout, L{topic_exchange}, bound to every matching address, then to
C{pubsub.topics}), binds a new subscription to the bound topics it matches
before C{subscribe} answers, and unbinds the least recently published topic
beyond C{max_topics}. So outside publishers reach the subscribers in one hop
(L{ooidx.dissemination.publisher}), falling back to C{publish} when the topic
is not bound (the broker returns the publication whole). A topic too long
for a routing key, or one that could not be bound, goes in one multicast
(L{magnet.Bus.multicast}: on RabbitMQ one publish with the other addresses in
its C{BCC} header, confirmed). A subscription whose address is gone (its
queue deleted) gets nothing: it is counted, logged (once a minute per
address) and named in the answer, and never retried. A publication the
broker did not confirm is published again (by multicast: to the addresses
concerned, alone) up to the bus's retry limit, then dead-lettered to
C{pub_sub.dead} with the addresses it did not reach in its C{addresses}
header. docs/dissemination.md says it all.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from magnet import Bus, Message, MulticastError, RemoteError, Unroutable, operation
from magnet.bus import DEAD_SUFFIX, ERROR_HEADER, ORIGIN_HEADER
from magnet.multicast import MAX_ADDRESSES

from ooidx.component import Component
from ooidx.errors import DXError, InvalidName
from ooidx.routing import Router, compile_filter, validate
from ooidx import wire

__all__ = ["PubSub", "InvalidTopic", "MessageTooLarge", "UnknownSubscription", "CHANGED", "PUBLICATION",
           "address_of", "check_name", "KEY_PREFIX", "TOPICS", "topic_exchange", "bindable", "MAX_TOPICS"]

CHANGED = wire.PUBSUB_CHANGED
PUBLICATION = wire.PUBLICATION
TOPIC_HEADER = wire.TOPIC_HEADER
KEY_PREFIX = wire.SUBSCRIPTION_KEY
ADDRESS_PREFIX = wire.SUBSCRIBER_PREFIX
TOPICS = wire.PUBSUB_TOPICS
TOPIC_KEY = wire.TOPIC_BINDING_KEY
#: Topics bound on L{TOPICS} at once (by all instances); beyond, the least
#: recently published (by this instance) is unbound first.
MAX_TOPICS = 10_000
#: A routing key is an AMQP short string: a longer topic is never bound
#: (its publications always go through pub_sub, in one multicast).
MAX_ROUTING_KEY_BYTES = 255
#: Above this many (subscription, topic) pairs to look at, a reload binds
#: changed subscriptions with one Router pass per topic instead.
RECONCILE_PER_SUBSCRIPTION = 200_000
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_TOPIC_BYTES = 1024
MAX_MESSAGE_BYTES = 1 << 20
#: Seconds between two warnings about the same address being gone.
GONE_WARNING_INTERVAL = 60.0


class InvalidTopic(DXError):
    """A topic that is not a non-empty string of at most 1024 UTF-8 bytes without NUL."""


class MessageTooLarge(DXError):
    """A published message larger than 1 MiB as JSON, or not JSON at all."""


class UnknownSubscription(DXError):
    """No subscription by that name."""


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidName(f"a subscription name is 1 to 64 of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not topic:
        raise InvalidTopic(f"a topic must be a non-empty string, got {topic!r}")
    if "\x00" in topic or len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidTopic(f"a topic must be at most {MAX_TOPIC_BYTES} UTF-8 bytes without NUL")
    return topic


def address_of(name: str) -> str:
    return ADDRESS_PREFIX + name


def _digest(topic: str) -> str:
    return hashlib.sha1(topic.encode("utf-8", "surrogatepass")).hexdigest()


def topic_exchange(topic: str) -> str:
    """The fanout exchange of a bound topic: what C{TOPICS} routes C{topic} to."""
    return wire.PUBSUB_TOPIC_PREFIX + _digest(topic)


def bindable(topic: str) -> bool:
    """Whether C{topic} can be a routing key (at most 255 UTF-8 bytes)."""
    return len(topic) <= MAX_ROUTING_KEY_BYTES // 4 or len(
        topic.encode("utf-8", "surrogatepass")) <= MAX_ROUTING_KEY_BYTES


def publication(topic: str, message: Any) -> Message:
    """What a subscriber receives for C{publish(topic, message)}."""
    try:
        body = json.dumps({"topic": topic, "message": message}, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MessageTooLarge(f"the message is not JSON: {e}") from None
    data = body.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"the message is {len(data)} bytes as JSON (at most {MAX_MESSAGE_BYTES})")
    return Message(body=data, content_type="application/json", type=PUBLICATION,
                   headers={TOPIC_HEADER: topic}, message_id=uuid.uuid4().hex, persistent=True)


class PubSub(Component):
    """One pub_sub instance; any number of them share the C{pub_sub} queue."""

    log = Logger()

    #: Requests taken at once per instance. A publish spends its time waiting
    #: for the broker to confirm its multicast (persistent, to durable
    #: addresses: after the broker's disk write), so the bus's default (10)
    #: would leave the broker idle between confirms.
    prefetch = 100

    def __init__(self, name: str, bus: Bus, *, node: str, instances: int = 1, clock: Any = None,
                 reactor: Any = None, store: str = "attribute_store", reload_interval: float = 60.0,
                 store_timeout: float = 10.0, retry_delay: float = 1.0, bindings: bool = True,
                 max_topics: int = MAX_TOPICS) -> None:
        super().__init__(name, bus, node=node, instances=instances, clock=clock, reactor=reactor)
        if not isinstance(max_topics, int) or max_topics < 1:
            raise ValueError(f"max_topics is a positive integer, got {max_topics!r}")
        #: bind topics on L{TOPICS} (one-hop publishing); else every publication is one multicast
        self.bindings = bindings
        self.max_topics = max_topics
        #: the topics bound on L{TOPICS} (by any instance, as far as this one knows),
        #: least recently published by this instance first
        self.topics: "OrderedDict[str, None]" = OrderedDict()
        #: topics being bound by this instance: the Deferred of the binding
        self._ensuring: Dict[str, Deferred] = {}
        #: addresses last found gone: bound again to their topics when they are back
        self._missing: Set[str] = set()
        self.store = store
        self.reload_interval = reload_interval
        self.store_timeout = store_timeout
        self.retry_delay = retry_delay
        self.router = Router()
        self.records: Dict[str, dict] = {}
        self._loaded: Optional[Deferred] = None
        self._waiting: List[Deferred] = []
        self._is_loaded = False
        self._loading = False
        self._touched: Set[str] = set()
        self._reloader: Optional[LoopingCall] = None
        self._retry_call: Any = None
        self._changed_subscription: Any = None
        self._stopping = False
        #: address -> when its being gone was last logged
        self._gone_logged: Dict[str, float] = {}
        #: counters (the C{stats} operation): publications, copies delivered,
        #: copies for addresses that are gone, multicasts retried, publications dead-lettered
        self.stats: Dict[str, int] = {"publications": 0, "delivered": 0, "unroutable": 0, "retried": 0,
                                      "dead": 0, "topics_bound": 0, "topics_unbound": 0, "returned": 0}

    # lifecycle -------------------------------------------------------------------

    @inlineCallbacks
    def setUp(self) -> Any:
        self._stopping = False
        yield self.bus.declare_fanout(CHANGED)
        if self.bindings:
            yield self.bus.declare_direct(TOPICS)
        self._changed_subscription = yield self.bus.subscribe(CHANGED, self._on_changed)
        # The first load does not hold up the start; operations wait for it.
        self._reload()
        if self.reload_interval:
            self._reloader = LoopingCall(self._reload)
            self._reloader.clock = self.clock
            self._reloader.start(self.reload_interval, now=False).addErrback(
                lambda f: self.log.failure("{component}: periodic reload", f, component=self.name))

    def tearDown(self) -> Any:
        self._stopping = True
        if self._reloader is not None and self._reloader.running:
            self._reloader.stop()
        self._reloader = None
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(Failure(DXError("pub_sub is stopping")))
        subscription, self._changed_subscription = self._changed_subscription, None
        return subscription.cancel() if subscription is not None else None

    # loading ---------------------------------------------------------------------

    def loaded(self) -> Deferred:
        """Fires once the subscriptions have been loaded from the store."""
        if self._is_loaded:
            return succeed(None)
        d: Deferred = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    def _reload(self) -> Optional[Deferred]:
        """Load every subscription from the store (retried until it answers, the first time)."""
        if self._loading or self._stopping:
            return None
        self._loading = True
        self._touched = set()
        d = self.bus.call(self.store, "query", regex="^" + re.escape(KEY_PREFIX), timeout=self.store_timeout)
        if self.bindings:
            d.addCallback(lambda found: self.bus.call(
                self.store, "query", regex="^" + re.escape(TOPIC_KEY), timeout=self.store_timeout).addCallback(
                lambda topics: (found, topics)))
        else:
            d.addCallback(lambda found: (found, {}))
        d.addCallbacks(self._apply_all, self._load_failed)
        return d

    def _apply_all(self, both: Any) -> Optional[Deferred]:
        found, topics = both
        self._loading = False
        learned: Set[str] = set()  # bound topics this instance did not know (a missed pubsub.changed)
        for key, value in sorted(topics.items()):
            topic = value.get("topic") if isinstance(value, dict) else None
            if (isinstance(topic, str) and topic and bindable(topic) and key == TOPIC_KEY + _digest(topic)
                    and topic not in self.topics):
                self.topics[topic] = None
                learned.add(topic)
        records: Dict[str, dict] = {}
        for key, record in found.items():
            name = key[len(KEY_PREFIX):]
            if not self._usable(name, record):
                self.log.warn("{component}: ignoring the malformed subscription record {key}",
                              component=self.name, key=key)
                continue
            records[name] = record
        touched, self._touched = self._touched, set()
        # Changes made while the query ran win over what it read: read them again.
        for name in touched:
            records.pop(name, None)
            if name in self.records:
                records[name] = self.records[name]
        before, self.records = self.records, records
        self.router.replace({name: r["regex"] for name, r in records.items()})
        # new or changed while this instance did not hear (at start: all of them, which repairs what a
        # stopped instance left half done): bound to the known topics they match
        changed = [name for name, record in records.items()
                   if name not in before or before[name]["regex"] != record["regex"]]
        if changed and self.bindings and self.topics:
            if len(changed) * len(self.topics) <= RECONCILE_PER_SUBSCRIPTION:
                for name in changed:
                    old = before.get(name)
                    self._logged(self._sync_bindings(records[name]["address"], old and old["regex"],
                                                     records[name]["regex"]), f"binding subscription {name}")
            else:  # one RE2 Set pass per topic rather than every topic through every regex
                self._logged(self._bind_all(set(changed)), f"binding {len(changed)} subscription(s)")
        learned.difference_update(self.topics if len(changed) == len(records) else ())  # all bound just now
        if learned and self.bindings and records:
            self._logged(self._bind_all(set(records), learned), f"binding {len(learned)} topic(s) learned")
        first = not self._is_loaded
        self._is_loaded = True
        if first:
            self.log.info("{component}: {count} subscription(s) loaded", component=self.name, count=len(records))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        for name in touched:
            self._refresh(name)
        return None

    def _load_failed(self, failure: Failure) -> None:
        self._loading = False
        if self._stopping:
            return
        self.log.warn("{component}: could not load subscriptions ({error}); trying again in {delay} s",
                      component=self.name, error=failure.getErrorMessage(), delay=self.retry_delay)
        if not self._is_loaded:
            self._retry_call = self.clock.callLater(self.retry_delay, self._reload)

    @staticmethod
    def _usable(name: str, record: Any) -> bool:
        return (isinstance(record, dict) and NAME.match(name) is not None and record.get("name") == name
                and isinstance(record.get("regex"), str) and record.get("address") == address_of(name))

    def _on_changed(self, message: Message) -> Optional[Deferred]:
        """Another instance (or this one) changed a subscription: read it again from the store.
        Or it bound or unbound a topic on L{TOPICS}: know it (to bind new subscriptions to it) or forget it."""
        try:
            body = message.json()
            if isinstance(body, dict) and isinstance(body.get("topic"), str) and "name" not in body:
                topic = body["topic"]
                if self.bindings and topic and topic not in self._ensuring and bindable(topic):
                    if body.get("bound") is True:
                        self.topics.setdefault(topic, None)
                    elif body.get("bound") is False:
                        self.topics.pop(topic, None)
                return None
            name = check_name(body.get("name")) if isinstance(body, dict) else None
        except Exception:
            name = None
        if name is None:
            self.log.warn("{component}: a {changed} message without a usable name; reloading everything",
                          component=self.name, changed=CHANGED)
            self._reload()
            return None
        return self._refresh(name)

    def _refresh(self, name: str) -> Deferred:
        if self._loading:
            self._touched.add(name)
        d = self.bus.call(self.store, "get", key=KEY_PREFIX + name, timeout=self.store_timeout)

        def got(record: Any) -> None:
            self._logged(self._apply(name, record if self._usable(name, record) else None),
                         f"binding subscription {name}")

        def missing(failure: Failure) -> None:
            if failure.check(RemoteError) and failure.value.remote_type == "KeyError":
                self._apply(name, None)
                return
            self.log.warn("{component}: could not read subscription {name} ({error}); the next reload will",
                          component=self.name, name=name, error=failure.getErrorMessage())

        return d.addCallbacks(got, missing)

    def _apply(self, name: str, record: Optional[dict]) -> Optional[Deferred]:
        """Take the subscription C{name} as C{record} (None: removed). The
        Deferred of binding its address to the known topics it now matches
        (and unbinding it from those it no longer does), if there is any."""
        if self._loading:
            self._touched.add(name)
        old = self.records.get(name)
        if record is None:
            self.records.pop(name, None)
            self.router.remove(name)
            # its address is deleted with it, and with the address its bindings
            return None
        self.router.add(name, record["regex"])
        self.records[name] = record
        # (re)made, maybe on another node: look at its address again before the next multicast
        self.bus.forget_addresses((record["address"],))
        if old is not None and old["regex"] == record["regex"]:
            return None
        return self._sync_bindings(record["address"], old["regex"] if old else None, record["regex"])

    # topic bindings ----------------------------------------------------------------

    def _logged(self, d: Optional[Deferred], what: str) -> None:
        if d is not None:
            d.addErrback(lambda f: self.log.warn("{component}: {what} failed ({error}); publications of "
                                                 "its topics go through pub_sub until it is bound",
                                                 component=self.name, what=what, error=f.getErrorMessage()))

    @inlineCallbacks
    def _sync_bindings(self, address: str, old_regex: Optional[str], regex: Optional[str]) -> Any:
        """Bind C{address} to every known topic C{regex} matches (each topic's
        own fanout), and unbind it from those only C{old_regex} matched."""
        if not self.bindings or not self.topics:
            return None
        matches = compile_filter(regex) if regex is not None else None
        before = compile_filter(old_regex) if old_regex is not None and old_regex != regex else None
        topics = list(self.topics)
        transport = self.bus.transport
        for topic in topics:
            if matches is not None and matches(topic):
                exchange = topic_exchange(topic)
                # declared too: the topic may be half bound by an instance that stopped
                yield transport.declare_exchange(exchange, "fanout", durable=True, remember=False)
                yield transport.bind_queue(address, exchange, "", remember=False)
            elif before is not None and before(topic):
                yield transport.unbind_queue(address, topic_exchange(topic), "")
        return None

    @inlineCallbacks
    def _bind_all(self, names: Set[str], topics: Optional[Set[str]] = None) -> Any:
        """Bind the addresses of the subscriptions C{names} to every known topic
        (of C{topics}, if given) they match."""
        failed = 0
        transport = self.bus.transport
        for topic in [t for t in self.topics if topics is None or t in topics]:
            addresses = sorted({self.records[n]["address"] for n in self.router.match(topic)
                                if n in names and n in self.records})
            if not addresses:
                continue
            exchange = topic_exchange(topic)
            try:
                yield transport.declare_exchange(exchange, "fanout", durable=True, remember=False)
                for address in addresses:
                    yield transport.bind_queue(address, exchange, "", remember=False)
            except Exception as e:  # a queue gone meanwhile: the others are still bound
                failed += 1
                if failed <= 3:
                    self.log.warn("{component}: binding topic {topic!r}: {error}", component=self.name,
                                  topic=topic, error=e)
        return None

    def _ensure(self, topic: str) -> Deferred:
        """Fires once C{topic} is bound on L{TOPICS} (the binding shared by concurrent publishes)."""
        d = self._ensuring.get(topic)
        if d is None:
            d = self._bind_topic(topic)
            if d.called:
                return d
            self._ensuring[topic] = d
            d.addBoth(self._ensured, topic)
        waiter: Deferred = Deferred()
        d.addBoth(_relay, waiter)
        return waiter

    def _ensured(self, result: Any, topic: str) -> Any:
        self._ensuring.pop(topic, None)
        return result

    @inlineCallbacks
    def _bind_topic(self, topic: str) -> Any:
        """Bind C{topic}: its own fanout, bound to the address of every matching
        subscription that exists, and only then the fanout to L{TOPICS} with the
        topic as routing key, so that a publication to the topic reaches all of
        them or (returned) none. Recorded in the store first, so an instance
        started later binds its new subscriptions to it too."""
        while len(self.topics) >= self.max_topics:
            # the least recently published, not one being bound right now
            oldest = next((t for t in self.topics if t not in self._ensuring and t != topic), None)
            if oldest is None:
                break
            yield self._unbind_topic(oldest)
        self.topics[topic] = None
        self.topics.move_to_end(topic)
        try:
            yield self.bus.call(self.store, "set", key=TOPIC_KEY + _digest(topic), value={"topic": topic},
                                timeout=self.store_timeout)
            exchange = topic_exchange(topic)
            transport = self.bus.transport
            yield transport.declare_exchange(exchange, "fanout", durable=True, remember=False)
            addresses = self.addresses_for(topic)
            existing = (yield self.bus.addresses.known(addresses)) if addresses else set()
            for address in addresses:
                if address in existing:
                    yield transport.bind_queue(address, exchange, "", remember=False)
                else:  # bound when it is found back
                    self._missing.add(address)
            yield transport.bind_exchange(exchange, TOPICS, topic, remember=False)
        except BaseException:
            self.topics.pop(topic, None)
            raise
        self.stats["topics_bound"] += 1
        self._announce_topic(topic, True)
        return None

    @inlineCallbacks
    def _unbind_topic(self, topic: str) -> Any:
        """Unbind C{topic} (the least recently published, to make room): first its
        fanout from L{TOPICS} (publications to it are then returned, whole, and
        go through pub_sub), then its fanout goes with every binding to it."""
        self.topics.pop(topic, None)
        self.stats["topics_unbound"] += 1
        exchange = topic_exchange(topic)
        transport = self.bus.transport
        yield transport.unbind_exchange(exchange, TOPICS, topic)
        yield transport.delete_exchange(exchange)
        self._announce_topic(topic, False)
        try:
            yield self.bus.call(self.store, "delete", key=TOPIC_KEY + _digest(topic), timeout=self.store_timeout)
        except Exception as e:  # the next reload reads it back; binding it again then is harmless
            self.log.warn("{component}: could not forget the unbound topic {topic!r}: {error}",
                          component=self.name, topic=topic, error=e)
        self.log.info("{component}: topic {topic!r} unbound (the least recently published of {count})",
                      component=self.name, topic=topic, count=self.max_topics)
        return None

    def _announce_topic(self, topic: str, bound: bool) -> None:
        d = self.bus.send(CHANGED, Message.of_json({"topic": topic, "bound": bound, "node": self.node},
                                                   persistent=False), mandatory=False)
        d.addErrback(lambda f: self.log.warn("{component}: {changed} for topic {topic!r} not sent: {error}",
                                             component=self.name, changed=CHANGED, topic=topic,
                                             error=f.getErrorMessage()))

    def _announce(self, name: str) -> Deferred:
        d = self.bus.send(CHANGED, Message.of_json({"name": name, "node": self.node}, persistent=False),
                          mandatory=False)
        d.addErrback(lambda f: self.log.warn("{component}: {changed} for {name} not sent: {error}",
                                             component=self.name, changed=CHANGED, name=name,
                                             error=f.getErrorMessage()))
        return d

    # operations -------------------------------------------------------------------

    @operation
    @inlineCallbacks
    def subscribe(self, regex: str, name: Optional[str] = None) -> Any:
        """Subscribe C{regex}; the durable address to consume. The same name
        gives the same address (its regex replaced when it differs)."""
        validate(regex)
        if name is None:
            name = "s-" + uuid.uuid4().hex[:16]
        check_name(name)
        yield self.loaded()
        address = address_of(name)
        yield self.bus.declare_address(address)
        key = KEY_PREFIX + name
        try:
            old = yield self.bus.call(self.store, "get", key=key, timeout=self.store_timeout)
        except RemoteError as e:
            if e.remote_type != "KeyError":
                raise
            old = None
        created = old.get("created") if isinstance(old, dict) else None
        record = {"name": name, "regex": regex, "address": address,
                  "created": created if isinstance(created, (int, float)) else time.time()}
        if old != record:
            yield self.bus.call(self.store, "set", key=key, value=record, timeout=self.store_timeout)
        # bound to every known topic it matches before the answer: from then on it gets them all
        # (again when nothing changed: a subscriber subscribing at its start repairs its bindings)
        binding = self._apply(name, record)
        yield binding if binding is not None else self._sync_bindings(address, None, regex)
        yield self._announce(name)
        self.log.info("{component}: subscription {name} -> {address} for {regex!r}", component=self.name,
                      name=name, address=address, regex=regex)
        return {"name": name, "regex": regex, "address": address}

    @operation
    @inlineCallbacks
    def unsubscribe(self, name: str) -> Any:
        """Remove the subscription and delete its address; whether it existed."""
        check_name(name)
        yield self.loaded()
        existed = yield self.bus.call(self.store, "delete", key=KEY_PREFIX + name, timeout=self.store_timeout)
        self._apply(name, None)
        yield self._announce(name)
        try:
            yield self.bus.transport.delete_queue(address_of(name))
        except Exception as e:
            self.log.warn("{component}: could not delete {address}: {error}", component=self.name,
                          address=address_of(name), error=e)
        if existed:
            self.log.info("{component}: subscription {name} removed", component=self.name, name=name)
        return bool(existed)

    @operation
    @inlineCallbacks
    def list(self) -> Any:
        """Every subscription, by name: C{[{"name", "regex", "address"}]} (read from the store)."""
        found = yield self.bus.call(self.store, "query", regex="^" + re.escape(KEY_PREFIX),
                                    timeout=self.store_timeout)
        out = []
        for key, record in sorted(found.items()):
            name = key[len(KEY_PREFIX):]
            if self._usable(name, record):
                out.append({"name": name, "regex": record["regex"], "address": record["address"]})
        return out

    def addresses_for(self, topic: str) -> List[str]:
        """The addresses of every subscription matching C{topic}, each once (no waiting)."""
        return sorted({self.records[name]["address"] for name in self.router.match(topic) if name in self.records})

    @operation
    @inlineCallbacks
    def route(self, topic: str) -> Any:
        """The address of every subscription whose regex matches C{topic}, each once."""
        check_topic(topic)
        yield self.loaded()
        return self.addresses_for(topic)

    @operation
    @inlineCallbacks
    def publish(self, topic: str, message: Any = None) -> Any:
        """Deliver C{message} to every subscription matching C{topic}, once each,
        in one multicast. Fires with C{{"topic", "addresses"}} (the count
        matched) and C{"unroutable"}: the addresses that are gone (no copy)."""
        check_topic(topic)
        out = publication(topic, message)
        yield self.loaded()
        addresses = self.addresses_for(topic)
        unroutable: List[str] = []
        if addresses:
            if self.bindings and bindable(topic):
                unroutable = yield self.deliver_bound(topic, addresses, out)
            else:
                unroutable = yield self.deliver(addresses, out)
        return {"topic": topic, "addresses": len(addresses), "unroutable": unroutable}

    @inlineCallbacks
    def deliver_bound(self, topic: str, addresses: List[str], out: Message) -> Any:
        """Publish C{out} to L{TOPICS} with C{topic} as routing key (binding the
        topic first if it is not), mandatory and confirmed; the addresses that
        are gone (known from the bus's address book, as a multicast knows them).

        Not confirmed (a timeout, the link lost, a nack): published again after
        C{retry_delay} times the attempt, up to the bus's retry limit, then
        dead-lettered (at least once: a lost confirm may mean a second copy).
        Returned (nothing bound to the topic any more: unbound meanwhile, or
        every address deleted): delivered in one multicast instead, which checks
        each address at the broker again. A topic that cannot be bound (the
        store or the broker refused) goes by multicast too."""
        try:
            existing = yield self.bus.addresses.known(addresses)
        except Exception:  # no answer about them: the multicast path checks again, and retries
            result = yield self.deliver(addresses, out)
            return result
        gone = [a for a in addresses if a not in existing]
        live = [a for a in addresses if a in existing]
        back = [a for a in live if a in self._missing]
        if back:  # made again since: the topics they match are bound to them again
            self._missing.difference_update(back)
            for address in back:
                name = address[len(ADDRESS_PREFIX):]
                record = self.records.get(name)
                if record is not None:
                    try:  # before this publication goes out, so that it reaches them too
                        yield self._sync_bindings(address, None, record["regex"])
                    except Exception as e:
                        self.log.warn("{component}: could not bind {address} again ({error}); the next "
                                      "publication tries again", component=self.name, address=address, error=e)
                        self._missing.add(address)
        if gone:
            self._missing.update(gone)
            self._gone(gone, out)
            for address in gone:
                self.bus.observer.unroutable(address)
        if not live:
            self.stats["publications"] += 1
            return sorted(gone)
        if topic in self.topics and topic not in self._ensuring:
            self.topics.move_to_end(topic)
        else:
            try:
                yield self._ensure(topic)
            except Exception as e:
                self.log.warn("{component}: could not bind topic {topic!r} ({error}); multicasting it",
                              component=self.name, topic=topic, error=e)
                more = yield self.deliver(live, out)
                return sorted(gone + list(more))
        self.stats["publications"] += 1
        attempt = 0
        while True:
            attempt += 1
            try:
                yield self.bus.send_to(TOPICS, topic, out, mandatory=True)
            except Unroutable:
                self.stats["returned"] += 1
                self.stats["publications"] -= 1  # the multicast counts it
                self.topics.pop(topic, None)  # bound again by the next publish
                self.bus.forget_addresses(live)
                more = yield self.deliver(live, out)
                return sorted(gone + list(more))
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"[:1000]
                if attempt > self.bus.retry_limit or self._stopping:
                    yield self._dead_letter(out, live, attempt, reason)
                    return sorted(gone)
                self.stats["retried"] += 1
                self.log.warn("{component}: publication {topic!r} not confirmed (attempt {attempt}), "
                              "publishing it again: {reason}", component=self.name, topic=topic,
                              attempt=attempt, reason=reason)
                yield deferLater(self.clock, self.retry_delay * attempt, lambda: None)
                continue
            self.stats["delivered"] += len(live)
            return sorted(gone)

    @operation
    def counters(self) -> Dict[str, int]:
        """This instance's counters: publications, copies delivered and unroutable, retries, dead letters,
        topics bound and unbound by it, publications returned (topic unbound meanwhile); C{topics}:
        the topics it knows to be bound now."""
        return dict(self.stats, topics=len(self.topics))

    @inlineCallbacks
    def deliver(self, addresses: List[str], out: Message) -> Any:
        """Multicast C{out} to C{addresses}; the addresses that are gone.

        Addresses whose publish was not confirmed (a timeout, the link lost,
        a nack) are multicast to again, alone, after C{retry_delay} times the
        attempt, up to the bus's retry limit; then the publication is
        dead-lettered for them. An address that got its copy never gets a second
        from here (one whose confirm was lost may: at least once)."""
        self.stats["publications"] += 1
        unroutable: List[str] = []
        pending = list(addresses)
        attempt = 0
        while pending:
            attempt += 1
            failed: Dict[str, str] = {}
            # more matching subscriptions than one multicast takes: several, at once
            batches = [pending[i:i + MAX_ADDRESSES] for i in range(0, len(pending), MAX_ADDRESSES)]
            outcomes = yield DeferredList([self.bus.multicast(batch, out) for batch in batches], consumeErrors=True)
            for batch, (ok, value) in zip(batches, outcomes):
                result = value if ok else None
                if not ok:
                    if value.check(MulticastError):
                        result = value.value.result
                        failed.update(value.value.failed)
                    else:  # the existence check failed (no link): none of them was sent
                        failed.update({a: f"{value.type.__name__}: {value.getErrorMessage()}" for a in batch})
                if result is not None:
                    self.stats["delivered"] += len(result.delivered)
                    if result.unroutable:
                        self._gone(result.unroutable, out)
                        unroutable.extend(result.unroutable)
            pending = [a for a in pending if a in failed] if failed else []
            if not pending:
                break
            reason = "; ".join(sorted(set(failed.values())))[:1000]
            if attempt > self.bus.retry_limit or self._stopping:
                yield self._dead_letter(out, pending, attempt, reason)
                break
            self.stats["retried"] += 1
            self.log.warn("{component}: {count} address(es) not confirmed (attempt {attempt}), multicasting "
                          "to them again: {reason}", component=self.name, count=len(pending), attempt=attempt,
                          reason=reason)
            yield deferLater(self.clock, self.retry_delay * attempt, lambda: None)
        return sorted(unroutable)

    def _gone(self, addresses: Any, out: Message) -> None:
        self.stats["unroutable"] += len(addresses)
        now = self.clock.seconds()
        for address in addresses:
            last = self._gone_logged.get(address)
            if last is None or now - last >= GONE_WARNING_INTERVAL:
                if len(self._gone_logged) > 10_000:
                    self._gone_logged.clear()
                self._gone_logged[address] = now
                self.log.warn("{component}: address {address} is gone (no such queue); publication {topic} "
                              "not delivered there (said once a minute)", component=self.name, address=address,
                              topic=out.headers.get(TOPIC_HEADER))

    def _dead_letter(self, out: Message, addresses: List[str], attempt: int, reason: str) -> Deferred:
        self.stats["dead"] += 1
        self.log.error("{component}: giving up on {count} address(es) of publication {topic} after {attempt} "
                       "attempt(s), dead-lettering it: {reason}", component=self.name, count=len(addresses),
                       topic=out.headers.get(TOPIC_HEADER), attempt=attempt, reason=reason)
        dead = out.with_headers(**{wire.ADDRESSES_HEADER: list(addresses), ERROR_HEADER: reason,
                                   ORIGIN_HEADER: self.name})
        d = self.bus.send(self.name + DEAD_SUFFIX, dead)
        d.addErrback(lambda f: self.log.failure("{component}: could not dead-letter publication {topic}", f,
                                                component=self.name, topic=out.headers.get(TOPIC_HEADER)))
        return d


def _relay(result: Any, waiter: Deferred) -> None:
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
