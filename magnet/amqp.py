"""The AMQP 0-9-1 transport: magnet on RabbitMQ, through txAMQP.

    transport = from_url("amqp://guest:guest@127.0.0.1:5672/", reactor)
    transport.start()

txAMQP supplies the protocol definition (the spec file shipped with magnet as
package data, with the RabbitMQ extensions magnet uses), the frame classes and
the request/response machinery used for the synchronous methods (declare,
bind, qos, consume, cancel, close). The hot paths bypass txAMQP's per-frame
Deferred queues:

  - incoming C{basic.deliver} + content header + body frames on a consumer's
    channel are assembled in L{_AMQPProtocol.dataReceived} and handed to the
    consumer's C{on_delivery} synchronously;
  - the broker's C{basic.ack} / C{basic.nack} / C{basic.return} on the
    publishing channel settle the publishes' Deferreds directly;
  - C{basic.publish} (method + header + body frames) and the consumers'
    C{basic.ack} / C{basic.nack} are written straight to the TCP transport.

The transport reconnects by itself (exponential backoff, trying each broker
URL of a cluster in turn), and after every reconnect declares the remembered
topology again and resumes every consumer before it tells its link listeners.
"""
from __future__ import annotations

import functools
import itertools
import re
import ssl as _stdlib_ssl
import struct
import uuid
from collections import OrderedDict
from io import BytesIO
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, TwistedDelegate
from txamqp.connection import Body, Frame, Header, Method
from txamqp.protocol import AMQClient
from zope.interface import implementer

from magnet.errors import (BadFrame, BadURL, ConnectionLost, MagnetError, NotConfirmed, NotConnected, Timeout,
                           Unroutable)
from magnet.message import Message
from magnet.transport import LinkListener, OnDelivery
from magnet.amqpwire import (  # noqa: F401 (parse_url, tables: re-exported)
    BrokerURL,
    PUBLISH_SEQ_HEADER,
    _ACK,
    _Codec,
    _FRAME_END,
    _FRAME_HEAD,
    _HEARTBEAT_FRAME,
    _PUBLISH_PREFIX,
    _P_CONTENT_ENCODING,
    _P_CONTENT_TYPE,
    _P_HEADERS,
    _S_H,
    _S_HH,
    _S_Q,
    _content_frames,
    _decode_table,
    _method_frame,
    _read_shortstr,
    _shortstr_cached,
    decode_properties,
    decode_table,
    encode_table,
    load_spec,
    parse_url,
)

__all__ = ["AMQPTransport", "AMQPConsumer", "AMQPDelivery", "BrokerURL", "ChannelError", "from_url",
           "load_spec", "parse_url"]

#: What magnet tells the broker about itself in connection.start-ok.
CLIENT_PROPERTIES: Dict[str, Any] = {
    "product": "magnet",
    "information": "ooidx messaging layer (txAMQP)",
    "capabilities": {
        "publisher_confirms": True,
        "consumer_cancel_notify": True,
        "basic.nack": True,
        "connection.blocked": False,
        # a refused login is then reported with connection.close (403)
        # instead of a bare TCP close, so the log can say why
        "authentication_failure_close": True,
    },
}


DEFAULT_FRAME_MAX = 131072


class ChannelError(MagnetError):
    """The broker refused an operation and closed the channel (e.g. 404, 406)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


# ---------------------------------------------------------------------------
# deliveries and consumers


class AMQPDelivery:
    """A message handed to a consumer; ack() or nack() it exactly once."""

    __slots__ = ("message", "queue", "redelivered", "exchange", "routing_key", "_channel", "_tag",
                 "_settled")

    def __init__(self, message: Message, queue: str, redelivered: bool, exchange: str, routing_key: str,
                 channel: "_ConsumerChannel", tag: int) -> None:
        self.message = message
        self.queue = queue
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self._channel = channel
        self._tag = tag
        self._settled = False

    def ack(self) -> None:
        """Done with. A no-op if already settled or if the link that brought it is gone."""
        if self._settled:
            return
        self._settled = True
        channel = self._channel
        if channel.open:
            channel.protocol.write_ack(channel.id, self._tag)
            channel.settled()

    def nack(self, requeue: bool = True) -> None:
        """Give it back to the queue (C{requeue}) or drop it (or dead-letter it)."""
        if self._settled:
            return
        self._settled = True
        channel = self._channel
        if channel.open:
            channel.protocol.write_nack(channel.id, self._tag, requeue)
            channel.settled()

    def __repr__(self) -> str:
        return f"<AMQPDelivery {self.queue!r} tag={self._tag} redelivered={self.redelivered}>"


class AMQPConsumer:
    """A consumer registered through an L{AMQPTransport}; survives reconnects."""

    log = Logger()

    def __init__(self, transport: "AMQPTransport", queue: str, on_delivery: OnDelivery, prefetch: int) -> None:
        self.queue = queue
        self.on_delivery = on_delivery
        self.prefetch = prefetch
        self.cancelled = False
        #: True while the broker is delivering to it (False while the link is
        #: down, or after the broker cancelled it because its queue was deleted).
        self.active = False
        self._transport = transport
        self._channel: Optional[_ConsumerChannel] = None
        self._ch: Any = None  # the txAMQP channel under it
        self._resuming = False

    def cancel(self) -> Deferred:
        """Stop deliveries; unacknowledged messages go back to the queue."""
        return self._transport._cancel_consumer(self)

    def __repr__(self) -> str:
        return f"<AMQPConsumer {self.queue!r} prefetch={self.prefetch} active={self.active}>"


class _ConsumerChannel:
    """The fast path of one consumer's channel: basic.deliver + header + body."""

    log = Logger()

    def __init__(self, protocol: "_AMQPProtocol", channel_id: int, consumer: AMQPConsumer, tag: str) -> None:
        self.protocol = protocol
        self.id = channel_id
        self.consumer = consumer
        self.tag = tag
        self.open = True  # acks go out only while True
        self.delivering = True  # deliveries reach the consumer only while True
        self.cancelled = False  # basic.cancel sent: close the channel once all is settled
        self.unsettled = 0
        self.txchannel: Any = None
        self.expecting = 0  # 0: a method, 2: a content header, 3: body frames
        self._delivery_tag = 0
        self._redelivered = False
        self._exchange = ""
        self._routing_key = ""
        self._header: Optional[Tuple[bytes, int]] = None
        self._parts: List[bytes] = []
        self._remaining = 0

    def method(self, method_id: int, buf: bytes, pos: int, end: int) -> bool:
        """A basic method frame's arguments at C{pos}, ending by C{end}: True if taken here."""
        if method_id == 60:  # basic.deliver
            _, pos = _read_shortstr(buf, pos)  # consumer tag: one consumer per channel
            tag = _S_Q.unpack_from(buf, pos)[0]
            redelivered = buf[pos + 8] & 1 == 1
            exchange, pos = _read_shortstr(buf, pos + 9)
            routing_key, pos = _read_shortstr(buf, pos)
            _within(pos, end, "basic.deliver")
            self._delivery_tag, self._redelivered = tag, redelivered
            self._exchange, self._routing_key = exchange, routing_key
            self.expecting = 2
            return True
        if method_id == 30:  # basic.cancel from the broker
            tag, pos = _read_shortstr(buf, pos)
            _within(pos, end, "basic.cancel")
            self.protocol.owner._broker_cancelled(self, tag)
            return True
        return False

    def header(self, buf: bytes, start: int, end: int) -> None:
        _within(start + 14, end, "a content header")
        size = _S_Q.unpack_from(buf, start + 4)[0]
        if size == 0:
            self.expecting = 0
            self._deliver(buf, start + 12, b"", end)
        else:
            self._header = (buf[start + 12:end], 0)
            self._parts = []
            self._remaining = size
            self.expecting = 3

    def body(self, data: bytes) -> None:
        self._parts.append(data)
        self._remaining -= len(data)
        if self._remaining <= 0:
            parts, self._parts = self._parts, []
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self.expecting = 0
            header, self._header = self._header, None
            assert header is not None
            self._deliver(header[0], header[1], body)

    def settled(self) -> None:
        self.unsettled -= 1
        if self.cancelled and self.unsettled <= 0:
            self.release()

    def release(self) -> None:
        """Close the channel (whatever is still unacknowledged goes back to the queue)."""
        if not self.open:
            return
        self.open = False
        self.delivering = False
        if self.txchannel is not None and not self.protocol.lost:
            self.protocol.close_channel(self.txchannel).addErrback(lambda _: None)

    def _deliver(self, buf: bytes, pos: int, body: bytes, end: Optional[int] = None) -> None:
        """A whole message: its content header's properties at C{pos} of C{buf},
        ending by C{end} (the header frame's end; default the end of C{buf})."""
        if not self.delivering:
            # arrived after basic.cancel was sent: straight back to the queue
            if self.open:
                self.protocol.write_nack(self.id, self._delivery_tag, True)
            return
        self.unsettled += 1
        message, _ = decode_properties(buf, pos, body, end=end)
        consumer = self.consumer
        delivery = AMQPDelivery(message, consumer.queue, self._redelivered, self._exchange,
                                self._routing_key, self, self._delivery_tag)
        try:
            consumer.on_delivery(delivery)
        except Exception:
            self.log.failure("consumer of {queue} raised on a delivery; nacking it (requeue)",
                             queue=consumer.queue)
            delivery.nack(requeue=True)


