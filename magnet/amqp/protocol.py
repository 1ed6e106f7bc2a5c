"""The AMQP protocol: frames in and out, on top of txAMQP's client.

txAMQP supplies the protocol definition (the spec file shipped with magnet as
package data, with the RabbitMQ extensions magnet uses), the frame classes and
the request/response machinery used for the synchronous methods (declare,
bind, qos, consume, cancel, close). L{_AMQPProtocol} keeps those, and adds:

  - a frame reader of its own (L{_AMQPProtocol.dataReceived}) that hands the
    frames of the consumers' and the publishing channel's hot paths to their
    channel state (L{magnet.amqp.channels}) without a Deferred per frame, and
    everything else to txAMQP; a frame larger than the agreed C{frame_max} or
    one that ends badly drops the connection at once;
  - writers for the fast paths (publish frames, acks, nacks), and one write
    per link for a read: what the frames of one C{dataReceived} cause any
    link to send (acks, publishes, answers) goes to its socket in one write
    at the end of the read (L{_Reads}, L{_write_now}), the consumers' acks of
    it as one C{basic.ack} with C{multiple} per channel where that acks
    exactly the same deliveries
    (L{magnet.amqp.channels._ConsumerChannel.flush_acks});
  - heartbeats of its own: sent when idle, and a broker silent for two
    intervals is taken for dead;
  - over TLS, a bound on the handshake and the words for why TLS refused
    the link (L{magnet.amqp.tls}).

It reports what the broker does to the link and its channels to its C{owner},
the transport (L{magnet.amqp.transport.AMQPTransport}).
"""
from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet import tcp
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, ConnectionClosed, TwistedDelegate
from txamqp.connection import Body, Frame, Header, Method
from txamqp.protocol import AMQClient
from zope.interface import implementer

from magnet.amqp.tls import tls_failure
from magnet.amqp.wire import (_ACK, _FRAME_END, _FRAME_HEAD, _HEARTBEAT_FRAME, _S_HH, BrokerURL, _Codec, _method_frame,
                              _read_shortstr, _within)
from magnet.errors import ConnectionLost, MagnetError, Timeout

#: What magnet tells the broker about itself in connection.start-ok.
CLIENT_PROPERTIES: Dict[str, Any] = {
    "product": "magnet",
    "information": "ooidx messaging layer (txAMQP)",
    "capabilities": {
        "publisher_confirms": True,
        "consumer_cancel_notify": True,
        "basic.nack": True,
        # the broker says when a resource alarm blocks publishers (and when
        # it lifts); publishes then wait instead of stalling the connection
        "connection.blocked": True,
        # a refused login is then reported with connection.close (403)
        # instead of a bare TCP close, so the log can say why
        "authentication_failure_close": True,
    },
}


DEFAULT_FRAME_MAX = 131072

#: at most this many seconds an ack made in a read that delivered nothing waits
#: for the link's next write to go out with it (see L{_AMQPProtocol._hold_acks})
ACK_HOLD = 0.005


class ChannelError(MagnetError):
    """The broker refused an operation and closed the channel (e.g. 404, 406)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text



def _write_now(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, but onto the socket at once when nothing waits before it.

    Twisted's transport keeps what is written until the reactor's next turn
    finds the socket writable: two C{epoll_ctl} calls and a turn of the
    reactor per write, and on the RPC path a turn of latency per hop. On a
    plain TCP connection (no TLS) whose own buffer is empty, the bytes go to
    the socket here; what it does not take (a full socket buffer), or any
    error, is left to C{transport.write}, which then writes, waits or drops
    the connection exactly as it would have (the order of the bytes is kept:
    nothing was queued before them).
    """
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.dataBuffer and not transport._tempDataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, interrupted, reset: Twisted's own write sorts it out
            sent = 0
        if sent >= len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


class _Reads:
    """The reads of broker frames in progress, for all links of the process (one reactor thread).

    While a link's C{dataReceived} runs, what any link writes (an ack, a
    publish a handler makes on another bus, an answer) waits in that link's
    C{_wbuf}; when the outermost read ends, each link with something waiting
    writes it at once (L{_write_now}), one write per link. Outside a read,
    writes go to C{transport.write} as they come (a loop of publishes from
    a timer is still one write on the reactor's next turn).
    """

    depth = 0
    waiting: List["_AMQPProtocol"] = []

    @classmethod
    def flush(cls) -> None:
        waiting = cls.waiting
        while waiting:
            waiting.pop(0)._flush_wbuf()


