"""pub_sub (with the attribute store) over RabbitMQ, publishing in one multicast; the
memory:// tests are in the fast tier, tests/fast/dissemination/test_pub_sub.py."""
from __future__ import annotations

import uuid
from typing import Any, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet
from magnet import Message

from tests.ooidx.waiting import eventually, sleep
from ooidx.attribute_store import AttributeStore
from ooidx.dissemination.pub_sub import PUBLICATION, PubSub


class Node:
    """A bus with any of: the attribute store, pub_sub."""

    def __init__(self, url: str, tmp_path: Any, *, store: bool = True, pubsub: bool = True,
                 node: str = "n1", table: str = "attrs", **bus_options: Any) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.table = table
        self.node = node
        self.bus = magnet.connect(url, reactor, node=node, rpc_timeout=10, **bus_options)
        self.store = self.make_store() if store else None
        self.pubsub = self.make_pubsub() if pubsub else None

    def make_store(self) -> AttributeStore:
        return AttributeStore("attribute_store", self.bus, node=self.node,
                              url=str(self.tmp_path / "attributes.sqlite3"), table=self.table, clock=reactor)

    def make_pubsub(self) -> PubSub:
        return PubSub("pub_sub", self.bus, node=self.node, clock=reactor)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.bus.when_connected()
        for c in (self.store, self.pubsub):
            if c is not None:
                yield c.start()
        if self.pubsub is not None:
            yield self.pubsub.loaded()

    @defer.inlineCallbacks
    def restart_pubsub(self) -> Any:
        yield self.pubsub.stopService()
        self.pubsub = self.make_pubsub()
        yield self.pubsub.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for c in (self.pubsub, self.store):
            if c is not None and c.started:
                yield c.stopService()
        yield self.bus.stopService()

    def call(self, op: str, **kwargs: Any) -> defer.Deferred:
        return self.bus.call("pub_sub", op, **kwargs)


class Inbox:
    """What arrives at a subscription's address."""

    def __init__(self) -> None:
        self.messages: List[Message] = []
        self.listener: Any = None

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def topics(self) -> List[str]:
        return [m.headers["topic"] for m in self.messages]


@defer.inlineCallbacks
def consume(bus: magnet.Bus, address: str) -> Any:
    inbox = Inbox()
    inbox.listener = yield bus.listen(inbox.on_message, name=address, durable=True)
    return inbox


# over RabbitMQ ---------------------------------------------------------------------------


async def own_pub_sub(broker_url: str, tmp_path: Any, tag: str, prefetch: Optional[int] = None,
                      **options: Any) -> Tuple["Node", str]:
    """A started Node whose attribute store and pub_sub (with C{options}) serve
    queues of this test's own (C{test.attrs.TAG}, C{test.pub_sub.TAG}), so that
    no other instance on the broker answers; returns it and pub_sub's queue."""
    service = own_queues(tag)[0]
    n = Node(broker_url, tmp_path, store=False, pubsub=False, node=f"test-{tag}", table=f"attrs_{tag}",
             address_recheck=0.5)
    await n.start()
    store_queue = own_queues(tag)[2]
    n.store = n.make_store()
    await n.store.setUp()
    await n.bus.serve(store_queue, n.store)
    n.pubsub = PubSub(service, n.bus, node=n.node, clock=reactor, store=store_queue, **options)
    await n.pubsub.setUp()
    await n.bus.serve(service, n.pubsub, **({} if prefetch is None else {"prefetch": prefetch}))
    n.pubsub.started = n.store.started = True
    return n, service


def own_queues(tag: str) -> List[str]:
    """The queues L{own_pub_sub} made for C{tag} (with their dead-letter queues), to delete after."""
    return [f"{name}.{tag}{dead}" for name in ("test.pub_sub", "test.attrs") for dead in ("", ".dead")]


@pytest.mark.rabbitmq
@pytest_twisted.ensureDeferred
async def test_subscribe_publish_over_rabbitmq(tmp_path: Any, broker_url: str) -> None:
    tag = uuid.uuid4().hex[:10]
    n, service = await own_pub_sub(broker_url, tmp_path, tag)
    names = [f"t{tag}-{i}" for i in range(3)]
    try:
        await n.pubsub.loaded()
        subs = [await n.bus.call(service, "subscribe", regex=regex, name=name)
                for name, regex in zip(names, [rf"^dataset\.{tag}", rf"^dataset\.{tag}$", rf"^event\.{tag}"])]
        inboxes = [await consume(n.bus, s["address"]) for s in subs[:2]]
        # the third subscriber is away
        topic = f"dataset.{tag}"
        for i in range(5):
            assert (await n.bus.call(service, "publish", topic=topic, message={"i": i}))["addresses"] == 2
        await n.bus.call(service, "publish", topic=f"event.{tag}", message="while away")
        await eventually(lambda: all(len(inbox.messages) == 5 for inbox in inboxes))
        await sleep(0.3)
        for inbox in inboxes:
            assert [m.json()["message"]["i"] for m in inbox.messages] == list(range(5))
            assert inbox.messages[0].type == PUBLICATION and inbox.messages[0].headers["topic"] == topic
        away = await consume(n.bus, subs[2]["address"])
        await eventually(lambda: len(away.messages) == 1)
        assert away.messages[0].json() == {"topic": f"event.{tag}", "message": "while away"}
        for inbox in inboxes + [away]:
            await inbox.listener.subscription.cancel()
        # the second subscriber's queue is deleted by an operator between publications: reported (within
        # the bus's address_recheck, 0.5 s here), never retried, and the first still gets every one
        inboxes[0] = await consume(n.bus, subs[0]["address"])
        operator = magnet.connect(broker_url, reactor)
        operator.startService()
        await operator.transport.delete_queue(subs[1]["address"])
        await operator.stopService()
        await sleep(0.6)
        for i in range(5, 8):
            result = await n.bus.call(service, "publish", topic=topic, message={"i": i})
            assert result == {"topic": topic, "addresses": 2, "unroutable": [subs[1]["address"]]}
        await eventually(lambda: len(inboxes[0].messages) == 3)
        assert [m.json()["message"]["i"] for m in inboxes[0].messages] == [5, 6, 7]
        assert n.pubsub.stats["unroutable"] == 3 and n.pubsub.stats["retried"] == 0
        await inboxes[0].listener.subscription.cancel()
    finally:
        for name in names:
            await n.bus.call(service, "unsubscribe", name=name)
        for queue in own_queues(tag):
            await n.bus.transport.delete_queue(queue).addErrback(lambda _: None)
        await n.pubsub.stopService()
        await n.stop()


