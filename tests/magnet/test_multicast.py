"""Bus.multicast on RabbitMQ and on the in-process broker alike: one publish
(BCC) for a set of addresses, one copy each, the list hidden from consumers,
missing addresses reported, a queue deleted between publishes reported while
the others keep getting theirs, a long list split. The clock-driven details
are in tests/fast/magnet/test_multicast.py."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest_twisted
from twisted.internet import defer

import magnet
from magnet import Message
from magnet.multicast import MAX_PER_PUBLISH
from magnet.transport import BCC_HEADER, DEFAULT_EXCHANGE
from tests.magnet.waiting import eventually, sleep


@defer.inlineCallbacks
def ready_count(bus: magnet.Bus, name: str) -> Any:
    """How many messages wait in queue C{name}."""
    transport = bus.transport
    if hasattr(transport, "broker"):  # memory://
        return len(transport.broker.queues[name].ready)
    ok = yield transport._operation("count", lambda p: transport._control_call(
        p, lambda ch: ch.queue_declare(queue=name, passive=True)))
    return ok.message_count


@pytest_twisted.inlineCallbacks
def test_one_copy_each_the_list_hidden_missing_reported(make_bus: Any, names: Any) -> Any:
    sender, subscriber = make_bus(), make_bus()
    addresses = [names("mc") for _ in range(10)]
    got: Dict[str, List[Message]] = {a: [] for a in addresses}
    for a in addresses:
        yield subscriber.listen(got[a].append, name=a, durable=True)
    missing = names("mc-missing")
    published: List[Any] = []
    real = sender.transport.publish
    sender.transport.publish = lambda *a, **k: published.append(a) or real(*a, **k)
    message = Message(body=b"to all", type="publication", headers={"topic": "t"}, persistent=True)
    result = yield sender.multicast(addresses[:5] + [missing] + addresses[5:], message)
    assert result.delivered == tuple(addresses) and result.unroutable == (missing,)
    assert len(published) == 1 and published[0][:2] == (DEFAULT_EXCHANGE, addresses[0])
    yield eventually(lambda: all(len(box) == 1 for box in got.values()), what="every address has its copy")
    yield sleep(0.2)
    for a in addresses:
        [m] = got[a]
        assert (m.body, m.type, dict(m.headers), m.persistent) == (b"to all", "publication", {"topic": "t"}, True)
        assert BCC_HEADER not in m.headers


@pytest_twisted.inlineCallbacks
def test_a_queue_deleted_between_publishes_is_reported_and_the_others_keep_theirs(make_bus: Any,
                                                                                  names: Any) -> Any:
    sender, subscriber, operator = make_bus(address_recheck=0.5), make_bus(), make_bus()
    addresses = [names("mc") for _ in range(5)]
    victim = addresses[2]
    got: Dict[str, List[Message]] = {a: [] for a in addresses if a != victim}
    for a in addresses:
        if a == victim:
            yield subscriber.declare_address(a)  # nobody consumes it: nobody declares it again
        else:
            yield subscriber.listen(got[a].append, name=a, durable=True)
    results = []
    for i in range(3):
        results.append((yield sender.multicast(addresses, Message(body=str(i).encode()))))
    assert all(r.unroutable == () for r in results)
    assert (yield ready_count(operator, victim)) == 3
    yield operator.transport.delete_queue(victim)
    yield sleep(0.6)  # past the sender's address_recheck
    for i in range(3, 6):
        results.append((yield sender.multicast(addresses, Message(body=str(i).encode()))))
    for r in results[3:]:
        assert r.unroutable == (victim,) and r.delivered == tuple(a for a in addresses if a != victim)
    yield eventually(lambda: all(len(box) == 6 for box in got.values()), what="the others have every copy")
    for box in got.values():
        assert [m.body for m in box] == [str(i).encode() for i in range(6)]
    assert (yield sender.transport.existing_queues([victim])) == set()
    # and when every address of a publish is gone, the broker's return says so at once
    for a in addresses:
        yield operator.transport.delete_queue(a)
    # (the book still believes in four of them: one publish, returned)
    result = yield sender.multicast(addresses, Message(body=b"late"))
    assert result.unroutable == tuple(addresses) and result.delivered == ()
    assert not any(sender.addresses.seen[a][0] for a in addresses)


@pytest_twisted.inlineCallbacks
def test_a_long_list_goes_as_several_publishes(make_bus: Any, names: Any) -> Any:
    sender, subscriber = make_bus(), make_bus()
    addresses = [names("mcl") for _ in range(MAX_PER_PUBLISH + 20)]
    for a in addresses:
        yield subscriber.declare_address(a)
    published: List[Any] = []
    real = sender.transport.publish
    sender.transport.publish = lambda *a, **k: published.append(a) or real(*a, **k)
    result = yield sender.multicast(addresses, Message(body=b"x"))
    assert len(result.delivered) == len(addresses) and len(published) == 2
    counts = []
    for a in addresses:
        counts.append((yield ready_count(subscriber, a)))
    assert counts == [1] * len(addresses)


@pytest_twisted.inlineCallbacks
def test_bad_input_is_refused_before_the_broker(make_bus: Any, names: Any) -> Any:
    sender = make_bus()
    a = names("mc")
    yield sender.declare_address(a)
    for addresses, error in (([], ValueError), ([a, a], ValueError), ([a, 1], TypeError), (a, TypeError)):
        try:
            yield sender.multicast(addresses, Message(body=b"x"))
        except error:
            pass
        else:
            raise AssertionError(f"{addresses!r} was accepted")
    assert (yield ready_count(sender, a)) == 0


@pytest_twisted.inlineCallbacks
def test_a_private_listen_address_of_another_connection_counts_as_existing(make_bus: Any, names: Any) -> Any:
    """A listen address is exclusive to its connection: RabbitMQ answers another
    connection's passive declare with 405 RESOURCE_LOCKED, yet takes its publishes."""
    sender, subscriber = make_bus(), make_bus()
    got: List[Message] = []
    listener = yield subscriber.listen(got.append)
    durable = names("mc")
    yield subscriber.declare_address(durable)
    result = yield sender.multicast([listener.address, durable], Message(body=b"to a private address"))
    assert result.delivered == (listener.address, durable) and result.unroutable == ()
    yield eventually(lambda: len(got) == 1, what="the private address has its copy")
    yield listener.close()
