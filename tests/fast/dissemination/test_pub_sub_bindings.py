"""pub_sub's topic bindings on memory:// (on a Clock): the topic bound on its
first publication (its own fanout bound to every matching address, then to
pubsub.topics), a new subscription bound to the known topics it matches
before subscribe answers, a changed regex unbound, unsubscribe, the least
recently published topic unbound beyond max_topics, topics shared by
instances and kept across a restart, a publication returned to pub_sub
delivered by multicast, not confirmed -> retried -> dead-lettered; and the
one-hop Publisher, falling back to pub_sub's publish when returned. The
same on RabbitMQ: tests/ooidx/test_pub_sub_bindings.py."""
from __future__ import annotations

import uuid
from typing import Any, List, Set

from twisted.internet import defer

from magnet import ConnectionLost, Message
from magnet.bus import ERROR_HEADER

from ooidx.dissemination.pub_sub import TOPICS, TOPIC_KEY, _digest, topic_exchange
from ooidx.dissemination.publisher import Publisher

from tests.fast.core.support import ClockCase, on_clock
from tests.fast.dissemination.test_pub_sub import Node, consume


def bound_addresses(node: Node, topic: str) -> Set[str]:
    """The queues a publication to C{topic} on pubsub.topics reaches now (the memory broker's routing)."""
    return {q.name for q in node.bus.transport.broker.route(TOPICS, topic)}


