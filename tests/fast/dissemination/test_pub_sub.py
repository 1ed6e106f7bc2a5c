"""pub_sub (with the attribute store) on the bus: durable
regex subscriptions, routing, publish exactly once per subscription (one
multicast), addresses gone, retries and dead letters, restarts,
several instances, bad input. memory:// on a Clock (the attribute store's SQLite
threads run at once: see tests.fast.core.support.threadless); the RabbitMQ
test stays in tests/ooidx/test_pub_sub.py."""
from __future__ import annotations

import json
import uuid
from typing import Any, List

from twisted.internet import defer

import magnet
from magnet import ConnectionLost, Message, MulticastError, MulticastResult, RemoteError, rpc
from magnet.bus import ERROR_HEADER, ORIGIN_HEADER

from ooidx.attribute_store import AttributeStore
from ooidx.dissemination.pub_sub import CHANGED, KEY_PREFIX, PUBLICATION, PubSub

from tests.fast.core.support import ClockCase, cases, expand, on_clock


class Node:
    """A bus with any of: the attribute store, pub_sub."""

    def __init__(self, clock: Any, url: str, tmp_path: Any, *, store: bool = True, pubsub: bool = True,
                 node: str = "n1", table: str = "attrs", pubsub_options: Any = None, **bus_options: Any) -> None:
        self.clock = clock
        self.url = url
        self.tmp_path = tmp_path
        self.table = table
        self.node = node
        self.pubsub_options = dict(pubsub_options or {})
        self.bus = magnet.connect(url, clock, node=node, rpc_timeout=10, **bus_options)
        self.store = self.make_store() if store else None
        self.pubsub = self.make_pubsub() if pubsub else None

    def make_store(self) -> AttributeStore:
        return AttributeStore("attribute_store", self.bus, node=self.node,
                              url=str(self.tmp_path / "attributes.sqlite3"), table=self.table, clock=self.clock)

    def make_pubsub(self) -> PubSub:
        return PubSub("pub_sub", self.bus, node=self.node, clock=self.clock, **self.pubsub_options)

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


async def error_of(d: defer.Deferred) -> str:
    try:
        result = await d
    except RemoteError as e:
        return e.remote_type
    raise AssertionError(f"expected an error, got {result!r}")


