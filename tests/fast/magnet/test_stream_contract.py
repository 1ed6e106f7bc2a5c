"""magnet.stream's contract on a Clock, with a publish function whose
confirms the test gives: the writer's chunking and flow control (at most
C{window} unconfirmed messages), its failures, and the receiving L{Stream}:
order, a slow sink, the end marker's check, an abort, a stall.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet.errors import StreamError, Timeout
from magnet.message import BINARY, Message
from magnet.stream import ABORT, DATA, END, SEQ_HEADER, START, STREAM_HEADER, Stream, StreamWriter, send_stream


class Broker:
    """The publish function of a writer: records messages, confirms when told."""

    def __init__(self, auto: bool = False) -> None:
        self.messages: List[Message] = []
        self.confirms: List[Deferred] = []
        self.auto = auto

    def __call__(self, message: Message) -> Deferred:
        self.messages.append(message)
        if self.auto:
            return succeed(None)
        d: Deferred = Deferred()
        self.confirms.append(d)
        return d

    def confirm(self, n: Optional[int] = None) -> None:
        todo = self.confirms if n is None else self.confirms[:n]
        self.confirms = [] if n is None else self.confirms[n:]
        for d in todo:
            d.callback(None)

    def kinds(self) -> List[str]:
        return [m.type for m in self.messages]  # type: ignore[misc]

    def bodies(self) -> List[bytes]:
        return [m.body for m in self.messages if m.type == DATA]


class WriterTests(SynchronousTestCase):
    def test_start_data_end_with_ids_and_sequence_numbers(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {"status": 200}, correlation_id="corr", chunk_size=4)
        self.successResultOf(writer.write(b"abcdefghij"))
        done = writer.finish()
        self.assertEqual(self.successResultOf(done), 10)
        self.assertEqual(broker.kinds(), [START, DATA, DATA, DATA, END])
        self.assertEqual(broker.bodies(), [b"abcd", b"efgh", b"ij"])
        self.assertEqual(broker.messages[0].json(), {"status": 200})
        self.assertEqual([m.headers[SEQ_HEADER] for m in broker.messages], [0, 1, 2, 3, 4])
        self.assertEqual({m.headers[STREAM_HEADER] for m in broker.messages}, {writer.stream_id})
        self.assertEqual({m.correlation_id for m in broker.messages}, {"corr"})
        self.assertFalse(any(m.persistent for m in broker.messages))
        self.assertEqual(broker.messages[1].content_type, BINARY)
        self.assertEqual(broker.messages[-1].json(), {"chunks": 3, "bytes": 10})  # finish flushed the rest

    def test_finish_flushes_what_is_buffered(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {}, chunk_size=100)
        writer.write(b"ab")
        writer.write(b"cd")
        self.assertEqual(broker.kinds(), [START])  # small pieces wait to be joined
        self.assertEqual(self.successResultOf(writer.finish()), 4)
        self.assertEqual(broker.bodies(), [b"abcd"])
        self.assertEqual(broker.messages[-1].json(), {"chunks": 1, "bytes": 4})

    def test_a_piece_of_a_good_size_goes_out_as_it_is(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {}, chunk_size=8)
        piece = b"12345678"
        writer.write(b"a")
        writer.write(piece)
        self.assertEqual(broker.bodies(), [b"a", piece])  # what was buffered first, then the piece uncopied
        self.assertIs(broker.bodies()[1], piece)

    def test_bytearrays_and_big_pieces_are_cut_into_chunks(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {}, chunk_size=4)
        writer.write(bytearray(b"0123456789"))
        writer.write(b"")
        self.successResultOf(writer.finish())
        self.assertEqual(broker.bodies(), [b"0123", b"4567", b"89"])

    def test_the_window_bounds_what_awaits_a_confirm(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {}, chunk_size=2, window=3)  # the start marker takes one place
        self.successResultOf(writer.write(b"aa"))
        room = writer.write(b"bb")
        self.assertNoResult(room)
        later = writer.write(b"cc")
        self.assertNoResult(later)
        broker.confirm(1)  # still 3 unconfirmed (start, bb, cc after aa): the window is full
        self.assertNoResult(room)
        broker.confirm(1)
        self.successResultOf(room)
        self.successResultOf(later)
        broker.confirm()
        done = writer.finish()
        self.assertNoResult(done)
        broker.confirm()
        self.assertEqual(self.successResultOf(done), 6)

    def test_a_failed_confirm_fails_the_writer_and_its_waiters(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {}, chunk_size=2, window=3)
        self.successResultOf(writer.write(b"aa"))
        waiting = writer.write(b"bb")
        broker.confirms.pop(0).errback(Timeout("no confirm"))
        self.failureResultOf(waiting, Timeout)
        self.failureResultOf(writer.write(b"cc"), Timeout)
        done = writer.finish()
        broker.confirm()
        self.failureResultOf(done, Timeout)
        self.assertEqual(broker.kinds(), [START, DATA, DATA])  # no end marker for a broken stream

    def test_a_write_after_a_failure_with_room_fails(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {}, chunk_size=100, window=8)
        broker.confirms.pop(0).errback(Timeout("no confirm"))
        self.failureResultOf(writer.write(b"x" * 40), Timeout)

    def test_a_publish_that_fails_at_once_fails_the_write_that_sent_it(self) -> None:
        # a transport refuses some messages synchronously (headers too large, no link and stopped)
        def publish(message: Message) -> Deferred:
            return fail(ValueError("refused")) if message.type == DATA else succeed(None)

        writer = StreamWriter(publish, {}, chunk_size=2)
        self.failureResultOf(writer.write(b"ab"), ValueError)

    def test_writes_and_finish_after_finish_are_refused(self) -> None:
        writer = StreamWriter(Broker(auto=True), {})
        self.successResultOf(writer.finish())
        self.failureResultOf(writer.write(b"x"), StreamError)
        self.failureResultOf(writer.finish(), StreamError)
        self.successResultOf(writer.abort(ValueError("late")))  # nothing to abort

    def test_abort_sends_the_reason_and_drops_what_is_buffered(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {}, chunk_size=100)
        writer.write(b"partial")
        self.successResultOf(writer.abort(ValueError("source broke")))
        self.assertEqual(broker.kinds(), [START, ABORT])
        self.assertEqual(broker.messages[-1].json(), {"type": "ValueError", "message": "source broke"})

    def test_an_abort_whose_confirm_fails_is_still_quiet(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {})
        d = writer.abort(ValueError("x"))
        for confirm in broker.confirms:
            confirm.errback(Timeout("gone"))
        self.assertIsNone(self.successResultOf(d))


class SendStreamTests(SynchronousTestCase):
    def test_every_chunk_then_the_end(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {}, chunk_size=2, window=2)
        done = send_stream(writer, [b"ab", b"cd", b"ef"])
        self.assertNoResult(done)
        while not done.called:
            broker.confirm()
        self.assertEqual(self.successResultOf(done), 6)
        self.assertEqual(broker.bodies(), [b"ab", b"cd", b"ef"])

    def test_an_iterator_that_raises_aborts_the_stream(self) -> None:
        def chunks() -> Iterator[bytes]:
            yield b"ab"
            raise OSError("disk gone")

        broker = Broker(auto=True)
        done = send_stream(StreamWriter(broker, {}, chunk_size=2), chunks())
        self.failureResultOf(done, OSError)
        self.assertEqual(broker.kinds(), [START, DATA, ABORT])

    def test_a_failed_write_fails_it(self) -> None:
        broker = Broker()
        writer = StreamWriter(broker, {}, chunk_size=2, window=2)
        done = send_stream(writer, [b"ab", b"cd", b"ef"])
        broker.confirms.pop(0).errback(Timeout("no confirm"))
        self.failureResultOf(done, Timeout)

    def test_a_write_failed_at_once_fails_it(self) -> None:
        def publish(message: Message) -> Deferred:
            return fail(ValueError("refused")) if message.type == DATA else succeed(None)

        done = send_stream(StreamWriter(publish, {}, chunk_size=2), [b"ab", b"cd"])
        self.failureResultOf(done, ValueError)


def _message(kind: str, seq: int, body: bytes = b"", json: Any = None) -> Message:
    headers = {STREAM_HEADER: "s1", SEQ_HEADER: seq}
    if json is not None:
        return Message.of_json(json, type=kind, headers=headers)
    return Message(body=body, type=kind, headers=headers, content_type=BINARY)


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.closed: List[str] = []
        self.stream = Stream("s1", {"status": 200}, "corr", self.clock, 10.0, self.closed.append)

    def test_chunks_in_order_then_a_matching_end(self) -> None:
        got: List[bytes] = []
        done = self.stream.deliver(got.append)
        for i, chunk in enumerate([b"ab", b"cde"], start=1):
            self.successResultOf(self.stream._arrived(DATA, _message(DATA, i, chunk)))
        self.stream._arrived(END, _message(END, 3, json={"chunks": 2, "bytes": 5}))
        self.assertEqual(self.successResultOf(done), 5)
        self.assertEqual(got, [b"ab", b"cde"])
        self.assertEqual(self.closed, ["s1"])
        self.successResultOf(self.stream._arrived(DATA, _message(DATA, 4, b"late")))  # dropped
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_what_arrives_before_the_sink_waits_for_it(self) -> None:
        settled = self.stream._arrived(DATA, _message(DATA, 1, b"early"))
        self.assertNoResult(settled)  # not acked until the sink took it
        self.stream._arrived(END, _message(END, 2, json={"chunks": 1, "bytes": 5}))
        self.assertEqual(self.successResultOf(self.stream.read_all()), b"early")
        self.successResultOf(settled)

    def test_a_slow_sink_holds_the_acks(self) -> None:
        gates: List[Deferred] = []

        def sink(data: bytes) -> Deferred:
            gates.append(Deferred())
            return gates[-1]

        done = self.stream.deliver(sink)
        first = self.stream._arrived(DATA, _message(DATA, 1, b"a"))
        second = self.stream._arrived(DATA, _message(DATA, 2, b"b"))
        self.assertEqual(len(gates), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        # a slow sink is not a stall: the idle timer waits for us
        self.clock.advance(25)
        self.assertNoResult(done)
        gates[0].callback(None)
        self.successResultOf(first)
        self.assertEqual(len(gates), 2)
        gates[1].callback(None)
        self.successResultOf(second)
        self.assertEqual(self.stream.bytes_received, 2)

    def test_a_sink_that_refuses_fails_the_stream(self) -> None:
        def sink(data: bytes) -> None:
            raise OSError("disk full")

        done = self.stream.deliver(sink)
        settled = self.stream._arrived(DATA, _message(DATA, 1, b"a"))
        self.successResultOf(settled)
        self.failureResultOf(done, OSError)

    def test_a_gap_in_the_sequence_fails_the_stream(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.stream._arrived(DATA, _message(DATA, 2, b"b"))
        failure = self.failureResultOf(done, StreamError)
        self.assertIn("expected chunk 1, got 2", str(failure.value))

    def test_an_end_that_does_not_match_fails_the_stream(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.stream._arrived(DATA, _message(DATA, 1, b"abc"))
        self.stream._arrived(END, _message(END, 2, json={"chunks": 1, "bytes": 99}))
        self.assertIn("does not match the 3 bytes", str(self.failureResultOf(done, StreamError).value))

    def test_an_end_that_is_not_json_fails_the_stream(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.stream._arrived(END, _message(END, 1, b"\xff not json"))
        self.failureResultOf(done, StreamError)

    def test_an_abort_carries_the_senders_reason(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.stream._arrived(ABORT, _message(ABORT, 1, json={"type": "OSError", "message": "upstream reset"}))
        self.assertIn("sender aborted the stream: OSError: upstream reset",
                      str(self.failureResultOf(done, StreamError).value))

    def test_an_abort_that_is_not_json(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.stream._arrived(ABORT, _message(ABORT, 1, json=["not", "an", "object"]))
        self.assertIn("aborted", str(self.failureResultOf(done, StreamError).value))

    def test_silence_is_a_stall(self) -> None:
        done = self.stream.deliver(lambda data: None)
        self.clock.advance(9)
        self.stream._arrived(DATA, _message(DATA, 1, b"a"))  # each arrival restarts the idle timer
        self.clock.advance(9)
        self.assertNoResult(done)
        self.clock.advance(1)
        self.assertIn("nothing arrived for 10.0 s", str(self.failureResultOf(done, Timeout).value))

    def test_a_failure_before_anyone_reads_is_kept_for_the_reader(self) -> None:
        held = self.stream._arrived(DATA, _message(DATA, 1, b"a"))
        self.stream.fail(ConnectionError("sender gone"))
        self.successResultOf(held)  # what was held is let go (acked: it will not be read)
        self.failureResultOf(self.stream.deliver(lambda data: None), ConnectionError)
        self.stream.fail(ValueError("twice"))  # a finished stream ignores it

    def test_one_sink_per_stream(self) -> None:
        self.stream.deliver(lambda data: None)
        self.assertRaises(StreamError, self.stream.deliver, lambda data: None)

    def test_read_all_is_bounded(self) -> None:
        done = self.stream.read_all(limit=3)
        self.stream._arrived(DATA, _message(DATA, 1, b"abcd"))
        self.assertIn("larger than 3 bytes", str(self.failureResultOf(done, StreamError).value))

    def test_writer_and_receiver_agree(self) -> None:
        broker = Broker(auto=True)
        writer = StreamWriter(broker, {"k": "v"}, chunk_size=3)
        self.successResultOf(send_stream(writer, [b"hello ", b"world", b"!"]))
        stream = Stream(writer.stream_id, broker.messages[0].json(), None, self.clock, 10, self.closed.append)
        for m in broker.messages[1:]:
            m = m.with_headers()
            stream._arrived(m.type, m)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(stream.read_all()), b"hello world!")
        self.assertEqual(stream.metadata, {"k": "v"})
