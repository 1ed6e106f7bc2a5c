"""The AMQP transport (magnet.amqp) against a real RabbitMQ.

Every test uses queue and exchange names of its own and deletes them
afterwards; every wait is bounded. A broker that cannot be reached makes the
tests fail (the ``broker_url`` fixture fails, and so does ``when_connected``).
"""
from __future__ import annotations

import datetime
import os
import struct
import uuid
from decimal import Decimal
from io import BytesIO
from typing import Any, Callable, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher

from magnet import amqp
from magnet.amqp import wire as amqpwire
from magnet.amqp import AMQPTransport, ChannelError, decode_table, encode_table, parse_url
from magnet.errors import BadFrame, BadURL, ConnectionLost, NotConnected, Unroutable
from magnet.message import Message
from tests.magnet.waiting import TIMEOUT, sleep, until, wait
from tests.rabbitmq import free_port



@pytest.fixture
def url(request: Any) -> str:
    """The broker for these tests: the suite's ``broker_url`` (it fails if there is none)."""
    env = os.environ.get("OOIDX_TEST_BROKER")
    if env and env.strip().lower() != "none":  # none: broker_url fails, saying why
        return env
    try:
        return request.getfixturevalue("broker_url")
    except pytest.FixtureLookupError:
        return "amqp://guest:guest@127.0.0.1:5672/"


class Names:
    def __init__(self) -> None:
        self.queues: List[str] = []
        self.exchanges: List[str] = []

    def queue(self, prefix: str = "q") -> str:
        name = f"test.amqp.{prefix}.{uuid.uuid4().hex[:10]}"
        self.queues.append(name)
        return name

    def exchange(self, prefix: str = "x") -> str:
        name = f"test.amqp.{prefix}.{uuid.uuid4().hex[:10]}"
        self.exchanges.append(name)
        return name


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture
def make_transport(url: str, names: Names) -> Any:
    """``make(url=..., **options)``: a started transport; all are stopped, test queues deleted."""
    made: List[AMQPTransport] = []

    def make(target: Any = None, **options: Any) -> AMQPTransport:
        options.setdefault("heartbeat", 5.0)
        options.setdefault("operation_timeout", 10.0)
        options.setdefault("close_timeout", 2.0)
        t = amqp.from_url(target or url, reactor, **options)
        made.append(t)
        t.start()
        return t

    yield make

    @defer.inlineCallbacks
    def cleanup() -> Any:
        for t in made:
            yield wait(t.stop(), 10)
        # test queues live on the suite's broker (a test on a node of its own has removed it)
        cleaner = amqp.from_url(url, reactor, operation_timeout=5.0)
        cleaner.start()
        try:
            yield cleaner.when_connected(10)
            for q in names.queues:
                yield cleaner.delete_queue(q).addErrback(lambda _: None)
            for x in names.exchanges:
                yield cleaner.delete_exchange(x).addErrback(lambda _: None)
        finally:
            yield wait(cleaner.stop(), 10)

    pytest_twisted.blockon(cleanup())


@pytest.fixture
def transport(make_transport: Any) -> AMQPTransport:
    return make_transport()


class Inbox:
    """Collects deliveries; optionally acks them at once."""

    def __init__(self, ack: bool = True) -> None:
        self.auto_ack = ack
        self.deliveries: List[Any] = []
        self._waiting: List[Any] = []

    def __call__(self, delivery: Any) -> None:
        self.deliveries.append(delivery)
        if self.auto_ack:
            delivery.ack()

    @property
    def bodies(self) -> List[bytes]:
        return [d.message.body for d in self.deliveries]

    def wait_for(self, count: int, seconds: float = TIMEOUT) -> defer.Deferred:
        return until(lambda: len(self.deliveries) >= count, seconds, f"{count} deliveries "
                     f"(have {len(self.deliveries)})")


class LogCapture:
    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        self.events.append(event)

    def texts(self) -> List[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


# -- pure functions (no broker) ------------------------------------------------


def test_parse_url() -> None:
    u = parse_url("amqp://user:p%40ss@broker.example:5673/%2F")
    assert (u.scheme, u.host, u.port, u.username, u.password, u.vhost) == (
        "amqp", "broker.example", 5673, "user", "p@ss", "/")
    assert parse_url("amqp://guest:guest@localhost").vhost == "/"
    assert parse_url("amqp://guest:guest@localhost/").vhost == "/"
    assert parse_url("amqp://guest:guest@localhost/dx").vhost == "dx"
    assert parse_url("amqp://guest:guest@localhost/a%2Fb").vhost == "a/b"
    assert parse_url("amqp://h").port == 5672
    s = parse_url("amqps://u:secret@h/")
    assert s.tls and s.port == 5671
    assert parse_url("amqp://h/?heartbeat=3").heartbeat == 3.0
    for bad in ("http://h/", "amqp://h:notaport/", "amqp://h/?frobnicate=1"):
        with pytest.raises(BadURL):
            parse_url(bad)


def test_url_never_shows_the_password() -> None:
    u = parse_url("amqp://guest:s3cret@127.0.0.1:5672/%2F")
    assert "s3cret" not in u.masked() and "s3cret" not in repr(u) and "s3cret" not in str(u)
    assert u.masked() == "amqp://guest:***@127.0.0.1:5672/%2F"
    t = AMQPTransport(["amqp://guest:s3cret@127.0.0.1:5672/"], reactor=reactor)
    assert "s3cret" not in repr(t)


def test_field_tables_round_trip() -> None:
    table = {
        "str": "héllo", "long_str": "x" * 70000, "bytes": b"\x00\xff\xfe binary", "empty": b"",
        "int": 42, "neg": -7, "big": 2 ** 40, "float": 2.5, "true": True, "false": False,
        "none": None, "nested": {"a": 1, "b": {"c": "d"}}, "list": [1, "two", b"3", None, [4.0]],
        "decimal": Decimal("12.34"),
    }
    out = decode_table(encode_table(table))
    assert out == table
    assert isinstance(out["bytes"], bytes) and isinstance(out["str"], str)
    assert out["true"] is True and out["int"] == 42 and not isinstance(out["int"], bool)
    ts = datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)
    assert decode_table(encode_table({"t": ts}))["t"] == int(ts.timestamp())
    with pytest.raises(TypeError):
        encode_table({"x": object()})