@expand
class PubSubTests(ClockCase):
    def shared_tmp(self) -> Any:
        """This test's directory (the node's attribute store is in it)."""
        if "_tmp" not in self.__dict__:
            self.__dict__["_tmp"] = self.tmp_path()
        return self.__dict__["_tmp"]

    async def node(self, **pubsub_options: Any) -> "Node":
        n = Node(self.clock, f"memory://pubsub-{uuid.uuid4().hex}", self.shared_tmp(), pubsub_options=pubsub_options)
        await n.start()
        self.addCleanup(lambda: self.wait(n.stop()))
        return n

    @on_clock
    async def test_subscribe_gives_a_durable_address_and_the_same_one_again(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex=r"^dataset\.", name="persister")
        assert sub == {"name": "persister", "regex": r"^dataset\.", "address": "pubsub.sub.persister"}
        again = await node.call("subscribe", regex=r"^dataset\.", name="persister")
        assert again == sub
        anonymous = await node.call("subscribe", regex="x")
        assert anonymous["address"] == "pubsub.sub." + anonymous["name"] and anonymous["name"] != "persister"
        record = await node.bus.call("attribute_store", "get", key=KEY_PREFIX + "persister")
        assert record["regex"] == r"^dataset\." and record["address"] == sub["address"]
        assert isinstance(record["created"], float)
        listed = await node.call("list")
        assert [s["name"] for s in listed] == sorted(["persister", anonymous["name"]])
        assert listed[[s["name"] for s in listed].index("persister")] == sub

    @on_clock
    async def test_route_and_replace_and_unsubscribe(self) -> None:
        node = await self.node()
        await node.call("subscribe", regex=r"^dataset\.", name="all")
        await node.call("subscribe", regex=r"sst", name="sst")
        await node.call("subscribe", regex=r"^event\.", name="events")
        assert await node.call("route", topic="dataset.sst") == ["pubsub.sub.all", "pubsub.sub.sst"]
        assert await node.call("route", topic="event.saved.ctd") == ["pubsub.sub.events"]
        assert await node.call("route", topic="nothing") == []
        created = (await node.bus.call("attribute_store", "get", key=KEY_PREFIX + "sst"))["created"]
        await node.call("subscribe", regex=r"^nope$", name="sst")  # same name, new regex: replaced
        assert await node.call("route", topic="dataset.sst") == ["pubsub.sub.all"]
        assert (await node.bus.call("attribute_store", "get", key=KEY_PREFIX + "sst"))["created"] == created
        assert await node.call("unsubscribe", name="all") is True
        assert await node.call("unsubscribe", name="all") is False
        assert await node.call("route", topic="dataset.sst") == []
        assert [s["name"] for s in await node.call("list")] == ["events", "sst"]

    @cases("regex, expected", [
        (r"(a)\1", "InvalidRegex"),
        (r"(?=dataset)", "InvalidRegex"),
        ("[", "InvalidRegex"),
        ("a" * 5000, "InvalidRegex"),
        (r"((a{100}){100}){100}", "InvalidRegex"),
        (42, "InvalidRegex"),
    ])
    @on_clock
    async def test_invalid_regex_refused_at_subscribe(self, regex, expected) -> None:
        node = await self.node()
        assert await error_of(node.call("subscribe", regex=regex, name="bad")) == expected
        assert await node.call("list") == []

    @cases("name", ["", "a" * 65, "a/b", "a b", "é", 7])
    @on_clock
    async def test_invalid_subscription_name_refused(self, name) -> None:
        node = await self.node()
        assert await error_of(node.call("subscribe", regex="x", name=name)) == "InvalidName"

    @on_clock
    async def test_pathological_regex_is_harmless(self) -> None:
        node = await self.node()
        await node.call("subscribe", regex=r"(a+)+$", name="evil1")
        await node.call("subscribe", regex=r"(a|a)*b", name="evil2")
        topic = "a" * 1000 + "!"
        assert await node.call("route", topic=topic) == []
        assert await node.call("route", topic="a" * 1000) == ["pubsub.sub.evil1"]
        assert await error_of(node.call("route", topic="a" * 2000)) == "InvalidTopic"

    @cases("topic", ["", None, 5, "a\x00b"])
    @on_clock
    async def test_bad_topics_refused(self, topic) -> None:
        node = await self.node()
        assert await error_of(node.call("route", topic=topic)) == "InvalidTopic"
        assert await error_of(node.call("publish", topic=topic, message={})) == "InvalidTopic"

    @on_clock
    async def test_message_too_large_or_not_json_refused(self) -> None:
        node = await self.node()
        assert await error_of(node.call("publish", topic="t", message="x" * (1 << 20))) == "MessageTooLarge"

    @on_clock
    async def test_publish_reaches_each_matching_subscription_exactly_once(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex=r"^dataset\.", name="a")
        b = await node.call("subscribe", regex=r"sst", name="b")      # overlaps a on dataset.sst
        c = await node.call("subscribe", regex=r"^event\.", name="c")  # does not match
        inboxes = {s["name"]: await consume(node.bus, s["address"]) for s in (a, b, c)}
        result = await node.call("publish", topic="dataset.sst", message={"v": 1})
        assert result == {"topic": "dataset.sst", "addresses": 2, "unroutable": []}
        await self.advance_until(lambda: len(inboxes["a"].messages) == 1 and len(inboxes["b"].messages) == 1)
        await self.advance(0.2)
        assert [len(inboxes[n].messages) for n in "abc"] == [1, 1, 0]
        m = inboxes["a"].messages[0]
        assert m.type == PUBLICATION and m.headers == {"topic": "dataset.sst"}
        assert m.content_type == "application/json"
        assert m.json() == {"topic": "dataset.sst", "message": {"v": 1}}
        assert inboxes["b"].messages[0].body == m.body
        assert (await node.call("publish", topic="nothing.matches", message=None))["addresses"] == 0

    @on_clock
    async def test_many_publications_exactly_once_with_two_pub_sub_instances(self) -> None:
        node = await self.node()
        tmp_path = self.shared_tmp()
        other = Node(self.clock, node.url, tmp_path, store=False, node="n2")
        await other.start()
        try:
            subs = [await node.call("subscribe", regex=regex, name=f"s{i}")
                    for i, regex in enumerate([r"^dataset\.", r"\.sst", r"^dataset\.sst$"])]
            await self.advance_until(lambda: len(other.pubsub.records) == 3)
            inboxes = [await consume(node.bus, s["address"]) for s in subs]
            for i in range(30):
                await node.call("publish", topic="dataset.sst", message=i)
            await self.advance_until(lambda: all(len(inbox.messages) >= 30 for inbox in inboxes))
            await self.advance(0.2)
            for inbox in inboxes:
                assert sorted(m.json()["message"] for m in inbox.messages) == list(range(30))
            shares = (node.pubsub.stats["publications"], other.pubsub.stats["publications"])
            assert sum(shares) == 30 and all(shares), shares  # competing consumers, each publication once
        finally:
            await other.stop()

    @on_clock
    async def test_a_message_published_while_the_subscriber_is_away_is_kept(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex=r"^dataset\.", name="away")
        inbox = await consume(node.bus, sub["address"])
        await node.call("publish", topic="dataset.one", message=1)
        await self.advance_until(lambda: len(inbox.messages) == 1)
        await inbox.listener.subscription.cancel()  # the subscriber goes away (its queue stays)
        await node.call("publish", topic="dataset.two", message=2)
        await node.call("publish", topic="dataset.three", message=3)
        await self.advance(0.1)
        again = await node.call("subscribe", regex=r"^dataset\.", name="away")  # it comes back
        assert again["address"] == sub["address"]
        back = await consume(node.bus, again["address"])
        await self.advance_until(lambda: len(back.messages) == 2)
        assert back.topics() == ["dataset.two", "dataset.three"]

    @on_clock
    async def test_unsubscribe_stops_delivery(self) -> None:
        node = await self.node()
        keep = await node.call("subscribe", regex="x", name="keep")
        inbox = await consume(node.bus, keep["address"])
        await node.call("subscribe", regex="x", name="gone")
        assert await node.call("unsubscribe", name="gone") is True
        assert (await node.call("publish", topic="x", message=1))["addresses"] == 1
        await self.advance_until(lambda: len(inbox.messages) == 1)

    @on_clock
    async def test_an_address_gone_is_reported_and_the_others_served(self) -> None:
        node = await self.node()
        a = await node.call("subscribe", regex="x", name="a")
        b = await node.call("subscribe", regex="x", name="b")
        inbox_a = await consume(node.bus, a["address"])
        assert (await node.call("publish", topic="x", message=1))["unroutable"] == []
        # b's queue vanishes behind pub_sub's back (deleted by an operator, elsewhere)
        operator = magnet.connect(node.url, self.clock)
        operator.startService()
        await operator.transport.delete_queue(b["address"])
        await operator.stopService()
        # noticed within the bus's address_recheck (10 s); until then the copy for b dies with its queue
        assert (await node.call("publish", topic="x", message=2))["unroutable"] == []
        await self.advance(10.0)
        for i in range(3, 5):
            result = await node.call("publish", topic="x", message=i)
            assert result == {"topic": "x", "addresses": 2, "unroutable": [b["address"]]}
        await self.advance_until(lambda: len(inbox_a.messages) == 4)
        assert [m.json()["message"] for m in inbox_a.messages] == [1, 2, 3, 4]
        counters = await node.call("counters")
        assert counters["unroutable"] == 2 and counters["retried"] == 0 and counters["dead"] == 0
        assert counters["publications"] == 4 and counters["delivered"] == 6

    def fail_multicasts(self, node: "Node", address: str, times: int) -> List[int]:
        """Make pub_sub's multicasts fail for C{address} (not confirmed) C{times} times."""
        real = node.bus.multicast
        calls: List[int] = []

        def multicast(addresses: Any, message: Message, **kw: Any) -> defer.Deferred:
            calls.append(len(addresses))
            if address not in addresses or len([c for c in calls]) > times:
                return real(addresses, message, **kw)
            others = [a for a in addresses if a != address]

            def failed(result: MulticastResult) -> None:
                raise MulticastError({address: "ConnectionLost: link lost before the confirm"}, result)

            if not others:
                return defer.fail(MulticastError({address: "ConnectionLost: link lost"}, MulticastResult()))
            return real(others, message, **kw).addCallback(failed)

        node.bus.multicast = multicast  # type: ignore[method-assign]
        return calls

    @on_clock
    async def test_an_unconfirmed_address_is_retried_alone(self) -> None:
        node = await self.node(bindings=False)  # the multicast path (topics too long to bind take it)
        a = await node.call("subscribe", regex="x", name="a")
        b = await node.call("subscribe", regex="x", name="b")
        inbox_a, inbox_b = await consume(node.bus, a["address"]), await consume(node.bus, b["address"])
        calls = self.fail_multicasts(node, b["address"], times=2)
        result = node.call("publish", topic="x", message=1)
        await self.advance_until(lambda: result.called, timeout=30)
        assert (await result)["unroutable"] == []
        assert calls == [2, 1, 1]  # both, then b alone, twice
        await self.advance_until(lambda: len(inbox_a.messages) == 1 and len(inbox_b.messages) == 1)
        await self.advance(1.0)
        assert (len(inbox_a.messages), len(inbox_b.messages)) == (1, 1)
        assert node.pubsub.stats["retried"] == 2 and node.pubsub.stats["dead"] == 0

    @on_clock
    async def test_an_address_never_confirmed_is_dead_lettered_after_the_retry_limit(self) -> None:
        node = await self.node(bindings=False)  # the multicast path (topics too long to bind take it)
        dead: List[Message] = []
        await node.bus.consume("pub_sub.dead", dead.append)
        a = await node.call("subscribe", regex="x", name="a")
        b = await node.call("subscribe", regex="x", name="b")
        inbox_a = await consume(node.bus, a["address"])
        calls = self.fail_multicasts(node, b["address"], times=1000)
        result = node.call("publish", topic="x", message={"v": 1})
        await self.advance_until(lambda: result.called and len(dead) == 1, timeout=30)
        assert (await result)["addresses"] == 2
        assert calls == [2] + [1] * node.bus.retry_limit  # then given up: not forever
        [letter] = dead
        assert letter.headers["addresses"] == [b["address"]] and letter.headers[ORIGIN_HEADER] == "pub_sub"
        assert "ConnectionLost" in letter.headers[ERROR_HEADER]
        assert letter.json() == {"topic": "x", "message": {"v": 1}}
        assert len(inbox_a.messages) == 1
        assert node.pubsub.stats["dead"] == 1

    @on_clock
    async def test_more_subscriptions_than_one_multicast_takes(self) -> None:
        from magnet import multicast as mc
        from ooidx.dissemination import pub_sub as pub_sub_module

        node = await self.node(bindings=False)  # the multicast path (topics too long to bind take it)
        subs = [await node.call("subscribe", regex="x", name=f"m{i}") for i in range(5)]
        inboxes = [await consume(node.bus, s["address"]) for s in subs]
        self.patch(mc, "MAX_ADDRESSES", 2)  # as if 10,000 were 2
        self.patch(pub_sub_module, "MAX_ADDRESSES", 2)
        real, sizes = node.bus.multicast, []
        node.bus.multicast = lambda addresses, message, **kw: sizes.append(len(addresses)) or real(  # type: ignore
            addresses, message, **kw)
        result = await node.call("publish", topic="x", message=1)
        assert result == {"topic": "x", "addresses": 5, "unroutable": []}
        assert sizes == [2, 2, 1]
        await self.advance_until(lambda: all(len(inbox.messages) == 1 for inbox in inboxes))

    @on_clock
    async def test_no_link_for_the_existence_check_is_retried_too(self) -> None:
        node = await self.node(bindings=False)  # the multicast path (topics too long to bind take it)
        a = await node.call("subscribe", regex="x", name="a")
        inbox_a = await consume(node.bus, a["address"])
        node.bus.forget_addresses([a["address"]])
        real = node.bus.transport.existing_queues
        failures = [ConnectionLost("link lost")]
        node.bus.transport.existing_queues = (  # type: ignore[method-assign]
            lambda names: defer.fail(failures.pop()) if failures else real(names))
        result = node.call("publish", topic="x", message=1)
        await self.advance_until(lambda: result.called, timeout=30)
        assert (await result)["unroutable"] == []
        await self.advance_until(lambda: len(inbox_a.messages) == 1)
        assert node.pubsub.stats["retried"] == 1

    @on_clock
    async def test_a_restarted_pub_sub_still_routes(self) -> None:
        node = await self.node()
        sub = await node.call("subscribe", regex=r"^dataset\.", name="durable")
        inbox = await consume(node.bus, sub["address"])
        await node.restart_pubsub()
        assert node.pubsub.records == {} or "durable" in node.pubsub.records
        assert await node.call("route", topic="dataset.x") == [sub["address"]]
        await node.call("publish", topic="dataset.x", message="after restart")
        await self.advance_until(lambda: len(inbox.messages) == 1)

    @on_clock
    async def test_a_restarted_store_and_pub_sub_keep_subscriptions(self) -> None:
        tmp_path = self.shared_tmp()
        url = f"memory://pubsub-{uuid.uuid4().hex}"
        first = Node(self.clock, url, tmp_path)
        await first.start()
        await first.call("subscribe", regex="a", name="one")
        await first.stop()
        second = Node(self.clock, url, tmp_path)
        await second.start()
        try:
            assert await second.call("route", topic="a") == ["pubsub.sub.one"]
        finally:
            await second.stop()

    @on_clock
    async def test_two_pub_sub_instances_see_each_others_subscriptions(self) -> None:
        node = await self.node()
        tmp_path = self.shared_tmp()
        other = Node(self.clock, node.url, tmp_path, store=False, node="n2")
        await other.start()
        try:
            await node.pubsub.subscribe(regex=r"^dataset\.", name="from-n1")
            await other.pubsub.subscribe(regex=r"^event\.", name="from-n2")
            for ps in (node.pubsub, other.pubsub):
                await self.advance_until(lambda: set(ps.records) == {"from-n1", "from-n2"})
                assert await ps.route(topic="dataset.x") == ["pubsub.sub.from-n1"]
                assert await ps.route(topic="event.x") == ["pubsub.sub.from-n2"]
            await node.pubsub.unsubscribe(name="from-n2")
            await self.advance_until(lambda: set(other.pubsub.records) == {"from-n1"})
            assert await other.pubsub.route(topic="event.x") == []
        finally:
            await other.stop()

    @on_clock
    async def test_operations_wait_for_the_first_load(self) -> None:
        tmp_path = self.shared_tmp()
        url = f"memory://pubsub-{uuid.uuid4().hex}"
        seed = Node(self.clock, url, tmp_path, pubsub=False)
        await seed.start()
        await seed.bus.call("attribute_store", "set", key=KEY_PREFIX + "early",
                            value={"name": "early", "regex": "x", "address": "pubsub.sub.early", "created": 1.0})
        await seed.bus.call("attribute_store", "set", key=KEY_PREFIX + "broken", value={"name": "other"})
        await seed.store.stopService()  # the store is down while pub_sub starts
        late = Node(self.clock, url, tmp_path, store=False, node="n2")
        late.pubsub.retry_delay = 0.05
        late.pubsub.store_timeout = 0.2
        late.bus.startService()
        await late.pubsub.start()
        routed = late.call("route", topic="x")
        await self.advance(0.3)
        assert not routed.called
        seed.store = seed.make_store()
        await seed.store.start()
        assert await routed == ["pubsub.sub.early"]  # the malformed record is left out
        await late.stop()
        await seed.stop()

    @on_clock
    async def test_malformed_requests_are_answered_or_dead_lettered(self) -> None:
        node = await self.node()
        replies = await node.bus.listen()
        dead: List[Message] = []
        await node.bus.consume("pub_sub.dead", dead.append)
        bad = [
            Message(body=b"{not json", content_type="application/json", type=rpc.CALL,
                    headers={rpc.OP_HEADER: "route"}, reply_to=replies.address, correlation_id="1"),
            Message(body=b"{}", content_type="application/json", type=rpc.CALL, reply_to=replies.address,
                    correlation_id="2"),  # no op header
            Message(body=b"[1, 2]", content_type="application/json", type=rpc.CALL,
                    headers={rpc.OP_HEADER: "route"}, reply_to=replies.address, correlation_id="3"),
            Message(body=b'{"topic": "x", "extra": 1}', content_type="application/json", type=rpc.CALL,
                    headers={rpc.OP_HEADER: "route"}, reply_to=replies.address, correlation_id="4"),
        ]
        for m in bad:
            await node.bus.send("pub_sub", m)
        errors = {}
        for _ in bad:
            reply = await replies.get(timeout=5)
            with self.assertRaises(RemoteError) as e:
                rpc.decode_reply(reply)
            errors[reply.correlation_id] = e.exception.remote_type
        assert errors == {"1": "BadMessage", "2": "BadMessage", "3": "BadMessage", "4": "BadArguments"}
        # with nowhere to answer: dead-lettered
        await node.bus.send("pub_sub", Message(body=b"\xff\xfe", content_type="application/json", type=rpc.CALL,
                                               headers={rpc.OP_HEADER: "publish"}))
        await self.advance_until(lambda: len(dead) == 1)
        # the consumer keeps running
        assert await node.call("route", topic="x") == []

    @on_clock
    async def test_malformed_changed_message_reloads_everything(self) -> None:
        node = await self.node()
        await node.bus.call("attribute_store", "set", key=KEY_PREFIX + "sneaky",
                            value={"name": "sneaky", "regex": "x", "address": "pubsub.sub.sneaky", "created": 1.0})
        await node.bus.send(CHANGED, Message(body=b"not json", content_type="application/json"), mandatory=False)
        await self.advance_until(lambda: "sneaky" in node.pubsub.records)
        assert await node.call("route", topic="x") == ["pubsub.sub.sneaky"]

    @on_clock
    async def test_ooidx_subscriptions_lists_them(self) -> None:
        node = await self.node()
        import io

        from ooidx import cli

        await node.call("subscribe", regex=r"^dataset\.", name="persister")
        await node.call("subscribe", regex=r"^event\.saved\.", name="west-coast")
        client = cli.BrokerClient(node.bus, timeout=2)

        async def run(*argv: str) -> tuple:
            out, err = io.StringIO(), io.StringIO()
            args = cli.parser().parse_args(list(argv))
            await cli.COMMANDS["subscriptions"].run(cli.Context(args, client, out, err))
            return out.getvalue(), err.getvalue()

        out, err = await run("subscriptions")
        lines = out.splitlines()
        assert lines[0].split() == ["NAME", "REGEX", "ADDRESS"]
        assert lines[1].split() == ["persister", r"^dataset\.", "pubsub.sub.persister"]
        assert lines[2].split() == ["west-coast", r"^event\.saved\.", "pubsub.sub.west-coast"]
        assert "user_pub_sub" in err  # not running on this bus: noted, not fatal
        out, _ = await run("subscriptions", "--json", "--no-people")
        assert json.loads(out) == {"pub_sub": await node.call("list"), "people": []}


