"""Streams: whole and in order, bounded on both sides, and every way one can
break (abort, stall, gaps, bad end markers, a lost link), on the clock."""
from __future__ import annotations

import gc
import uuid
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

import magnet
from magnet import Message, stream
from magnet.bus import SHARED_DEAD_LETTERS

from tests.fast.magnet.base import BusCase


def part(kind: str, sid: str, seq: Any, body: bytes = b"{}") -> Message:
    content_type = "application/octet-stream" if kind == stream.DATA else "application/json"
    return Message(body=body, type=kind, headers={stream.STREAM_HEADER: sid, stream.SEQ_HEADER: seq},
                   content_type=content_type, persistent=False)


class StreamCase(BusCase):
    def setUp(self) -> None:
        super().setUp()
        self.sender = self.bus(send_timeout=30)
        self.receiver = self.bus(stream_idle_timeout=30, rpc_timeout=10)
        self.listener = self.result(self.receiver.listen())

    def next_stream(self) -> Any:
        return self.result(self.listener.next_stream())


class WholeStreamTests(StreamCase):
    def test_a_stream_arrives_whole_and_in_order(self) -> None:
        payload = bytes(range(256)) * 4099
        chunks = [payload[i:i + 10_000] for i in range(0, len(payload), 10_000)]
        sent = self.sender.send_stream(self.listener.address, {"status": 200, "headers": {"a": "b"}}, chunks,
                                       correlation_id="req-1")
        s = self.next_stream()
        self.assertEqual((s.metadata, s.correlation_id), ({"status": 200, "headers": {"a": "b"}}, "req-1"))
        self.assertEqual(self.result(s.read_all()), payload)
        self.assertEqual(self.result(sent), len(payload))

    def test_deliver_counts_bytes(self) -> None:
        sent = self.sender.send_stream(self.listener.address, {}, [b"ab", b"cde"])
        s = self.next_stream()
        got: List[bytes] = []
        self.assertEqual(self.result(s.deliver(got.append)), 5)
        self.assertEqual((b"".join(got), s.bytes_received), (b"abcde", 5))
        self.assertEqual(self.result(sent), 5)

    def test_an_empty_stream(self) -> None:
        self.sender.send_stream(self.listener.address, {"empty": True}, [])
        s = self.next_stream()
        self.assertEqual(self.result(s.read_all()), b"")

    def test_next_stream_before_it_starts(self) -> None:
        d = self.listener.next_stream()
        self.assertNoResult(d)
        self.sender.send_stream(self.listener.address, {}, [b"x"])
        self.assertEqual(self.result(self.result(d).read_all()), b"x")

    def test_next_stream_times_out(self) -> None:
        d = self.listener.next_stream(timeout=5)
        self.broker.advance(5)
        self.failureResultOf(d, magnet.Timeout)

    def test_two_streams_to_one_address_stay_apart(self) -> None:
        w1 = self.sender.open_stream(self.listener.address, {"n": 1}, chunk_size=4)
        w2 = self.sender.open_stream(self.listener.address, {"n": 2}, chunk_size=4)
        for w, b in ((w1, b"aaaa"), (w2, b"bbbb"), (w1, b"cccc"), (w2, b"dddd")):
            w.write(b)
        w1.finish()
        w2.finish()
        s1, s2 = self.next_stream(), self.next_stream()
        self.assertEqual({s1.metadata["n"]: self.result(s1.read_all()), s2.metadata["n"]: self.result(s2.read_all())},
                         {1: b"aaaacccc", 2: b"bbbbdddd"})

    def test_streams_can_be_handled_as_they_start(self) -> None:
        bodies: List[bytes] = []
        listener = self.result(self.receiver.listen(on_stream=lambda s: s.read_all().addCallback(bodies.append)))
        self.result(self.sender.send_stream(listener.address, {}, [b"ab", b"cd"]))
        self.flush()
        self.assertEqual(bodies, [b"abcd"])

    def test_an_on_stream_handler_that_fails_is_logged(self) -> None:
        def broken(s: Any) -> None:
            raise RuntimeError("handler broke")

        listener = self.result(self.receiver.listen(on_stream=broken))
        self.sender.send_stream(listener.address, {}, [b"x"]).addErrback(lambda _: None)
        self.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_pieces_go_as_chunks_without_copies(self) -> None:
        writer = self.sender.open_stream(self.listener.address, {}, chunk_size=1024)
        s = self.next_stream()
        got: List[bytes] = []
        done = s.deliver(got.append)
        whole = b"a" * 1000
        writer.write(whole)
        for _ in range(3):
            writer.write(b"b" * 100)
        writer.write(b"c" * 600)
        writer.write(b"d" * 3000)
        writer.finish()
        self.assertEqual(self.result(done), 1000 + 300 + 600 + 3000)
        self.assertIs(got[0], whole)
        self.assertEqual([len(c) for c in got], [1000, 300, 600, 1024, 1024, 952])

    def test_the_end_marker_counts_chunks_and_bytes(self) -> None:
        self.result(self.sender.transport.declare_queue("tap"))
        self.result(self.sender.send_stream("tap", {}, [b"abcd", b"ef"], chunk_size=4))
        end = self.broker.ready("tap")[-1]
        self.assertEqual((end.type, end.json()), (stream.END, {"chunks": 2, "bytes": 6}))
        seqs = [m.headers[stream.SEQ_HEADER] for m in self.broker.ready("tap")]
        self.assertEqual(seqs, [0, 1, 2, 3])