# Inputs the fuzzer (fuzz/fuzz_amqpwire.py) found: a table, a content header or
# a method's arguments that a broker or a peer sends malformed must raise
# BadFrame (a ValueError), not IndexError, struct.error, RecursionError or
# txAMQP's EOF, nor decode silently into something shorter.
_DEEP = b""
for _ in range(2000):
    _DEEP = struct.pack(">I", len(_DEEP) + 3) + b"\x01kF" + _DEEP if _DEEP else b"\x00\x00\x00\x00"


@pytest.mark.parametrize("data", [
    b"\x00\x00\x00\x05\x01k",  # the table says 5 bytes, 2 follow (was IndexError)
    b"\x00\x00",  # not even a length (was struct.error)
    b"\x00\x00\x00\x03\x01kI",  # an integer without its bytes (was struct.error)
    b"\x00\x00\x00\x03\x01kt",  # a boolean without its octet (was IndexError)
    b"\x00\x00\x00\x03\x01kD",  # a decimal without its bytes (was IndexError)
    b"\x00\x00\x00\x07\x01kS\x00\x00\x00\xff",  # a string longer than the table (was {'k': ''})
    b"\x00\x00\x00\x04\x01kI\x00\x00\x00\x00\x00",  # a value running past its table's end (was {'k': 0})
    b"\x00\x00\x00\x09\x01kA\x00\x00\x00\x02I\x00",  # an array item running past the array
    b"\x00\x00\x00\x02\x05k",  # a key longer than the table
    b"\x00\x00\x00\x03\x01kZ",  # an unknown field type (was a plain ValueError)
    _DEEP,  # 2,000 nested tables (was RecursionError)
], ids=["truncated", "no-length", "short-int", "short-bool", "short-decimal", "long-string",
        "value-past-end", "array-item-past-end", "long-key", "unknown-type", "deep"])