def _within(pos: int, end: int, what: str) -> None:
    """L{BadFrame} unless what was read ends by the frame's C{end} (else it came from the next frame)."""
    if pos > end:
        raise BadFrame(f"{what} runs {pos - end} byte(s) past the end of its frame")


class _Pending:
    __slots__ = ("deferred", "exchange", "routing_key", "returned", "message", "mandatory", "nacks",
                 "deadline")

    def __init__(self, deferred: Deferred, exchange: str, routing_key: str, message: Message,
                 mandatory: bool) -> None:
        self.deferred = deferred
        self.exchange = exchange
        self.routing_key = routing_key
        self.returned: Optional[str] = None
        self.message = message  # kept to publish it again after a basic.nack
        self.mandatory = mandatory
        self.nacks = 0
        self.deadline = 0.0  # set at the first nack: no more attempts after it


class _PublishChannel:
    """The publishing channel (confirm mode): basic.ack / nack / return on the fast path.

    A message the broker refuses (C{basic.nack}) is handed to the transport,
    which publishes it again on a fresh channel (L{AMQPTransport._nacked}):
    RabbitMQ keeps per-channel state for every queue a channel publishes to,
    and that state can stay broken for the channel's lifetime.
    """

    log = Logger()

    def __init__(self, protocol: "_AMQPProtocol", channel_id: int, txchannel: Any = None) -> None:
        self.protocol = protocol
        self.id = channel_id
        self.txchannel = txchannel
        self.open = True
        self.replacing = False  # a fresh channel is being opened to take over from this one
        self.retired = False  # replaced: closed once its last publish is settled
        self.seq = 0
        self.pending: "OrderedDict[int, _Pending]" = OrderedDict()
        self.expecting = 0
        self._return: Optional[Tuple[int, str, str, str]] = None
        self._return_seq: Optional[int] = None
        self._remaining = 0

    def publish(self, exchange: str, routing_key: str, message: Message, mandatory: bool) -> Deferred:
        d = Deferred()
        self.send(_Pending(d, exchange, routing_key, message, mandatory))
        return d

    def send(self, p: _Pending) -> None:
        """Write C{p}'s message (basic.publish + content) under the next sequence number."""
        seq = self.seq + 1
        method = (_PUBLISH_PREFIX + _shortstr_cached(p.exchange) + _shortstr_cached(p.routing_key)
                  + (b"\x01" if p.mandatory else b"\x00"))
        frames = _content_frames(self.id, p.message, seq if p.mandatory else None, self.protocol.frame_max)
        frames.insert(0, _method_frame(self.id, method))
        self.seq = seq
        p.returned = None
        self.pending[seq] = p
        self.protocol.write_frames(frames)

    def method(self, method_id: int, buf: bytes, pos: int, end: int) -> bool:
        """A basic method frame's arguments at C{pos}, ending by C{end}: True if taken here."""
        if method_id == 80:  # basic.ack
            _within(pos + 9, end, "basic.ack")
            tag = _S_Q.unpack_from(buf, pos)[0]
            self._settle(tag, buf[pos + 8] & 1 == 1, None)
            return True
        if method_id == 120:  # basic.nack
            _within(pos + 9, end, "basic.nack")
            tag = _S_Q.unpack_from(buf, pos)[0]
            self._settle(tag, buf[pos + 8] & 1 == 1, "nack")
            return True
        if method_id == 50:  # basic.return: content follows
            code = _S_H.unpack_from(buf, pos)[0]
            text, pos = _read_shortstr(buf, pos + 2)
            exchange, pos = _read_shortstr(buf, pos)
            routing_key, pos = _read_shortstr(buf, pos)
            _within(pos, end, "basic.return")
            self._return = (code, text, exchange, routing_key)
            self.expecting = 2
            return True
        return False

    def header(self, buf: bytes, start: int, end: int) -> None:
        _within(start + 14, end, "a content header")
        size = _S_Q.unpack_from(buf, start + 4)[0]
        flags = _S_H.unpack_from(buf, start + 12)[0]
        seq = None
        if flags & _P_HEADERS:
            pos = start + 14
            if flags & _P_CONTENT_TYPE:
                pos += 1 + buf[pos]
            if flags & _P_CONTENT_ENCODING:
                pos += 1 + buf[pos]
            headers, _ = _decode_table(buf, pos, end)
            seq = headers.get(PUBLISH_SEQ_HEADER)
        self._return_seq = seq
        self._remaining = size
        if size == 0:
            self._returned()
        else:
            self.expecting = 3

    def body(self, data: bytes) -> None:
        self._remaining -= len(data)
        if self._remaining <= 0:
            self._returned()

    def _returned(self) -> None:
        self.expecting = 0
        ret, self._return = self._return, None
        seq, self._return_seq = self._return_seq, None
        assert ret is not None
        code, text, exchange, routing_key = ret
        pending = self.pending.get(seq) if isinstance(seq, int) else None
        if pending is None:
            self.log.warn("broker returned a message we cannot match (exchange {exchange!r}, "
                          "routing key {routing_key!r}): {code} {text}",
                          exchange=exchange, routing_key=routing_key, code=code, text=text)
            return
        pending.returned = f"{code} {text}"

    def _settle(self, tag: int, multiple: bool, outcome: Optional[str]) -> None:
        pending = self.pending
        settled: List[_Pending] = []
        if multiple:
            while pending:
                first = next(iter(pending))
                if tag and first > tag:
                    break
                settled.append(pending.popitem(last=False)[1])
        else:
            one = pending.pop(tag, None)
            if one is not None:
                settled.append(one)
        nacked: List[_Pending] = []
        for p in settled:
            if p.returned is not None:
                p.deferred.errback(Unroutable(
                    f"no queue took the message to exchange {p.exchange!r} with routing key "
                    f"{p.routing_key!r} ({p.returned})"))
            elif outcome is None:
                p.deferred.callback(None)
            else:
                nacked.append(p)
        if nacked:
            self.protocol.owner._nacked(self, nacked)
        if self.retired and not pending and self.open:
            self.release()

    def retire(self) -> None:
        """A fresh channel publishes from now on: close this one once nothing waits for a confirm."""
        self.retired = True
        if not self.pending:
            self.release()

    def release(self) -> None:
        self.open = False
        if self.txchannel is not None and not self.protocol.lost:
            self.protocol.close_channel(self.txchannel).addErrback(lambda _: None)

    def fail_all(self, make_error: Callable[[_Pending], Exception]) -> None:
        self.open = False
        pending, self.pending = self.pending, OrderedDict()
        for p in pending.values():
            p.deferred.errback(make_error(p))


# ---------------------------------------------------------------------------
# the protocol