class PubSubStopTests(ClockCase):
    def test_a_message_that_is_not_json_is_refused(self) -> None:
        from ooidx.dissemination.pub_sub import MessageTooLarge, publication

        with self.assertRaises(MessageTooLarge) as e:
            publication("dataset.x", float("nan"))
        assert "not JSON" in str(e.exception)
        assert publication("dataset.x", {"a": 1}).json() == {"topic": "dataset.x", "message": {"a": 1}}

    @on_clock
    async def test_stopping_before_the_first_load_fails_the_waiting_operations(self) -> None:
        from ooidx.errors import DXError

        node = Node(self.clock, f"memory://pubsub-{uuid.uuid4().hex}", self.tmp_path(), store=False)
        node.pubsub.retry_delay = 0.05
        node.pubsub.store_timeout = 0.2
        node.bus.startService()
        await node.pubsub.start()
        waiting = node.pubsub.loaded()
        await self.advance(0.5)  # the store never answers: a retry is pending
        assert not waiting.called and node.pubsub._retry_call is not None
        await node.pubsub.stopService()
        with self.assertRaises(DXError) as e:
            await waiting
        assert str(e.exception) == "pub_sub is stopping"
        assert node.pubsub._retry_call is None
        cancelled = node.pubsub.loaded()
        cancelled.cancel()  # a waiter that gives up is forgotten
        assert node.pubsub._waiting == []
        with self.assertRaises(defer.CancelledError):
            await cancelled
        await node.bus.stopService()
