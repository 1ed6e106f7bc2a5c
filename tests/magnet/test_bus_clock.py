"""Unit tests of the bus on the in-process broker, with time driven by a Clock."""
from __future__ import annotations

import uuid
from typing import Any, List

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

import magnet
from magnet import Message, operation
from magnet.memory import HIGH_WATER_BYTES, MemoryBroker, MemoryTransport


def make(clock: Clock, broker: MemoryBroker = None, **options: Any) -> magnet.Bus:
    broker = broker or MemoryBroker(clock)
    bus = magnet.Bus(MemoryTransport(broker), clock=clock, **options)
    bus.startService()
    return bus


def result_of(d: defer.Deferred) -> Any:
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class Echo:
    @operation
    def echo(self, value: Any) -> Any:
        return value

    @operation
    def never(self) -> defer.Deferred:
        return defer.Deferred()


def test_call_times_out_exactly_at_its_limit() -> None:
    clock = Clock()
    bus = make(clock, rpc_timeout=7)
    bus.serve("echo", Echo())
    clock.advance(0)
    d = bus.call("echo", "never")
    failures: List[Any] = []
    d.addErrback(failures.append)
    clock.advance(0)
    clock.advance(6.9)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(magnet.Timeout)
    assert "echo.never" in str(failures[0].value)
    assert bus._pending_calls == {}, "a timed-out call leaves nothing behind"


def test_call_answers_through_the_clock() -> None:
    clock = Clock()
    bus = make(clock)
    bus.serve("echo", Echo())
    d = bus.call("echo", "echo", value=[1, "two"])
    for _ in range(5):
        clock.advance(0)
    assert result_of(d) == [1, "two"]


def test_pending_calls_fail_fast_when_the_link_drops() -> None:
    clock = Clock()
    bus = make(clock)
    bus.serve("echo", Echo())
    d = bus.call("echo", "never")
    clock.advance(0)
    failures: List[Any] = []
    d.addErrback(failures.append)
    bus._link_changed(False)
    assert failures and failures[0].check(magnet.ConnectionLost)


def test_stream_that_stalls_fails_after_its_idle_timeout() -> None:
    clock = Clock()
    broker = MemoryBroker(clock)
    sender, receiver = make(clock, broker), make(clock, broker, stream_idle_timeout=30)
    listener = result_of_after(clock, receiver.listen())
    writer = sender.open_stream(listener.address, {"status": 200})
    writer.write(b"partial")
    s = result_of_after(clock, listener.next_stream())
    done = s.deliver(lambda data: None)
    failures: List[Any] = []
    done.addErrback(failures.append)
    clock.advance(29)
    assert not failures
    clock.advance(2)
    assert failures and failures[0].check(magnet.Timeout)


def result_of_after(clock: Clock, d: defer.Deferred) -> Any:
    for _ in range(5):
        clock.advance(0)
    return result_of(d)


def test_in_process_broker_withholds_confirms_above_high_water() -> None:
    """Flow control: a queue nobody drains stops confirming, so a sender that
    waits for confirms stops too, and memory stays bounded."""
    clock = Clock()
    bus = make(clock)
    bus.declare_worker_queue("slow")
    chunk = Message(b"x" * (256 * 1024))
    confirmed: List[int] = []
    sends = []
    for i in range(40):  # 10 MiB in all
        d = bus.send("slow", chunk, timeout=3600)
        d.addCallback(lambda _, i=i: confirmed.append(i))
        sends.append(d)
    clock.advance(0)
    limit = HIGH_WATER_BYTES // len(chunk.body) + 1
    assert len(confirmed) <= limit < 40
    taken: List[Any] = []
    bus.consume("slow", taken.append, prefetch=0)
    for _ in range(5):
        clock.advance(0)
    assert len(taken) == 40 and len(confirmed) == 40


def test_requeued_messages_keep_their_order_and_are_flagged() -> None:
    clock = Clock()
    broker = MemoryBroker(clock)
    transport = MemoryTransport(broker)
    transport.start()
    transport.declare_queue("q")
    for i in range(3):
        transport.publish("", "q", Message(str(i).encode()))
    held: List[Any] = []
    consumer = result_of(transport.consume("q", held.append, prefetch=3))
    clock.advance(0)
    assert [d.message.body for d in held] == [b"0", b"1", b"2"]
    for d in reversed(held):
        d.nack(requeue=True)
    consumer.cancel()
    again: List[Any] = []
    transport.consume("q", again.append, prefetch=10)
    clock.advance(0)
    assert [d.message.body for d in again] == [b"0", b"1", b"2"]
    assert all(d.redelivered for d in again)