class _Delegate(TwistedDelegate):
    """txAMQP's delegate, for the methods that are not on the fast path."""

    log = Logger()

    def __init__(self, protocol_owner: "AMQPTransport") -> None:
        TwistedDelegate.__init__(self)
        self.owner = protocol_owner

    def connection_start(self, ch: Any, msg: Any) -> None:
        client = self.client
        ch.connection_start_ok(client_properties=CLIENT_PROPERTIES, mechanism=client.mechanism,
                               response=client.response, locale=client.locale)

    def connection_tune(self, ch: Any, msg: Any) -> None:
        client = self.client
        frame_max = msg.frame_max or DEFAULT_FRAME_MAX
        frame_max = min(frame_max, DEFAULT_FRAME_MAX) if frame_max >= 4096 else 4096
        channel_max = msg.channel_max or 65535
        wanted = client.wanted_heartbeat
        if wanted <= 0:
            heartbeat = 0
        elif msg.heartbeat == 0:
            heartbeat = max(1, int(round(wanted)))
        else:
            heartbeat = max(1, min(int(round(wanted)), msg.heartbeat))
        client.MAX_LENGTH = frame_max
        client.frame_max = frame_max
        client.channel_max = channel_max
        ch.connection_tune_ok(channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)
        client.start_heartbeat(heartbeat)
        client.started.fire()

    def connection_close(self, ch: Any, msg: Any) -> None:
        self.client.close_reason = f"{msg.reply_code} {msg.reply_text}"
        self.log.warn("broker {url} closed the connection: {code} {text}", url=self.client.url,
                      code=msg.reply_code, text=msg.reply_text)
        TwistedDelegate.connection_close(self, ch, msg)

    def channel_close(self, ch: Any, msg: Any) -> None:
        ch.channel_close_ok()
        ch.do_close(msg)
        self.client.channel_closed_by_broker(ch.id, msg.reply_code, msg.reply_text)

    def channel_failed(self, ch: Any, reason: Any) -> None:
        pass

    def basic_deliver(self, ch: Any, msg: Any) -> None:
        self.log.warn("delivery on channel {channel} with no consumer; dropped", channel=ch.id)

    def basic_return_(self, ch: Any, msg: Any) -> None:
        self.log.warn("basic.return on channel {channel} that does not publish; dropped", channel=ch.id)

    def basic_ack(self, ch: Any, msg: Any) -> None:
        pass

    def basic_nack(self, ch: Any, msg: Any) -> None:
        pass

    def basic_cancel(self, ch: Any, msg: Any) -> None:
        self.log.info("broker cancelled consumer {tag} on channel {channel}", tag=msg.consumer_tag,
                      channel=ch.id)


@implementer(IHandshakeListener)
class _AMQPProtocol(AMQClient):
    """txAMQP's client with the fast paths of this module and heartbeats of its own."""

    log = Logger()

    def __init__(self, owner: "AMQPTransport", url: BrokerURL, spec: Any, clock: Any, heartbeat: float) -> None:
        AMQClient.__init__(self, _Delegate(owner), url.vhost, spec, heartbeat=0, clock=clock)
        self.owner = owner
        self.url = url
        self.wanted_heartbeat = heartbeat
        self.frame_max = 4096
        self.channel_max = 65535
        self.close_reason: Optional[str] = None
        self.lost = False
        self.fast: Dict[int, Any] = {}
        self._next_channel = 0
        self._rbuf = b""
        self._heartbeat_call: Optional[LoopingCall] = None
        self._sent = False
        self._received = False
        self._silent_ticks = 0
        self._heartbeat = 0
        #: over TLS: True once the TLS handshake is done (the broker's certificate verified)
        self.tls_done = False
        #: over TLS: why the link was lost, if TLS had to do with it
        self.tls_error: Optional[str] = None
        self._tls_timer: Any = None

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (L{IHandshakeListener}): the broker's certificate passed."""
        self.tls_done = True
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None

    def _tls_handshake_timeout(self, seconds: float) -> None:
        self._tls_timer = None
        if self.tls_done or self.lost or self.transport is None:
            return
        self.tls_error = self.close_reason = (
            f"TLS handshake with {self.url.host}:{self.url.port} not finished within {seconds:.1f} s "
            f"(is it the broker's TLS port?)")
        self.transport.abortConnection()

    # -- writing

    def send_frame(self, frame: Frame) -> None:
        if self.transport is None:
            return
        self._sent = True
        self.transport.write(self._pack_frame(frame))

    def _pack_frame(self, frame: Frame) -> bytes:
        payload = frame.payload
        if isinstance(payload, Method):
            buf = BytesIO()
            c = _Codec(buf)
            c.encode_short(payload.method.klass.id)
            c.encode_short(payload.method.id)
            for field, arg in zip(payload.method.fields, payload.args):
                c.encode(field.type, arg)
            c.flush()
            return _method_frame(frame.channel, buf.getvalue())
        return AMQClient._pack_frame(self, frame)

    def connectionMade(self) -> None:
        # small frames (acks, RPC requests) must not wait for Nagle's algorithm
        for transport in (self.transport, getattr(self.transport, "transport", None)):
            setter = getattr(transport, "setTcpNoDelay", None)
            if setter is not None:
                try:
                    setter(True)
                except Exception:
                    pass
                break
        if self.url.tls and not self.tls_done:
            # the TCP connect is bounded by the endpoint, the TLS handshake here
            seconds = self.owner.connect_timeout
            self._tls_timer = self.clock.callLater(seconds, self._tls_handshake_timeout, seconds)
        AMQClient.connectionMade(self)

    def send_init_string(self) -> None:
        # the AMQP 0-9-1 protocol header (txAMQP sends the 0-8 style "AMQP 1 1 0 9")
        self._sent = True
        self.transport.write(b"AMQP\x00\x00\x09\x01")

    def write_frames(self, frames: List[bytes]) -> None:
        self._sent = True
        self.transport.write(b"".join(frames))

    def write_ack(self, channel: int, tag: int) -> None:
        self._sent = True
        self.transport.write(_ACK.pack(1, channel, 13, 60, 80, tag, 0, _FRAME_END))

    def write_nack(self, channel: int, tag: int, requeue: bool) -> None:
        self._sent = True
        self.transport.write(_ACK.pack(1, channel, 13, 60, 120, tag, 2 if requeue else 0, _FRAME_END))

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        buf = self._rbuf + data if self._rbuf else data
        n = len(buf)
        pos = 0
        try:
            while n - pos >= 8:
                ftype, channel, size = _FRAME_HEAD.unpack_from(buf, pos)
                if size > self.frame_max:
                    # the broker agreed to frame_max (4096 until the tune); a larger
                    # frame is a broken peer, and waiting for it would buffer up to 4 GiB
                    raise ValueError(f"a frame of {size} bytes; frame_max is {self.frame_max}")
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != _FRAME_END:
                    raise ValueError(f"bad frame end {buf[end]!r}")
                start = pos + 7
                pos = end + 1
                self._frame(ftype, channel, buf, start, end)
                if self.lost:
                    return
        except Exception:
            self.log.failure("bad data from broker {url}; dropping the connection", url=self.url)
            self._rbuf = b""
            self.transport.abortConnection()
            return
        self._rbuf = buf[pos:] if pos < n else b""

    def _frame(self, ftype: int, channel: int, buf: bytes, start: int, end: int) -> None:
        fast = self.fast.get(channel)
        if ftype == 1:
            class_id, method_id = _S_HH.unpack_from(buf, start)
            if fast is not None and class_id == 60 and fast.method(method_id, buf, start + 4, end):
                return
            self._slow(Frame(channel, self._decode_method(buf[start:end])))
        elif ftype == 2:
            if fast is not None and fast.expecting == 2:
                fast.header(buf, start, end)
                return
            self._slow(Frame(channel, self._decode_header(buf[start:end])))
        elif ftype == 3:
            if fast is not None and fast.expecting == 3:
                fast.body(buf[start:end])
                return
            self._slow(Frame(channel, Body(buf[start:end])))
        elif ftype == 8:
            pass
        else:
            raise ValueError(f"unknown frame type {ftype}")

    def _decode_method(self, payload: bytes) -> Method:
        c = _Codec(BytesIO(payload))
        klass = self.spec.classes.byid[c.decode_short()]
        meth = klass.methods.byid[c.decode_short()]
        args = tuple(c.decode(f.type) for f in meth.fields)
        return Method(meth, *args)

    def _decode_header(self, payload: bytes) -> Any:
        klass_id, weight, size = struct.unpack_from(">HHQ", payload, 0)
        return Header(self.spec.classes.byid[klass_id], weight, size)

    def _slow(self, frame: Frame) -> None:
        d = self.process_frame(frame)
        d.addErrback(lambda f: self.log.failure("processing frame {frame}", failure=f, frame=str(frame)))

    # -- channels

    def allocate_channel(self) -> int:
        limit = self.channel_max
        for _ in range(limit):
            self._next_channel = self._next_channel % limit + 1
            if self._next_channel not in self.channels:
                return self._next_channel
        raise MagnetError(f"all {limit} AMQP channels are in use")

    @defer.inlineCallbacks
    def open_channel(self) -> Any:
        if self.lost or self.closed:
            raise Closed("the link is down")
        channel_id = self.allocate_channel()
        ch = yield self.channel(channel_id)
        yield ch.channel_open()
        return ch

    @defer.inlineCallbacks
    def close_channel(self, ch: Any) -> Any:
        """channel.close and wait for close-ok; frees the channel id."""
        self.fast.pop(ch.id, None)
        try:
            if not ch.closed and not self.lost:
                yield ch.channel_close(reply_code=200, reply_text="done")
        finally:
            ch.close(None)
            if self.channels.get(ch.id) is ch:
                del self.channels[ch.id]

    def channel_closed_by_broker(self, channel_id: int, code: int, text: str) -> None:
        fast = self.fast.pop(channel_id, None)
        ch = self.channels.pop(channel_id, None)
        del ch
        self.owner._channel_closed(self, channel_id, fast, code, text)

    def do_close(self, reason: Any) -> None:
        # as AMQClient's, but closing a channel may remove it from the map
        for ch in list(self.channels.values()):
            ch.close(reason)
        for q in list(self.queues.values()):
            q.close()
        self.delegate.close(reason)

    # -- heartbeats

    def start_heartbeat(self, interval: float) -> None:
        self._heartbeat = interval
        if interval <= 0:
            return
        self._heartbeat_call = LoopingCall(self._heartbeat_tick)
        self._heartbeat_call.clock = self.clock
        self._heartbeat_call.start(interval / 2.0, now=False)

    def _heartbeat_tick(self) -> None:
        if self.lost or self.transport is None:
            return
        if not self._sent:
            self.transport.write(_HEARTBEAT_FRAME)
        self._sent = False
        if self._received:
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= 4:  # two heartbeat intervals without a byte
                self.log.warn("no data from broker {url} for {seconds} s (heartbeat); dropping the link",
                              url=self.url, seconds=self._heartbeat * 2)
                self.transport.abortConnection()
        self._received = False

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = True
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None
        if self.url.tls and self.close_reason is None:
            self.tls_error = _tls_failure(reason, self.url, self.tls_done,
                                          self.owner._tls_trust_description(self.url), self.transport)
            self.close_reason = self.tls_error
        if self._heartbeat_call is not None and self._heartbeat_call.running:
            self._heartbeat_call.stop()
        try:
            self.owner._connection_lost(self, reason)
        finally:
            AMQClient.connectionLost(self, reason)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], _AMQPProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> _AMQPProtocol:
        return self._build()


