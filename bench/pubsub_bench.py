"""Group C{pubsub}: routing topics to regex subscriptions, and publish to delivery.

Rows:

  1-3. topics routed per second with 1,000 / 10,000 / 100,000 subscriptions:
       L{ooidx.routing.Router} (RE2 Sets, one pass per topic) against the
       naive loop over every compiled Python C{re} pattern (C{search}). The
       subscriptions are realistic per-dataset patterns (five shapes, see
       L{patterns}: anchored names with digit classes and alternations, and
       unanchored C{event\\.saved\\.NAME\\b} ones); 20,000 topics over all
       the datasets, five in seven matching one subscription, two in seven
       none, routed round and round (RE2's lazily built DFA is warm after
       the first pass; see the report for the first pass after a rebuild).
       Both sides check they find the same keys before timing.
       The work is CPU-bound, in batches of about 20 ms between reactor turns.
       The Router is built by adding every subscription, then compiled once.
  4.   changing subscriptions at 100,000: one change (alternately a
       subscribe of a new dataset's pattern and an unsubscribe of a random
       subscription, so the count stays at 100,000) then one topic routed,
       per operation; the Router (base, delta levels, tombstones) against the
       same Router configured as before it had levels
       (C{compact_min=1, compact_ratio=0}: every change recompiles every
       pattern), the baseline. Unit: changes per second, compactions (the
       occasional full recompile) included. Each side also times 200
       (baseline: 5) consecutive subscribes, each followed by a match, right
       after building and logs their median and worst; and logs the median
       and worst operation of the whole run, compactions included.
       Since a compile holds the GIL, an operation's time is how long it
       stalls the reactor.
  5-7. end to end over RabbitMQ, C{publish} posted to pub_sub: events per
       second from the post to delivery at 1, 10 and 100 subscriber
       addresses. pub_sub binds the topic on its first publication
       (C{pubsub.topics} -> the topic's fanout -> every matching address),
       then publishes each to C{pubsub.topics}: one publish reaching every
       address. Every publication still goes through pub_sub's worker queue
       first (a persistent post, its delivery and ack). Baseline: a plain
       magnet fanout of the same (persistent) publications to as many
       subscribers, durable addresses as pub_sub's bound to it. At most 100
       events outstanding. Unit: deliveries per second (events x
       subscribers), as the magnet group's fanout row.
  8-10. the same publications from the one-hop publisher
       (L{ooidx.dissemination.publisher.Publisher}, on a bus of its own):
       straight to C{pubsub.topics}, persistent, mandatory, confirmed; its
       first publication is returned (the topic not bound yet) and posted
       to pub_sub, which binds the topic (during the warm-up). The same
       baseline.
  11.  row 6 against the fanout the distributor was measured against: each
       subscriber its own exclusive, non-durable queue (C{bus.subscribe}),
       where the broker keeps nothing on disk.
  12.  magnet's C{Bus.multicast} alone (no pub_sub in front: the publisher
       multicasts the publication itself) to 10 durable addresses, against
       the fanout of row 6: what the one-publish delivery with C{BCC} costs
       (pub_sub's path for a topic it cannot bind).

Everything runs in this one process (one reactor): publisher, pub_sub, the
attribute store (SQLite in a temporary directory) and the
consumers; on the subject side of row 4 pub_sub and the store are served on
queues of this run's own, and the subscriptions are removed afterwards.
"""
from __future__ import annotations

import random
import re
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks

from bench.harness import Benchmark, Group, Load, Pipeline, Settings
from bench.raw_txamqp import delete

#: Seconds of routing between two reactor turns.
BATCH_SECONDS = 0.02

#: Consecutive subscribes timed one by one after building (row 4), per side:
#: the baseline recompiles everything each time (~1.3 s at 100,000), so few.
TIMED_SUBSCRIBES = 200
TIMED_SUBSCRIBES_BASELINE = 5


def pattern(i: int) -> str:
    """The subscription regex of dataset C{i}: one of five realistic shapes."""
    kind = i % 5
    if kind == 0:
        return rf"^dataset\.sst_{i}$"
    if kind == 1:
        return rf"^dataset\.ctd_{i}_\d+$"
    if kind == 2:
        return rf"event\.saved\.ds{i}\b"  # unanchored
    if kind == 3:
        return rf"^event\.(fetched|saved)\.glider{i}$"
    return rf"^dataset\.(sst|ctd)_{i}\..*"


