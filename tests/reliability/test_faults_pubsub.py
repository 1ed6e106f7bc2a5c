"""A subscriber's queue deleted while publications flow (issue 15), against a
real `twistd -n ooidx` daemon (attribute_store, pub_sub) on a private
RabbitMQ node.

pub_sub delivers each publication to its subscribers in one publish: to the
`pubsub.topics` exchange, through the topic's fanout bound to every matching
address (before it bound the topic, and for a topic it cannot bind, in one
multicast: magnet's Bus.multicast, the other addresses in BCC). RabbitMQ
returns such a publish only when it reached no queue at all, so a deleted
queue among five is never returned: the bus's address book notices it at
its next check (within `address_recheck`, 10 s). What must hold:

  - the four living subscribers get every publication that pub_sub
    answered, exactly once (0 lost);
  - the deleted one is reported: in `publish`'s answer (`unroutable`), in
    pub_sub's counters, /metrics (magnet_unroutable_total) and its log;
  - nothing is retried for it, ever (counters `retried` and `dead` stay 0),
    and the flow does not slow down.

One JSON line (tests.reliability.results).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from magnet import Message

from tests.reliability.faultlib import eventually, metric_value, sleep, start_node, wait_started
from tests.reliability.results import percentile

pytestmark = [pytest.mark.slow]

#: the daemon's bus checks an address it believes in again after this long (magnet.Bus address_recheck)
RECHECK = 10.0


def ctl(broker: Any, *args: str) -> str:
    done = broker.ctl(*args)
    assert done.returncode == 0, (args, done.stdout)
    return done.stdout.decode(errors="replace")


async def five_subscribers(tmp_path: Path, broker: Any, nodes: list, buses: Any, prefix: str,
                           regex: str) -> Tuple[Any, Any, Dict[str, dict], Dict[str, Counter], str]:
    """A daemon with attribute_store and pub_sub on C{broker}, and five subscriptions
    C{prefix}0-4 to C{regex}; all but the victim (C{prefix}2) consumed, each counting
    the publications it gets by their "i". Returns (node, bus, subs, got, victim)."""
    node = start_node(tmp_path, "dx", broker.url, {"attribute_store": {"url": str(tmp_path / "attrs.sqlite3")},
                                                    "pub_sub": None})
    nodes.append(node)
    await wait_started(node)
    bus = buses(broker.url)
    await bus.when_connected(20)
    names = [f"{prefix}{i}" for i in range(5)]
    victim = f"{prefix}2"
    subs = {n: await bus.call("pub_sub", "subscribe", regex=regex, name=n, timeout=20) for n in names}
    got: Dict[str, Counter] = {n: Counter() for n in names if n != victim}

    def take(name: str) -> Any:
        def on(message: Message) -> None:
            got[name][message.json()["message"]["i"]] += 1
        return on

    for n in got:
        await bus.consume(subs[n]["address"], take(n), prefetch=100)
    return node, bus, subs, got, victim


class Flow:
    """Publications through pub_sub (RPC `publish`), a few in flight, until stopped."""

    def __init__(self, bus: Any, topic: str, concurrency: int = 8, pause: float = 0.02) -> None:
        self.bus = bus
        self.topic = topic
        self.semaphore = defer.DeferredSemaphore(concurrency)
        self.pause = pause
        self.stopped = False
        self.sent = 0
        self.answered: Dict[int, dict] = {}
        self.failed: Dict[int, str] = {}
        self.latencies: List[float] = []
        self.at: Dict[int, float] = {}
        self._pending: List[defer.Deferred] = []
        self._loop: Any = None

    def start(self) -> "Flow":
        self._loop = defer.ensureDeferred(self._run())
        return self

    async def _run(self) -> None:
        while not self.stopped:
            await self.semaphore.acquire()
            self.sent += 1
            i = self.sent
            started = time.monotonic()
            self.at[i] = started
            d = self.publish(i)
            d.addCallbacks(self._answered, self._failed, callbackArgs=(i, started), errbackArgs=(i,))
            d.addBoth(lambda _: self.semaphore.release())
            self._pending.append(d)
            await sleep(self.pause)

    def publish(self, i: int) -> defer.Deferred:
        """Publication C{i}: a call of pub_sub's C{publish}, answered with what it reached."""
        return self.bus.call("pub_sub", "publish", topic=self.topic, message={"i": i}, timeout=30)

    def _answered(self, answer: dict, i: int, started: float) -> None:
        self.answered[i] = answer
        self.latencies.append((time.monotonic() - started) * 1000)

    def _failed(self, failure: Any, i: int) -> None:
        self.failed[i] = f"{failure.type.__name__}: {failure.getErrorMessage()}"

    async def stop(self) -> None:
        self.stopped = True
        await self._loop
        await defer.DeferredList(self._pending)