# ---------------------------------------------------------------------------
# the transport


class _Waiter:
    __slots__ = ("deferred", "call")

    def __init__(self, deferred: Deferred, call: Any) -> None:
        self.deferred = deferred
        self.call = call


class AMQPTransport:
    """The L{magnet.transport.Transport} on RabbitMQ.

    @param urls: one C{amqp://} / C{amqps://} URL or a list of them (a
        cluster: each reconnect attempt tries the next one).
    @param reactor: the reactor (time, TCP); tests pass their own.
    @param heartbeat: seconds between heartbeats (0: none); a broker silent
        for two intervals is taken for dead and the link is dropped.
    @param operation_timeout: how long a declaration or publish waits for the
        link to come up before it fails with L{NotConnected}.
    @param backoff: C{attempt -> seconds} between reconnect attempts.
    @param connect_timeout: limit of one TCP connect + AMQP handshake.
    @param close_timeout: how long L{stop} waits for the broker's close-ok.
    @param nack_retries: how many times a message the broker refused
        (C{basic.nack}) is published again, each time on a fresh channel and
        after a backoff (50 ms, doubling, at most 1 s), within
        C{operation_timeout} of the first refusal, before its publish fails
        with L{NotConfirmed}. A refused message was not taken, so publishing
        it again duplicates nothing. (RabbitMQ 3.10 refuses every publish of
        a channel to a quorum queue whose first publish there found the
        queue's leader on a node that had just died, for as long as the
        channel lives; a fresh channel publishes fine.)
    @param tls_options: an C{IOpenSSLClientConnectionCreator} for amqps URLs,
        for what the URL options cannot say (it names one host, so it suits
        one broker, not a cluster). By default an C{amqps://} URL verifies the
        broker's certificate against the system's trust store, or against the
        CA file of its C{cacertfile=} query option, and checks that the
        certificate names the URL's host (or its C{server_name_indication=});
        C{certfile=} / C{keyfile=} add a client certificate. A file that
        cannot be read or holds no certificate is a L{BadURL} here, at once.
        A refused certificate is an error of the attempt (logged, retried with
        backoff, and named in the L{NotConnected} of callers waiting for the
        link): C{TLS verification failed: ...}.
    """

    log = Logger()

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        reactor: Any,
        heartbeat: float = 10.0,
        operation_timeout: float = 30.0,
        backoff: Optional[Callable[[int], float]] = None,
        connect_timeout: float = 10.0,
        close_timeout: float = 3.0,
        auth_mechanism: str = "PLAIN",
        tls_options: Any = None,
        nack_retries: int = 8,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise BadURL("no broker URL given")
        self.urls: List[BrokerURL] = [parse_url(u) for u in urls]
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.operation_timeout = operation_timeout
        self.backoff = backoff if backoff is not None else backoffPolicy(initialDelay=0.5, maxDelay=30.0,
                                                                         factor=1.7)
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.nack_retries = nack_retries
        #: messages the broker refused (basic.nack), and publishing channels replaced for it
        self.nacked = 0
        self.publishers_replaced = 0
        self.auth_mechanism = auth_mechanism.upper()
        self.tls_options = tls_options
        if tls_options is not None and any(u.has_tls_options for u in self.urls):
            raise BadURL("TLS options given both in the broker URL (cacertfile, certfile, keyfile, "
                         "server_name_indication) and as tls_options: give them one way")
        #: the TLS connection creator of each amqps URL, made (and its files read) once, here
        self._tls: Dict[BrokerURL, Any] = {}
        for url in self.urls:
            if url.tls:
                self._tls[url] = tls_options if tls_options is not None else _tls_creator(url)
        #: why the last connection attempt failed (no password in it), None once connected
        self.last_error: Optional[str] = None
        self.spec = load_spec()

        #: True while the link is up (topology replayed, consumers resumed).
        self.connected = False
        self._protocol: Optional[_AMQPProtocol] = None  # the link in use, once up
        self._attempt_protocol: Optional[_AMQPProtocol] = None  # the link being set up
        self._publisher: Optional[_PublishChannel] = None
        self._control: Optional[Any] = None  # txAMQP channel for declarations
        self._control_lock = defer.DeferredLock()
        self._running = False
        self._stopping = False
        self._url_index = -1
        self._failures = 0
        self._retry_call: Any = None
        self._connecting: Optional[Deferred] = None
        self._waiters: List[_Waiter] = []
        self._listeners: List[LinkListener] = []
        self._topology: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._consumers: "OrderedDict[int, AMQPConsumer]" = OrderedDict()
        self._tags = itertools.count(1)
        self._tag_prefix = f"magnet.{uuid.uuid4().hex[:8]}"
        self._stopped_d: Optional[Deferred] = None

    def __repr__(self) -> str:
        return f"<AMQPTransport {', '.join(u.masked() for u in self.urls)} connected={self.connected}>"

    # -- link management

    def start(self) -> None:
        """Begin connecting (and keep reconnecting with backoff)."""
        if self._running:
            return
        self._stopped_d = None
        self._running = True
        self._stopping = False
        self._connect()

    def _connect(self) -> None:
        self._retry_call = None
        if not self._running or self._stopping:
            return
        self._url_index = (self._url_index + 1) % len(self.urls)
        url = self.urls[self._url_index]
        self.log.debug("connecting to {url}", url=url)
        d = self._attempt(url)
        self._connecting = d
        d.addCallbacks(self._attempt_succeeded, self._attempt_failed, errbackArgs=(url,))

    def _endpoint(self, url: BrokerURL) -> Any:
        endpoint = HostnameEndpoint(self.reactor, url.host, url.port, timeout=self.connect_timeout)
        if url.tls:
            endpoint = wrapClientTLS(self._tls[url], endpoint)
        return endpoint

    def _tls_trust_description(self, url: BrokerURL) -> Tuple[str, Optional[str]]:
        """What the broker's certificate is checked against, for messages, and
        where to find those CAs again: the CA file, "" for the system's trust
        store, None when unknown (the caller's own tls_options)."""
        if self.tls_options is not None:
            return "the tls_options given", None
        if url.cafile:
            return f"the CA file {url.cafile}", url.cafile
        return "the system's trust store", ""

    @defer.inlineCallbacks
    def _attempt(self, url: BrokerURL) -> Any:
        heartbeat = url.heartbeat if url.heartbeat is not None else self.heartbeat
        factory = _ProtocolFactory(lambda: _AMQPProtocol(self, url, self.spec, self.reactor, heartbeat))
        protocol = yield self._endpoint(url).connect(factory)
        self._attempt_protocol = protocol
        timer = self.reactor.callLater(self.connect_timeout + self.operation_timeout, self._setup_timeout,
                                       protocol)
        try:
            yield self._setup(protocol, url)
        except BaseException:
            if not protocol.lost and protocol.transport is not None:
                protocol.transport.abortConnection()
            raise
        finally:
            if timer.active():
                timer.cancel()
            self._attempt_protocol = None
        if protocol.lost:
            raise ConnectionLost("link lost while declaring the topology again")
        return protocol

    @defer.inlineCallbacks
    def _setup(self, protocol: _AMQPProtocol, url: BrokerURL) -> Any:
        mechanism = url.mechanism or self.auth_mechanism
        try:
            yield protocol.authenticate(url.username, url.password, mechanism=mechanism)
        except Closed:
            if protocol.tls_error:
                raise ConnectionLost(protocol.tls_error) from None
            reason = protocol.close_reason or "connection closed during the handshake"
            raise ConnectionLost(f"AMQP handshake failed: {reason}") from None
        publisher_ch = yield protocol.open_channel()
        yield publisher_ch.confirm_select(nowait=False)
        publisher = _PublishChannel(protocol, publisher_ch.id, publisher_ch)
        protocol.fast[publisher_ch.id] = publisher
        self._publisher = publisher
        self._control = None
        yield self._replay(protocol)

    def _setup_timeout(self, protocol: _AMQPProtocol) -> None:
        self.log.warn("broker {url} did not complete the connection setup in time; dropping it",
                      url=protocol.url)
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def _attempt_succeeded(self, protocol: _AMQPProtocol) -> None:
        self._connecting = None
        if self._stopping:
            protocol.transport.abortConnection()
            return
        self._failures = 0
        self.last_error = None
        self._protocol = protocol
        self.connected = True
        self.log.info("connected to broker {url}", url=protocol.url)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.call.active():
                w.call.cancel()
            w.deferred.callback(protocol)
        self._notify(True)

    def _attempt_failed(self, failure: Failure, url: BrokerURL) -> None:
        self._connecting = None
        if self._stopping or not self._running:
            return
        self._failures += 1
        delay = self.backoff(self._failures)
        self.last_error = _describe(failure)
        self.log.warn("broker unreachable at {url} ({reason}), retrying in {delay:.1f} s", url=url,
                      reason=self.last_error, delay=delay)
        self._retry_call = self.reactor.callLater(delay, self._connect)

    def _connection_lost(self, protocol: _AMQPProtocol, reason: Failure) -> None:
        publisher = self._publisher
        if publisher is not None and publisher.protocol is protocol:
            self._publisher = None
        # the publishing channel, and any replaced one still waiting for confirms
        publishers = [f for f in protocol.fast.values() if isinstance(f, _PublishChannel)]
        if publisher is not None and publisher.protocol is protocol and publisher not in publishers:
            publishers.append(publisher)
        for fast in publishers:
            fast.fail_all(lambda p: ConnectionLost(
                f"link to the broker lost before the confirm of the message to exchange "
                f"{p.exchange!r} with routing key {p.routing_key!r}"))
        for fast in list(protocol.fast.values()):
            fast.open = False
            if isinstance(fast, _ConsumerChannel):
                fast.delivering = False
                if fast.consumer._channel is fast:
                    fast.consumer._channel = None
                    fast.consumer.active = False
        protocol.fast.clear()
        if protocol is not self._protocol:
            return  # a link that never came up: the attempt's errback deals with it
        self._protocol = None
        self._control = None
        self.connected = False
        if not self._stopping:
            why = protocol.close_reason or _describe(reason)
            self.log.warn("link to broker {url} lost ({reason}); reconnecting", url=protocol.url, reason=why)
        self._notify(False)
        if self._running and not self._stopping:
            self._retry_call = self.reactor.callLater(0, self._connect)

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:
                self.log.failure("link listener {listener!r} raised", listener=listener)

    def stop(self) -> Deferred:
        """Close the link cleanly and stop reconnecting; fires within a bound."""
        if self._stopped_d is not None:
            d = Deferred()
            self._stopped_d.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        self._stopping = True
        self._running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.call.active():
                w.call.cancel()
            w.deferred.errback(NotConnected("the transport was stopped"))
        self._stopped_d = self._close_link()
        return self._stopped_d

    @defer.inlineCallbacks
    def _close_link(self) -> Any:
        if self._connecting is not None:
            self._connecting.cancel()
        attempt = self._attempt_protocol
        if attempt is not None and attempt.transport is not None and not attempt.lost:
            attempt.transport.abortConnection()
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return None
        lost = protocol.disconnected.wait()
        try:
            channel0 = yield protocol.channel(0)
            close = channel0.connection_close(reply_code=200, reply_text="magnet stopping")
            yield _bounded(close, self.close_timeout, self.reactor)
        except Exception:
            pass
        if not protocol.lost:
            protocol.transport.loseConnection()
        try:
            yield _bounded(lost, 2.0, self.reactor)
        except Exception:
            if not protocol.lost:
                protocol.transport.abortConnection()
        return None

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        """Fires (with None) once the link is up, at once if it is; L{NotConnected} after C{timeout}."""
        if self.connected:
            return succeed(None)
        return self._wait_link(timeout).addCallback(lambda _: None)

    def add_link_listener(self, listener: LinkListener) -> None:
        self._listeners.append(listener)

    def _wait_link(self, timeout: Optional[float]) -> Deferred:
        """Fires with the protocol once the link is up; L{NotConnected} after C{timeout}."""
        if self.connected and self._protocol is not None:
            return succeed(self._protocol)
        if self._stopping:
            return defer.fail(NotConnected("the transport is stopped"))

        def cancel(d: Deferred) -> None:
            self._waiters[:] = [w for w in self._waiters if w.deferred is not d]
            if waiter.call is not None and waiter.call.active():
                waiter.call.cancel()

        d = Deferred(cancel)
        waiter = _Waiter(d, None)

        def expire() -> None:
            self._waiters[:] = [w for w in self._waiters if w is not waiter]
            d.errback(NotConnected(
                f"no link to the broker ({', '.join(u.masked() for u in self.urls)}) within {timeout:.1f} s"
                f"{self._last_error_note()}"))

        if timeout is not None:
            waiter.call = self.reactor.callLater(timeout, expire)
        else:
            waiter.call = _NoCall()
        self._waiters.append(waiter)
        return d

    def _last_error_note(self) -> str:
        return f"; last attempt: {self.last_error}" if self.last_error else ""

    # -- operations

    @defer.inlineCallbacks
    def _operation(self, what: str, run: Callable[[_AMQPProtocol], Deferred]) -> Any:
        """Run C{run(protocol)} on the link, waiting for it and retrying after a link loss."""
        deadline = self.reactor.seconds() + self.operation_timeout
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise NotConnected(f"{what}: no broker link within {self.operation_timeout:.1f} s"
                                   f"{self._last_error_note()}")
            protocol = yield self._wait_link(remaining)
            try:
                result = yield run(protocol)
            except Closed as e:
                if protocol.lost or protocol is not self._protocol:
                    continue  # the link went down under it: try again on the next one
                raise _channel_error(e) from None
            return result

    @defer.inlineCallbacks
    def _control_call(self, protocol: _AMQPProtocol, call: Callable[[Any], Deferred]) -> Any:
        """Run one synchronous method on the declarations channel (one at a time)."""
        yield self._control_lock.acquire()
        try:
            ch = self._control
            if ch is None or ch.closed or ch.client is not protocol:
                ch = yield protocol.open_channel()
                self._control = ch
            result = yield _bounded(call(ch), self.operation_timeout, self.reactor, protocol)
        finally:
            self._control_lock.release()
        return result

    def _declare_queue_on(self, protocol: _AMQPProtocol, name: str, options: Mapping[str, Any]) -> Deferred:
        return self._control_call(protocol, lambda ch: ch.queue_declare(
            queue=name, durable=options["durable"], exclusive=options["exclusive"],
            auto_delete=options["auto_delete"], arguments=dict(options["arguments"] or {})))

    def _declare_exchange_on(self, protocol: _AMQPProtocol, name: str, kind: str, durable: bool) -> Deferred:
        return self._control_call(protocol, lambda ch: ch.exchange_declare(
            exchange=name, type=kind, durable=durable))

    def _bind_on(self, protocol: _AMQPProtocol, queue: str, exchange: str, routing_key: str) -> Deferred:
        return self._control_call(protocol, lambda ch: ch.queue_bind(
            queue=queue, exchange=exchange, routing_key=routing_key))

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Optional[Mapping[str, Any]] = None) -> Deferred:
        """Fires with None once the queue exists. Remembered for replay."""
        options = {"durable": durable, "exclusive": exclusive, "auto_delete": auto_delete,
                   "arguments": dict(arguments or {})}

        def done(_: Any) -> None:
            self._topology[("queue", name)] = ("queue", name, options)
            self._resume_consumers_of(name)

        d = self._operation(f"declare queue {name!r}", lambda p: self._declare_queue_on(p, name, options))
        return d.addCallback(done)

    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True) -> Deferred:
        """C{kind} is 'fanout', 'direct' or 'topic'. Remembered for replay."""
        if kind not in ("fanout", "direct", "topic", "headers"):
            return defer.fail(ValueError(f"unknown exchange kind {kind!r}"))

        def done(_: Any) -> None:
            self._topology[("exchange", name)] = ("exchange", name, kind, durable)

        d = self._operation(f"declare exchange {name!r}",
                            lambda p: self._declare_exchange_on(p, name, kind, durable))
        return d.addCallback(done)

    def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> Deferred:
        """Remembered for replay."""

        def done(_: Any) -> None:
            self._topology[("bind", queue, exchange, routing_key)] = ("bind", queue, exchange, routing_key)

        d = self._operation(f"bind queue {queue!r} to {exchange!r}",
                            lambda p: self._bind_on(p, queue, exchange, routing_key))
        return d.addCallback(done)

    def delete_queue(self, name: str) -> Deferred:
        """Delete a queue and forget it (no replay); its consumers are dropped."""
        self._forget_queue(name)

        def done(_: Any) -> None:
            self._forget_queue(name)

        d = self._operation(f"delete queue {name!r}", lambda p: self._control_call(
            p, lambda ch: ch.queue_delete(queue=name)))
        return d.addCallback(done)

    def delete_exchange(self, name: str) -> Deferred:
        """Delete an exchange and forget it and its bindings (not in the Transport interface)."""

        def forget(_: Any = None) -> None:
            for key in [k for k in self._topology if (k[0] == "exchange" and k[1] == name)
                        or (k[0] == "bind" and k[2] == name)]:
                del self._topology[key]

        forget()
        d = self._operation(f"delete exchange {name!r}", lambda p: self._control_call(
            p, lambda ch: ch.exchange_delete(exchange=name)))
        return d.addCallback(forget)

    def _forget_queue(self, name: str) -> None:
        for key in [k for k in self._topology if (k[0] == "queue" and k[1] == name)
                    or (k[0] == "bind" and k[1] == name)]:
            del self._topology[key]
        for consumer in [c for c in self._consumers.values() if c.queue == name]:
            consumer.cancelled = True
            self._consumers.pop(id(consumer), None)

    # -- publishing

    def publish(self, exchange: str, routing_key: str, message: Message, *, mandatory: bool = True) -> Deferred:
        """Fires once the broker has confirmed the message (see L{Transport.publish})."""
        publisher = self._publisher
        if self.connected and publisher is not None and publisher.open:
            try:
                return publisher.publish(exchange, routing_key, message, mandatory)
            except (ValueError, TypeError) as e:
                return defer.fail(e)
        return self._publish_later(exchange, routing_key, message, mandatory)

    @defer.inlineCallbacks
    def _publish_later(self, exchange: str, routing_key: str, message: Message, mandatory: bool) -> Any:
        deadline = self.reactor.seconds() + self.operation_timeout
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise NotConnected(f"publish to exchange {exchange!r}: no broker link within "
                                   f"{self.operation_timeout:.1f} s")
            yield self._wait_link(remaining)
            publisher = self._publisher
            if self.connected and publisher is not None and publisher.open:
                result = yield publisher.publish(exchange, routing_key, message, mandatory)
                return result
            # the publishing channel is being reopened; give it a moment
            yield _sleep(self.reactor, 0.05)

    # -- consuming

    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 10) -> Deferred:
        """Fires with an L{AMQPConsumer} once the broker delivers to it."""
        if not 0 <= prefetch <= 65535:
            return defer.fail(ValueError(f"prefetch must be 0..65535, got {prefetch}"))
        consumer = AMQPConsumer(self, queue, on_delivery, prefetch)

        def registered(_: Any) -> AMQPConsumer:
            if consumer.cancelled:
                return consumer
            self._consumers[id(consumer)] = consumer
            return consumer

        d = self._operation(f"consume from {queue!r}", lambda p: self._start_consumer(p, consumer))
        return d.addCallback(registered)

    @defer.inlineCallbacks
    def _start_consumer(self, protocol: _AMQPProtocol, consumer: AMQPConsumer) -> Any:
        ch = yield protocol.open_channel()
        try:
            yield _bounded(ch.basic_qos(prefetch_count=consumer.prefetch, global_=False),
                           self.operation_timeout, self.reactor, protocol)
            tag = f"{self._tag_prefix}.{next(self._tags)}"
            state = _ConsumerChannel(protocol, ch.id, consumer, tag)
            state.txchannel = ch
            protocol.fast[ch.id] = state
            yield _bounded(ch.basic_consume(queue=consumer.queue, consumer_tag=tag, no_ack=False),
                           self.operation_timeout, self.reactor, protocol)
        except Exception:
            protocol.fast.pop(ch.id, None)
            if not ch.closed and not protocol.lost:
                protocol.close_channel(ch).addErrback(lambda _: None)
            raise
        consumer._channel = state
        consumer.active = True
        consumer._ch = ch
        return consumer

    @defer.inlineCallbacks
    def _cancel_consumer(self, consumer: AMQPConsumer) -> Any:
        if consumer.cancelled:
            return None
        consumer.cancelled = True
        consumer.active = False
        self._consumers.pop(id(consumer), None)
        state, consumer._channel = consumer._channel, None
        if state is None:
            return None
        state.delivering = False
        protocol = state.protocol
        ch = consumer._ch
        if protocol.lost or ch is None or ch.closed:
            state.open = False
            return None
        try:
            yield _bounded(ch.basic_cancel(consumer_tag=state.tag), self.close_timeout, self.reactor)
        except Exception:
            pass
        # As in RabbitMQ, what the consumer holds may still be acked: the
        # channel closes once all of it is settled (or with the link), and
        # whatever is still unacknowledged then goes back to the queue.
        state.cancelled = True
        if state.unsettled <= 0:
            state.release()
        return None

    def _broker_cancelled(self, state: _ConsumerChannel, tag: str) -> None:
        consumer = state.consumer
        state.delivering = False
        if consumer._channel is state:
            consumer._channel = None
            consumer.active = False
        if not consumer.cancelled:
            self.log.warn("broker cancelled the consumer of queue {queue!r} (queue deleted?); it resumes "
                          "if the queue is declared again", queue=consumer.queue)
        state.release()

    def _resume_consumers_of(self, queue: str) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        for consumer in list(self._consumers.values()):
            if (consumer.queue == queue and consumer._channel is None and not consumer.cancelled
                    and not consumer._resuming):
                consumer._resuming = True
                d = self._start_consumer(protocol, consumer)

                def resumed(c: AMQPConsumer) -> None:
                    c._resuming = False
                    self.log.info("consumer of queue {queue!r} resumed", queue=c.queue)

                def not_resumed(f: Failure, c: AMQPConsumer = consumer) -> None:
                    c._resuming = False
                    self.log.warn("could not resume the consumer of {queue!r}: {reason}", queue=c.queue,
                                  reason=_describe(f))

                d.addCallbacks(resumed, not_resumed)

    def _channel_closed(self, protocol: _AMQPProtocol, channel_id: int, fast: Any, code: int, text: str) -> None:
        """The broker closed a channel (an error on it)."""
        if isinstance(fast, _PublishChannel):
            self.log.warn("broker closed the publishing channel: {code} {text}", code=code, text=text)
            was_current = self._publisher is fast
            if was_current:
                self._publisher = None

            def error(p: _Pending) -> Exception:
                if code == 404 and f"'{p.exchange}'" in text:
                    return Unroutable(f"no exchange {p.exchange!r} ({code} {text})")
                return ConnectionLost(f"publishing channel closed by the broker before the confirm "
                                      f"({code} {text})")

            fast.fail_all(error)
            if was_current and protocol is self._protocol and not protocol.lost:
                self._reopen_publisher(protocol)
        elif isinstance(fast, _ConsumerChannel):
            fast.open = False
            fast.delivering = False
            consumer = fast.consumer
            was_active = consumer._channel is fast
            if was_active:
                consumer._channel = None
                consumer.active = False
            if was_active and not consumer.cancelled:
                self.log.warn("broker closed the channel of the consumer of {queue!r}: {code} {text}; "
                              "resuming it", queue=consumer.queue, code=code, text=text)
                if protocol is self._protocol and not protocol.lost:
                    self.reactor.callLater(0.1, self._resume_consumers_of, consumer.queue)
        elif self._control is not None and self._control.id == channel_id:
            self._control = None

    @defer.inlineCallbacks
    def _reopen_publisher(self, protocol: _AMQPProtocol) -> Any:
        try:
            ch = yield protocol.open_channel()
            yield ch.confirm_select(nowait=False)
        except Exception as e:
            self.log.warn("could not reopen the publishing channel ({reason}); dropping the link", reason=e)
            if not protocol.lost:
                protocol.transport.abortConnection()
            return
        if protocol is self._protocol and not protocol.lost:
            publisher = _PublishChannel(protocol, ch.id, ch)
            protocol.fast[ch.id] = publisher
            self._publisher = publisher

    # -- refused publishes (basic.nack)

    def _nacked(self, channel: _PublishChannel, nacked: List[_Pending]) -> None:
        """The broker refused these messages on C{channel}: publish them again on a fresh channel.

        Called from the publishing channel's fast path. The channel that
        refused them is replaced (if it still is the publishing channel) and
        closed once its other publishes are settled; each message is sent
        again after a backoff, at most L{nack_retries} times and within
        C{operation_timeout} of its first refusal. A publish the sender has
        given up on (its Deferred cancelled) is not sent again.
        """
        self.nacked += len(nacked)
        if channel is self._publisher and not channel.replacing and not channel.retired:
            self._replace_publisher(channel)
        now = self.reactor.seconds()
        for p in nacked:
            if p.deferred.called:
                continue
            p.nacks += 1
            if p.nacks == 1:
                p.deadline = now + self.operation_timeout
            if p.nacks > self.nack_retries or now >= p.deadline:
                self._refused(p)
                continue
            self.reactor.callLater(min(1.0, 0.05 * 2 ** (p.nacks - 1)), self._republish, p, channel)

    @staticmethod
    def _refused(p: _Pending) -> None:
        p.deferred.errback(NotConfirmed(
            f"the broker refused the message to exchange {p.exchange!r} with routing key "
            f"{p.routing_key!r} (basic.nack, {p.nacks} times)"))

    def _republish(self, p: _Pending, refused_on: _PublishChannel) -> None:
        if p.deferred.called:
            return
        if self._stopping or not self._running:
            p.deferred.errback(NotConnected(
                f"publish to exchange {p.exchange!r}: refused (basic.nack), and the transport was stopped "
                f"before it could be published again"))
            return
        publisher = self._publisher
        if (self.connected and publisher is not None and publisher.open and publisher is not refused_on
                and not publisher.retired):
            try:
                publisher.send(p)
            except Exception as e:  # it was encoded once already; cannot happen, but never hang
                p.deferred.errback(e)
            return
        if self.reactor.seconds() >= p.deadline:
            if self.connected:
                self._refused(p)
            else:
                p.deferred.errback(NotConnected(
                    f"publish to exchange {p.exchange!r}: refused (basic.nack), then no broker link "
                    f"to publish it again within {self.operation_timeout:.1f} s"))
            return
        # the fresh channel is being opened (or the link is down): wait for it
        self.reactor.callLater(0.05, self._republish, p, refused_on)

    @defer.inlineCallbacks
    def _replace_publisher(self, old: _PublishChannel) -> Any:
        """Open a fresh publishing channel; C{old} is closed once its last publish is settled."""
        old.replacing = True
        protocol = old.protocol
        try:
            ch = yield protocol.open_channel()
            yield _bounded(ch.confirm_select(nowait=False), self.operation_timeout, self.reactor, protocol)
        except Exception as e:
            old.replacing = False
            if not protocol.lost:
                self.log.warn("could not open a fresh publishing channel ({reason}); dropping the link",
                              reason=e)
                protocol.transport.abortConnection()
            return
        if protocol is not self._protocol or protocol.lost or self._publisher is not old:
            # the link went, or the channel was replaced otherwise meanwhile
            if not protocol.lost:
                protocol.close_channel(ch).addErrback(lambda _: None)
            return
        publisher = _PublishChannel(protocol, ch.id, ch)
        protocol.fast[ch.id] = publisher
        self._publisher = publisher
        self.publishers_replaced += 1
        self.log.info("the broker refused (basic.nack) a message on publishing channel {old}; "
                      "publishing on a fresh channel {new} from now on", old=old.id, new=ch.id)
        old.retire()

    # -- replay

    @defer.inlineCallbacks
    def _replay(self, protocol: _AMQPProtocol) -> Any:
        """Declare the remembered topology again, then resume every consumer."""
        for entry in list(self._topology.values()):
            if entry[0] == "queue":
                step = functools.partial(self._declare_queue_on, protocol, entry[1], entry[2])
            elif entry[0] == "exchange":
                step = functools.partial(self._declare_exchange_on, protocol, entry[1], entry[2], entry[3])
            else:
                step = functools.partial(self._bind_on, protocol, entry[1], entry[2], entry[3])
            yield self._replay_step(protocol, step, f"{entry[0]} {entry[1]!r}")
        for consumer in list(self._consumers.values()):
            if consumer.cancelled:
                continue
            yield self._replay_step(protocol, functools.partial(self._start_consumer, protocol, consumer),
                                    f"consumer of {consumer.queue!r}")

    @defer.inlineCallbacks
    def _replay_step(self, protocol: _AMQPProtocol, step: Callable[[], Deferred], what: str) -> Any:
        """One replay step; a refusal is logged (the link stays), 405 RESOURCE_LOCKED is retried.

        After an abrupt loss the broker may not yet have noticed that the old
        connection is gone, and still hold its exclusive queues for a moment.
        """
        deadline = self.reactor.seconds() + min(self.operation_timeout, 10.0)
        while True:
            try:
                yield step()
                return
            except Closed as e:
                if protocol.lost:
                    raise
                error = _channel_error(e)
            locked = isinstance(error, ChannelError) and error.reply_code == 405
            if locked and self.reactor.seconds() < deadline:
                yield _sleep(self.reactor, 0.2)
                continue
            self.log.error("after reconnecting, the broker refused the {what}: {reason}", what=what,
                           reason=error)
            return


