"""The distributor: one shared work queue on the fanout, each message sent
once to each listed address; gone addresses skipped; malformed messages
dead-lettered; failures retried for the failed addresses only."""
from __future__ import annotations

import uuid
from typing import Any, List

from twisted.internet import defer

import magnet
from magnet import Message, NotConfirmed
from magnet.bus import ERROR_HEADER

from ooidx.dissemination.distributor import (ADDRESSES_HEADER, DISTRIBUTE, DISTRIBUTOR, MAX_ADDRESSES_PER_MESSAGE, TYPE_HEADER,
                               WORK_QUEUE, Distributor, declare_work_queue, distribute, distribute_message, parse)
from magnet import BadMessage

from tests.fast.core.support import ClockCase, cases, expand, on_clock


class Env:
    def __init__(self, clock: Any, url: str = "", instances: int = 1) -> None:
        self.url = url or f"memory://distributor-{uuid.uuid4().hex}"
        self.bus = magnet.connect(self.url, clock, node="n1", rpc_timeout=5, send_timeout=2)
        self.distributor = Distributor("distributor", self.bus, node="n1", instances=instances, clock=clock)
        self.dead: List[Message] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield self.bus.when_connected()
        yield self.distributor.start()
        yield self.bus.consume(WORK_QUEUE + ".dead", self.dead.append)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.distributor.stopService()
        yield self.bus.stopService()

    @defer.inlineCallbacks
    def inbox(self) -> Any:
        got: List[Message] = []
        listener = yield self.bus.listen(got.append)
        return listener.address, got