@pytest_twisted.ensureDeferred
async def test_a_subscriber_queue_deleted_while_publications_flow(tmp_path: Path, private_rabbitmq: Any,
                                                                  nodes: list, buses: Any, record: Any) -> None:
    broker = private_rabbitmq
    node, bus, subs, got, victim = await five_subscribers(tmp_path, broker, nodes, buses, "flow",
                                                          r"^dataset\.flow$")
    flow = Flow(bus, "dataset.flow").start()
    try:
        await sleep(4)
        t_delete = time.monotonic()
        await deferToThread(ctl, broker, "delete_queue", subs[victim]["address"])
        deleted_after = flow.sent
        await eventually(lambda: any(subs[victim]["address"] in a.get("unroutable", ())
                                     for a in list(flow.answered.values())), RECHECK + 20,
                         "pub_sub reports the deleted address")
        t_reported = min(flow.at[i] for i, a in flow.answered.items()
                         if subs[victim]["address"] in a.get("unroutable", ())) - t_delete
        await sleep(4)
    finally:
        await flow.stop()
    answered = sorted(flow.answered)
    await eventually(lambda: all(set(answered) <= set(c) for c in got.values()), 60,
                     "every living subscriber has every answered publication")
    await sleep(1)
    counters = await bus.call("pub_sub", "counters", timeout=20)
    lost = sum(len(set(answered) - set(c)) for c in got.values())
    duplicated = sum(n - 1 for c in got.values() for n in c.values() if n > 1)
    reported = [i for i, a in flow.answered.items() if subs[victim]["address"] in a.get("unroutable", ())]
    # before the deletion the victim got its copies; after it, at most RECHECK seconds' worth were not reported
    first_reported = min(reported)
    unreported_after = [i for i in answered if deleted_after < i < first_reported]
    log = node.log()
    said = log.count(f"address {subs[victim]['address']} is gone")
    after_end = await bus.call("pub_sub", "counters", timeout=20)
    metric = await deferToThread(lambda: metric_value(node.metrics(), "magnet_unroutable_total",
                                                      name=subs[victim]["address"]))
    record("a subscriber's queue deleted while publications flow", faults_injected=1, sent=flow.sent,
           confirmed=len(answered), processed=len(answered) * len(got), lost=lost, duplicated=duplicated,
           errors=len(flow.failed), p50_ms=percentile(flow.latencies, 50), p99_ms=percentile(flow.latencies, 99),
           notes=f"5 subscribers, 1 queue deleted (rabbitmqctl delete_queue) after publication {deleted_after}; "
                 f"reported unroutable {t_reported:.1f} s later (address_recheck {RECHECK:.0f} s), in "
                 f"{len(reported)} answers, logged {said} time(s), magnet_unroutable_total {metric:.0f}; {len(unreported_after)} publications in "
                 f"between not reported; pub_sub counters {counters}")
    assert flow.failed == {}, list(flow.failed.items())[:5]
    assert lost == 0 and duplicated == 0, (lost, duplicated)
    assert t_reported < RECHECK + 5, t_reported
    assert all(subs[victim]["address"] in flow.answered[i]["unroutable"] for i in answered if i >= first_reported)
    assert counters["retried"] == 0 and counters["dead"] == 0, counters
    assert counters["unroutable"] == len(reported), (counters, len(reported))
    assert after_end == counters, (after_end, counters)
    assert metric == len(reported), (metric, len(reported))  # nothing goes on after the flow: no retries
    assert 1 <= said <= 2 + int((time.monotonic() - t_delete) / 60), said


class OneHopFlow(Flow):
    """Publications from the one-hop Publisher (straight to pubsub.topics), a few in flight, until stopped."""

    def __init__(self, bus: Any, topic: str, **options: Any) -> None:
        super().__init__(bus, topic, **options)
        from ooidx.dissemination.publisher import Publisher
        self.publisher = Publisher(bus)

    def publish(self, i: int) -> defer.Deferred:
        return self.publisher.publish(self.topic, {"i": i})


@pytest_twisted.ensureDeferred
async def test_one_hop_publications_go_on_while_pub_sub_is_killed_and_a_queue_deleted(
        tmp_path: Path, private_rabbitmq: Any, nodes: list, buses: Any, record: Any) -> None:
    """The one-hop Publisher on a bound topic needs no pub_sub: kill -9 the daemon and delete a
    subscriber's queue while it publishes; the living subscribers get every confirmed publication,
    exactly once, and after the restart publications of unbound topics go through pub_sub again."""
    broker = private_rabbitmq
    node, bus, subs, got, victim = await five_subscribers(tmp_path, broker, nodes, buses, "hop",
                                                          r"^dataset\.hop")
    flow = OneHopFlow(bus, "dataset.hop").start()
    try:
        await eventually(lambda: flow.publisher.counts["exchange"] > 50, 30, "publications in one hop")
        await deferToThread(node.kill9)
        killed_at = flow.sent
        await deferToThread(ctl, broker, "delete_queue", subs[victim]["address"])
        await sleep(3)
        during = flow.publisher.counts["exchange"]
        await sleep(2)
        assert flow.publisher.counts["exchange"] > during, "one-hop publications stopped with pub_sub"
        await deferToThread(node.restart)
        await wait_started(node)
        await sleep(2)
    finally:
        await flow.stop()
    # a topic never published: returned, posted to pub_sub, which binds it
    late = await flow.publisher.publish("dataset.hop.late", {"i": -1})
    confirmed = sorted(flow.answered)
    await eventually(lambda: all(set(confirmed) <= set(c) for c in got.values()), 60,
                     "every living subscriber has every confirmed publication")
    await eventually(lambda: all(c[-1] == 1 for c in got.values()), 60, "the late topic through pub_sub")
    await sleep(1)
    lost = sum(len(set(confirmed) - set(c)) for c in got.values())
    duplicated = sum(n - 1 for c in got.values() for n in c.values() if n > 1)
    record("one-hop publications while pub_sub is killed and a queue deleted", faults_injected=2,
           sent=flow.sent, confirmed=len(confirmed), processed=len(confirmed) * len(got), lost=lost,
           duplicated=duplicated, errors=len(flow.failed), p50_ms=percentile(flow.latencies, 50),
           p99_ms=percentile(flow.latencies, 99),
           notes=f"5 subscribers; pub_sub killed (kill -9) after publication {killed_at}, then one queue "
                 f"deleted; {flow.publisher.counts} (exchange: one hop, pub_sub: posted); late topic {late}")
    assert flow.failed == {}, list(flow.failed.items())[:5]
    assert lost == 0 and duplicated == 0, (lost, duplicated)
    assert late["via"] == "pub_sub"