def from_url(url: Union[str, Sequence[str]], reactor: Any, **options: Any) -> AMQPTransport:
    """An L{AMQPTransport} (not started) for one broker URL or a list of them."""
    return AMQPTransport(url, reactor=reactor, **options)


# ---------------------------------------------------------------------------
# helpers


class _NoCall:
    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass


def _tls_creator(url: BrokerURL) -> Any:
    """The client connection creator of an C{amqps://} URL: the broker's
    certificate verified against the URL's CA file (else the system's trust
    store) and its name against the URL's host (or C{server_name_indication});
    a client certificate if the URL names one. L{BadURL} if a file is unusable."""
    try:
        from twisted.internet import ssl
    except ImportError as e:  # pragma: no cover - pyOpenSSL missing
        raise BadURL(f"amqps:// needs pyOpenSSL and service_identity (pip install 'twisted[tls]'): {e}") from None
    trust = None
    if url.cafile:
        blocks = _pem_blocks(url.cafile, "cacertfile", "CERTIFICATE")
        try:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in blocks])
        except Exception as e:
            raise BadURL(f"cacertfile {url.cafile}: not a usable CA certificate ({e})") from None
    extra: Dict[str, Any] = {}
    if url.certfile:
        extra = _client_certificate(url)
    try:
        return ssl.optionsForClientTLS(url.tls_name, trustRoot=trust, extraCertificateOptions=extra)
    except Exception as e:
        raise BadURL(f"TLS options for {url.masked()}: {e}") from None