class _Delegate(TwistedDelegate):
    """txAMQP's delegate, for the methods that are not on the fast path."""

    log = Logger()

    def __init__(self, protocol_owner: Any) -> None:
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

    #: seconds from the broker's connection.close to dropping a socket that did not close by itself
    CLOSE_GRACE = 1.0

    def connection_close(self, ch: Any, msg: Any) -> None:
        self.client.close_reason = f"{msg.reply_code} {msg.reply_text}"
        # a refused login (403) is reported by the link, once, with what to do
        emit = self.log.info if msg.reply_code == 403 else self.log.warn
        emit("broker {url} closed the connection: {code} {text}", url=self.client.url,
             code=msg.reply_code, text=msg.reply_text)
        TwistedDelegate.connection_close(self, ch, msg)  # close-ok, then loseConnection
        # loseConnection waits until what is buffered is written, and a broker
        # that closed the connection may stop reading it (RabbitMQ after
        # `rabbitmqctl close_connection` under load: it waits 30 s for a
        # close-ok stuck behind our publishes, heartbeating meanwhile). The
        # link would look alive, every consumer idle, for that long: the
        # socket is aborted if it is not gone within CLOSE_GRACE.
        client = self.client
        client.clock.callLater(self.CLOSE_GRACE, client.abort_if_open)

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

    def __init__(self, owner: Any, url: BrokerURL, spec: Any, clock: Any, heartbeat: float) -> None:
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
        #: True while its dataReceived runs (its acks wait for the end of the read)
        self._reading = False
        #: written while a read is in progress, written at its end (L{_Reads})
        self._wbuf: List[bytes] = []
        #: consumer channels with acks waiting for the end of the read, or held after it (L{_hold_acks})
        self._ackers: List[Any] = []
        #: True once the read in progress has handed a consumer a delivery
        self._delivered = False
        #: flushes held acks at the latest L{ACK_HOLD} seconds after they were kept
        self._ack_timer: Any = None
        self._heartbeat_call: Optional[LoopingCall] = None
        self._sent = False
        self._received = False
        self._silent_ticks = 0
        self._heartbeat = 0
        #: the broker's reason while it blocks publishers (connection.blocked), else None
        self.blocked: Optional[str] = None
        #: over TLS: True once the TLS handshake is done (the broker's certificate verified)
        self.tls_done = False
        #: over TLS: why the link was lost, if TLS had to do with it
        self.tls_error: Optional[str] = None
        self._tls_timer: Any = None

    @property
    def going(self) -> bool:
        """The link is gone or on its way: the socket is lost, the client closed
        it, or the broker sent connection.close (a node that stops or pauses:
        320 CONNECTION_FORCED). txAMQP fails every waiting method with Closed
        before it marks the connection closed, so C{closed} alone is still
        false for whoever that Closed reaches; C{close_reason} is set first."""
        return self.lost or self.closed or self.close_reason is not None

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

    def _write(self, data: bytes) -> None:
        """Write C{data}, or keep it for the end of the read in progress (see L{_Reads})."""
        self._sent = True
        if _Reads.depth:
            if not self._wbuf:
                _Reads.waiting.append(self)
            self._wbuf.append(data)
        else:
            self.transport.write(data)

    def _flush_wbuf(self) -> None:
        if self._ackers and self._wbuf:
            # held acks (L{_hold_acks}) ride in the same write
            _Reads.depth += 1
            try:
                self._flush_acks()
            finally:
                _Reads.depth -= 1
        wbuf, self._wbuf = self._wbuf, []
        if wbuf and self.transport is not None:
            _write_now(self.transport, wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))

    def send_frame(self, frame: Frame) -> None:
        if self.transport is None:
            return
        if self._ackers:
            # acks go before any other method (a channel.close, a basic.cancel, connection.close)
            self._flush_acks()
        self._write(self._pack_frame(frame))

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
        if _Reads.depth:
            self._sent = True
            if not self._wbuf:
                _Reads.waiting.append(self)
            self._wbuf.extend(frames)
        else:
            if self._ackers and not self._reading:
                self._flush_acks()  # held acks go first, in the same write on the reactor's next turn
            self._write(b"".join(frames))

    def write_ack(self, channel: int, tag: int, multiple: bool = False) -> None:
        self._write(_ACK.pack(1, channel, 13, 60, 80, tag, 1 if multiple else 0, _FRAME_END))

    def write_nack(self, channel: int, tag: int, requeue: bool) -> None:
        self._write(_ACK.pack(1, channel, 13, 60, 120, tag, 2 if requeue else 0, _FRAME_END))

    def _flush_acks(self) -> None:
        ackers, self._ackers = self._ackers, []
        for channel in ackers:
            channel.flush_acks()

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        if self._reading:  # cannot happen (a frame's handler does not read); never lose data
            self._read(data)
            return
        self._reading = True
        self._delivered = False
        _Reads.depth += 1
        try:
            self._read(data)
            if self._ackers and not self._hold_acks():
                self._flush_acks()
        finally:
            self._reading = False
            _Reads.depth -= 1
            if not _Reads.depth:
                _Reads.flush()

    def _hold_acks(self) -> bool:
        """Keep the acks of this read for the link's next write instead of a write of their own?

        A read that brought no delivery, only, say, the confirms of an RPC
        server's replies, acks requests whose handling ended in it (their
        replies confirmed). Written at once, those acks would be a write
        (a send to the broker, and a read there) of their own; kept, they
        go out with the link's next write (the next reply, L{_flush_wbuf}
        and L{write_frames}), before any other method (L{send_frame}), or
        at the latest L{ACK_HOLD} seconds later (L{_release_held_acks}).
        Never later than that, and never earlier than now: an ack still
        follows whatever its handler waited for. Held only while the
        channel is idle: one ack, nothing else of the channel unsettled,
        a prefetch other than 1, so that a held ack takes at most one
        place of the consumer's window while the consumer has nothing to
        do (with more in flight, each held ack would keep the broker from
        delivering one more request until the next write: 10 calls in
        flight ran 27% slower holding them all). Not held either: acks of
        a read that delivered something (a worker queue's consumer acks as
        it goes) and acks with something else to write anyway.
        """
        if self._delivered or self._wbuf or self.transport is None:
            return False
        for channel in self._ackers:
            if channel.unsettled or len(channel._acks) > 1 or channel.consumer.prefetch == 1:
                return False
        if self._ack_timer is None:
            self._ack_timer = self.clock.callLater(ACK_HOLD, self._release_held_acks)
        return True

    def _release_held_acks(self) -> None:
        self._ack_timer = None
        if self._ackers and not self.lost and self.transport is not None:
            self._flush_acks()

    def _read(self, data: bytes) -> None:
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
            self._wbuf, self._ackers = [], []  # nothing more goes out on this link
            self.transport.abortConnection()
            return
        self._rbuf = buf[pos:] if pos < n else b""

    def _frame(self, ftype: int, channel: int, buf: bytes, start: int, end: int) -> None:
        fast = self.fast.get(channel)
        if ftype == 1:
            class_id, method_id = _S_HH.unpack_from(buf, start)
            if fast is not None and class_id == 60 and fast.method(method_id, buf, start + 4, end):
                return
            if channel == 0 and class_id == 10 and method_id in (60, 61):
                self._blocking(method_id, buf, start + 4, end)
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

    def _blocking(self, method_id: int, buf: bytes, pos: int, end: int) -> None:
        """RabbitMQ's connection.blocked (60, with the alarm as its reason) and connection.unblocked (61).

        Read here rather than through txAMQP: they are RabbitMQ extensions
        the spec file does not define, sent because magnet advertises the
        C{connection.blocked} capability.
        """
        if method_id == 60:
            reason, pos = _read_shortstr(buf, pos)
            _within(pos, end, "connection.blocked")
            self.blocked = reason or "no reason given"
            self.owner._connection_blocked(self, self.blocked)
        else:
            _within(pos, end, "connection.unblocked")
            self.blocked = None
            self.owner._connection_unblocked(self)

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
        """A fresh channel, opened; L{Closed} if the link is down or goes meanwhile.

        The broker's connection.close closes the channels that exist then,
        one after the other, and each closed channel fails its waiters at
        once; one of them may be a declaration that, failing, lets the next
        (the transport's declarations go one at a time) ask for a channel
        while the closing is still going on (txAMQP marks the connection
        closed only at its end). A channel made then is never closed: its
        channel.open waits for ever, and whoever waits on it. So no channel
        is made once the broker has said it closes (C{close_reason}), and
        the link is looked at again once the channel object is had (that
        waits for txAMQP's channel lock)."""
        if self.lost or self.closed or self.close_reason is not None:
            raise ConnectionClosed("the link is down")
        channel_id = self.allocate_channel()
        ch = yield self.channel(channel_id)
        if self.lost or self.closed or self.close_reason is not None:
            ch.close(None)
            if self.channels.get(channel_id) is ch:
                del self.channels[channel_id]
            raise ConnectionClosed("the link went down while a channel was being opened")
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
            self._write(_HEARTBEAT_FRAME)
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

    def abort_if_open(self) -> None:
        """Drop the socket unless it is gone already (see L{_Delegate.connection_close})."""
        if not self.lost and self.transport is not None:
            self.log.warn("broker {url} closed the connection but the socket is still open; dropping it",
                          url=self.url)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = True
        self._ackers = []  # held acks die with the link: the broker gives their messages back
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None
        if self.url.tls and self.close_reason is None:
            self.tls_error = tls_failure(reason, self.url, self.tls_done,
                                         self.owner._tls_trust_description(self.url), self.transport)
            self.close_reason = self.tls_error
        if self._heartbeat_call is not None and self._heartbeat_call.running:
            self._heartbeat_call.stop()
        try:
            # Every channel's waiters fail now: txAMQP closes the channels once,
            # when the connection closes (the broker's connection.close, or
            # here), so a channel made after the broker's close (its maker
            # waited for txAMQP's channel lock) is never closed, and whoever
            # waits on it waits for ever, least of all a declaration holding
            # the transport's declarations lock, which the next link needs to
            # replay the topology (see L{open_channel}).
            self._close_channels(reason)
            self.owner._connection_lost(self, reason)
        finally:
            AMQClient.connectionLost(self, reason)

    def _close_channels(self, reason: Any) -> None:
        for ch in list(self.channels.values()):
            try:
                ch.close(reason)
            except Exception:  # noqa: BLE001 - closing what is already gone: nothing to report
                pass


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], _AMQPProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> _AMQPProtocol:
        return self._build()