def test_malformed_field_tables_raise_bad_frame(data: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_table(data)
    with pytest.raises(BadFrame):
        amqpwire._Codec(BytesIO(data)).decode_table()


def test_tables_nested_to_the_limit_still_decode() -> None:
    value: Any = {"k": "bottom"}
    for _ in range(amqpwire.MAX_TABLE_DEPTH):  # MAX_TABLE_DEPTH tables inside the outermost one
        value = {"k": value}
    assert decode_table(encode_table(value)) == value
    with pytest.raises(BadFrame):
        decode_table(encode_table({"k": value}))


@pytest.mark.parametrize("data", [
    b"",  # no flags (was struct.error)
    b"\x80\x00",  # content-type flag, no string (was IndexError)
    b"\x80\x00\x09text",  # a content type longer than the header (was 'text')
    b"\x10\x00",  # delivery-mode flag, no octet (was IndexError)
    b"\x00\x40",  # timestamp flag, no timestamp (was struct.error)
    b"\x00\x01",  # a continuation flag word that is not there (was struct.error)
    b"\x20\x00\x00\x00\x00\x05",  # headers longer than the header (was IndexError)
])
def test_malformed_content_headers_raise_bad_frame(data: bytes) -> None:
    with pytest.raises(BadFrame):
        amqpwire.decode_properties(data, 0, b"")


def test_content_header_properties_end_where_they_are_told() -> None:
    props = amqpwire.encode_properties(Message(body=b"x", content_type="text/plain", message_id="m1"))
    message, _ = amqpwire.decode_properties(props + b"more frames", 0, b"x", len(props))
    assert message.content_type == "text/plain" and message.message_id == "m1"
    with pytest.raises(BadFrame):  # the property list runs into the next frame's bytes
        amqpwire.decode_properties(props + b"more frames", 0, b"x", len(props) - 1)


@pytest.mark.parametrize("data", [
    b"\x00",  # half a class id (was struct.error)
    b"\x00<\x00<\x04ctag\x00\x00",  # basic.deliver cut inside its delivery tag (was struct.error)
    b"\x00<\x00<\x09ctag",  # a consumer tag longer than the frame (was txAMQP's EOF)
])
def test_truncated_method_arguments_raise_bad_frame(data: bytes) -> None:
    spec = amqp.load_spec()
    c = amqpwire._Codec(BytesIO(data))
    with pytest.raises(BadFrame):
        meth = spec.classes.byid[c.decode_short()].methods.byid[c.decode_short()]
        for f in meth.fields:
            c.decode(f.type)


def test_spec_has_the_rabbitmq_extensions() -> None:
    spec = amqp.load_spec()
    confirm = spec.classes.byname["confirm"]
    assert confirm.id == 85
    assert confirm.methods.byname["select"].id == 10
    assert confirm.methods.byname["select-ok"].id == 11
    nack = spec.classes.byname["basic"].methods.byname["nack"]
    assert nack.id == 120 and [f.name for f in nack.fields] == ["delivery-tag", "multiple", "requeue"]


# -- against the broker --------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_round_trip_with_all_properties_and_header_types(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    inbox = Inbox()
    yield wait(transport.consume(q, inbox, prefetch=5))
    headers = {
        "s": "text ✓", "long": "L" * 100000, "b": b"\x00\x01\xff raw", "i": -12345, "big": 2 ** 50,
        "f": 0.125, "t": True, "n": None, "d": {"k": "v", "deep": {"x": [1, 2]}}, "l": ["a", 1, False],
    }
    body = bytes(range(256)) * 4  # not UTF-8: must stay bytes
    sent = Message(body=body, headers=headers, content_type="application/octet-stream",
                   correlation_id="corr-1", reply_to="reply.q", message_id="msg-1", type="test.kind",
                   persistent=False, expiration="60000", timestamp=1700000000)
    result = yield wait(transport.publish("", q, sent))
    assert result is None
    text_body = Message(body=b'{"a": 1}', content_type="application/json")
    yield wait(transport.publish("", q, text_body))
    yield inbox.wait_for(2)
    got = inbox.deliveries[0]
    assert got.queue == q and got.redelivered is False
    assert got.message == sent
    assert isinstance(got.message.body, bytes)
    second = inbox.deliveries[1].message
    assert second.body == b'{"a": 1}' and isinstance(second.body, bytes)
    assert second.persistent is True and second.headers == {}


@pytest_twisted.inlineCallbacks
def test_large_bodies_are_split_into_frames(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    inbox = Inbox()
    yield wait(transport.consume(q, inbox))
    mib = os.urandom(1024 * 1024)
    exact = os.urandom(131072 - 8)  # exactly one body frame
    yield wait(defer.gatherResults([transport.publish("", q, Message(body=b)) for b in (mib, exact, b"")],
                                   consumeErrors=True), 30)
    yield inbox.wait_for(3, 30)
    assert inbox.bodies == [mib, exact, b""]


@pytest_twisted.inlineCallbacks
def test_many_publishes_all_confirmed_in_order(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    ds = [transport.publish("", q, Message(body=str(i).encode())) for i in range(500)]
    results = yield wait(defer.gatherResults(ds, consumeErrors=True), 30)
    assert results == [None] * 500
    inbox = Inbox()
    yield wait(transport.consume(q, inbox, prefetch=100))
    yield inbox.wait_for(500, 30)
    assert inbox.bodies == [str(i).encode() for i in range(500)]


@pytest_twisted.inlineCallbacks
def test_unroutable(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    missing = f"test.amqp.missing.{uuid.uuid4().hex}"
    # routed and unrouted publishes interleaved: each gets its own outcome
    ds = []
    for i in range(10):
        ds.append(transport.publish("", q, Message(body=b"ok")))
        ds.append(transport.publish("", missing, Message(body=b"lost")))
    outcomes = yield wait(defer.DeferredList(ds, consumeErrors=True))
    for i, (ok, value) in enumerate(outcomes):
        if i % 2 == 0:
            assert ok, value
        else:
            assert not ok and value.check(Unroutable), value
            assert missing in str(value.value)
    # without mandatory, the broker drops it silently and confirms
    yield wait(transport.publish("", missing, Message(body=b"x"), mandatory=False))
    # a missing exchange closes the publishing channel: Unroutable, and publishing goes on
    with pytest.raises(Unroutable):
        yield wait(transport.publish(f"test.amqp.noexchange.{uuid.uuid4().hex}", "k", Message(body=b"x")))
    yield wait(transport.publish("", q, Message(body=b"still works")))


@pytest_twisted.inlineCallbacks
def test_fanout_to_two_queues(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    x = names.exchange()
    q1, q2 = names.queue(), names.queue()
    yield wait(transport.declare_exchange(x, "fanout", durable=False))
    for q in (q1, q2):
        yield wait(transport.declare_queue(q, durable=False))
        yield wait(transport.bind_queue(q, x))
    in1, in2 = Inbox(), Inbox()
    yield wait(transport.consume(q1, in1))
    yield wait(transport.consume(q2, in2))
    yield wait(transport.publish(x, "", Message(body=b"to all")))
    yield in1.wait_for(1)
    yield in2.wait_for(1)
    assert in1.bodies == in2.bodies == [b"to all"]


@pytest_twisted.inlineCallbacks
def test_direct_exchange_and_queue_arguments(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    x, dlx = names.exchange(), names.exchange("dlx")
    q, dead = names.queue(), names.queue("dead")
    yield wait(transport.declare_exchange(x, "direct", durable=False))
    yield wait(transport.declare_exchange(dlx, "fanout", durable=False))
    yield wait(transport.declare_queue(dead, durable=False))
    yield wait(transport.bind_queue(dead, dlx))
    yield wait(transport.declare_queue(q, durable=False, arguments={"x-dead-letter-exchange": dlx,
                                                                     "x-max-length": 100}))
    yield wait(transport.bind_queue(q, x, "key"))
    rejected = Inbox(ack=False)
    consumer = yield wait(transport.consume(q, rejected))
    yield wait(transport.publish(x, "key", Message(body=b"to dlx")))
    with pytest.raises(Unroutable):
        yield wait(transport.publish(x, "other-key", Message(body=b"nowhere")))
    yield rejected.wait_for(1)
    rejected.deliveries[0].nack(requeue=False)
    dead_inbox = Inbox()
    yield wait(transport.consume(dead, dead_inbox))
    yield dead_inbox.wait_for(1)
    assert dead_inbox.bodies == [b"to dlx"]
    assert dead_inbox.deliveries[0].message.headers["x-death"][0]["queue"] == q
    yield wait(consumer.cancel())
    # redeclaring with other arguments is refused by the broker: a typed error, link stays up
    with pytest.raises(ChannelError) as e:
        yield wait(transport.declare_queue(q, durable=False, arguments={"x-max-length": 5}))
    assert e.value.reply_code == 406
    yield wait(transport.publish(x, "key", Message(body=b"again")))


@pytest_twisted.inlineCallbacks
def test_prefetch_is_respected(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    for i in range(5):
        yield wait(transport.publish("", q, Message(body=b"%d" % i)))
    inbox = Inbox(ack=False)
    yield wait(transport.consume(q, inbox, prefetch=2))
    yield inbox.wait_for(2)
    yield sleep(0.5)
    assert inbox.bodies == [b"0", b"1"]
    inbox.deliveries[0].ack()
    yield inbox.wait_for(3)
    yield sleep(0.3)
    assert inbox.bodies == [b"0", b"1", b"2"]
    for d in inbox.deliveries:
        d.ack()  # the first one again: a no-op, not a channel error
    yield inbox.wait_for(5)
    assert inbox.bodies == [b"%d" % i for i in range(5)]


@pytest_twisted.inlineCallbacks
def test_nack_requeue_redelivers(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    inbox = Inbox(ack=False)
    yield wait(transport.consume(q, inbox, prefetch=1))
    yield wait(transport.publish("", q, Message(body=b"again")))
    yield inbox.wait_for(1)
    assert inbox.deliveries[0].redelivered is False
    inbox.deliveries[0].nack(requeue=True)
    yield inbox.wait_for(2)
    assert inbox.deliveries[1].redelivered is True
    assert inbox.deliveries[1].message.body == b"again"
    inbox.deliveries[1].ack()


@pytest_twisted.inlineCallbacks
def test_cancel_stops_deliveries_and_unacked_messages_go_back(make_transport: Any, names: Names) -> Any:
    # As in RabbitMQ (and the memory transport): after cancel() the consumer may
    # still ack what it holds; what it nacks, or still holds when its link
    # closes, goes back to the queue.
    transport = make_transport()
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    first = Inbox(ack=False)
    consumer = yield wait(transport.consume(q, first, prefetch=10))
    for i in range(4):
        yield wait(transport.publish("", q, Message(body=b"%d" % i)))
    yield first.wait_for(4)
    yield wait(consumer.cancel())
    yield wait(consumer.cancel())  # twice is fine
    assert not consumer.active
    yield wait(transport.publish("", q, Message(body=b"4")))
    yield sleep(0.3)
    assert len(first.deliveries) == 4  # nothing more after cancel
    first.deliveries[0].ack()  # still allowed: "0" is done
    first.deliveries[1].nack(requeue=True)  # "1" goes back now
    second = Inbox()
    yield wait(make_transport().consume(q, second))
    yield second.wait_for(2)
    assert sorted(second.bodies) == [b"1", b"4"]
    yield wait(transport.stop())  # "2" and "3" were still held: they go back with the link
    yield second.wait_for(4)
    assert sorted(second.bodies) == [b"1", b"2", b"3", b"4"]
    assert {d.message.body: d.redelivered for d in second.deliveries} == {
        b"1": True, b"2": True, b"3": True, b"4": False}


@pytest_twisted.inlineCallbacks
def test_cancelled_consumer_channel_closes_once_all_is_settled(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    inbox = Inbox(ack=False)
    consumer = yield wait(transport.consume(q, inbox, prefetch=5))
    yield wait(transport.publish("", q, Message(body=b"a")))
    yield inbox.wait_for(1)
    protocol = transport._protocol
    assert protocol is not None
    channel_id = consumer._channel.id
    yield wait(consumer.cancel())
    assert channel_id in protocol.channels  # still held: the channel stays
    inbox.deliveries[0].ack()
    yield until(lambda: channel_id not in protocol.channels, what="channel closed")


@pytest_twisted.inlineCallbacks
def test_consumer_of_a_queue_declared_elsewhere_is_dropped_when_it_is_deleted_and_resumes_on_redeclare(
        make_transport: Any, names: Names, logs: LogCapture) -> Any:
    """A queue this transport did not declare is not its to bring back: its
    consumer waits until someone declares the queue again."""
    transport = make_transport()
    other = make_transport()
    yield transport.when_connected(TIMEOUT)
    yield other.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(other.declare_queue(q, durable=False))
    inbox = Inbox()
    consumer = yield wait(transport.consume(q, inbox))
    yield wait(other.delete_queue(q))  # the broker cancels the consumer (consumer_cancel_notify)
    yield until(lambda: not consumer.active, what="consumer dropped")
    assert any("cancelled the consumer" in t and "resumes if the queue is declared again" in t
               for t in logs.texts())
    yield sleep(0.5)
    assert transport.connected and not consumer.active
    yield wait(transport.declare_queue(q, durable=False))
    yield until(lambda: consumer.active, what="consumer resumed")
    yield wait(other.publish("", q, Message(body=b"back")))
    yield inbox.wait_for(1)
    assert inbox.bodies == [b"back"]


@pytest_twisted.inlineCallbacks
def test_a_queue_this_transport_declared_comes_back_when_deleted_under_its_consumer(
        make_transport: Any, names: Names, logs: LogCapture) -> Any:
    """The broker's cancel (the queue deleted by someone else) makes the
    transport declare its remembered topology again, the queue's binding
    included, and resume the consumer."""
    transport = make_transport()
    other = make_transport()
    yield transport.when_connected(TIMEOUT)
    yield other.when_connected(TIMEOUT)
    q, ex = names.queue(), names.exchange()
    yield wait(transport.declare_exchange(ex, "fanout", durable=False))
    yield wait(transport.declare_queue(q, durable=False))
    yield wait(transport.bind_queue(q, ex))
    inbox = Inbox()
    consumer = yield wait(transport.consume(q, inbox))
    yield wait(other.delete_queue(q))
    yield until(lambda: any("declaring it again" in t for t in logs.texts()), what="the broker's cancel")
    yield until(lambda: consumer.active, what="consumer resumed")
    yield wait(other.publish(ex, "", Message(body=b"through the binding")))
    yield inbox.wait_for(1)
    assert inbox.bodies == [b"through the binding"]


@pytest_twisted.inlineCallbacks
def test_unreachable_broker_keeps_retrying(make_transport: Any, logs: LogCapture) -> Any:
    port = free_port()
    t = make_transport(f"amqp://guest:sekrit@127.0.0.1:{port}/",
                       backoff=lambda attempt: 0.2, operation_timeout=1.0)
    events: List[bool] = []
    t.add_link_listener(events.append)
    with pytest.raises(NotConnected):
        yield wait(t.publish("", "q", Message(body=b"x")))
    with pytest.raises(NotConnected):
        yield wait(t.declare_queue("test.amqp.never"))
    with pytest.raises(NotConnected):
        yield wait(t.when_connected(0.5))
    yield sleep(2.0)
    assert not t.connected and events == []
    texts = [x for x in logs.texts() if "broker unreachable" in x]
    assert len(texts) >= 3, texts  # still at it
    assert f"amqp://guest:***@127.0.0.1:{port}" in texts[-1] and "retrying in" in texts[-1]
    assert not any("sekrit" in x for x in logs.texts())
    started = reactor.seconds()
    yield wait(t.stop(), 5)
    assert reactor.seconds() - started < 3
    count = len(texts)
    yield sleep(0.6)
    assert len([x for x in logs.texts() if "broker unreachable" in x]) == count  # stopped retrying


@pytest_twisted.inlineCallbacks
def test_cluster_urls_tried_in_turn_and_early_operations_wait(
        make_transport: Any, url: str, names: Names) -> Any:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    t = amqp.from_url([dead, url], reactor, backoff=lambda attempt: 0.1, operation_timeout=10.0,
                      heartbeat=5.0)
    q = names.queue()
    # issued before start: they wait for the link
    declared = t.declare_queue(q, durable=False)
    published = declared.addCallback(lambda _: t.publish("", q, Message(body=b"early")))
    t.start()
    try:
        yield wait(published)
        assert t.connected
        inbox = Inbox()
        yield wait(t.consume(q, inbox))
        yield inbox.wait_for(1)
        assert inbox.bodies == [b"early"]
    finally:
        yield wait(t.stop())
    yield wait(t.stop())  # idempotent


def _connection_of(t: AMQPTransport) -> Any:
    assert t._protocol is not None
    return t._protocol


@defer.inlineCallbacks
def _check_reconnect(t: AMQPTransport, names: Names, kill: Callable[[], Any], other: AMQPTransport) -> Any:
    events: List[bool] = []
    t.add_link_listener(events.append)
    yield t.when_connected(TIMEOUT)
    x = names.exchange()
    q1, q2 = names.queue(), names.queue()
    yield wait(t.declare_exchange(x, "fanout", durable=False))
    yield wait(t.declare_queue(q1, durable=False, exclusive=True))  # exclusive: gone with the link
    yield wait(t.declare_queue(q2, durable=True))
    yield wait(t.bind_queue(q1, x))
    yield wait(t.bind_queue(q2, x))
    in1, in2 = Inbox(), Inbox()
    c1 = yield wait(t.consume(q1, in1, prefetch=7))
    c2 = yield wait(t.consume(q2, in2, prefetch=3))
    yield wait(t.publish(x, "", Message(body=b"before")))
    yield in1.wait_for(1)
    yield in2.wait_for(1)
    old = _connection_of(t)

    # publishes in flight when the link goes
    in_flight = [t.publish(x, "", Message(body=b"flight-%d" % i)) for i in range(200)]
    yield kill()
    outcomes = yield wait(defer.DeferredList(in_flight, consumeErrors=True), 30)
    confirmed = set()
    for i, (ok, value) in enumerate(outcomes):
        if ok:
            confirmed.add(b"flight-%d" % i)
        else:
            assert value.check(ConnectionLost), value
    yield until(lambda: t.connected and t._protocol is not old, 30, "reconnect")
    # listeners heard the link go down, then come back (after replay)
    assert False in events and events[-1] is True
    assert events.index(False) < len(events) - 1
    assert c1.active and c2.active and c1.prefetch == 7

    # topology is back (the exclusive queue was re-created and bound) and consumers resumed
    yield wait(other.publish(x, "", Message(body=b"after")))
    yield in1.wait_for(1 + 1)
    yield until(lambda: b"after" in in1.bodies and b"after" in in2.bodies, what="'after' on both queues")
    # nothing confirmed to the durable queue was lost
    yield until(lambda: confirmed <= set(in2.bodies), what="all confirmed in-flight messages")
    yield wait(t.publish("", q1, Message(body=b"direct")))
    yield until(lambda: b"direct" in in1.bodies, what="direct publish after reconnect")


@pytest_twisted.inlineCallbacks
def test_reconnect_after_abrupt_tcp_loss(make_transport: Any, names: Names) -> Any:
    t = make_transport(backoff=lambda attempt: 0.2)
    other = make_transport()
    yield other.when_connected(TIMEOUT)

    def kill() -> Any:
        _connection_of(t).transport.abortConnection()
        return defer.succeed(None)

    yield _check_reconnect(t, names, kill, other)


@pytest_twisted.inlineCallbacks
def test_reconnect_after_broker_closes_the_connection(make_transport: Any, names: Names) -> Any:
    t = make_transport(backoff=lambda attempt: 0.2)
    other = make_transport()
    yield other.when_connected(TIMEOUT)

    def kill() -> Any:
        # a protocol error: the broker answers with connection.close (504 CHANNEL_ERROR)
        _connection_of(t).write_ack(999, 1)
        return defer.succeed(None)

    yield _check_reconnect(t, names, kill, other)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_reconnect_after_rabbitmqctl_close_and_broker_restart(private_rabbitmq: Any, make_transport: Any,
                                                              names: Names, logs: LogCapture) -> Any:
    node = private_rabbitmq
    t = make_transport(node.url, backoff=lambda attempt: 0.3)
    other = make_transport(node.url, backoff=lambda attempt: 0.3)
    yield other.when_connected(TIMEOUT)

    def close_all() -> Any:
        from twisted.internet.threads import deferToThread
        return deferToThread(node.ctl, "close_all_connections", "test")

    yield _check_reconnect(t, names, close_all, other)
    assert any("CONNECTION_FORCED" in x for x in logs.texts())

    # the broker goes away altogether, then comes back: the transport waits and recovers
    q = names.queue("durable")
    yield wait(t.declare_queue(q, durable=True))
    inbox = Inbox()
    yield wait(t.consume(q, inbox))
    yield wait(node.stop_async(), 60)
    yield until(lambda: not t.connected, what="link down")
    yield sleep(1.0)
    assert any("broker unreachable" in x for x in logs.texts())
    yield wait(node.start_async(), 120)
    yield until(lambda: t.connected and other.connected, 30, "reconnect after broker restart")
    yield wait(other.publish("", q, Message(body=b"after restart")))
    yield inbox.wait_for(1)
    assert inbox.bodies[-1] == b"after restart"


@pytest_twisted.inlineCallbacks
def test_stop_is_bounded_and_fails_waiters(make_transport: Any, names: Names) -> Any:
    t = make_transport()
    yield t.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(t.declare_queue(q, durable=False))
    inbox = Inbox(ack=False)
    yield wait(t.consume(q, inbox))
    yield wait(t.publish("", q, Message(body=b"unacked")))
    yield inbox.wait_for(1)
    events: List[bool] = []
    t.add_link_listener(events.append)
    started = reactor.seconds()
    yield wait(t.stop(), 10)
    assert reactor.seconds() - started < 5
    assert not t.connected and events == [False]
    inbox.deliveries[0].ack()  # the link that brought it is gone: a no-op
    with pytest.raises(NotConnected):
        yield wait(t.publish("", q, Message(body=b"after stop")))


@pytest_twisted.inlineCallbacks
def test_headers_too_large_for_a_frame_fail_the_publish_only(transport: AMQPTransport, names: Names) -> Any:
    yield transport.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(transport.declare_queue(q, durable=False))
    with pytest.raises(ValueError):
        yield wait(transport.publish("", q, Message(body=b"x", headers={"big": "x" * 200000})))
    with pytest.raises(ValueError):
        yield wait(transport.publish("", q, Message(body=b"x", correlation_id="c" * 300)))
    yield wait(transport.publish("", q, Message(body=b"fine")))
    assert transport.connected


class _Owner:
    """The protocol's calls on its AMQPTransport, ignored (the frame reader alone is tested)."""

    def _broker_cancelled(self, state: Any, tag: Any) -> None:
        pass

    def _channel_closed(self, *args: Any) -> None:
        pass

    def _nacked(self, *args: Any) -> None:
        pass

    def _connection_lost(self, *args: Any) -> None:
        pass

    def _connection_blocked(self, *args: Any) -> None:
        pass

    def _connection_unblocked(self, *args: Any) -> None:
        pass


class _Consumer:
    queue = "q"
    prefetch = 10
    no_ack = False

    def __init__(self) -> None:
        self.deliveries: list = []

    def on_delivery(self, delivery: Any) -> None:
        self.deliveries.append(delivery)


def _frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"


def _short(s: bytes) -> bytes:
    return bytes([len(s)]) + s


def _with_failures(logs: LogCapture) -> List[str]:
    """Each log line, with the type and message of its failure, if any."""
    from twisted.logger import formatEvent
    out = []
    for e in logs.events:
        failure = e.get("log_failure")
        extra = f" {failure.type.__name__}: {failure.getErrorMessage()}" if failure is not None else ""
        out.append(formatEvent(e) + extra)
    return out


def _reader() -> Any:
    """A protocol past its handshake (frame_max 4096), a consumer on channel 1, its wire."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    owner = AMQPTransport("amqp://guest:guest@127.0.0.1:1/", reactor=Clock())
    proto = amqp._AMQPProtocol(_Owner(), owner.urls[0], owner.spec, Clock(), 0)
    wire = StringTransport()
    proto.makeConnection(wire)
    consumer = _Consumer()
    proto.fast[1] = amqp._ConsumerChannel(proto, 1, consumer, "ctag")
    return proto, wire, consumer


def test_a_frame_larger_than_frame_max_drops_the_connection_at_once(logs: LogCapture) -> None:
    """A broken or hostile peer declaring a 4 GiB frame: dropped on its first
    8 bytes, not buffered while the rest is awaited."""
    proto, wire, _ = _reader()
    proto.dataReceived(struct.pack(">BHI", 3, 1, 0xFFFFFF00) + b"x" * 6000)
    assert wire.disconnecting and proto._rbuf == b""
    assert any("frame_max is 4096" in line for line in _with_failures(logs)), _with_failures(logs)


def test_content_header_properties_may_not_run_into_the_next_frame(logs: LogCapture) -> None:
    """A delivery's empty-body content header whose headers table claims more
    bytes than its frame holds: the reader must not take them from the next
    frame. The connection is dropped; no message reaches the consumer."""
    proto, wire, consumer = _reader()
    deliver = _frame(1, 1, struct.pack(">HH", 60, 60) + _short(b"ctag") + struct.pack(">QB", 1, 0) +
                     _short(b"ex") + _short(b"rk"))
    table = encode_table({"op": "x"})
    flags = 0x2000  # headers only
    # the frame holds {"op": 2-byte string} but its last byte; read on, that byte is the
    # frame-end octet and the next bytes are a sound entry {"zz": 14-byte string}
    inside = b"\x02opS" + struct.pack(">I", 2) + b"x"
    beyond = b"\x02zzS" + struct.pack(">I", 14) + b"y" * 14
    short_table = struct.pack(">I", len(inside) + 1 + len(beyond)) + inside
    header = _frame(2, 1, struct.pack(">HHQH", 60, 0, 0, flags) + short_table)
    proto.dataReceived(deliver + header + beyond)
    assert consumer.deliveries == [] and wire.disconnecting
    assert any("bad data from broker" in line and "BadFrame" in line for line in _with_failures(logs)), \
        _with_failures(logs)
    # and a sound one on a fresh reader is delivered
    proto, wire, consumer = _reader()
    header = _frame(2, 1, struct.pack(">HHQH", 60, 0, 0, flags) + table)
    proto.dataReceived(deliver + header + _frame(8, 0, b""))
    assert len(consumer.deliveries) == 1 and consumer.deliveries[0].message.headers == {"op": "x"}


def _publisher() -> Any:
    """A reader whose channel 2 is the publishing channel, with one publish awaiting its confirm."""
    proto, wire, consumer = _reader()
    channel = amqp._PublishChannel(proto, 2)
    proto.fast[2] = channel
    return proto, wire, channel


@pytest.mark.parametrize("frame", [
    # basic.deliver whose routing key runs past its frame (into the next frame's bytes)
    _frame(1, 1, struct.pack(">HH", 60, 60) + _short(b"ctag") + struct.pack(">QB", 1, 0) + _short(b"ex") +
           b"\x09rk")[:-1] + b"\xce" + b"next-byte" + _frame(8, 0, b""),
    # basic.ack and basic.nack one byte short (the flag octet would be the frame-end octet)
    _frame(1, 2, struct.pack(">HHQ", 60, 80, 1)),
    _frame(1, 2, struct.pack(">HHQ", 60, 120, 1)),
    # basic.return whose routing key runs past its frame
    _frame(1, 2, struct.pack(">HHH", 60, 50, 312) + _short(b"NO_ROUTE") + _short(b"ex") + b"\x05rk"),
    # basic.cancel whose tag runs past its frame
    _frame(1, 1, struct.pack(">HH", 60, 30) + b"\x08ct"),
    # a content header too short for its class, weight, size and flags
    _frame(1, 1, struct.pack(">HH", 60, 60) + _short(b"ctag") + struct.pack(">QB", 1, 0) + _short(b"ex") +
           _short(b"rk")) + _frame(2, 1, struct.pack(">HHQ", 60, 0, 0)),
], ids=["deliver", "ack", "nack", "return", "cancel", "short-header"])
def test_fast_path_methods_may_not_read_past_their_frame(frame: bytes, logs: LogCapture) -> None:
    """The fast paths read a method's arguments from the read buffer: one that
    runs past its frame is a BadFrame (the connection drops) before it acts."""
    proto, wire, channel = _publisher()
    settled: List[Any] = []
    channel._settle = lambda *args: settled.append(args)  # type: ignore[method-assign]
    cancelled: List[Any] = []
    proto.owner = type("Owner", (), {"_broker_cancelled": lambda self, *a: cancelled.append(a)})()
    consumer = proto.fast[1].consumer
    proto.dataReceived(frame + b"\x00" * 16)
    assert wire.disconnecting
    assert settled == [] and cancelled == [] and consumer.deliveries == []
    assert any("BadFrame" in line and "past the end of its frame" in line for line in _with_failures(logs)), \
        _with_failures(logs)


def test_heartbeats_sent_when_idle_and_silent_broker_dropped() -> None:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    clock = Clock()
    owner = AMQPTransport("amqp://guest:guest@127.0.0.1:1/", reactor=clock)
    proto = amqp._AMQPProtocol(owner, owner.urls[0], owner.spec, clock, 10.0)
    wire = StringTransport()
    proto.makeConnection(wire)
    assert wire.value() == b"AMQP\x00\x00\x09\x01"
    wire.clear()
    proto.start_heartbeat(10)
    clock.advance(5)
    assert wire.value() == b""  # the protocol header counted as traffic
    clock.advance(5)
    assert wire.value() == b"\x08\x00\x00\x00\x00\x00\x00\xce"  # idle: a heartbeat frame
    proto.dataReceived(b"\x08\x00\x00\x00\x00\x00\x00\xce")  # the broker's heartbeat
    for _ in range(4):  # 20 s of silence: not yet
        clock.advance(5)
    assert not wire.disconnecting
    clock.advance(5)  # nothing from the broker for two full intervals (checked every half interval)
    assert wire.disconnecting


@pytest_twisted.inlineCallbacks
def test_silent_server_times_out_the_handshake_and_retries(make_transport: Any, logs: LogCapture) -> Any:
    from twisted.internet.protocol import Factory, Protocol

    connections: List[Any] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            connections.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        t = make_transport(f"amqp://guest:guest@127.0.0.1:{port.getHost().port}/", connect_timeout=0.5,
                           operation_timeout=0.5, backoff=lambda attempt: 0.1)
        yield until(lambda: len(connections) >= 2, 10, "a second attempt")
        assert not t.connected
        assert any("did not complete the connection setup" in x for x in logs.texts())
        yield wait(t.stop(), 5)
    finally:
        for c in connections:
            c.transport.abortConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_amqplain_login(make_transport: Any, url: str, names: Names) -> Any:
    t = make_transport(url, auth_mechanism="AMQPLAIN")
    yield t.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(t.declare_queue(q, durable=False))
    yield wait(t.publish("", q, Message(body=b"x")))


@pytest_twisted.inlineCallbacks
def test_refused_login_is_logged_and_retried_without_the_password(make_transport: Any, url: str,
                                                                  logs: LogCapture) -> Any:
    u = parse_url(url)
    bad = f"amqp://{u.username}:not-the-Passw0rd@{u.host}:{u.port}/"
    t = make_transport(bad, backoff=lambda attempt: 0.2)
    yield until(lambda: len([x for x in logs.texts() if "refused the login" in x]) >= 2, 10, "two attempts")
    assert not t.connected
    texts = [x for x in logs.texts() if "refused the login" in x]
    assert "403" in texts[-1] or "ACCESS_REFUSED" in texts[-1], texts[-1]
    assert not any("not-the-Passw0rd" in x for x in logs.texts())


# -- refused publishes (basic.nack): sent again on a fresh channel
#
# A queue at its x-max-length with x-overflow reject-publish makes the broker
# refuse (basic.nack) every publish to it, deterministically, on one node.


def _full_queue_arguments() -> Dict[str, Any]:
    return {"x-max-length": 1, "x-overflow": "reject-publish"}


def _publish_channels(t: AMQPTransport) -> List[Any]:
    protocol = t._protocol
    assert protocol is not None
    return [f for f in protocol.fast.values() if isinstance(f, amqp._PublishChannel)]


@pytest_twisted.inlineCallbacks
def test_refused_publish_is_sent_again_on_a_fresh_channel_until_taken(make_transport: Any, names: Names) -> Any:
    t = make_transport()
    yield t.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(t.declare_queue(q, durable=False, arguments=_full_queue_arguments()))
    yield wait(t.publish("", q, Message(body=b"one")))  # the queue is full now
    first = t._publisher
    refused = t.publish("", q, Message(body=b"two"))
    yield until(lambda: t._publisher is not first, what="a fresh publishing channel after the nack")
    yield sleep(0.3)
    assert not refused.called  # refused, and being sent again: not failed, not confirmed
    assert first.retired and not first.open  # the refusing channel is closed (nothing pending on it)
    assert _publish_channels(t) == [t._publisher]
    # room in the queue: the next attempt is taken, and the publish fires on that confirm
    inbox = Inbox()
    yield wait(t.consume(q, inbox, prefetch=10))
    yield wait(refused, 5)
    yield inbox.wait_for(2)
    yield sleep(0.5)
    assert inbox.bodies == [b"one", b"two"]  # once each: a refused message was not taken
    yield wait(t.publish("", q, Message(body=b"three")))
    yield inbox.wait_for(3)


@pytest_twisted.inlineCallbacks
def test_publish_refused_every_time_fails_with_not_confirmed_after_the_retries(make_transport: Any,
                                                                               names: Names) -> Any:
    from magnet.errors import NotConfirmed
    t = make_transport(nack_retries=2)
    yield t.when_connected(TIMEOUT)
    q, other = names.queue(), names.queue()
    yield wait(t.declare_queue(q, durable=False, arguments=_full_queue_arguments()))
    yield wait(t.declare_queue(other, durable=False))
    yield wait(t.publish("", q, Message(body=b"one")))
    began = reactor.seconds()
    with pytest.raises(NotConfirmed, match=r"basic\.nack, 3 times"):
        yield wait(t.publish("", q, Message(body=b"two")))
    assert reactor.seconds() - began >= 0.05 + 0.1  # two retries, after their backoff
    assert t.connected and len(_publish_channels(t)) == 1
    yield wait(t.publish("", other, Message(body=b"elsewhere")))  # the link and channel serve on
    inbox = Inbox()
    yield wait(t.consume(q, inbox))
    yield inbox.wait_for(1)
    yield sleep(0.5)
    assert inbox.bodies == [b"one"]


@pytest_twisted.inlineCallbacks
def test_a_refused_publish_given_up_by_its_sender_is_not_sent_again(make_transport: Any, names: Names) -> Any:
    t = make_transport()
    yield t.when_connected(TIMEOUT)
    q = names.queue()
    yield wait(t.declare_queue(q, durable=False, arguments=_full_queue_arguments()))
    yield wait(t.publish("", q, Message(body=b"one")))
    first = t._publisher
    d = t.publish("", q, Message(body=b"two"))
    yield until(lambda: t._publisher is not first, what="a fresh publishing channel after the nack")
    d.cancel()  # as Bus.send does at its timeout
    with pytest.raises(defer.CancelledError):
        yield d
    inbox = Inbox()
    yield wait(t.consume(q, inbox))  # room in the queue from now on
    yield sleep(2.0)  # longer than the backoff of every remaining retry
    assert inbox.bodies == [b"one"]
