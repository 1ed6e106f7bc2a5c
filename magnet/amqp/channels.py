"""Channel state: what one consumer's channel and the publishing channel know.

The hot paths of the transport run here, called by the frame reader
(L{magnet.amqp.protocol._AMQPProtocol.dataReceived}) without a Deferred per
frame:

  - L{_ConsumerChannel}: C{basic.deliver} + content header + body frames
    assembled into an L{AMQPDelivery} and handed to the consumer's
    C{on_delivery} synchronously; the broker's C{basic.cancel};
  - L{_PublishChannel}: C{basic.publish} written straight to the TCP
    transport, the broker's C{basic.ack} / C{basic.nack} / C{basic.return}
    settling each publish's Deferred (publisher confirms).

What to do when the broker refuses, cancels or closes something is the
transport's (L{magnet.amqp.transport}): these classes report it through
C{protocol.owner}.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from magnet.amqp.wire import (
    _PUBLISH_PREFIX,
    _S_H,
    _S_Q,
    _content_frames,
    _method_frame,
    _read_shortstr,
    _shortstr_cached,
    _within,
    decode_properties,
    publish_seq,
)
from magnet.errors import Timeout, Unroutable
from magnet.message import Message
from magnet.transport import OnDelivery

if TYPE_CHECKING:  # pragma: no cover
    from magnet.amqp.protocol import _AMQPProtocol


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
            channel.ack(self._tag)

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

    def __init__(self, transport: Any, queue: str, on_delivery: OnDelivery, prefetch: int,
                 no_ack: bool = False) -> None:
        self.queue = queue
        self.on_delivery = on_delivery
        #: basic.consume with no-ack: the broker takes a message as settled once sent
        self.no_ack = no_ack
        self.prefetch = 0 if no_ack else prefetch
        self.cancelled = False
        #: True while the broker is delivering to it (False while the link is
        #: down, or after the broker cancelled it because its queue was deleted).
        self.active = False
        self._transport = transport
        self._channel: Optional[_ConsumerChannel] = None
        self._ch: Any = None  # the txAMQP channel under it
        self._resuming = False
        #: why it lost its channel (a reason of L{magnet.amqp.liveness}), until it consumes again
        self._lost: Optional[str] = None

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
        #: delivery tags acked during the protocol's read in progress, written at its end (L{flush_acks})
        self._acks: List[int] = []

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

    def ack(self, tag: int) -> None:
        """Ack delivery C{tag}: at once, or at the end of the read in progress (see L{flush_acks})."""
        protocol = self.protocol
        if protocol._reading:
            if not self._acks:
                protocol._ackers.append(self)
            self._acks.append(tag)
        else:
            protocol.write_ack(self.id, tag)
        self.settled()

    def flush_acks(self) -> None:
        """Write the acks kept during a read: one C{basic.ack} with C{multiple} if that is exact.

        A handler that finishes synchronously acks its message while the
        frames of a read are still being handled, so a read that brought
        several deliveries acks them all before it ends. Their acks go out
        together at its end, where they would have left anyway (the
        transport writes on the reactor's next turn). When no delivery of the
        channel is left unsettled, every delivery up to the highest tag kept
        is settled: acked now, or nacked already (a nack is written at once),
        and an ack with C{multiple} of that tag acks exactly the kept ones
        (RabbitMQ acks the outstanding deliveries up to the tag). Otherwise
        (a handler still holds one) each is acked on its own.
        """
        tags, self._acks = self._acks, []
        if not tags or not self.open:
            return  # the channel is gone: the broker gives what it held back to the queue
        protocol = self.protocol
        if len(tags) == 1:
            protocol.write_ack(self.id, tags[0])
        elif self.unsettled == 0:
            protocol.write_ack(self.id, max(tags), multiple=True)
        else:
            for tag in tags:
                protocol.write_ack(self.id, tag)

    def settled(self) -> None:
        self.unsettled -= 1
        if self.cancelled and self.unsettled <= 0:
            self.release()

    def release(self) -> None:
        """Close the channel (whatever is still unacknowledged goes back to the queue)."""
        if not self.open:
            return
        self.flush_acks()
        self.open = False
        self.delivering = False
        if self.txchannel is not None and not self.protocol.lost:
            self.protocol.close_channel(self.txchannel).addErrback(lambda _: None)

    def _deliver(self, buf: bytes, pos: int, body: bytes, end: Optional[int] = None) -> None:
        """A whole message: its content header's properties at C{pos} of C{buf},
        ending by C{end} (the header frame's end; default the end of C{buf})."""
        consumer = self.consumer
        if not self.delivering:
            # arrived after basic.cancel was sent: straight back to the queue (no-ack: it is gone)
            if self.open and not consumer.no_ack:
                self.protocol.write_nack(self.id, self._delivery_tag, True)
            return
        self.protocol._delivered = True  # this read's acks go out at its end (see _AMQPProtocol._hold_acks)
        message, _ = decode_properties(buf, pos, body, end=end)
        delivery = AMQPDelivery(message, consumer.queue, self._redelivered, self._exchange,
                                self._routing_key, self, self._delivery_tag)
        if consumer.no_ack:
            delivery._settled = True  # the broker settled it as it sent it: ack() and nack() do nothing
        else:
            self.unsettled += 1
        try:
            consumer.on_delivery(delivery)
        except Exception:
            self.log.failure("consumer of {queue} raised on a delivery; nacking it (requeue)",
                             queue=consumer.queue)
            delivery.nack(requeue=True)


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
        d = Deferred(self._given_up)
        self.send(_Pending(d, exchange, routing_key, message, mandatory))
        return d

    def _given_up(self, d: Deferred) -> None:
        """The caller stopped waiting for the confirm (the bus's send timeout cancels it).

        While the broker blocks publishers (C{connection.blocked}) that is
        why no confirm came: the failure says so (a L{Timeout}: the broker
        may still take the message when the block lifts). Otherwise the
        caller gets the plain C{CancelledError}, and a late confirm is ignored.
        """
        reason = self.protocol.blocked
        if reason is not None:
            d.errback(Timeout(f"no confirm from the broker: it blocks publishers ({reason}; connection.blocked); "
                              f"it may still take the message when the block lifts"))
            return
        # No confirm in the sender's time on a link that is up and not blocked:
        # the channel may never confirm again (RabbitMQ 3.10: a channel whose
        # publishes to a quorum queue went to a leader that was cut off waits
        # for it for ever), so the transport publishes on a fresh channel.
        if not self.protocol.going:
            self.protocol.owner._confirm_given_up(self, d)

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
        self._return_seq = publish_seq(buf, start + 12, end)
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
            if p.deferred.called:  # its sender gave up on it
                continue
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
        if self.retired and self.open and not self.waiting():
            self.release()

    def retire(self) -> None:
        """A fresh channel publishes from now on: close this one once nothing waits for a confirm."""
        self.retired = True
        if not self.waiting():
            self.release()

    def waiting(self, given_up: Optional[Deferred] = None) -> bool:
        """Whether a sender still waits for a confirm on this channel (besides C{given_up}'s)."""
        return any(not p.deferred.called and p.deferred is not given_up for p in self.pending.values())

    def release(self) -> None:
        self.open = False
        if self.txchannel is not None and not self.protocol.lost:
            self.protocol.close_channel(self.txchannel).addErrback(lambda _: None)

    def fail_all(self, make_error: Callable[[_Pending], Exception]) -> None:
        self.open = False
        pending, self.pending = self.pending, OrderedDict()
        for p in pending.values():
            if not p.deferred.called:
                p.deferred.errback(make_error(p))
