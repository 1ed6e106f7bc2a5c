"""magnet.amqp.protocol's contract, fed frames through a StringTransport: the
greeting, the tune (frame_max, channel_max, heartbeat), heartbeats on a
Clock, frames split across reads, frames too large or badly ended, the
broker's close, channel allocation, and L{answer_within}.

L{FakeBroker} here is the scripted broker the channel, publishing, transport
and connection contract tests use too: it reads what the client wrote,
answers the synchronous methods as RabbitMQ does (or refuses or holds them,
as a test asks), and turns the client's own close or abort into the
C{connectionLost} a reactor would deliver.
"""
from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.error import ConnectionLost as TwistedConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import Closed

from magnet.amqp.protocol import (
    CLIENT_PROPERTIES,
    DEFAULT_FRAME_MAX,
    ChannelError,
    _AMQPProtocol,
    _ProtocolFactory,
    _write_now,
    answer_within,
    channel_error,
    describe,
)
from magnet.amqp.wire import (_ACK, _FRAME_END, _HEARTBEAT_FRAME, _Codec, _content_frames, _method_frame, load_spec,
                              parse_url)
from magnet.errors import BadFrame, ConnectionLost, MagnetError, Timeout
from magnet.message import Message

SPEC = load_spec()
_DEFAULTS = {"octet": 0, "short": 0, "long": 0, "longlong": 0, "bit": False, "shortstr": "", "longstr": b"",
             "table": {}, "timestamp": 0}

#: what the broker answers to each synchronous method of the client, by default
ANSWERS = {
    "channel.open": "channel.open-ok", "channel.close": "channel.close-ok", "confirm.select": "confirm.select-ok",
    "queue.declare": "queue.declare-ok", "exchange.declare": "exchange.declare-ok", "queue.bind": "queue.bind-ok",
    "queue.delete": "queue.delete-ok", "exchange.delete": "exchange.delete-ok", "basic.qos": "basic.qos-ok",
    "basic.consume": "basic.consume-ok", "basic.cancel": "basic.cancel-ok", "connection.close": "connection.close-ok",
    "connection.open": "connection.open-ok",
}


def method(channel: int, name: str, **args: Any) -> bytes:
    """A method frame of the spec's C{class.method}, its fields from C{args} (or their zero values)."""
    meth = SPEC.parse_method(name)
    buf = BytesIO()
    codec = _Codec(buf)
    codec.encode_short(meth.klass.id)
    codec.encode_short(meth.id)
    for field in meth.fields:
        codec.encode(field.type, args.get(field.name.replace("-", "_"), _DEFAULTS[field.type]))
    codec.flush()
    return _method_frame(channel, buf.getvalue())


def content(channel: int, message: Message, frame_max: int = 131072) -> bytes:
    """The content header and body frames of C{message}."""
    return b"".join(_content_frames(channel, message, None, frame_max))


def deliver(channel: int, tag: int, message: Message, *, exchange: str = "ex", routing_key: str = "rk",
            redelivered: bool = False, consumer_tag: str = "ctag") -> bytes:
    return method(channel, "basic.deliver", consumer_tag=consumer_tag, delivery_tag=tag, redelivered=redelivered,
                  exchange=exchange, routing_key=routing_key) + content(channel, message)


def blocked(reason: str) -> bytes:
    """RabbitMQ's connection.blocked (an extension the spec file lacks)."""
    data = reason.encode()
    return _method_frame(0, struct.pack(">HHB", 10, 60, len(data)) + data)


UNBLOCKED = _method_frame(0, struct.pack(">HH", 10, 61))


def ack(channel: int, tag: int, multiple: bool = False) -> bytes:
    return method(channel, "basic.ack", delivery_tag=tag, multiple=multiple)


def nack(channel: int, tag: int, multiple: bool = False) -> bytes:
    return method(channel, "basic.nack", delivery_tag=tag, multiple=multiple)