class BindingTests(ClockCase):
    def shared_tmp(self) -> Any:
        if "_tmp" not in self.__dict__:
            self.__dict__["_tmp"] = self.tmp_path()
        return self.__dict__["_tmp"]

    async def node(self, url: str = "", **pubsub_options: Any) -> Node:
        n = Node(self.clock, url or f"memory://bind-{uuid.uuid4().hex}", self.shared_tmp(),
                 pubsub_options=pubsub_options, store=not url, node="n2" if url else "n1")
        await n.start()
        self.addCleanup(lambda: self.wait(n.stop()))
        return n

    @on_clock
    async def test_the_first_publication_binds_the_topic_to_every_matching_address(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex=r"^dataset\.", name="a")
        b = await node.call("subscribe", regex=r"sst", name="b")
        await node.call("subscribe", regex=r"^event\.", name="c")
        assert bound_addresses(node, "dataset.sst") == set()  # nothing bound before a publication
        inboxes = [await consume(node.bus, s["address"]) for s in (a, b)]
        result = await node.call("publish", topic="dataset.sst", message=1)
        assert result == {"topic": "dataset.sst", "addresses": 2, "unroutable": []}
        assert bound_addresses(node, "dataset.sst") == {a["address"], b["address"]}
        stored = await node.bus.call("attribute_store", "get", key=TOPIC_KEY + _digest("dataset.sst"))
        assert stored == {"topic": "dataset.sst"}
        counters = await node.call("counters")
        assert (counters["topics_bound"], counters["topics"], counters["publications"]) == (1, 1, 1)
        await node.call("publish", topic="dataset.sst", message=2)
        await self.advance_until(lambda: all(len(i.messages) == 2 for i in inboxes))
        await self.advance(0.2)
        assert [[m.json()["message"] for m in i.messages] for i in inboxes] == [[1, 2], [1, 2]]
        assert (await node.call("counters"))["topics_bound"] == 1  # bound once

    @on_clock
    async def test_a_publication_goes_in_one_publish_to_pubsub_topics(self) -> None:
        node = await self.node()
        for name in "abc":
            await node.call("subscribe", regex="x", name=name)
        await node.call("publish", topic="x", message=0)  # binds
        sent: List[Any] = []
        real = node.bus.transport.publish
        node.bus.transport.publish = lambda *a, **k: sent.append((a[:2], k)) or real(*a, **k)  # type: ignore
        await node.call("publish", topic="x", message=1)
        assert [s for s in sent if s[0][0] == TOPICS] == [((TOPICS, "x"), {"mandatory": True})]

    @on_clock
    async def test_subscribe_binds_the_known_topics_it_matches_before_answering(self) -> None:
        node = await self.node()
        await node.call("subscribe", regex=".", name="first")
        for topic in ("dataset.a", "dataset.b", "event.c"):
            await node.call("publish", topic=topic, message=0)
        new = await node.call("subscribe", regex=r"^dataset\.a$|^event", name="new")
        # no turn of the clock between the answer and the check
        assert new["address"] in bound_addresses(node, "dataset.a")
        assert new["address"] in bound_addresses(node, "event.c")
        assert new["address"] not in bound_addresses(node, "dataset.b")
        # the regex changed: unbound from what it no longer matches, bound to what it now does
        await node.call("subscribe", regex=r"^dataset\.b$", name="new")
        assert new["address"] not in bound_addresses(node, "dataset.a")
        assert new["address"] not in bound_addresses(node, "event.c")
        assert new["address"] in bound_addresses(node, "dataset.b")
        publisher = Publisher(node.bus)
        inbox = await consume(node.bus, new["address"])
        assert (await publisher.publish("dataset.b", 7))["via"] == "exchange"
        assert (await publisher.publish("dataset.a", 8))["via"] == "exchange"  # reaches "first" only now
        await self.advance_until(lambda: len(inbox.messages) == 1)
        await self.advance(0.2)
        assert [m.json()["message"] for m in inbox.messages] == [7]

    @on_clock
    async def test_unsubscribe_removes_its_bindings_with_its_address(self) -> None:
        node = await self.node()
        keep = await node.call("subscribe", regex="x", name="keep")
        gone = await node.call("subscribe", regex="x", name="gone")
        await node.call("publish", topic="x", message=0)
        assert bound_addresses(node, "x") == {keep["address"], gone["address"]}
        await node.call("unsubscribe", name="gone")
        assert bound_addresses(node, "x") == {keep["address"]}

    @on_clock
    async def test_the_least_recently_published_topic_is_unbound_beyond_max_topics(self) -> None:
        node = await self.node(max_topics=2)
        sub = await node.call("subscribe", regex="^t", name="s")
        inbox = await consume(node.bus, sub["address"])
        for topic in ("t1", "t2", "t1", "t3"):  # t1 published again after t2: t2 is the oldest
            await node.call("publish", topic=topic, message=topic)
        assert list(node.pubsub.topics) == ["t1", "t3"]
        assert bound_addresses(node, "t2") == set()
        assert topic_exchange("t2") not in node.bus.transport.broker.exchanges  # its fanout went, whole
        assert await node.bus.call("attribute_store", "query", regex="^" + TOPIC_KEY) == {
            TOPIC_KEY + _digest(t): {"topic": t} for t in ("t1", "t3")}
        counters = await node.call("counters")
        assert (counters["topics_bound"], counters["topics_unbound"], counters["topics"]) == (3, 1, 2)
        # t2 published one hop: returned whole, posted to pub_sub, bound again (t1 now the oldest, unbound)
        publisher = Publisher(node.bus)
        assert (await publisher.publish("t2", "again"))["via"] == "pub_sub"
        await self.advance_until(lambda: len(inbox.messages) == 5)
        assert list(node.pubsub.topics) == ["t3", "t2"]
        assert (await publisher.publish("t2", "one hop"))["via"] == "exchange"
        await self.advance_until(lambda: len(inbox.messages) == 6)
        await self.advance(0.2)
        assert [m.json()["message"] for m in inbox.messages] == ["t1", "t2", "t1", "t3", "again", "one hop"]

    @on_clock
    async def test_an_unbound_topic_goes_through_pub_sub_then_one_hop(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex="^dataset", name="a")
        b = await node.call("subscribe", regex="sst", name="b")
        inboxes = [await consume(node.bus, s["address"]) for s in (a, b)]
        publisher = Publisher(node.bus)
        assert await publisher.publish("dataset.sst", 1) == {"topic": "dataset.sst", "via": "pub_sub"}
        await self.advance_until(lambda: bound_addresses(node, "dataset.sst") == {a["address"], b["address"]})
        for i in range(2, 5):
            assert (await publisher.publish("dataset.sst", i))["via"] == "exchange"
        assert (await publisher.publish("nobody.listens", 0))["via"] == "pub_sub"  # no subscriber: no binding
        await self.advance_until(lambda: all(len(i.messages) == 4 for i in inboxes))
        await self.advance(0.5)
        assert [[m.json()["message"] for m in i.messages] for i in inboxes] == [[1, 2, 3, 4]] * 2
        assert publisher.counts == {"exchange": 3, "pub_sub": 2}
        assert bound_addresses(node, "nobody.listens") == set()

    @on_clock
    async def test_a_topic_too_long_for_a_routing_key_goes_by_multicast(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex="^long", name="s")
        inbox = await consume(node.bus, sub["address"])
        topic = "long." + "é" * 130  # 265 UTF-8 bytes
        assert (await Publisher(node.bus).publish(topic, 1))["via"] == "pub_sub"
        assert (await node.call("publish", topic=topic, message=2))["unroutable"] == []
        await self.advance_until(lambda: len(inbox.messages) == 2)
        assert (await node.call("counters"))["topics"] == 0

    @on_clock
    async def test_a_publication_returned_to_pub_sub_is_multicast(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex="x", name="s")
        inbox = await consume(node.bus, sub["address"])
        await node.call("publish", topic="x", message=1)
        # the binding vanishes behind pub_sub's back (another instance unbound it)
        await node.bus.transport.unbind_exchange(topic_exchange("x"), TOPICS, "x")
        assert (await node.call("publish", topic="x", message=2))["unroutable"] == []
        await self.advance_until(lambda: len(inbox.messages) == 2)
        counters = await node.call("counters")
        assert (counters["returned"], counters["publications"], counters["delivered"]) == (1, 2, 2)
        await node.call("publish", topic="x", message=3)  # bound again
        assert bound_addresses(node, "x") == {sub["address"]}
        await self.advance_until(lambda: len(inbox.messages) == 3)

    @on_clock
    async def test_not_confirmed_is_published_again_then_dead_lettered(self) -> None:
        node = await self.node()
        dead: List[Message] = []
        await node.bus.consume("pub_sub.dead", dead.append)
        sub = await node.call("subscribe", regex="x", name="s")
        inbox = await consume(node.bus, sub["address"])
        await node.call("publish", topic="x", message=0)
        real, failures = node.bus.send_to, [2]

        def send_to(exchange: str, key: str, message: Message, **kw: Any) -> defer.Deferred:
            if failures[0] > 0:
                failures[0] -= 1
                return defer.fail(ConnectionLost("link lost before the confirm"))
            return real(exchange, key, message, **kw)

        node.bus.send_to = send_to  # type: ignore[method-assign]
        result = node.call("publish", topic="x", message=1)
        await self.advance_until(lambda: result.called, timeout=30)
        await self.advance_until(lambda: len(inbox.messages) == 2)
        assert node.pubsub.stats["retried"] == 2 and node.pubsub.stats["dead"] == 0
        failures[0] = 1000
        result = node.call("publish", topic="x", message=2)
        await self.advance_until(lambda: result.called and len(dead) == 1, timeout=60)
        [letter] = dead
        assert letter.headers["addresses"] == [sub["address"]] and "ConnectionLost" in letter.headers[ERROR_HEADER]
        assert node.pubsub.stats["dead"] == 1

    @on_clock
    async def test_instances_share_topics_and_a_restart_keeps_them(self) -> None:
        node = await self.node()
        other = await self.node(url=node.url)
        await node.pubsub.subscribe(regex="^dataset", name="a")
        await node.pubsub.publish(topic="dataset.x", message=0)  # bound by n1
        await self.advance_until(lambda: "dataset.x" in other.pubsub.topics)  # told on pubsub.changed
        late = await other.pubsub.subscribe(regex=r"\.x$", name="late")  # on n2: bound to n1's topic
        assert late["address"] in bound_addresses(node, "dataset.x")
        await node.restart_pubsub()  # n1 reads the topics back from the store
        await node.pubsub.loaded()
        assert list(node.pubsub.topics) == ["dataset.x"]
        again = await node.pubsub.subscribe(regex="x$", name="after-restart")
        assert again["address"] in bound_addresses(node, "dataset.x")
        # a subscription made on n1 is bound by n2 too when it hears of it (idempotent)
        await self.advance_until(lambda: "after-restart" in other.pubsub.records)

    @on_clock
    async def test_a_deleted_then_made_again_address_is_bound_again(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex="x", name="a")
        b = await node.call("subscribe", regex="x", name="b")
        await node.call("publish", topic="x", message=0)
        await node.bus.transport.delete_queue(b["address"])  # an operator deletes it: its bindings go
        await self.advance(10.0)
        assert (await node.call("publish", topic="x", message=1))["unroutable"] == [b["address"]]
        inbox = await consume(node.bus, b["address"])  # the subscriber makes it again (listen, durable)
        await self.advance(10.0)  # the address book looks again
        assert (await node.call("publish", topic="x", message=2))["unroutable"] == []
        await self.advance_until(lambda: b["address"] in bound_addresses(node, "x"))
        assert bound_addresses(node, "x") == {a["address"], b["address"]}
        assert (await Publisher(node.bus).publish("x", 3))["via"] == "exchange"
        await self.advance_until(lambda: len(inbox.messages) == 1)
        await self.advance(0.2)
        # bound again before publication 2 went out: it got 2 as well
        assert [m.json()["message"] for m in inbox.messages] == [2, 3]

    @on_clock
    async def test_bad_input(self) -> None:
        node = await self.node()
        publisher = Publisher(node.bus)
        from ooidx.dissemination.pub_sub import InvalidTopic, MessageTooLarge
        for topic in ("", None, "a\x00b", "x" * 1025):
            with self.assertRaises(InvalidTopic):
                await publisher.publish(topic, 1)
        with self.assertRaises(MessageTooLarge):
            await publisher.publish("x", {"big": "y" * (1 << 20)})
        with self.assertRaises(ValueError):
            Node(self.clock, node.url, self.shared_tmp(), store=False, pubsub_options={"max_topics": 0})

    @on_clock
    async def test_subscribing_again_unchanged_binds_again(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex="x", name="s")
        await node.call("publish", topic="x", message=0)
        # deleted and made again unnoticed (no publication in between): its bindings are gone
        await node.bus.transport.delete_queue(sub["address"])
        inbox = await consume(node.bus, sub["address"])
        assert bound_addresses(node, "x") == set()
        await node.call("subscribe", regex="x", name="s")  # the subscriber's start
        assert bound_addresses(node, "x") == {sub["address"]}
        assert (await Publisher(node.bus).publish("x", 1))["via"] == "exchange"
        await self.advance_until(lambda: len(inbox.messages) == 1)

    @on_clock
    async def test_a_start_binds_what_a_stopped_instance_left_unbound(self) -> None:
        from ooidx.dissemination import pub_sub as module

        node = await self.node()
        subs = [await node.call("subscribe", regex=regex, name=f"s{i}")
                for i, regex in enumerate(["^a", "^b", "."])]
        for topic in ("a1", "b1", "c1"):
            await node.call("publish", topic=topic, message=0)
        for s in subs:  # bindings lost behind pub_sub's back
            for topic in ("a1", "b1", "c1"):
                await node.bus.transport.unbind_queue(s["address"], topic_exchange(topic), "")
        self.patch(module, "RECONCILE_PER_SUBSCRIPTION", 1)  # the Router pass per topic
        await node.restart_pubsub()
        await node.pubsub.loaded()
        await self.advance(0.1)
        assert bound_addresses(node, "a1") == {subs[0]["address"], subs[2]["address"]}
        assert bound_addresses(node, "b1") == {subs[1]["address"], subs[2]["address"]}
        assert bound_addresses(node, "c1") == {subs[2]["address"]}

    @on_clock
    async def test_an_address_missing_when_its_topic_is_bound_is_bound_once_it_is_back(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex="x", name="a")
        b = await node.call("subscribe", regex="x", name="b")
        await node.bus.transport.delete_queue(b["address"])
        node.bus.forget_addresses([b["address"]])
        assert (await node.call("publish", topic="x", message=0))["unroutable"] == [b["address"]]
        assert bound_addresses(node, "x") == {a["address"]}
        inbox = await consume(node.bus, b["address"])  # made again by its subscriber
        await self.advance(10.0)
        await node.call("publish", topic="x", message=1)
        assert bound_addresses(node, "x") == {a["address"], b["address"]}
        await self.advance_until(lambda: len(inbox.messages) == 1)

    @on_clock
    async def test_a_topic_being_bound_is_not_the_one_unbound_to_make_room(self) -> None:
        node = await self.node(max_topics=1)
        await node.call("subscribe", regex=".", name="s")
        first = node.pubsub._ensure("t1")
        second = node.pubsub._ensure("t2")  # at once: t1 is still being bound (its store write)
        assert "t1" in node.pubsub._ensuring
        await first
        await second
        # t1 was left alone (a half-bound topic unbound would fail its binding): one over the limit, for now
        assert list(node.pubsub.topics) == ["t1", "t2"]
        assert bound_addresses(node, "t1") == bound_addresses(node, "t2") == {"pubsub.sub.s"}
        await node.call("publish", topic="t3", message=0)  # the next binding makes room: both oldest go
        assert list(node.pubsub.topics) == ["t3"]
        assert bound_addresses(node, "t1") == bound_addresses(node, "t2") == set()

    @on_clock
    async def test_a_topic_learned_at_a_reload_gets_the_matching_subscriptions(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex="^t", name="s")
        # another instance bound t9 (with no subscriber of its own) and its pubsub.changed was missed
        await node.bus.call("attribute_store", "set", key=TOPIC_KEY + _digest("t9"), value={"topic": "t9"})
        transport = node.bus.transport
        await transport.declare_exchange(topic_exchange("t9"), "fanout")
        await transport.bind_exchange(topic_exchange("t9"), TOPICS, "t9")
        assert "t9" not in node.pubsub.topics
        await node.pubsub._reload()  # what the periodic reload (every 60 s) does
        assert "t9" in node.pubsub.topics
        await self.advance_until(lambda: bound_addresses(node, "t9") == {sub["address"]})
        # a malformed topic announcement changes nothing
        await node.bus.send("pubsub.changed", Message.of_json({"topic": "", "bound": True}, persistent=False))
        await self.advance(0.1)
        assert "" not in node.pubsub.topics