def _client_certificate(url: BrokerURL) -> Dict[str, Any]:
    """The client certificate (and the rest of its chain) and key of the URL's
    C{certfile} / C{keyfile} (the key may be in C{certfile}), as options of
    Twisted's C{CertificateOptions}; L{BadURL} if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    assert url.certfile is not None
    key_option, key_path = ("keyfile", url.keyfile) if url.keyfile else ("certfile", url.certfile)
    try:
        chain = x509.load_pem_x509_certificates(b"\n".join(_pem_blocks(url.certfile, "certfile", "CERTIFICATE")))
    except ValueError as e:
        raise BadURL(f"certfile {url.certfile}: not a usable certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(_pem_blocks(key_path, key_option, "PRIVATE KEY")[0], password=None)
    except (ValueError, TypeError) as e:
        raise BadURL(f"{key_option} {key_path}: not a usable private key (an unencrypted PEM key is needed: "
                     f"{e})") from None

    def public(k: Any) -> bytes:
        return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    if public(chain[0].public_key()) != public(key.public_key()):
        raise BadURL(f"{key_option} {key_path}: the key does not belong to the certificate in {url.certfile}")
    options: Dict[str, Any] = {"certificate": chain[0], "privateKey": key}
    if len(chain) > 1:
        options["extraCertChain"] = chain[1:]
    try:
        from OpenSSL import __version__ as pyopenssl_version
        if tuple(int(p) for p in pyopenssl_version.split(".")[:2]) < (24, 3):  # pragma: no cover
            # older pyOpenSSL takes only its own wrappers
            from OpenSSL import crypto
            options = {"certificate": crypto.X509.from_cryptography(chain[0]),
                       "privateKey": crypto.PKey.from_cryptography_key(key),
                       **({"extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]]}
                          if len(chain) > 1 else {})}
    except ValueError:  # pragma: no cover - an unusual version string
        pass
    return options


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)


def _pem_blocks(path: str, option: str, kind: str) -> List[bytes]:
    """The PEM blocks of C{kind} (C{CERTIFICATE}; C{PRIVATE KEY} also matches
    C{EC PRIVATE KEY}, C{RSA PRIVATE KEY}) in the file; L{BadURL} if none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadURL(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)
              if m.group(1) == kind.encode() or (kind == "PRIVATE KEY" and m.group(1).endswith(b"PRIVATE KEY"))]
    if not blocks:
        raise BadURL(f"{option} {path}: no PEM {kind} in it")
    return blocks


