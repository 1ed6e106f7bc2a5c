"""pub_sub's topic bindings and the one-hop Publisher over RabbitMQ: a topic
bound on its first publication (the Publisher's first is returned and posted
to pub_sub), then one publish to pubsub.topics reaches every subscriber; a new
subscription bound before subscribe answers; a changed regex unbound;
unsubscribe; the least recently published topic unbound beyond max_topics
(the next one-hop publication returned whole and delivered through pub_sub).
The clock-driven details: tests/fast/dissemination/test_pub_sub_bindings.py."""
from __future__ import annotations

import uuid
from typing import Any, List

import pytest
import pytest_twisted

from ooidx.dissemination.pub_sub import PubSub, topic_exchange
from ooidx.dissemination.publisher import Publisher

from tests.ooidx.test_pub_sub import consume, own_pub_sub, own_queues
from tests.ooidx.waiting import eventually, sleep


def messages(inbox: Any) -> List[Any]:
    return [m.json()["message"] for m in inbox.messages]


@pytest.mark.rabbitmq
@pytest_twisted.ensureDeferred
async def test_bindings_and_the_one_hop_publisher_over_rabbitmq(tmp_path: Any, broker_url: str) -> None:
    tag = uuid.uuid4().hex[:10]
    n, service = await own_pub_sub(broker_url, tmp_path, tag, prefetch=PubSub.prefetch, max_topics=2)
    names = [f"b{tag}-{i}" for i in range(3)]
    topics = [f"dataset.{tag}.{i}" for i in range(3)]
    publisher = Publisher(n.bus, service=service)
    try:
        await n.pubsub.loaded()
        a = await n.bus.call(service, "subscribe", regex=rf"^dataset\.{tag}\.", name=names[0])
        b = await n.bus.call(service, "subscribe", regex=rf"\.{tag}\.0$", name=names[1])
        inbox_a, inbox_b = await consume(n.bus, a["address"]), await consume(n.bus, b["address"])
        # the first is returned (the topic is not bound), posted to pub_sub, which binds the topic
        assert (await publisher.publish(topics[0], 0))["via"] == "pub_sub"
        await eventually(lambda: topics[0] in n.pubsub.topics and not n.pubsub._ensuring)
        for i in range(1, 21):
            assert (await publisher.publish(topics[0], i))["via"] == "exchange"
        await eventually(lambda: len(inbox_a.messages) == 21 and len(inbox_b.messages) == 21)
        # a new subscription is bound before subscribe answers: the very next one-hop publication reaches it
        c = await n.bus.call(service, "subscribe", regex=rf"{tag}\.0", name=names[2])
        assert (await publisher.publish(topics[0], 21))["via"] == "exchange"
        inbox_c = await consume(n.bus, c["address"])
        await eventually(lambda: messages(inbox_c) == [21])
        # its regex changed: unbound from what it no longer matches
        await n.bus.call(service, "subscribe", regex=rf"{tag}\.9$", name=names[2])
        assert (await publisher.publish(topics[0], 22))["via"] == "exchange"
        # unsubscribe b: gone with its address and its bindings
        await inbox_b.listener.subscription.cancel()
        await n.bus.call(service, "unsubscribe", name=names[1])
        assert (await publisher.publish(topics[0], 23))["via"] == "exchange"
        await eventually(lambda: len(inbox_a.messages) == 24)
        # two more topics published through pub_sub: beyond max_topics=2, topics[0] is unbound
        for topic in topics[1:]:
            await n.bus.call(service, "publish", topic=topic, message=topic)
        assert list(n.pubsub.topics) == topics[1:]
        # ... so a one-hop publication to it is returned whole and goes through pub_sub, which binds it again
        assert (await publisher.publish(topics[0], 24))["via"] == "pub_sub"
        await eventually(lambda: len(inbox_a.messages) == 27)
        await sleep(0.3)
        assert messages(inbox_a) == list(range(24)) + topics[1:] + [24]
        assert messages(inbox_b)[:21] == list(range(21)) and len(inbox_b.messages) <= 23
        assert messages(inbox_c) == [21]
        counters = await n.bus.call(service, "counters")
        assert counters["topics_unbound"] >= 1 and counters["dead"] == 0 and counters["retried"] == 0
    finally:
        for listener_inbox in [v for k, v in list(locals().items()) if k.startswith("inbox_")]:
            await listener_inbox.listener.subscription.cancel().addErrback(lambda _: None)
        for name in names:
            await n.bus.call(service, "unsubscribe", name=name).addErrback(lambda _: None)
        for topic in topics:
            await n.bus.transport.delete_exchange(topic_exchange(topic)).addErrback(lambda _: None)
        for queue in own_queues(tag):
            await n.bus.transport.delete_queue(queue).addErrback(lambda _: None)
        await n.pubsub.stopService()
        await n.stop()