def patterns(n: int) -> Dict[int, str]:
    """C{n} subscription regexes of five realistic shapes, one dataset each."""
    return {i: pattern(i) for i in range(n)}


def topics(n: int, count: int = 20_000, seed: int = 1) -> List[str]:
    """A mix of topics over all C{n} datasets: five in seven match one
    subscription (of the shape its dataset number gives), two in seven none."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        i = rng.randrange(n)
        shape = rng.randrange(7)
        if shape < 5:
            i = i - i % 5 + shape
            if i >= n:
                i -= 5
        if shape == 0:
            out.append(f"dataset.sst_{i}")
        elif shape == 1:
            out.append(f"dataset.ctd_{i}_{rng.randrange(100)}")
        elif shape == 2:
            out.append(f"event.saved.ds{i}")
        elif shape == 3:
            out.append(f"event.fetched.glider{i}")
        elif shape == 4:
            out.append(f"dataset.sst_{i}.v{rng.randrange(9)}")
        elif shape == 5:
            out.append(f"event.purged.sst_{i}")  # no subscription
        else:
            out.append(f"dataset.unknown_{rng.randrange(10 ** 6)}")  # no subscription
    return out


class _TurnLoop(Load):
    """A CPU-bound load: L{_batch} runs for one slice, then gives the reactor a turn."""

    def __init__(self, clock: Any, drain_timeout: float) -> None:
        super().__init__(clock, drain_timeout)
        self._call: Any = None

    def _begin(self) -> None:
        self._call = self.clock.callLater(0, self._batch)

    def _batch(self) -> None:
        raise NotImplementedError

    def _drained(self) -> Deferred:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.succeed(None)


class CPULoop(_TurnLoop):
    """Call C{route(topic)} over a topic list in batches between reactor turns."""

    def __init__(self, clock: Any, route: Callable[[str], Any], corpus: List[str], drain_timeout: float) -> None:
        super().__init__(clock, drain_timeout)
        self.route = route
        self.corpus = corpus
        self.position = 0


    def _batch(self) -> None:
        self._call = None
        if not self.running:
            return
        route, corpus, n = self.route, self.corpus, len(self.corpus)
        deadline = time.perf_counter() + BATCH_SECONDS
        i = self.position
        done = 0
        while True:
            route(corpus[i])
            i = i + 1 if i + 1 < n else 0
            done += 1
            if done % 16 == 0 and time.perf_counter() >= deadline:
                break
        self.position = i
        self.completed += done
        self._call = self.clock.callLater(0, self._batch)



class ChangeLoop(_TurnLoop):
    """Change one subscription then route one topic, per operation, timing
    each; one operation at least per reactor turn (the baseline's take ~1 s).

    Changes alternate: subscribe a new dataset's pattern, unsubscribe a
    random subscription, so the Router's size stays put.
    """

    def __init__(self, clock: Any, router: Any, first_new: int, corpus: List[str], drain_timeout: float) -> None:
        super().__init__(clock, drain_timeout)
        self.router = router
        self.corpus = corpus
        self.live = [key for key, _ in router.items()]
        self.next_key = first_new
        self.rng = random.Random(3)
        self.times: List[float] = []


    def operation(self) -> None:
        router, live = self.router, self.live
        if self.completed % 2 == 0:
            key = self.next_key
            self.next_key += 1
            router.add(key, pattern(key))
            live.append(key)
        else:
            i = self.rng.randrange(len(live))
            live[i], live[-1] = live[-1], live[i]
            router.remove(live.pop())
        router.match(self.corpus[self.completed % len(self.corpus)])

    def _batch(self) -> None:
        self._call = None
        if not self.running:
            return
        deadline = time.perf_counter() + BATCH_SECONDS
        while True:
            started = time.perf_counter()
            self.operation()
            now = time.perf_counter()
            self.times.append(now - started)
            self.completed += 1
            if now >= deadline:
                break
        self._call = self.clock.callLater(0, self._batch)



def _stalls(times: List[float]) -> str:
    ordered = sorted(times)
    return (f"median {ordered[len(ordered) // 2] * 1e3:.2f} ms, worst {ordered[-1] * 1e3:.1f} ms, "
            f"mean {sum(ordered) / len(ordered) * 1e3:.2f} ms over {len(ordered):,}")


class _Side:
    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.buses: List[Any] = []

    def open(self) -> Any:
        return None

    @inlineCallbacks
    def close(self) -> Any:
        for bus in self.buses:
            if bus.running:
                yield bus.stopService()

    @inlineCallbacks
    def _bus(self, node: str) -> Any:
        import magnet

        timeout = self.settings.setup_timeout
        bus = magnet.connect(self.settings.broker, self.reactor, node=node, rpc_timeout=timeout,
                             send_timeout=timeout)
        bus.startService()
        yield bus.when_connected(timeout)
        self.buses.append(bus)
        return bus

    def _routing_load(self, route: Callable[[str], Any], n: int) -> Load:
        corpus = topics(n)
        return CPULoop(self.reactor, route, corpus, self.settings.drain_timeout)

    def _changes_load(self, router: Any, n: int, label: str, timed: int) -> Load:
        """Row 4 on C{router} (holding C{n} subscriptions, compiled): first
        C{timed} subscribes, each then a match, timed and logged; then the load."""
        from bench.harness import log

        corpus = topics(n, count=1000, seed=7)
        times = []
        for i in range(n, n + timed):
            started = time.perf_counter()
            router.add(i, pattern(i))
            router.match(corpus[i % len(corpus)])
            times.append(time.perf_counter() - started)
        log(f"  {label}: {timed} subscribes at {n:,}, each then a match: {_stalls(times)}")
        load = ChangeLoop(self.reactor, router, n + timed, corpus, self.settings.drain_timeout)

        def report() -> None:
            if load.times:
                log(f"  {label}: every change + match of the run: {_stalls(load.times)}; "
                    f"{router.compactions} compaction(s), now {router.set_count} Set(s)")

        load.on_close(report)
        return load


def _router(n: int) -> Any:
    from ooidx.routing import Router

    router = Router()
    for key, regex in patterns(n).items():
        router.add(key, regex)
    return router


def _naive(n: int) -> List[Tuple[int, Any]]:
    return [(key, re.compile(regex)) for key, regex in patterns(n).items()]


def _naive_route(compiled: List[Tuple[int, Any]]) -> Callable[[str], set]:
    def route(topic: str) -> set:
        return {key for key, p in compiled if p.search(topic)}
    return route


def _check(route: Callable[[str], set], n: int) -> None:
    """Both sides must find the same keys: compare with the naive loop on a sample."""
    reference = _naive_route(_naive(n))
    for topic in topics(n, count=50, seed=99):
        got, want = route(topic), reference(topic)
        if got != want:
            raise AssertionError(f"routing {topic!r}: {sorted(got)} != {sorted(want)}")


class PubSubSide(_Side):
    """The subject: ooidx.routing.Router; pub_sub (one multicast per publication) end to end."""

    def routing(self, n: int) -> Any:
        started = time.perf_counter()
        router = _router(n)
        router.match("warm.up")  # builds the Set(s)
        from bench.harness import log
        log(f"  Router: {n:,} patterns added and compiled into {router.set_count} RE2 Set(s) in "
            f"{time.perf_counter() - started:.2f} s")
        _check(router.match, n)
        return self._routing_load(router.match, n)

    def changes(self, n: int) -> Any:
        router = _router(n)
        router.match("warm.up")
        return self._changes_load(router, n, "Router", TIMED_SUBSCRIBES)

    @inlineCallbacks
    def end_to_end(self, subscribers: int = 10, window: int = 100, transient: bool = False,
                   one_hop: bool = False) -> Any:
        """C{publish} posted to pub_sub (which binds the topic on its first
        publication, then publishes each to C{pubsub.topics}), or, C{one_hop},
        an outside L{ooidx.dissemination.publisher.Publisher} on a bus of its
        own publishing straight to C{pubsub.topics} (its first publication is
        returned, posted to pub_sub, which binds the topic: in the warm-up)."""
        from ooidx.attribute_store import AttributeStore
        from ooidx.dissemination.pub_sub import PubSub, topic_exchange
        from ooidx.dissemination.publisher import Publisher

        tag = uuid.uuid4().hex[:10]
        service, store_queue = f"bench.pub_sub.{tag}", f"bench.attrs.{tag}"
        bus = yield self._bus(f"bench-pubsub-{tag}")
        consumers = yield self._bus(f"bench-consumers-{tag}")
        directory = tempfile.mkdtemp(prefix="ooidx-bench-")
        store = AttributeStore("attribute_store", bus, node=bus.node, url=f"{directory}/attrs.sqlite3",
                               clock=self.reactor)
        yield store.setUp()
        yield bus.serve(store_queue, store)
        pubsub = PubSub(service, bus, node=bus.node, clock=self.reactor, store=store_queue)
        yield pubsub.setUp()
        yield bus.serve(service, pubsub, prefetch=pubsub.prefetch)  # as Component.start serves it
        yield pubsub.loaded()
        topic = f"event.saved.bench{tag}"
        message = {"kind": "saved", "dataset": f"bench{tag}", "pad": "x" * 40}
        names = [f"bench-{tag}-{i}" for i in range(subscribers)]
        regexes = [rf"^event\.saved\.bench{tag}$", rf"bench{tag}", r"^event\.saved\."]

        def publish() -> Deferred:
            return bus.post(service, "publish", topic=topic, message=message)

        if one_hop:
            publisher = Publisher((yield self._bus(f"bench-publisher-{tag}")), service=service)

            def publish() -> Deferred:  # noqa: F811
                return publisher.publish(topic, message)

            def report() -> None:
                from bench.harness import log
                log(f"  Publisher: {publisher.counts['exchange']:,} publications in one hop, "
                    f"{publisher.counts['pub_sub']:,} posted to pub_sub")

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)
        if one_hop:
            load.on_close(report)
        listeners = []
        for i, name in enumerate(names):
            sub = yield bus.call(service, "subscribe", regex=regexes[i % len(regexes)], name=name)
            listeners.append((yield consumers.listen(lambda _m: load.delivered(), name=sub["address"],
                                                     durable=True)))
        routed = yield bus.call(service, "route", topic=topic)
        assert len(routed) == subscribers, routed

        @inlineCallbacks
        def cleanup() -> Any:
            for listener in listeners:
                yield listener.subscription.cancel()
            for name in names:
                yield bus.call(service, "unsubscribe", name=name)
            yield pubsub.tearDown()
            yield store.tearDown()
            yield delete(self.reactor, self.settings.broker,
                         queues=[service, service + ".dead", store_queue, store_queue + ".dead"],
                         exchanges=[topic_exchange(topic)])
            shutil.rmtree(directory, ignore_errors=True)

        load.on_close(cleanup)
        return load


    @inlineCallbacks
    def multicast_alone(self, subscribers: int = 10, window: int = 100) -> Any:
        """magnet's Bus.multicast by itself (no pub_sub in front): the same
        publication to C{subscribers} durable addresses, one publish each time."""
        from ooidx.dissemination.pub_sub import publication

        tag = uuid.uuid4().hex[:10]
        front = yield self._bus(f"bench-front-{tag}")
        back = yield self._bus(f"bench-back-{tag}")
        queues = [f"bench.pubsub.multicast.{tag}.{i}" for i in range(subscribers)]
        message = publication(f"event.saved.bench{tag}", {"kind": "saved", "dataset": f"bench{tag}", "pad": "x" * 40})

        def publish() -> Deferred:
            return front.multicast(queues, message)

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)
        subscriptions = []
        for queue in queues:
            yield back.declare_address(queue)
            subscriptions.append((yield back.consume(queue, lambda _m: load.delivered())))

        @inlineCallbacks
        def cleanup() -> Any:
            yield defer.gatherResults([s.cancel() for s in subscriptions], consumeErrors=True)
            yield delete(self.reactor, self.settings.broker, queues=queues)

        load.on_close(cleanup)
        return load


class NaiveSide(_Side):
    """The baseline: a loop over compiled C{re} patterns; plain magnet fanout."""

    def routing(self, n: int) -> Any:
        compiled = _naive(n)
        return self._routing_load(_naive_route(compiled), n)

    def changes(self, n: int) -> Any:
        """The Router as it was before its levels: every change recompiles everything."""
        from ooidx.routing import Router

        router = Router(compact_min=1, compact_ratio=0)
        router.replace(patterns(n))
        router.match("warm.up")
        return self._changes_load(router, n, "full rebuild", TIMED_SUBSCRIBES_BASELINE)

    def multicast_alone(self, subscribers: int = 10, window: int = 100) -> Any:
        return self.end_to_end(subscribers, window)

    @inlineCallbacks
    def end_to_end(self, subscribers: int = 10, window: int = 100, transient: bool = False,
                   one_hop: bool = False) -> Any:
        """A plain fanout of the same publications (persistent) to as many
        subscribers: durable addresses as pub_sub's (C{bus.declare_address})
        bound to the fanout, or, C{transient}, each subscriber's own
        exclusive, non-durable queue (C{bus.subscribe}: the broker then keeps
        nothing on disk), the comparison the distributor was measured against."""
        import magnet
        from ooidx.dissemination.pub_sub import publication

        tag = uuid.uuid4().hex[:10]
        name = f"bench.pubsub.fanout.{tag}"
        front = yield self._bus(f"bench-front-{tag}")
        back = yield self._bus(f"bench-back-{tag}")
        yield front.declare_fanout(name)
        message = publication(f"event.saved.bench{tag}", {"kind": "saved", "dataset": f"bench{tag}", "pad": "x" * 40})

        def publish() -> Deferred:
            return front.send(name, message)

        load = Pipeline(self.reactor, publish, copies=subscribers, window=window,
                        drain_timeout=self.settings.drain_timeout)
        subscriptions = []
        queues = [f"{name}.{i}" for i in range(subscribers)] if not transient else []
        if transient:
            for _ in range(subscribers):
                subscriptions.append((yield back.subscribe(name, lambda _m: load.delivered())))
        else:
            for queue in queues:
                yield back.declare_address(queue)
                yield back.transport.bind_queue(queue, name)
                subscriptions.append((yield back.consume(queue, lambda _m: load.delivered())))

        @inlineCallbacks
        def cleanup() -> Any:
            yield defer.gatherResults([s.cancel() for s in subscriptions], consumeErrors=True)
            yield delete(self.reactor, self.settings.broker, queues=queues, exchanges=[name])

        load.on_close(cleanup)
        assert isinstance(message, magnet.Message) and message.persistent
        return load


def group() -> Group:
    return Group(
        name="pubsub",
        description="regex routing (RE2 Set vs a loop over Python re; changes vs full rebuild) and "
                    "publish -> delivery (vs plain fanout)",
        subject="pub_sub",
        baselines=["naive"],
        sides={"pub_sub": PubSubSide, "naive": NaiveSide},
        benchmarks=[
            Benchmark("route, 1,000 subscriptions", "topics/s", lambda side: side.routing(1_000)),
            Benchmark("route, 10,000 subscriptions", "topics/s", lambda side: side.routing(10_000)),
            Benchmark("route, 100,000 subscriptions", "topics/s", lambda side: side.routing(100_000)),
            Benchmark("(un)subscribe + route, 100,000 subscriptions", "changes/s",
                      lambda side: side.changes(100_000)),
            Benchmark("publish op posted to pub_sub -> 1 subscriber address (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=1, window=100)),
            Benchmark("publish op posted to pub_sub -> 10 subscriber addresses (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=10, window=100)),
            Benchmark("publish op posted to pub_sub -> 100 subscriber addresses (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=100, window=100)),
            Benchmark("publish one hop (Publisher) -> 1 subscriber address (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=1, window=100, one_hop=True)),
            Benchmark("publish one hop (Publisher) -> 10 subscriber addresses (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=10, window=100, one_hop=True)),
            Benchmark("publish one hop (Publisher) -> 100 subscriber addresses (RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=100, window=100, one_hop=True)),
            Benchmark("publish op posted to pub_sub -> 10 subscriber addresses, baseline's queues transient "
                      "(RabbitMQ)", "deliveries/s",
                      lambda side: side.end_to_end(subscribers=10, window=100, transient=True)),
            Benchmark("Bus.multicast alone -> 10 addresses (RabbitMQ)", "deliveries/s",
                      lambda side: side.multicast_alone(subscribers=10, window=100)),
        ],
    )