def parse(data: bytes) -> Tuple[List[Tuple[int, str, Dict[str, Any]]], bytes]:
    """The frames a client wrote: (channel, name, fields) for methods, ('header'|'body'|'heartbeat') else."""
    out: List[Tuple[int, str, Dict[str, Any]]] = []
    pos = 0
    if data.startswith(b"AMQP"):
        out.append((0, "protocol-header", {"bytes": data[:8]}))
        pos = 8
    while len(data) - pos >= 8:
        ftype, channel, size = struct.unpack_from(">BHI", data, pos)
        if len(data) - pos < size + 8:
            break
        payload = data[pos + 7:pos + 7 + size]
        assert data[pos + 7 + size] == 0xCE
        pos += 8 + size
        if ftype == 1:
            codec = _Codec(BytesIO(payload))
            klass = SPEC.classes.byid[codec.decode_short()]
            meth = klass.methods.byid[codec.decode_short()]
            fields = {f.name.replace("-", "_"): codec.decode(f.type) for f in meth.fields}
            out.append((channel, f"{klass.name}.{meth.name}", fields))
        elif ftype == 2:
            out.append((channel, "header", {"size": struct.unpack_from(">Q", payload, 4)[0], "raw": payload}))
        elif ftype == 3:
            out.append((channel, "body", {"data": payload}))
        else:
            out.append((channel, "heartbeat", {}))
    return out, data[pos:]


class FakeBroker:
    """A scripted RabbitMQ on the far side of one protocol's StringTransport.

    L{pump} reads what the client wrote since, records it in L{received},
    answers it (L{ANSWERS}; C{refuse[name] = (code, text)} answers with
    channel.close instead, C{hold} names methods left unanswered), and
    delivers C{connectionLost} once the client closed or aborted its
    transport, as a reactor would.
    """

    def __init__(self, protocol: _AMQPProtocol, *, frame_max: int = 131072, heartbeat: int = 0,
                 channel_max: int = 2047, handshake: bool = True) -> None:
        self.protocol = protocol
        self.wire = StringTransport()
        self.frame_max = frame_max
        self.heartbeat = heartbeat
        self.channel_max = channel_max
        self.handshake = handshake
        self.received: List[Tuple[int, str, Dict[str, Any]]] = []
        self.refuse: Dict[str, Tuple[int, str]] = {}
        self.hold: set = set()
        self.held: List[Tuple[int, str, Dict[str, Any]]] = []
        self.consumer_tags: Dict[int, str] = {}
        self.publishes: List[Tuple[int, Dict[str, Any]]] = []
        self._rest = b""
        protocol.makeConnection(self.wire)

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.pump()

    def names(self, channel: Optional[int] = None) -> List[str]:
        return [n for c, n, _ in self.received if channel is None or c == channel]

    def pump(self) -> None:
        for _ in range(1000):
            data = self._rest + self.wire.value()
            self.wire.clear()
            frames, self._rest = parse(data)
            for frame in frames:
                self.received.append(frame)
                answer = self._answer(*frame)
                if answer:
                    self.protocol.dataReceived(answer)
            if not frames:
                break
        if self.wire.disconnecting and not self.protocol.lost:
            self.protocol.connectionLost(Failure(ConnectionDone("closed by the client")))

    def drop(self, reason: Optional[Exception] = None) -> None:
        """The TCP connection is gone (the broker died)."""
        self.protocol.connectionLost(Failure(reason or TwistedConnectionLost("broker gone")))

    def answer(self, channel: int, name: str, fields: Dict[str, Any]) -> bytes:
        """What a broker answers to a held method (see L{hold})."""
        return self._answer(channel, name, fields, force=True)

    def _answer(self, channel: int, name: str, fields: Dict[str, Any], force: bool = False) -> bytes:
        if name == "protocol-header":
            if not self.handshake:
                return b""
            return method(0, "connection.start", version_major=0, version_minor=9,
                          server_properties={"product": "FakeBroker"}, mechanisms=b"PLAIN AMQPLAIN",
                          locales=b"en_US")
        if name == "connection.start-ok":
            return method(0, "connection.tune", channel_max=self.channel_max, frame_max=self.frame_max,
                          heartbeat=self.heartbeat)
        if name == "basic.publish":
            self.publishes.append((channel, fields))
            return b""
        if name in self.hold and not force:
            self.held.append((channel, name, fields))
            return b""
        if name in self.refuse:
            code, text = self.refuse[name]
            klass, meth = name.split(".")
            k = SPEC.classes.byname[klass]
            return method(channel, "channel.close", reply_code=code, reply_text=text, class_id=k.id,
                          method_id=k.methods.byname[meth].id)
        reply = ANSWERS.get(name)
        if reply is None:
            return b""
        args: Dict[str, Any] = {}
        if name == "queue.declare":
            # a passive declare (the liveness check) is told how many consumers it has
            args = {"queue": fields["queue"] or "amq.gen-1", "consumer_count": len(self.consumer_tags)}
        elif name == "basic.consume":
            self.consumer_tags[channel] = fields["consumer_tag"]
            args = {"consumer_tag": fields["consumer_tag"]}
        elif name == "basic.cancel":
            args = {"consumer_tag": fields["consumer_tag"]}
        return method(channel, reply, **args)