def test_closing_a_connection_gives_back_what_it_held() -> None:
    clock = Clock()
    broker = MemoryBroker(clock)
    a, b = MemoryTransport(broker), MemoryTransport(broker)
    a.start()
    b.start()
    a.declare_queue("jobs")
    a.publish("", "jobs", Message(b"job"))
    got_a: List[Any] = []
    a.consume("jobs", got_a.append)
    clock.advance(0)
    assert len(got_a) == 1
    got_b: List[Any] = []
    b.consume("jobs", got_b.append)
    a.stop()  # a dies holding the job unacked
    clock.advance(0)
    assert [d.message.body for d in got_b] == [b"job"] and got_b[0].redelivered


def test_exclusive_queue_is_private_and_goes_with_its_connection() -> None:
    clock = Clock()
    broker = MemoryBroker(clock)
    a, b = MemoryTransport(broker), MemoryTransport(broker)
    a.start()
    b.start()
    a.declare_queue("mine", exclusive=True, durable=False)
    with pytest.raises(magnet.MagnetError):
        result_of(b.consume("mine", lambda d: None))
    a.stop()
    assert "mine" not in broker.queues


def test_bad_urls_are_refused_clearly() -> None:
    for url in ("", "nonsense", "ftp://host/", 42):
        with pytest.raises(magnet.BadURL):
            magnet.transport_for(url, Clock())


def test_message_bodies_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Message("text")  # type: ignore[arg-type]
    assert Message(bytearray(b"ab")).body == b"ab"
    with pytest.raises(magnet.BadMessage):
        Message(b"\xff\xfe", content_type=magnet.JSON).json()
    with pytest.raises(magnet.BadMessage):
        Message(b"{}", content_type="text/plain").json()
    with pytest.raises(magnet.BadMessage):
        Message(b"{}").header("op")


def test_a_slow_sink_is_not_taken_for_a_stalled_sender() -> None:
    clock = Clock()
    broker = MemoryBroker(clock)
    sender, receiver = make(clock, broker), make(clock, broker, stream_idle_timeout=30)
    listener = result_of_after(clock, receiver.listen())
    writer = sender.open_stream(listener.address, {}, chunk_size=4)
    writer.write(b"abcd")
    s = result_of_after(clock, listener.next_stream())
    gate = defer.Deferred()
    done = s.deliver(lambda data: gate)
    outcome: List[Any] = []
    done.addBoth(outcome.append)
    for _ in range(5):
        clock.advance(0)
    clock.advance(120)  # the sink holds its chunk for minutes
    assert not outcome
    gate.callback(None)
    writer.finish()
    for _ in range(5):
        clock.advance(0)
    assert outcome == [4]


def test_stream_pieces_go_as_chunks_without_copies() -> None:
    """A piece of a quarter chunk or more, written while nothing is buffered, is a
    chunk as it is: on the memory transport the sink gets that very object.
    Smaller pieces are joined; chunks are never larger than chunk_size."""
    clock = Clock()
    broker = MemoryBroker(clock)
    sender, receiver = make(clock, broker), make(clock, broker)
    listener = result_of_after(clock, receiver.listen())
    writer = sender.open_stream(listener.address, {}, chunk_size=1024)
    s = result_of_after(clock, listener.next_stream())
    got: List[bytes] = []
    done = s.deliver(got.append)
    whole = b"a" * 1000
    writer.write(whole)
    for _ in range(3):
        writer.write(b"b" * 100)  # buffered...
    writer.write(b"c" * 600)  # ...sent as a chunk of their own first, then this one as it is
    writer.write(b"d" * 3000)  # over a chunk: split
    writer.finish()
    total = result_of_after(clock, done)
    assert total == 1000 + 300 + 600 + 3000
    assert got[0] is whole
    assert [len(c) for c in got] == [1000, 300, 600, 1024, 1024, 952]
    assert b"".join(got) == whole + b"b" * 300 + b"c" * 600 + b"d" * 3000


