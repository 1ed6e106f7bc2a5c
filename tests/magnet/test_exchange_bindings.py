"""Direct exchanges, queue and exchange-to-exchange bindings and Bus.send_to,
on RabbitMQ and on the in-process broker alike (the same answers from both):
a publication through a direct exchange bound to a fanout reaches every
queue once; unbinding the fanout returns the next one whole (mandatory);
deleting the fanout removes its bindings; unbinding what is not bound is
fine (even from what does not exist), binding to what does not exist is NOT_FOUND. Details on the
Clock: tests/fast/magnet/test_exchange_bindings.py."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer

from magnet import Message, Unroutable
from tests.magnet.waiting import eventually, sleep


@pytest_twisted.inlineCallbacks
def test_bind_route_unbind_delete(make_bus: Any, names: Any) -> Any:
    sender, subscriber = make_bus(), make_bus()
    topics, fanout = names("topics"), names("topic")
    queues = [names("sub") for _ in range(3)]
    got: Dict[str, List[Message]] = {q: [] for q in queues}
    try:
        yield sender.declare_direct(topics)
        yield sender.transport.declare_exchange(fanout, "fanout", durable=True)
        for q in queues:
            yield subscriber.listen(got[q].append, name=q, durable=True)
            yield sender.transport.bind_queue(q, fanout, "", remember=False)
        message = Message(body=b"p", type="publication", headers={"topic": "t.1"}, persistent=True)
        with pytest.raises(Unroutable):  # the topic is not bound yet: returned
            yield sender.send_to(topics, "t.1", message)
        yield sender.transport.bind_exchange(fanout, topics, "t.1", remember=False)
        yield sender.send_to(topics, "t.1", message)
        yield eventually(lambda: all(len(box) == 1 for box in got.values()), what="one copy each")
        # unbind one queue: the others still get theirs
        yield sender.transport.unbind_queue(queues[0], fanout, "")
        yield sender.transport.unbind_queue(queues[0], fanout, "")  # not bound: fine
        yield sender.send_to(topics, "t.1", message)
        yield eventually(lambda: [len(got[q]) for q in queues] == [1, 2, 2], what="the others' copies")
        # unbind the fanout from the topics: returned whole
        yield sender.transport.unbind_exchange(fanout, topics, "t.1")
        yield sender.transport.unbind_exchange(fanout, topics, "t.1")  # not bound: fine
        with pytest.raises(Unroutable):
            yield sender.send_to(topics, "t.1", message)
        # bound again, then the fanout deleted: its bindings go with it
        yield sender.transport.bind_exchange(fanout, topics, "t.1", remember=False)
        yield sender.transport.delete_exchange(fanout)
        with pytest.raises(Unroutable):
            yield sender.send_to(topics, "t.1", message)
        yield sender.transport.declare_exchange(fanout, "fanout", durable=True)
        with pytest.raises(Unroutable):  # made again: bound to nothing, nothing bound to it
            yield sender.send_to(topics, "t.1", message)
        yield sender.transport.unbind_queue(names("none"), fanout, "")  # no such queue: fine too
        yield sender.transport.unbind_exchange(names("none"), topics, "t.1")  # nor exchange
        with pytest.raises(Exception, match="NOT_FOUND"):
            yield sender.transport.bind_exchange(names("none"), topics, "t.1")
        yield sleep(0.2)
        assert [len(got[q]) for q in queues] == [1, 2, 2]
    finally:
        for exchange in (fanout, topics):
            yield sender.transport.delete_exchange(exchange).addErrback(lambda _: None)