class _Owner:
    """What the protocol reports to: records the calls."""

    connect_timeout = 5.0

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, ...]] = []

    def _connection_lost(self, protocol: Any, reason: Failure) -> None:
        self.calls.append(("lost", reason.type))

    def _channel_closed(self, protocol: Any, channel: int, fast: Any, code: int, text: str) -> None:
        self.calls.append(("channel_closed", channel, fast, code, text))

    def _connection_blocked(self, protocol: Any, reason: str) -> None:
        self.calls.append(("blocked", reason))

    def _connection_unblocked(self, protocol: Any) -> None:
        self.calls.append(("unblocked",))

    def _tls_trust_description(self, url: Any) -> Tuple[str, str]:
        return ("the system's trust store", "")


def connected(clock: Clock, *, url: str = "amqp://guest:guest@broker:5672/vh", heartbeat: float = 0,
              **broker: Any) -> Tuple[_AMQPProtocol, FakeBroker, Deferred, _Owner]:
    owner = _Owner()
    proto = _AMQPProtocol(owner, parse_url(url), SPEC, clock, heartbeat)
    fake = FakeBroker(proto, **broker)
    d = proto.authenticate("guest", "guest", mechanism="PLAIN")
    fake.pump()
    return proto, fake, d, owner


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_greeting_start_ok_tune_ok_open(self) -> None:
        proto, broker, d, _ = connected(self.clock)
        self.successResultOf(d)
        self.assertEqual(broker.received[0], (0, "protocol-header", {"bytes": b"AMQP\x00\x00\x09\x01"}))
        self.assertEqual(broker.names(), ["protocol-header", "connection.start-ok", "connection.tune-ok",
                                          "connection.open"])
        start_ok = broker.received[1][2]
        self.assertEqual(start_ok["mechanism"], "PLAIN")
        self.assertEqual(start_ok["response"], "\0guest\0guest")
        self.assertEqual(start_ok["client_properties"]["capabilities"],
                         CLIENT_PROPERTIES["capabilities"])
        self.assertEqual(broker.received[3][2]["virtual_host"], "vh")

    def test_frame_max_is_the_smaller_of_ours_and_the_brokers(self) -> None:
        proto, broker, d, _ = connected(self.clock, frame_max=8192, channel_max=10)
        self.assertEqual((proto.frame_max, proto.channel_max), (8192, 10))
        self.assertEqual(broker.received[2][2]["frame_max"], 8192)
        proto, broker, d, _ = connected(self.clock, frame_max=0, channel_max=0)  # no limit: ours
        self.assertEqual((proto.frame_max, proto.channel_max), (DEFAULT_FRAME_MAX, 65535))
        proto, broker, d, _ = connected(self.clock, frame_max=1024)  # below the spec's minimum: 4096
        self.assertEqual(proto.frame_max, 4096)

    def test_heartbeat_negotiation(self) -> None:
        for wanted, offered, agreed in [(0, 60, 0), (10, 0, 10), (10, 4, 4), (10, 60, 10), (0.2, 60, 1)]:
            proto, broker, d, _ = self._tuned(wanted, offered)
            self.assertEqual(broker.received[2][2]["heartbeat"], agreed, (wanted, offered))
            self.assertEqual(proto._heartbeat, agreed)

    def _tuned(self, wanted: float, offered: int) -> Tuple[_AMQPProtocol, FakeBroker, Deferred, _Owner]:
        owner = _Owner()
        proto = _AMQPProtocol(owner, parse_url("amqp://h/"), SPEC, self.clock, wanted)
        broker = FakeBroker(proto, heartbeat=offered)
        d = proto.authenticate("guest", "guest", mechanism="PLAIN")
        broker.pump()
        return proto, broker, d, owner

    def test_a_refused_login_fails_the_handshake_with_the_brokers_reason(self) -> None:
        owner = _Owner()
        proto = _AMQPProtocol(owner, parse_url("amqp://h/"), SPEC, self.clock, 0)
        broker = FakeBroker(proto)
        broker.hold.add("connection.open")
        d = proto.authenticate("guest", "wrong", mechanism="AMQPLAIN")
        broker.pump()
        self.assertEqual(broker.received[1][2]["mechanism"], "AMQPLAIN")
        broker.feed(method(0, "connection.close", reply_code=403, reply_text="ACCESS_REFUSED - Login was refused"))
        self.assertEqual(proto.close_reason, "403 ACCESS_REFUSED - Login was refused")
        self.failureResultOf(d, Closed)
        self.assertIn("connection.close-ok", broker.names())

    def test_tcp_nodelay_is_asked_for(self) -> None:
        asked = []

        class NoDelay(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                asked.append(enabled)

        class Refuses(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError("not a socket")

        for transport in (NoDelay(), Refuses()):
            proto = _AMQPProtocol(_Owner(), parse_url("amqp://h/"), SPEC, self.clock, 0)
            proto.makeConnection(transport)
            self.assertEqual(transport.value(), b"AMQP\x00\x00\x09\x01")
        self.assertEqual(asked, [True])


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto, self.broker, d, self.owner = connected(self.clock, heartbeat=10)
        self.successResultOf(d)

    def test_idle_sends_heartbeats_every_half_interval(self) -> None:
        # the broker offered 0: ours (10 s) is agreed; ticks every 5 s
        self.broker.wire.clear()
        self.clock.advance(5)
        self.proto.dataReceived(_HEARTBEAT_FRAME)
        self.assertEqual(self.broker.wire.value(), b"")  # something was sent in this tick (the open)
        self.clock.advance(5)
        self.assertEqual(self.broker.wire.value(), _HEARTBEAT_FRAME)
        self.assertFalse(self.broker.wire.disconnecting)

    def test_a_broker_silent_for_two_intervals_is_dropped(self) -> None:
        self.clock.advance(5)  # the handshake's bytes count for the first tick
        for _ in range(3):
            self.clock.advance(5)
        self.assertFalse(self.broker.wire.disconnecting)
        self.clock.advance(5)
        self.assertTrue(self.broker.wire.disconnecting)

    def test_any_byte_from_the_broker_keeps_it_alive(self) -> None:
        for _ in range(10):
            self.proto.dataReceived(_HEARTBEAT_FRAME)
            self.clock.advance(5)
        self.assertFalse(self.broker.wire.disconnecting)

    def test_the_heartbeat_stops_with_the_link(self) -> None:
        self.broker.drop()
        self.assertEqual(self.owner.calls, [("lost", TwistedConnectionLost)])
        self.assertFalse(self.proto._heartbeat_call.running)
        self.proto._heartbeat_tick()  # a tick after the loss writes nothing
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FrameReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto, self.broker, d, self.owner = connected(self.clock, frame_max=4096)
        self.successResultOf(d)

    def _channel(self) -> Any:
        d = self.proto.open_channel()
        self.broker.pump()
        return self.successResultOf(d)

    def test_a_frame_split_across_reads_is_put_together(self) -> None:
        frame = blocked("disk")
        for i in range(len(frame)):
            self.proto.dataReceived(frame[i:i + 1])
        self.assertEqual(self.proto.blocked, "disk")
        self.assertEqual(self.owner.calls, [("blocked", "disk")])
        self.assertEqual(self.proto._rbuf, b"")

    def test_several_frames_in_one_read(self) -> None:
        self.proto.dataReceived(blocked("") + UNBLOCKED
                                + _HEARTBEAT_FRAME)
        self.assertEqual(self.owner.calls, [("blocked", "no reason given"), ("unblocked",)])
        self.assertIsNone(self.proto.blocked)

    def test_a_frame_larger_than_frame_max_drops_the_link_without_waiting_for_it(self) -> None:
        self.proto.dataReceived(struct.pack(">BHI", 3, 1, 4097) + b"x")
        self.assertTrue(self.broker.wire.disconnecting)
        self.assertEqual(self.proto._rbuf, b"")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_bad_frame_end_drops_the_link(self) -> None:
        self.proto.dataReceived(_HEARTBEAT_FRAME[:-1] + b"\x00")
        self.assertTrue(self.broker.wire.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_an_unknown_frame_type_drops_the_link(self) -> None:
        self.proto.dataReceived(b"\x09\x00\x00\x00\x00\x00\x00\xce")
        self.assertTrue(self.broker.wire.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_method_cut_short_drops_the_link(self) -> None:
        self.proto.dataReceived(_method_frame(0, struct.pack(">HH", 10, 50) + b"\x00"))
        self.assertTrue(self.broker.wire.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(BadFrame)), 1)

    def test_the_fuzzers_frame_seeds_never_raise(self) -> None:
        from tests.fast.magnet.test_amqp_wire_contract import CORPUS
        seeds = sorted((CORPUS / "amqp_frames").glob("seed-*"))
        self.assertTrue(seeds)
        for seed in seeds:
            proto, broker, d, _ = connected(Clock())
            proto.dataReceived(seed.read_bytes())  # handled, or the link dropped: never an exception
        self.flushLoggedErrors()

    def test_frames_on_channels_without_a_fast_path_go_to_txamqp(self) -> None:
        ch = self._channel()
        # a delivery on a channel with no consumer is dropped (logged), and so is a return
        self.proto.dataReceived(deliver(ch.id, 1, Message(body=b"x")))
        self.proto.dataReceived(method(ch.id, "basic.return", reply_code=312, reply_text="NO_ROUTE", exchange="e",
                                       routing_key="k") + content(ch.id, Message(body=b"")))
        self.proto.dataReceived(ack(ch.id, 1) + nack(ch.id, 2))
        self.proto.dataReceived(method(ch.id, "basic.cancel", consumer_tag="t"))
        self.assertFalse(self.broker.wire.disconnecting)

    def test_channel_close_by_the_broker_is_reported_and_answered(self) -> None:
        ch = self._channel()
        self.proto.fast[ch.id] = marker = object()
        self.broker.feed(method(ch.id, "channel.close", reply_code=406, reply_text="PRECONDITION_FAILED"))
        self.assertEqual(self.owner.calls, [("channel_closed", ch.id, marker, 406, "PRECONDITION_FAILED")])
        self.assertIn("channel.close-ok", self.broker.names(ch.id))
        self.assertNotIn(ch.id, self.proto.channels)
        self.assertNotIn(ch.id, self.proto.fast)

    def test_close_channel_waits_for_close_ok_and_frees_the_id(self) -> None:
        ch = self._channel()
        self.proto.fast[ch.id] = object()
        d = self.proto.close_channel(ch)
        self.broker.pump()
        self.successResultOf(d)
        self.assertNotIn(ch.id, self.proto.channels)
        self.assertNotIn(ch.id, self.proto.fast)
        self.assertEqual(self.broker.names(ch.id), ["channel.open", "channel.close"])

    def test_channel_ids_are_allocated_round_robin_and_run_out(self) -> None:
        self.proto.channel_max = 3
        self.assertEqual([self.proto.allocate_channel() for _ in range(4)], [1, 2, 3, 1])
        for i in (1, 2, 3):
            self.proto.channels[i] = object()
        self.assertRaises(MagnetError, self.proto.allocate_channel)

    def test_open_channel_on_a_lost_link_is_refused(self) -> None:
        self.broker.drop()
        self.failureResultOf(self.proto.open_channel(), Closed)

    def test_writes_after_the_transport_is_gone_are_dropped(self) -> None:
        self.proto.transport = None
        self.proto.send_frame(object())  # type: ignore[arg-type]

    def test_acks_and_nacks_are_written_whole(self) -> None:
        self.broker.wire.clear()
        self.proto.write_ack(5, 9)
        self.proto.write_nack(5, 10, True)
        self.proto.write_nack(5, 11, False)
        frames, rest = parse(self.broker.wire.value())
        self.assertEqual(rest, b"")
        self.assertEqual([(c, n, f["delivery_tag"], f.get("requeue")) for c, n, f in frames],
                         [(5, "basic.ack", 9, None), (5, "basic.nack", 10, True), (5, "basic.nack", 11, False)])

    def test_the_broker_closing_the_connection(self) -> None:
        self.broker.feed(method(0, "connection.close", reply_code=320, reply_text="CONNECTION_FORCED"))
        self.assertEqual(self.proto.close_reason, "320 CONNECTION_FORCED")
        self.assertIn("connection.close-ok", self.broker.names(0))

    def test_the_factory_builds_with_its_function(self) -> None:
        built = object()
        self.assertIs(_ProtocolFactory(lambda: built).buildProtocol(None), built)  # type: ignore[arg-type,return-value]


class AnswerWithinTests(SynchronousTestCase):
    def test_an_answer_in_time(self) -> None:
        clock = Clock()
        d: Deferred = Deferred()
        follower = answer_within(d, 5, clock)
        d.callback("ok")
        self.assertEqual(self.successResultOf(follower), "ok")

    def test_a_late_answer_is_dropped_and_the_link_with_it(self) -> None:
        clock = Clock()
        proto, broker, auth, _ = connected(clock)
        d: Deferred = Deferred()
        follower = answer_within(d, 5, clock, proto)
        clock.advance(5)
        failure = self.failureResultOf(follower, Timeout)
        self.assertIn("within 5.0 s", str(failure.value))
        self.assertTrue(broker.wire.disconnecting)
        self.assertNoResult(d)  # the request itself is not cancelled
        d.callback("late")

    def test_a_timeout_without_a_protocol_only_fails(self) -> None:
        clock = Clock()
        follower = answer_within(Deferred(), 1, clock)
        clock.advance(1)
        self.failureResultOf(follower, Timeout)


class ErrorWordsTests(SynchronousTestCase):
    def test_describe(self) -> None:
        self.assertEqual(describe(Failure(ValueError("why"))), "why")
        self.assertEqual(describe(KeyError()), "KeyError")

    def test_channel_error(self) -> None:
        class Reason:
            fields = (404, "NOT_FOUND - no queue 'q'", 50, 10)

        error = channel_error(Closed(Reason()))
        self.assertIsInstance(error, ChannelError)
        self.assertEqual((error.reply_code, error.reply_text), (404, "NOT_FOUND - no queue 'q'"))
        self.assertEqual(str(error), "404 NOT_FOUND - no queue 'q'")
        lost = channel_error(Closed("gone"))
        self.assertIsInstance(lost, ConnectionLost)
        self.assertIn("channel closed: gone", str(lost))
        self.assertIsInstance(channel_error(Closed()), ConnectionLost)


class _Socket:
    """A socket for L{_write_now}: takes at most C{room} bytes per send, or raises C{error}."""

    def __init__(self, room: int = 1 << 20, error: Optional[Exception] = None) -> None:
        self.room = room
        self.error = error
        self.sent: List[bytes] = []

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 99

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = bytes(data[:self.room])
        self.sent.append(taken)
        return len(taken)


class _Reactor:
    def __init__(self) -> None:
        self.writers: List[Any] = []

    def addWriter(self, writer: Any) -> None:
        self.writers.append(writer)

    def removeWriter(self, writer: Any) -> None:
        pass


class WriteNowTests(SynchronousTestCase):
    """L{_write_now}: onto a plain TCP connection's socket when nothing is queued; else Twisted's write."""

    def connection(self, socket: _Socket) -> Any:
        from twisted.internet import tcp

        reactor = _Reactor()
        conn = tcp.Connection(socket, None, reactor=reactor)
        conn.connected = True
        return conn, reactor

    def test_nothing_queued_all_to_the_socket(self) -> None:
        socket = _Socket()
        conn, reactor = self.connection(socket)
        _write_now(conn, b"frame")
        self.assertEqual(socket.sent, [b"frame"])
        self.assertEqual((conn._tempDataBuffer, reactor.writers), ([], []))  # no reactor turn, no epoll_ctl

    def test_what_the_socket_does_not_take_is_queued_in_order(self) -> None:
        socket = _Socket(room=3)
        conn, reactor = self.connection(socket)
        _write_now(conn, b"abcdef")
        self.assertEqual(socket.sent, [b"abc"])
        self.assertEqual(conn._tempDataBuffer, [b"def"])
        self.assertEqual(reactor.writers, [conn])
        _write_now(conn, b"gh")  # something is queued: after it, never before
        self.assertEqual(socket.sent, [b"abc"])
        self.assertEqual(conn._tempDataBuffer, [b"def", b"gh"])

    def test_an_error_is_left_to_twisted(self) -> None:
        for error in (BlockingIOError(), ConnectionResetError()):
            socket = _Socket(error=error)
            conn, reactor = self.connection(socket)
            _write_now(conn, b"frame")
            self.assertEqual(conn._tempDataBuffer, [b"frame"])
            self.assertEqual(reactor.writers, [conn])

    def test_tls_and_other_transports_use_their_write(self) -> None:
        socket = _Socket()
        conn, reactor = self.connection(socket)
        conn.TLS = True
        conn.write = lambda data: written.append(data)  # type: ignore[method-assign]
        written: List[bytes] = []
        _write_now(conn, b"secret")
        self.assertEqual((socket.sent, written), ([], [b"secret"]))
        transport = StringTransport()
        _write_now(transport, b"x")
        self.assertEqual(transport.value(), b"x")


class OneWritePerReadTests(SynchronousTestCase):
    """What a read makes any link write goes out once the read is over, one write per link."""

    def test_writes_during_a_read_wait_for_its_end(self) -> None:
        clock = Clock()
        reader, reader_broker, d1, _ = connected(clock)
        other, other_broker, d2, _ = connected(clock)
        self.successResultOf(d1)
        self.successResultOf(d2)
        reader_broker.wire.clear()
        other_broker.wire.clear()
        seen: List[bytes] = []

        class Channel:
            expecting = 0

            def method(self, method_id: int, buf: bytes, pos: int, end: int) -> bool:
                other.write_ack(3, 1)
                reader.write_ack(2, 1)
                other.write_frames([b"A", b"B"])
                seen.append(other_broker.wire.value() + reader_broker.wire.value())
                return True

        writes: List[bytes] = []
        for proto in (reader, other):
            write = proto.transport.write
            proto.transport.write = lambda data, write=write: (writes.append(data), write(data))  # type: ignore
        reader.fast[2] = Channel()
        reader.dataReceived(ack(2, 7) + ack(2, 8))
        self.assertEqual(seen, [b"", b""])  # nothing written while the read went on
        one_ack = _ACK.pack(1, 3, 13, 60, 80, 1, 0, _FRAME_END)
        self.assertEqual(other_broker.wire.value(), (one_ack + b"AB") * 2)
        self.assertEqual(reader_broker.wire.value(), _ACK.pack(1, 2, 13, 60, 80, 1, 0, _FRAME_END) * 2)
        self.assertEqual(len(writes), 2)  # one write per link
        other.write_ack(3, 2)  # outside a read: at once
        self.assertEqual(other_broker.wire.value()[-len(one_ack):], _ACK.pack(1, 3, 13, 60, 80, 2, 0, _FRAME_END))
