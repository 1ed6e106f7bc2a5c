"""The distributor over a real RabbitMQ; the rest (on memory:// with a Clock) is
in the fast tier, tests/fast/dissemination/test_distributor.py."""
from __future__ import annotations

import uuid
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import magnet
from magnet import Message

from tests.ooidx.waiting import eventually
from ooidx.dissemination.distributor import ADDRESSES_HEADER, DISTRIBUTE, DISTRIBUTOR, WORK_QUEUE, Distributor, distribute


class Env:
    def __init__(self, url: str = "", instances: int = 1) -> None:
        self.url = url or f"memory://distributor-{uuid.uuid4().hex}"
        self.bus = magnet.connect(self.url, reactor, node="n1", rpc_timeout=5, send_timeout=2)
        self.distributor = Distributor("distributor", self.bus, node="n1", instances=instances, clock=reactor)
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


@pytest.mark.rabbitmq
@pytest_twisted.ensureDeferred
async def test_distribute_over_rabbitmq(broker_url: str) -> None:
    e = Env(broker_url)
    await e.start()
    try:
        boxes = [await e.inbox() for _ in range(5)]
        addresses = [a for a, _ in boxes] + ["pubsub.sub.gone-" + uuid.uuid4().hex]
        inner = Message.of_json({"v": 1}, type="publication", headers={"topic": "dataset.x"})
        for _ in range(10):
            await distribute(e.bus, addresses, inner)
        await eventually(lambda: all(len(got) == 10 for _, got in boxes))
        m = boxes[0][1][0]
        assert m.type == "publication" and m.headers == {"topic": "dataset.x"} and m.json() == {"v": 1}
        # a malformed one on the real broker: dead-lettered, the consumer still runs
        dead_before = len(e.dead)
        await e.bus.send(DISTRIBUTOR, Message(body=b"x", type=DISTRIBUTE, headers={ADDRESSES_HEADER: "no"}))
        await eventually(lambda: any(d.body == b"x" for d in e.dead[dead_before:]))
        await distribute(e.bus, addresses[:1], inner)
        await eventually(lambda: len(boxes[0][1]) == 11)
    finally:
        await e.stop()
