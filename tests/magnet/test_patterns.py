"""Every messaging pattern, on the in-process broker and on RabbitMQ alike."""
from __future__ import annotations

import json
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

import magnet
from magnet import Message, operation
from magnet.bus import ATTEMPT_HEADER, ERROR_HEADER
from tests.magnet.waiting import wait

TIMEOUT = 10


def settle(seconds: float = 0.3) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class Store:
    def __init__(self) -> None:
        self.data = {"a": 1}

    @operation
    def get(self, key: str) -> Any:
        return self.data[key]

    @operation
    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    @operation
    def raw(self, size: int) -> bytes:
        return bytes(range(256)) * (size // 256)

    @operation
    def slow(self, seconds: float) -> defer.Deferred:
        return task.deferLater(reactor, seconds, lambda: "late")

    @operation
    def unserializable(self) -> Any:
        return object()

    def not_exposed(self) -> str:
        return "secret"


@pytest_twisted.inlineCallbacks
def test_worker_queue_competing_consumers_each_message_once(make_bus: Any, names: Any) -> Any:
    q = names("work")
    producer, worker_a, worker_b = make_bus(), make_bus(), make_bus()
    yield producer.declare_worker_queue(q)
    got: List[tuple] = []
    done = defer.Deferred()

    def handler(who: str) -> Any:
        def handle(message: Message) -> Any:
            got.append((who, message.json()["n"]))
            if len(got) == 40 and not done.called:
                done.callback(None)
            return task.deferLater(reactor, 0.01, lambda: None)
        return handle

    yield worker_a.consume(q, handler("a"), prefetch=2)
    yield worker_b.consume(q, handler("b"), prefetch=2)
    yield defer.gatherResults([producer.send_json(q, {"n": i}) for i in range(40)])
    yield wait(done)
    yield settle()
    assert sorted(n for _, n in got) == list(range(40))
    assert {who for who, _ in got} == {"a", "b"}


@pytest_twisted.inlineCallbacks
def test_ack_only_after_handler_deferred_fires(make_bus: Any, names: Any) -> Any:
    q = names("ack")
    bus = make_bus()
    yield bus.declare_worker_queue(q)
    gate = defer.Deferred()
    seen: List[int] = []

    def handle(message: Message) -> defer.Deferred:
        seen.append(message.json())
        return gate if len(seen) == 1 else defer.succeed(None)

    yield bus.consume(q, handle, prefetch=1)
    yield bus.send_json(q, 1)
    yield bus.send_json(q, 2)
    yield settle(0.5)
    assert seen == [1], "prefetch 1: the second message must wait for the first ack"
    gate.callback(None)
    yield settle(0.5)
    assert seen == [1, 2]


@pytest_twisted.inlineCallbacks
def test_failing_handler_retried_then_dead_lettered_and_consumer_keeps_running(make_bus: Any, names: Any) -> Any:
    q = names("poison")
    bus = make_bus(retry_limit=2)
    yield bus.declare_worker_queue(q)
    attempts: List[Any] = []
    good = defer.Deferred()

    def handle(message: Message) -> None:
        body = message.json()
        if body == "poison":
            attempts.append(message.headers.get(ATTEMPT_HEADER, 0))
            raise ValueError("cannot digest this")
        good.callback(body)

    yield bus.consume(q, handle)
    dead: defer.DeferredQueue = defer.DeferredQueue()
    yield bus.consume(q + ".dead", dead.put)
    yield bus.send_json(q, "poison")
    letter = yield wait(dead.get())
    assert letter.json() == "poison"
    assert "ValueError: cannot digest this" in letter.headers[ERROR_HEADER]
    assert attempts == [0, 1, 2]
    yield bus.send_json(q, "fine")
    assert (yield wait(good)) == "fine"


@pytest_twisted.inlineCallbacks
def test_undecodable_message_dead_lettered_at_once(make_bus: Any, names: Any) -> Any:
    q = names("bad")
    bus = make_bus(retry_limit=5)
    yield bus.declare_worker_queue(q)
    calls: List[int] = []

    def handle(message: Message) -> None:
        calls.append(1)
        message.json()

    yield bus.consume(q, handle)
    dead: defer.DeferredQueue = defer.DeferredQueue()
    yield bus.consume(q + ".dead", dead.put)
    yield bus.send(q, Message(body=b"{not json", content_type="application/json"))
    letter = yield wait(dead.get())
    assert letter.body == b"{not json"
    assert "BadMessage" in letter.headers[ERROR_HEADER]
    assert calls == [1]


@pytest_twisted.inlineCallbacks
def test_fanout_every_subscriber_gets_a_copy(make_bus: Any, names: Any) -> Any:
    f = names("fan")
    sender = make_bus()
    yield sender.declare_fanout(f)
    inboxes: List[List[Any]] = [[], [], []]
    for inbox in inboxes:
        subscriber = make_bus()
        yield subscriber.subscribe(f, lambda m, inbox=inbox: inbox.append(m.json()))
    for i in range(5):
        yield sender.send_json(f, i)
    for _ in range(50):
        if all(len(i) == 5 for i in inboxes):
            break
        yield settle(0.1)
    assert inboxes == [[0, 1, 2, 3, 4]] * 3


@pytest_twisted.inlineCallbacks
def test_unroutable_send_fails_loudly(make_bus: Any, names: Any) -> Any:
    bus = make_bus()
    with pytest.raises(magnet.Unroutable):
        yield bus.send_json(names("nowhere"), {"lost": True})
    f = names("emptyfan")
    yield bus.declare_fanout(f)
    with pytest.raises(magnet.Unroutable):
        yield bus.send_json(f, "nobody listens")
    yield bus.send(f, Message(b"ok to drop"), mandatory=False)
    yield bus.transport.delete_exchange(f)


@pytest_twisted.inlineCallbacks
def test_send_json_and_binary_bodies_round_trip(make_bus: Any, names: Any) -> Any:
    bus = make_bus()
    listener = yield bus.listen()
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    headers = {"s": "text", "i": 7, "b": True, "f": 1.5, "nested": {"k": "v"}}
    yield bus.send(listener.address, Message(body=blob, headers=headers, content_type=magnet.BINARY,
                                             correlation_id="c1", type="blob"))
    got = yield wait(listener.get())
    assert got.body == blob
    assert got.content_type == magnet.BINARY
    assert got.correlation_id == "c1" and got.type == "blob"
    for key, value in headers.items():
        assert got.headers[key] == value
    yield bus.send_json(listener.address, {"ünïcode": [1, None, "x"]})
    assert (yield wait(listener.get())).json() == {"ünïcode": [1, None, "x"]}


@pytest_twisted.inlineCallbacks
def test_rpc_results_and_typed_errors(make_bus: Any, names: Any) -> Any:
    q = names("store")
    server, client = make_bus(), make_bus()
    yield server.serve(q, Store())
    assert (yield client.call(q, "get", key="a")) == 1
    yield client.call(q, "set", key="b", value={"x": [1, 2]})
    assert (yield client.call(q, "get", key="b")) == {"x": [1, 2]}
    assert (yield client.call(q, "raw", size=1024)) == bytes(range(256)) * 4

    with pytest.raises(magnet.RemoteError) as info:
        yield client.call(q, "get", key="missing")
    assert info.value.remote_type == "KeyError" and "missing" in info.value.message

    with pytest.raises(magnet.UnknownOperation) as unknown:
        yield client.call(q, "not_exposed")
    assert "not_exposed" in str(unknown.value) and "get" in str(unknown.value)

    with pytest.raises(magnet.BadArguments):
        yield client.call(q, "get", wrong="a")

    with pytest.raises(magnet.RemoteError) as bad_result:
        yield client.call(q, "unserializable")
    assert bad_result.value.remote_type == "TypeError"


@pytest_twisted.inlineCallbacks
def test_rpc_timeout_and_unroutable(make_bus: Any, names: Any) -> Any:
    q = names("silent")
    client = make_bus()
    yield client.declare_worker_queue(q)  # nobody serves it
    with pytest.raises(magnet.Timeout):
        yield client.call(q, "anything", timeout=0.5)
    with pytest.raises(magnet.Unroutable):
        yield client.call(names("missing"), "anything")
    served = names("slow")
    server = make_bus()
    yield server.serve(served, Store())
    with pytest.raises(magnet.Timeout):
        yield client.call(served, "slow", seconds=2, timeout=0.3)
    assert (yield client.call(served, "get", key="a")) == 1


@pytest_twisted.inlineCallbacks
def test_rpc_replies_without_acks_and_requests_acked_after_their_replies(make_bus: Any, names: Any) -> Any:
    """Replies are consumed no-ack and a server's request acks ride with its next reply:
    a reply that comes after its call timed out leaves the reply consumer working (an ack
    or nack of a no-ack delivery would make RabbitMQ close its channel), and every request
    answered is acked once the server stops (none comes back to the queue)."""
    q = names("seq")
    server, client = make_bus(), make_bus()
    subscription = yield server.serve(q, Store())
    for i in range(50):
        assert (yield client.call(q, "get", key="a")) == 1
    with pytest.raises(magnet.Timeout):
        yield client.call(q, "slow", seconds=0.5, timeout=0.1)
    yield settle(0.8)  # the late reply has arrived meanwhile, and was dropped
    assert (yield client.call(q, "get", key="a")) == 1
    yield subscription.cancel()
    leftover: List[Message] = []
    other = make_bus()
    yield other.consume(q, leftover.append)
    yield settle(0.5)
    assert leftover == []


@pytest_twisted.inlineCallbacks
def test_rpc_malformed_request_gets_error_reply(make_bus: Any, names: Any) -> Any:
    q = names("strict")
    server, client = make_bus(), make_bus()
    yield server.serve(q, Store())
    inbox = yield client.listen()
    bad = [
        Message(body=b"{nope", content_type="application/json", headers={"op": "get"}, type="call"),
        Message(body=b'{"key": "a"}', content_type="application/json", type="call"),
        Message(body=b'["a"]', content_type="application/json", headers={"op": "get"}, type="call"),
        Message(body=b'{"key": "a"}', content_type="text/plain", headers={"op": "get"}, type="call"),
    ]
    for i, message in enumerate(bad):
        yield client.send(q, message.evolve(reply_to=inbox.address, correlation_id=str(i)))
    for i in range(len(bad)):
        reply = yield wait(inbox.get())
        assert reply.type == "error"
        with pytest.raises(magnet.RemoteError) as info:
            magnet.decode_reply(reply)
        assert info.value.remote_type == "BadMessage"
    assert (yield client.call(q, "get", key="a")) == 1, "the server keeps serving"


@pytest_twisted.inlineCallbacks
def test_third_party_reply_goes_elsewhere(make_bus: Any, names: Any) -> Any:
    q = names("svc")
    server, coordinator, third = make_bus(), make_bus(), make_bus()
    yield server.serve(q, Store())
    inbox = yield third.listen()
    yield coordinator.tell(q, "get", inbox.address, correlation_id="job-1", key="a")
    reply = yield wait(inbox.get())
    assert reply.correlation_id == "job-1"
    assert magnet.decode_reply(reply) == 1


@pytest_twisted.inlineCallbacks
def test_listen_address_private_and_shared(make_bus: Any, names: Any) -> Any:
    owner, other, sender = make_bus(), make_bus(), make_bus()
    got: List[Any] = []
    shared = yield owner.listen(lambda m: got.append(("owner", m.json())), shared=True)
    yield other.consume(shared.address, lambda m: got.append(("other", m.json())), prefetch=1)
    for i in range(20):
        yield sender.send_json(shared.address, i)
    for _ in range(50):
        if len(got) == 20:
            break
        yield settle(0.1)
    assert sorted(n for _, n in got) == list(range(20))
    assert {who for who, _ in got} == {"owner", "other"}
    yield shared.close()
    with pytest.raises(magnet.Unroutable):
        yield sender.send_json(shared.address, "gone")


@pytest_twisted.inlineCallbacks
def test_stream_arrives_whole_and_in_order(make_bus: Any) -> Any:
    sender, receiver = make_bus(), make_bus()
    listener = yield receiver.listen()
    payload = bytes(range(256)) * (5 * 4096 + 3)  # a little over 5 MiB, not a chunk multiple
    chunks = [payload[i:i + 100_000] for i in range(0, len(payload), 100_000)]
    sent = sender.send_stream(listener.address, {"status": 200, "headers": {"a": "b"}}, chunks,
                              correlation_id="req-1")
    s = yield wait(listener.next_stream())
    assert s.metadata == {"status": 200, "headers": {"a": "b"}}
    assert s.correlation_id == "req-1"
    body = yield wait(s.read_all())
    assert (yield wait(sent)) == len(payload)
    assert body == payload


@pytest_twisted.inlineCallbacks
def test_stream_abort_reaches_receiver_as_error(make_bus: Any) -> Any:
    sender, receiver = make_bus(), make_bus()
    listener = yield receiver.listen()
    writer = sender.open_stream(listener.address, {"status": 200})
    yield writer.write(b"x" * 200_000)
    yield writer.abort(IOError("upstream closed the connection"))
    s = yield wait(listener.next_stream())
    with pytest.raises(magnet.StreamError) as info:
        yield wait(s.read_all())
    assert "upstream closed" in str(info.value)


@pytest_twisted.inlineCallbacks
def test_slow_sink_slows_the_sender(make_bus: Any) -> Any:
    """The receiver acks a chunk only once its sink took it, so a slow sink
    holds the sender back instead of piling chunks up in memory."""
    sender, receiver = make_bus(), make_bus()
    listener = yield receiver.listen(prefetch=4)
    writer = sender.open_stream(listener.address, {}, chunk_size=1024, window=2)
    s = yield wait(listener.next_stream())
    taken: List[bytes] = []
    gate = defer.Deferred()

    def sink(data: bytes) -> defer.Deferred:
        taken.append(data)
        return gate

    # the stream is cut when the buses stop at the test's end: that failure is expected
    s.deliver(sink).addErrback(lambda f: f.trap(magnet.ConnectionLost, magnet.StreamError))
    for _ in range(10):
        yield writer.write(b"y" * 1024)
    yield settle(0.3)
    assert len(taken) == 1, "the sink has not finished its first chunk"


@pytest_twisted.inlineCallbacks
def test_a_stream_lost_before_anyone_reads_it_fails_its_later_reader(make_bus: Any) -> Any:
    """The link goes down while a stream waits, unread, at a private address:
    a later read fails with ConnectionLost, and no unhandled error is left behind."""
    import gc

    from twisted.logger import globalLogPublisher

    unhandled: List[str] = []

    def observe(event: dict) -> None:
        if "Unhandled error" in str(event.get("log_format", "")) or \
                "Unhandled error" in str(event.get("why", "")):
            unhandled.append(str(event.get("log_failure")))

    sender, receiver = make_bus(), make_bus()
    listener = yield receiver.listen()
    writers = [sender.open_stream(listener.address, {}) for _ in range(2)]
    for w in writers:
        yield w.write(b"x" * 10)
    read_later = yield wait(listener.next_stream())
    never_read = yield wait(listener.next_stream())
    globalLogPublisher.addObserver(observe)
    try:
        receiver._link_changed(False)  # what the transport reports when the broker connection drops
        with pytest.raises(magnet.ConnectionLost):
            yield wait(read_later.read_all())
        # a failed Deferred nobody holds is logged as "Unhandled error" when collected:
        # the unread stream must keep its failure for a reader, not in such a Deferred
        assert not never_read._done.called
        del read_later, never_read
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert unhandled == []
    for w in writers:
        w.abort(RuntimeError("test over")).addErrback(lambda _: None)


@pytest_twisted.inlineCallbacks
def test_clean_shutdown_waits_for_inflight_handler(make_bus: Any, names: Any) -> Any:
    q = names("inflight")
    producer, worker = make_bus(), make_bus(shutdown_timeout=5)
    yield producer.declare_worker_queue(q)
    started = defer.Deferred()
    finished: List[bool] = []

    def handle(message: Message) -> defer.Deferred:
        started.callback(None)
        return task.deferLater(reactor, 0.5, lambda: finished.append(True))

    yield worker.consume(q, handle)
    yield producer.send_json(q, "job")
    yield wait(started)
    yield wait(worker.stopService())
    assert finished == [True]
    checker = make_bus()
    leftovers = yield checker.listen()
    # the job was acked: nothing is left in the queue for a new consumer
    late: List[Any] = []
    yield checker.consume(q, lambda m: late.append(m))
    yield settle(0.5)
    assert late == []


@pytest_twisted.inlineCallbacks
def test_post_is_send_only_and_streams_can_be_handled_as_they_start(make_bus: Any, names: Any) -> Any:
    q = names("posted")
    server, client = make_bus(), make_bus()
    store = Store()
    yield server.serve(q, store)
    yield client.post(q, "set", key="k", value="v")
    assert (yield client.call(q, "get", key="k")) == "v"
    bodies: List[bytes] = []
    arrived = defer.Deferred()

    def on_stream(s: Any) -> None:
        s.read_all().addCallback(bodies.append).addCallback(arrived.callback)

    listener = yield server.listen(on_stream=on_stream)
    yield client.send_stream(listener.address, {}, [b"ab", b"cd"])
    yield wait(arrived)
    assert bodies == [b"abcd"]


@pytest_twisted.inlineCallbacks
def test_durable_address_gives_each_stream_whole_to_one_consumer(make_bus: Any, names: Any) -> Any:
    """Two consumers of one durable address never split a stream: one is
    active, the other takes over when it goes."""
    address = names("durable")
    sender, first, second = make_bus(), make_bus(), make_bus()
    got: List[tuple] = []
    done = defer.Deferred()

    def receiver(who: str) -> Any:
        def on_stream(s: Any) -> None:
            def finished(body: bytes) -> None:
                got.append((who, body))
                if len(got) == 3 and not done.called:
                    done.callback(None)
            s.read_all().addCallbacks(finished, lambda f: got.append((who, f.value)))
        return on_stream

    a = yield first.listen(name=address, durable=True, on_stream=receiver("first"))
    yield second.listen(name=address, durable=True, on_stream=receiver("second"))
    for i in range(3):
        yield sender.send_stream(address, {}, [bytes([i]) * 1000] * 20, chunk_size=1000)
    yield wait(done)
    assert got == [("first", bytes([i]) * 20000) for i in range(3)]
    yield a.subscription.cancel()
    yield sender.send_stream(address, {}, [b"z" * 1000] * 5, chunk_size=1000)
    for _ in range(50):
        if len(got) == 4:
            break
        yield settle(0.1)
    assert got[3] == ("second", b"z" * 5000)