def _stream_part(kind: str, sid: str, seq: Any, body: bytes = b"{}") -> Message:
    content_type = "application/octet-stream" if kind == "stream-data" else "application/json"
    return Message(body=body, type=kind, headers={"x-stream": sid, "x-seq": seq}, content_type=content_type,
                   persistent=False)


def test_a_second_start_of_a_stream_is_dropped() -> None:
    # Found by fuzz/fuzz_stream.py: a second stream-start with the id of a stream
    # that was arriving replaced it, so its chunks went to a stream nobody read,
    # and the first one to close removed the other from the listener (a KeyError
    # out of an idle timeout when the second closed in turn).
    clock = Clock()
    broker = MemoryBroker(clock)
    sender, receiver = make(clock, broker), make(clock, broker, stream_idle_timeout=30)
    listener = result_of_after(clock, receiver.listen())
    sid = uuid.uuid4().hex
    for m in (_stream_part("stream-start", sid, 0), _stream_part("stream-start", sid, 0),
              _stream_part("stream-data", sid, 1, b"abc"),
              _stream_part("stream-end", sid, 2, b'{"chunks": 1, "bytes": 3}')):
        sender.send(listener.address, m)
    s = result_of_after(clock, listener.next_stream())
    got: List[bytes] = []
    assert result_of_after(clock, s.deliver(got.append)) == 3
    assert got == [b"abc"]
    more = listener.next_stream(timeout=60)
    failures: List[Any] = []
    more.addErrback(failures.append)
    clock.advance(61)  # no second stream came of it, and no idle timeout raises
    assert failures and failures[0].check(magnet.Timeout)
    assert listener._streams == {}


def test_a_stream_start_whose_seq_is_not_an_integer_is_dead_lettered_at_once() -> None:
    # Found by fuzz/fuzz_stream.py: x-seq "0" on a stream-start raised TypeError
    # ("0" + 1), which the bus retried as if the handler had failed; it is an
    # undecodable message (BadMessage), dead-lettered at once.
    clock = Clock()
    broker = MemoryBroker(clock)
    sender, receiver = make(clock, broker), make(clock, broker, retry_limit=3)
    listener = result_of_after(clock, receiver.listen())
    letters: List[Message] = []
    result_of_after(clock, receiver.transport.declare_queue("magnet.dead-letters", durable=True))
    result_of_after(clock, receiver.consume("magnet.dead-letters", letters.append))
    sender.send(listener.address, _stream_part("stream-start", uuid.uuid4().hex, "0"))
    for _ in range(10):
        clock.advance(1)
    assert len(letters) == 1
    assert letters[0].headers["x-magnet-error"].startswith("BadMessage: stream start whose 'x-seq' header")
    assert "x-magnet-attempt" not in letters[0].headers


class TakesAnything:
    @operation
    def anything(self, **kwargs: Any) -> Any:
        return kwargs

    @operation
    def named(self, name: str, **kwargs: Any) -> Any:
        return name


@pytest.mark.parametrize("op, kwargs", [("anything", {"self": 1}), ("named", {"name": "x", "self": 1})])
def test_an_argument_named_like_the_bound_object_is_bad_arguments(op: str, kwargs: Any) -> None:
    # Found while fuzzing requests (fuzz/fuzz_message.py asserts that what
    # rpc.resolve accepts binds): a request {"self": 1} to an operation taking
    # **kwargs passed Signature.bind (a bound method's signature has no self),
    # then the call raised TypeError ("got multiple values for argument 'self'").
    from magnet import rpc

    request = rpc.request(op, kwargs)
    with pytest.raises(magnet.BadArguments, match="unexpected keyword argument 'self'"):
        rpc.resolve(rpc.operations(TakesAnything()), "svc", request)
    failures: List[Any] = []
    rpc.invoke(rpc.operations(TakesAnything()), "svc", request).addErrback(failures.append)
    assert failures and failures[0].check(magnet.BadArguments)
    assert rpc.resolve(rpc.operations(TakesAnything()), "svc", rpc.request(op, {"name": "x"}))[1] == {"name": "x"}