# ---------------------------------------------------------------------------
# answers, errors


def answer_within(d: Deferred, seconds: float, clock: Any, protocol: Optional[_AMQPProtocol] = None) -> Deferred:
    """C{d}'s result, or L{Timeout} after C{seconds} (L{Deferred.addTimeout}).

    A request/response method cannot be cancelled without confusing its
    channel's response order (txAMQP would hand the late answer to the next
    request on the channel), so the timeout cancels a follower of C{d}, never
    C{d} itself: a late answer is dropped. With a C{protocol}, a timeout also
    drops the whole link (the broker is not answering).
    """
    follower: Deferred = Deferred()
    d.chainDeferred(follower)

    def timed_out(result: Failure, timeout: float) -> Failure:
        if protocol is not None and not protocol.lost and protocol.transport is not None:
            protocol.log.warn("broker {url} did not answer in {seconds} s; dropping the link",
                              url=protocol.url, seconds=timeout)
            protocol.transport.abortConnection()
        return Failure(Timeout(f"no answer from the broker within {timeout:.1f} s"))

    return follower.addTimeout(seconds, clock, onTimeoutCancel=timed_out)


def describe(failure: Any) -> str:
    """A failure (or exception) in words, for the log and L{NotConnected}."""
    value = failure.value if isinstance(failure, Failure) else failure
    return str(value) or type(value).__name__


def channel_error(e: Closed) -> MagnetError:
    """txAMQP's L{Closed} as magnet's error: a L{ChannelError} with the broker's code and text."""
    reason = e.args[0] if e.args else None
    fields = getattr(reason, "fields", None)
    if fields and len(fields) >= 2:
        return ChannelError(int(fields[0]), str(fields[1]))
    return ConnectionLost(f"channel closed: {reason}")