class WriterTests(StreamCase):
    def test_write_after_finish_fails(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        w.finish()
        self.failure(w.write(b"x"), magnet.StreamError)

    def test_finish_twice_fails(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        self.result(w.finish())
        self.failure(w.finish(), magnet.StreamError)

    def test_abort_after_finish_is_a_no_op(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        w.finish()
        self.assertIsNone(self.result(w.abort(RuntimeError("late"))))

    def test_a_stream_to_nowhere_fails_its_writer(self) -> None:
        w = self.sender.open_stream("nowhere", {})
        self.failure(w.write(b"x" * 10), magnet.Unroutable)
        self.failure(w.finish(), magnet.Unroutable)

    def test_send_stream_to_nowhere_fails(self) -> None:
        self.failure(self.sender.send_stream("nowhere", {}, [b"a", b"b"]), magnet.Unroutable)

    def test_an_iterator_that_raises_aborts_the_stream(self) -> None:
        def chunks() -> Any:
            yield b"first"
            raise IOError("disk went away")

        sent = self.sender.send_stream(self.listener.address, {}, chunks())
        self.failure(sent, IOError)
        s = self.next_stream()
        f = self.failure(s.read_all(), magnet.StreamError)
        self.assertIn("disk went away", str(f.value))

    def test_the_window_holds_the_writer_back_until_confirms(self) -> None:
        from magnet.memory import HIGH_WATER_BYTES
        self.result(self.sender.transport.declare_queue("tap"))  # nobody reads it yet
        w = self.sender.open_stream("tap", {}, chunk_size=HIGH_WATER_BYTES, window=1)
        first = w.write(b"x" * HIGH_WATER_BYTES)
        self.flush()
        # the queue is over its high water: its confirm is withheld, the window is full
        self.assertNoResult(first)
        self.assertEqual(len(self.broker.ready("tap")), 2)
        self.sender.consume("tap", lambda m: None)
        self.flush()
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(self.result(w.finish()), HIGH_WATER_BYTES)

    def test_abort_reaches_the_receiver_as_a_stream_error(self) -> None:
        w = self.sender.open_stream(self.listener.address, {"status": 200})
        w.write(b"x" * 2000)
        self.result(w.abort(IOError("upstream closed the connection")))
        s = self.next_stream()
        f = self.failure(s.read_all(), magnet.StreamError)
        self.assertIn("upstream closed", str(f.value))
        self.assertIn("OSError", str(f.value))


class BrokenStreamTests(StreamCase):
    def send(self, *messages: Message) -> None:
        for m in messages:
            self.sender.send(self.listener.address, m)

    def test_a_stream_that_stalls_fails_after_its_idle_timeout(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        w.write(b"partial")
        s = self.next_stream()
        done = s.deliver(lambda data: None)
        self.broker.advance(29)
        self.assertNoResult(done)
        self.broker.advance(1)
        f = self.failureResultOf(done, magnet.Timeout)
        self.assertIn("nothing arrived for 30", str(f.value))

    def test_each_chunk_restarts_the_idle_timer(self) -> None:
        w = self.sender.open_stream(self.listener.address, {}, chunk_size=4)
        s = self.next_stream()
        done = s.deliver(lambda data: None)
        for _ in range(5):
            self.broker.advance(20)
            w.write(b"abcd")
            self.flush()
        w.finish()
        self.assertEqual(self.result(done), 20)

    def test_a_slow_sink_is_not_taken_for_a_stalled_sender(self) -> None:
        w = self.sender.open_stream(self.listener.address, {}, chunk_size=4)
        w.write(b"abcd")
        s = self.next_stream()
        gate: Deferred = Deferred()
        done = s.deliver(lambda data: gate)
        self.flush()
        self.broker.advance(120)
        self.assertNoResult(done)
        gate.callback(None)
        w.finish()
        self.assertEqual(self.result(done), 4)

    def test_a_slow_sink_holds_the_rest_unacknowledged(self) -> None:
        listener = self.result(self.receiver.listen(prefetch=4))
        w = self.sender.open_stream(listener.address, {}, chunk_size=1024, window=2)
        s = self.result(listener.next_stream())
        taken: List[bytes] = []
        gate: Deferred = Deferred()
        s.deliver(lambda data: taken.append(data) or gate).addErrback(lambda _: None)
        for _ in range(10):
            w.write(b"y" * 1024)
        self.flush()
        self.assertEqual(len(taken), 1)
        self.assertLessEqual(self.broker.unacked(listener.address), 4)
        gate.callback(None)
        self.flush()

    def test_a_gap_in_the_sequence_breaks_the_stream(self) -> None:
        sid = uuid.uuid4().hex
        self.send(part(stream.START, sid, 0), part(stream.DATA, sid, 2, b"abc"))
        s = self.next_stream()
        f = self.failure(s.read_all(), magnet.StreamError)
        self.assertIn("expected chunk 1, got 2", str(f.value))

    def test_an_end_marker_that_does_not_match_breaks_the_stream(self) -> None:
        sid = uuid.uuid4().hex
        self.send(part(stream.START, sid, 0), part(stream.DATA, sid, 1, b"abc"),
                  part(stream.END, sid, 2, b'{"chunks": 1, "bytes": 4}'))
        s = self.next_stream()
        f = self.failure(s.read_all(), magnet.StreamError)
        self.assertIn("does not match the 3 bytes", str(f.value))

    def test_an_undecodable_end_marker_breaks_the_stream(self) -> None:
        sid = uuid.uuid4().hex
        self.send(part(stream.START, sid, 0), part(stream.END, sid, 1, b"{"))
        self.failure(self.next_stream().read_all(), magnet.StreamError)

    def test_a_second_start_of_a_stream_is_dropped(self) -> None:
        sid = uuid.uuid4().hex
        self.send(part(stream.START, sid, 0), part(stream.START, sid, 0), part(stream.DATA, sid, 1, b"abc"),
                  part(stream.END, sid, 2, b'{"chunks": 1, "bytes": 3}'))
        s = self.next_stream()
        self.assertEqual(self.result(s.read_all()), b"abc")
        more = self.listener.next_stream(timeout=60)
        self.broker.advance(61)
        self.failureResultOf(more, magnet.Timeout)
        self.assertEqual(self.listener._streams, {})

    def test_parts_of_an_unknown_stream_are_dropped(self) -> None:
        self.send(part(stream.DATA, "unknown", 1, b"abc"))
        self.flush()
        self.assertEqual(self.broker.unacked(self.listener.address), 0)
        self.assertTrue(any("stream unknown or already closed" in t for t in self.log_texts()))

    def _dead_letters(self) -> List[Message]:
        letters: List[Message] = []
        self.result(self.receiver.transport.declare_queue(SHARED_DEAD_LETTERS))
        self.result(self.receiver.consume(SHARED_DEAD_LETTERS, letters.append))
        return letters

    def test_a_start_whose_seq_is_not_an_integer_is_dead_lettered_at_once(self) -> None:
        letters = self._dead_letters()
        self.send(part(stream.START, uuid.uuid4().hex, "0"))
        self.flush()
        self.assertEqual(len(letters), 1)
        self.assertTrue(letters[0].headers["x-magnet-error"].startswith("BadMessage: stream start whose 'x-seq'"))
        self.assertNotIn("x-magnet-attempt", letters[0].headers)

    def test_a_start_whose_seq_is_a_boolean_is_dead_lettered(self) -> None:
        letters = self._dead_letters()
        self.send(part(stream.START, uuid.uuid4().hex, True))
        self.flush()
        self.assertEqual(len(letters), 1)

    def test_a_stream_message_without_an_id_is_dead_lettered(self) -> None:
        letters = self._dead_letters()
        self.send(Message(b"x", type=stream.DATA))
        self.flush()
        self.assertEqual(len(letters), 1)
        self.assertIn("x-stream", letters[0].headers["x-magnet-error"])

    def test_a_stream_has_one_sink(self) -> None:
        self.sender.send_stream(self.listener.address, {}, [b"x"])
        s = self.next_stream()
        s.deliver(lambda d: None)
        self.assertRaises(magnet.StreamError, s.deliver, lambda d: None)

    def test_read_all_refuses_more_than_its_limit(self) -> None:
        self.sender.send_stream(self.listener.address, {}, [b"x" * 100])
        f = self.failure(self.next_stream().read_all(limit=10), magnet.StreamError)
        self.assertIn("larger than 10 bytes", str(f.value))

    def test_a_sink_that_fails_breaks_the_stream(self) -> None:
        self.sender.send_stream(self.listener.address, {}, [b"x"])
        s = self.next_stream()

        def sink(data: bytes) -> None:
            raise ValueError("disk full")

        self.failure(s.deliver(sink), ValueError)

    def test_fail_gives_up_on_a_stream(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        w.write(b"x")
        s = self.next_stream()
        done = s.deliver(lambda d: None)
        s.fail(magnet.ConnectionLost("sender gone"))
        self.failureResultOf(done, magnet.ConnectionLost)
        w.finish()
        self.flush()  # what arrives later is dropped

    def test_a_lost_link_fails_streams_at_private_addresses(self) -> None:
        w = self.sender.open_stream(self.listener.address, {})
        w.write(b"x")
        s = self.next_stream()
        done = s.deliver(lambda d: None)
        self.broker.drop_link(self.receiver)
        self.failureResultOf(done, magnet.ConnectionLost)

    def test_a_stream_lost_before_anyone_reads_it_fails_its_later_reader(self) -> None:
        unhandled: List[Any] = []

        def observe(event: dict) -> None:
            if "Unhandled error" in str(event.get("log_format", "")) or "Unhandled" in str(event.get("why", "")):
                unhandled.append(event)

        writers = [self.sender.open_stream(self.listener.address, {}) for _ in range(2)]
        for w in writers:
            w.write(b"x" * 10)
        read_later, never_read = self.next_stream(), self.next_stream()
        globalLogPublisher.addObserver(observe)
        try:
            self.receiver._link_changed(False)
            self.failure(read_later.read_all(), magnet.ConnectionLost)
            self.assertFalse(never_read._done.called)
            del read_later, never_read
            gc.collect()
        finally:
            globalLogPublisher.removeObserver(observe)
        self.assertEqual(unhandled, [])


class DurableStreamTests(BusCase):
    def test_a_durable_address_gives_each_stream_whole_to_one_consumer(self) -> None:
        sender, first, second = self.bus(), self.bus(), self.bus()
        got: List[tuple] = []

        def receiver(who: str) -> Any:
            return lambda s: s.read_all().addCallback(lambda body: got.append((who, body)))

        a = self.result(first.listen(name="durable", durable=True, on_stream=receiver("first")))
        self.result(second.listen(name="durable", durable=True, on_stream=receiver("second")))
        for i in range(3):
            self.result(sender.send_stream("durable", {}, [bytes([i]) * 1000] * 20, chunk_size=1000))
        self.flush()
        self.assertEqual(got, [("first", bytes([i]) * 20000) for i in range(3)])
        self.result(a.subscription.cancel())
        self.result(sender.send_stream("durable", {}, [b"z" * 1000] * 5, chunk_size=1000))
        self.flush()
        self.assertEqual(got[3], ("second", b"z" * 5000))