#: OpenSSL's reasons that mean the other end does not speak TLS at all
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure", "http request",
            "unknown protocol", "record too long")

#: the broker's alerts about the client's certificate
_CLIENT_CERT_REFUSED = ("alert unknown ca", "alert bad certificate", "alert certificate unknown",
                        "alert certificate expired", "alert unsupported certificate", "alert certificate revoked")


def _tls_failure(reason: Failure, url: BrokerURL, handshake_done: bool, trust: Tuple[str, Optional[str]],
                 transport: Any) -> Optional[str]:
    """Why a TLS link was lost, in words for the log and L{NotConnected}, or
    None when the loss had nothing to do with TLS (then AMQP says why)."""
    value = reason.value
    where = f"{url.host}:{url.port}"
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, VerificationError):
        names = _peer_names(transport)
        return (f"TLS verification failed: the broker's certificate{names} does not name "
                f"{url.tls_name!r} (hostname mismatch at {where}; server_name_indication= names the "
                f"host the certificate is for, if it is not the URL's)")
    if isinstance(value, SSL.Error):
        reasons = _openssl_reasons(value)
        text = "; ".join(reasons) or str(value) or "TLS error"
        if any("certificate verify failed" in r for r in reasons):
            what, cas = trust
            detail = _diagnose_chain(transport, cas) if cas is not None else ""
            unknown_ca = not detail or "issuer" in detail or "self-signed" in detail or "self signed" in detail
            hint = ("; give the CA that signed it with cacertfile=PATH in the amqps:// URL"
                    if cas == "" and unknown_ca else "")
            return (f"TLS verification failed: the broker's certificate at {where} is not trusted "
                    f"({detail or text}), checked against {what}{hint}")
        if any(n in r for r in reasons for n in _NOT_TLS):
            return (f"TLS handshake failed at {where} ({text}): the port does not speak TLS; amqps:// needs the "
                    f"broker's TLS listener (5671 by default), amqp:// its plain one")
        if any("alert certificate required" in r for r in reasons):
            return (f"TLS refused by the broker at {where} ({text}): it requires a client certificate "
                    f"(certfile= and keyfile= in the amqps:// URL)")
        if any(n in r for r in reasons for n in _CLIENT_CERT_REFUSED):
            return (f"TLS refused by the broker at {where} ({text}): it does not accept the client "
                    f"certificate{' ' + url.certfile if url.certfile else ''}")
        if handshake_done:
            return f"TLS error on the link to {where}: {text}"
        return f"TLS handshake failed at {where}: {text}"
    if not handshake_done:
        why = "the broker closed the connection" if isinstance(value, ConnectionDone) else _describe(reason)
        return f"TLS handshake failed at {where}: {why} before the handshake finished"
    return None


