"""Faults that kill consumers, on RabbitMQ: a consumer's channel closed by
the broker (an error provoked on purpose), a consumer gone at the broker
while its client still thinks it consumes, and `consumer_timeout` (a private
node whose broker closes the channel of a handler slower than it allows).

Each shows the work resumes, and the restart is counted.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import reactor, task

import magnet
from magnet import Message
from tests.magnet.test_amqp_faults import buses, fast_backoff, settle, until  # noqa: F401 - the fixture

pytestmark = pytest.mark.rabbitmq


def flow(producer: magnet.Bus, queue: str, sent: List[int], failed: List[Any]) -> task.LoopingCall:
    """A message every 50 ms; the ones confirmed in C{sent}, the refused in C{failed}."""
    count = iter(range(10 ** 9))

    def send() -> None:
        n = next(count)
        d = producer.send(queue, Message.of_json(n), timeout=10)
        d.addCallbacks(lambda _: sent.append(n), failed.append)

    loop = task.LoopingCall(send)
    loop.start(0.05)
    return loop


@pytest_twisted.inlineCallbacks
def test_a_consumer_channel_the_broker_closes_comes_back_and_is_counted(broker_url: str, buses: Any) -> Any:
    """A channel error provoked on purpose (an ack of a delivery tag the broker
    never gave: 406 PRECONDITION_FAILED closes the consumer's channel): the
    consumer consumes again on a fresh channel, the work resumes, nothing
    confirmed is lost, and the restart is counted as channel_closed."""
    queue = f"test.chclose.{uuid.uuid4().hex[:10]}"
    worker, producer = buses(broker_url), buses(broker_url)
    yield worker.declare_worker_queue(queue)
    got: List[int] = []
    yield worker.consume(queue, lambda m: got.append(m.json()))
    sent: List[int] = []
    failed: List[Any] = []
    loop = flow(producer, queue, sent, failed)
    try:
        yield until(lambda: len(got) >= 10, "work flowing")
        consumer = next(iter(worker.transport._consumers.values()))
        state = consumer._channel
        state.protocol.write_ack(state.id, 10 ** 9)  # no such delivery: the broker closes the channel
        yield until(lambda: consumer._channel is not state, "the broker to close the consumer's channel")
        before = len(got)
        yield until(lambda: consumer.active and len(got) >= before + 10, "work flowing again", timeout=10)
        assert worker.transport.consumer_restarts.get("channel_closed") == 1, worker.transport.consumer_restarts
    finally:
        loop.stop()
    yield until(lambda: set(sent) <= set(got), "every confirmed message consumed")
    assert failed == []
    yield worker.transport.delete_queue(queue)
    yield worker.transport.delete_queue(queue + ".dead")


@pytest_twisted.inlineCallbacks
def test_a_dead_letter_queue_deleted_alone_comes_back_and_takes_dead_letters(broker_url: str, buses: Any) -> Any:
    """Issue 17, scenario 3: the dead-letter queue of a consumed worker queue
    deleted at the broker (from another connection, as `rabbitmqctl
    delete_queue` would) while its queue stays: nothing cancels a consumer,
    yet the bus's check (every dead_letter_check, 1 s here) finds it gone and
    declares it again, once; a poison message sent afterwards lands in it."""
    queue = f"test.dlq.{uuid.uuid4().hex[:10]}"
    dead = queue + ".dead"
    worker = buses(broker_url, retry_limit=0, dead_letter_check=1.0)
    other = buses(broker_url)

    def poison(message: Message) -> None:
        raise ValueError("cannot digest this")

    yield worker.declare_worker_queue(queue)
    yield worker.consume(queue, poison)
    try:
        yield other.transport.delete_queue(dead)
        assert (yield other.transport.existing_queues([queue, dead])) == {queue}
        yield until(lambda: worker.dead_letter_queues_redeclared >= 1, "the dead-letter queue declared again",
                    timeout=10)
        assert (yield other.transport.existing_queues([queue, dead])) == {queue, dead}
        yield settle(2.5)  # two more checks: it is there, nothing more is declared
        assert worker.dead_letter_queues_redeclared == 1
        yield other.send(queue, Message.of_json("poison"), timeout=10)
        got: List[Message] = []
        yield other.consume(dead, got.append)
        yield until(lambda: len(got) == 1, "the poison message dead-lettered into the queue declared again")
        assert got[0].json() == "poison" and got[0].headers["x-magnet-origin"] == queue
        assert "cannot digest this" in got[0].headers["x-magnet-error"]
    finally:
        yield worker.transport.delete_queue(queue)
        yield worker.transport.delete_queue(dead)


@pytest_twisted.inlineCallbacks
def test_a_consumer_gone_at_the_broker_unnoticed_is_found_by_the_liveness_check(broker_url: str,
                                                                                  buses: Any) -> Any:
    """The consumer is cancelled at the broker behind the client's back (a raw
    basic.cancel on its channel, the cancel-ok dropped: the silent death that
    an "auto-reconnect" can leave); the next liveness check (every heartbeat,
    2 s here) sees the broker count no consumer and consumes again."""
    queue = f"test.silent.{uuid.uuid4().hex[:10]}"
    worker, producer = buses(broker_url, heartbeat=2), buses(broker_url)
    yield worker.declare_worker_queue(queue)
    got: List[int] = []
    yield worker.consume(queue, lambda m: got.append(m.json()))
    sent: List[int] = []
    failed: List[Any] = []
    loop = flow(producer, queue, sent, failed)
    try:
        yield until(lambda: len(got) >= 10, "work flowing")
        consumer = next(iter(worker.transport._consumers.values()))
        state = consumer._channel
        from magnet.amqp.wire import _method_frame, _shortstr_cached
        # basic.cancel (60, 30), consumer tag, nowait: no cancel-ok, so the client is never told
        state.protocol.write_frames([_method_frame(state.id, b"\x00\x3c\x00\x1e" + _shortstr_cached(state.tag)
                                                   + b"\x01")])
        yield settle(0.5)
        stalled = len(got)
        yield settle(0.5)
        assert len(got) == stalled, "deliveries stopped: the consumer is gone at the broker"
        assert consumer.active, "and the client has not noticed"
        yield until(lambda: len(got) >= stalled + 10, "the liveness check to bring it back", timeout=10)
        assert worker.transport.consumer_restarts.get("missing") == 1, worker.transport.consumer_restarts
    finally:
        loop.stop()
    yield until(lambda: set(sent) <= set(got), "every confirmed message consumed")
    yield worker.transport.delete_queue(queue)
    yield worker.transport.delete_queue(queue + ".dead")


def consumer_timeout_node(factory: Any, timeout_ms: int = 3000) -> Any:
    """A private node whose broker closes a consumer's channel when a delivery
    stays unacknowledged longer than C{timeout_ms}, checked every second (by
    default RabbitMQ looks once a minute)."""
    node = factory(start=False)
    with open(os.path.join(node.basedir, "rabbitmq.conf"), "a") as f:
        f.write(f"consumer_timeout = {timeout_ms}\n")
    with open(os.path.join(node.basedir, "advanced.config"), "w") as f:
        f.write("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    node.start()
    return node


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_consumer_timeout_closes_the_channel_and_the_message_is_done_again(private_rabbitmq_factory: Any,
                                                                           buses: Any) -> Any:
    """consumer_timeout = 3 s and a handler that takes 6 s the first time: the
    broker closes the channel (406 PRECONDITION_FAILED); magnet consumes
    again, the message is redelivered and done once more (one duplicate,
    counted), and the component keeps serving what follows."""
    node = consumer_timeout_node(private_rabbitmq_factory)
    queue = f"test.timeout.{uuid.uuid4().hex[:10]}"
    worker, producer = buses(node.url), buses(node.url)
    yield worker.declare_worker_queue(queue)
    done: Dict[str, int] = {}

    def handle(message: Message) -> Any:
        body = message.json()
        first = body not in done
        done[body] = done.get(body, 0) + 1
        if body == "slow" and first:
            return task.deferLater(reactor, 6, lambda: None)  # twice the consumer_timeout
        return None

    yield worker.consume(queue, handle, prefetch=1)
    yield producer.send_json(queue, "slow")
    yield until(lambda: "slow" in done, "the slow message taken")
    started = reactor.seconds()
    yield until(lambda: worker.transport.consumer_restarts.get("channel_closed"),
                "the broker to close the channel (consumer_timeout)", timeout=20)
    closed_after = reactor.seconds() - started
    yield until(lambda: done.get("slow") == 2, "the slow message redelivered and done again", timeout=20)
    for n in range(5):
        yield producer.send_json(queue, f"after {n}")
    yield until(lambda: all(done.get(f"after {n}") == 1 for n in range(5)), "the worker to keep serving")
    yield settle(4)  # the first, slow run ends now: its late ack must not disturb anything
    for n in range(5, 10):
        yield producer.send_json(queue, f"after {n}")
    yield until(lambda: all(done.get(f"after {n}") == 1 for n in range(10)), "still serving after the late ack")
    duplicates = sum(count - 1 for count in done.values())
    print(f"channel closed by consumer_timeout after {closed_after:.1f} s; duplicates {duplicates}")
    assert duplicates == 1
    assert worker.transport.consumer_restarts == {"channel_closed": 1}