@expand
class DistributorTests(ClockCase):
    async def env(self) -> "Env":
        e = Env(self.clock)
        await e.start()
        self.addCleanup(lambda: self.wait(e.stop()))
        return e

    def test_parse_and_build_round_trip(self) -> None:
        inner = Message.of_json({"x": 1}, type="publication", headers={"topic": "t"}, message_id="m1",
                                correlation_id="c1")
        out = distribute_message(["a", "b"], inner)
        assert out.type == DISTRIBUTE and out.headers[ADDRESSES_HEADER] == ["a", "b"]
        assert out.headers[TYPE_HEADER] == "publication"
        addresses, body = parse(out)
        assert addresses == ["a", "b"]
        assert body == inner

    @cases("message", [
        Message(body=b"x", type="other", headers={ADDRESSES_HEADER: ["a"]}),
        Message(body=b"x", type=DISTRIBUTE),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: "a"}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: {"a": 1}}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: ["a", 5]}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: [""]}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: ["x" * 300]}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: ["a"], TYPE_HEADER: 3}),
    ])
    def test_parse_refuses_malformed(self, message) -> None:
        with self.assertRaises(BadMessage):
            parse(message)

    @on_clock
    async def test_each_address_gets_the_body_once_with_its_properties(self) -> None:
        env = await self.env()
        boxes = [await env.inbox() for _ in range(3)]
        addresses = [a for a, _ in boxes]
        inner = Message(body=b"\x00raw bytes\xff", content_type="application/octet-stream", type="publication",
                        headers={"topic": "dataset.x", "extra": 7}, message_id="mid", correlation_id="cid")
        await distribute(env.bus, addresses + addresses[:1], inner)  # a repeated address still gets one copy
        await self.advance_until(lambda: all(len(got) == 1 for _, got in boxes))
        await self.advance(0.1)
        for _, got in boxes:
            assert len(got) == 1
            m = got[0]
            assert (m.body, m.content_type, m.type, dict(m.headers), m.message_id, m.correlation_id) == (
                inner.body, inner.content_type, "publication", {"topic": "dataset.x", "extra": 7}, "mid", "cid")

    @on_clock
    async def test_unroutable_address_is_skipped_and_the_others_served(self) -> None:
        env = await self.env()
        (a, got_a), (b, got_b) = await env.inbox(), await env.inbox()
        await distribute(env.bus, [a, "pubsub.sub.nobody-home", b], Message(body=b"hi", type="t"))
        await self.advance_until(lambda: len(got_a) == 1 and len(got_b) == 1)
        assert env.distributor.stats["unroutable"] == 1
        assert env.dead == []

    @on_clock
    async def test_a_long_address_list_is_split_and_still_exactly_once(self) -> None:
        env = await self.env()
        boxes = [await env.inbox() for _ in range(MAX_ADDRESSES_PER_MESSAGE + 20)]
        sent = await distribute(env.bus, [a for a, _ in boxes], Message(body=b"x"))
        assert sent == 2
        await self.advance_until(lambda: all(len(got) == 1 for _, got in boxes))
        assert env.distributor.stats["messages"] == 2

    @cases("bad", [
        Message(body=b"{not json at all", content_type="application/json", type=DISTRIBUTE),  # no header
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: "not-a-list"}),
        Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: [1, 2]}),
        Message(body=b"x", type="call", headers={"op": "ping"}),
    ])
    @on_clock
    async def test_malformed_messages_are_dead_lettered_and_the_consumer_keeps_running(self, bad) -> None:
        env = await self.env()
        await env.bus.send(DISTRIBUTOR, bad)
        await self.advance_until(lambda: len(env.dead) == 1)
        assert "BadMessage" in env.dead[0].headers[ERROR_HEADER]
        address, got = await env.inbox()
        await distribute(env.bus, [address], Message(body=b"still here"))
        await self.advance_until(lambda: len(got) == 1)

    @on_clock
    async def test_competing_instances_distribute_each_message_once(self) -> None:
        e1 = Env(self.clock, instances=2)
        await e1.start()
        e2 = Env(self.clock, e1.url)
        await e2.start()
        try:
            address, got = await e1.inbox()
            for i in range(40):
                await distribute(e1.bus, [address], Message(body=str(i).encode()))
            await self.advance_until(lambda: len(got) == 40)
            await self.advance(0.1)
            assert sorted(int(m.body) for m in got) == list(range(40))
            shares = (e1.distributor.stats["messages"], e2.distributor.stats["messages"])
            assert sum(shares) == 40 and all(shares)
        finally:
            await e2.stop()
            await e1.stop()

    @on_clock
    async def test_messages_wait_for_a_distributor_that_is_not_running_yet(self) -> None:
        url = f"memory://distributor-{uuid.uuid4().hex}"
        sender = magnet.connect(url, self.clock, node="s")
        sender.startService()
        await declare_work_queue(sender)
        got: List[Message] = []
        listener = await sender.listen(got.append)
        await distribute(sender, [listener.address], Message(body=b"early"))
        await self.advance(0.1)
        assert got == []
        e = Env(self.clock, url)
        await e.start()
        try:
            await self.advance_until(lambda: len(got) == 1)
        finally:
            await e.stop()
            await sender.stopService()

    @on_clock
    async def test_failed_addresses_are_retried_alone_then_dead_lettered(self) -> None:
        env = await self.env()
        (good, got_good), (flaky, got_flaky) = await env.inbox(), await env.inbox()
        real_send = env.bus.send
        failures = {"left": 2}

        def send(address: str, message: Message, **kw: Any) -> defer.Deferred:
            if address == flaky and failures["left"] > 0:
                failures["left"] -= 1
                return defer.fail(NotConfirmed("broker said no"))
            return real_send(address, message, **kw)

        env.bus.send = send  # type: ignore[method-assign]
        await distribute(env.bus, [good, flaky], Message(body=b"m"))
        await self.advance_until(lambda: len(got_good) == 1 and len(got_flaky) == 1)
        await self.advance(0.1)
        assert len(got_good) == 1 and len(got_flaky) == 1  # the good one is not sent twice
        assert env.distributor.stats["retried"] == 2
        # always failing: dead-lettered after the retry limit, with only that address
        failures["left"] = 100
        await distribute(env.bus, [good, flaky], Message(body=b"n"))
        await self.advance_until(lambda: len(env.dead) == 1)
        assert env.dead[0].headers[ADDRESSES_HEADER] == [flaky]
        assert len(got_good) == 2


class ParseTests(ClockCase):
    def test_addresses_and_type_as_bytes_or_a_tuple(self) -> None:
        message = Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: (b"a", "b"), TYPE_HEADER: b"pub"})
        addresses, inner = parse(message)
        assert addresses == ["a", "b"] and inner.type == "pub"

    def test_an_address_that_is_not_utf8_is_refused(self) -> None:
        with self.assertRaises(BadMessage) as e:
            parse(Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: [b"\xff"]}))
        assert "not UTF-8" in str(e.exception)

    @on_clock
    async def test_distribute_fails_with_the_send_s_own_failure(self) -> None:
        bus = magnet.connect(f"memory://distributor-{uuid.uuid4().hex}", self.clock, send_timeout=1)
        self.patch(bus, "send", lambda *a, **k: defer.fail(NotConfirmed("the broker said no")))
        with self.assertRaises(NotConfirmed):
            await distribute(bus, ["a"] * (MAX_ADDRESSES_PER_MESSAGE + 1), Message(body=b"x"))