def _openssl_reasons(error: Exception) -> List[str]:
    out = []
    for entry in (error.args[0] if error.args and isinstance(error.args[0], list) else []):
        if isinstance(entry, tuple) and entry:
            out.append(str(entry[-1]))
        else:
            out.append(str(entry))
    return [r for r in out if r]


def _peer_names(transport: Any) -> str:
    """C{" (for DNS:a, IP:b)"}: the names in the broker's certificate, if it can be had."""
    try:
        from cryptography import x509
        # the chain, not get_peer_certificate(): a certificate refused during
        # the handshake never becomes the session's peer certificate
        chain = transport.getHandle().get_peer_cert_chain(as_cryptography=True)
        if not chain:
            return ""
        cert = chain[0]
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            names += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = [cert.subject.rfc4514_string()]
        return f" (for {', '.join(names)})"
    except Exception:
        return ""


def _diagnose_chain(transport: Any, cafile: str) -> str:
    """Check the broker's certificate chain again, after the handshake
    refused it, against C{cafile} (or the system's CAs if empty), for
    OpenSSL's own reason (unable to get local issuer certificate, certificate
    has expired, ...) and the certificate's names; empty if that cannot be had."""
    try:
        from OpenSSL import crypto
        chain = transport.getHandle().get_peer_cert_chain()
        if not chain:
            return ""
        leaf, rest = chain[0], chain[1:]
        store = crypto.X509Store()
        if cafile:
            store.load_locations(cafile)
        else:
            paths = _stdlib_ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        leaf_c = leaf.to_cryptography()
        names = f"{leaf_c.subject.rfc4514_string()}, issued by {leaf_c.issuer.rfc4514_string()}"
        try:
            crypto.X509StoreContext(store, leaf, chain=rest).verify_certificate()
        except crypto.X509StoreContextError as e:
            return f"{names}: {e}"
        return names
    except Exception:
        return ""


def _describe(failure: Any) -> str:
    value = failure.value if isinstance(failure, Failure) else failure
    text = str(value) or type(value).__name__
    return text


def _channel_error(e: Closed) -> MagnetError:
    reason = e.args[0] if e.args else None
    fields = getattr(reason, "fields", None)
    if fields and len(fields) >= 2:
        return ChannelError(int(fields[0]), str(fields[1]))
    return ConnectionLost(f"channel closed: {reason}")


def _bounded(d: Deferred, seconds: float, clock: Any, protocol: Optional[_AMQPProtocol] = None) -> Deferred:
    """C{d}, failing with L{Timeout} after C{seconds}.

    Request/response methods cannot be cancelled without confusing the
    channel's response order, so when a C{protocol} is given a timeout drops
    the whole link instead (the broker is not answering).
    """
    result = Deferred()
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        if protocol is not None and not protocol.lost and protocol.transport is not None:
            protocol.log.warn("broker {url} did not answer in {seconds} s; dropping the link",
                              url=protocol.url, seconds=seconds)
            protocol.transport.abortConnection()
        if not result.called:
            result.errback(Timeout(f"no answer from the broker within {seconds:.1f} s"))

    call = clock.callLater(seconds, expire)

    def done(value: Any) -> Any:
        if call.active():
            call.cancel()
        if not result.called:
            result.callback(value) if not isinstance(value, Failure) else result.errback(value)
        return None

    d.addBoth(done)
    return result


def _sleep(clock: Any, seconds: float) -> Deferred:
    d = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
