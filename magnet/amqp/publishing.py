"""Publishing: confirmed publishes, refused ones published again, holds while the broker blocks publishers.

L{Publishing} is the part of L{magnet.amqp.transport.AMQPTransport} between
the link (L{magnet.amqp.connection.Link}) and the declarations and consumers:
it owns the publishing channel (L{magnet.amqp.channels._PublishChannel}, in
confirm mode) of the link in use, and

  - publishes on it at once while the link is up, else waits for the link at
    most C{operation_timeout};
  - publishes a message the broker refused (C{basic.nack}) again on a fresh
    channel, bounded in count (C{nack_retries}) and time;
  - holds publishes while the broker blocks publishers (RabbitMQ's
    C{connection.blocked}, a memory or disk alarm), and fails one held
    longer than C{operation_timeout} with L{Blocked}, which names the alarm.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from magnet.amqp.channels import _Pending, _PublishChannel
from magnet.amqp.connection import Link
from magnet.amqp.protocol import _AMQPProtocol, answer_within
from magnet.errors import Blocked, NotConfirmed, NotConnected
from magnet.message import Message


class Publishing(Link):
    """The link, and the publishing on it (see L{magnet.amqp.transport.AMQPTransport} for the parameters)."""

    log = Logger()

    def __init__(self, urls: Union[str, Sequence[str]], *, nack_retries: int, reactor: Any, heartbeat: float,
                 operation_timeout: float, backoff: Optional[Callable[[int], float]], connect_timeout: float,
                 close_timeout: float, auth_mechanism: str, tls_options: Any) -> None:
        Link.__init__(self, urls, reactor=reactor, heartbeat=heartbeat, operation_timeout=operation_timeout,
                      backoff=backoff, connect_timeout=connect_timeout, close_timeout=close_timeout,
                      auth_mechanism=auth_mechanism, tls_options=tls_options)
        self.nack_retries = nack_retries
        #: messages the broker refused (basic.nack), and publishing channels replaced for it
        self.nacked = 0
        self.publishers_replaced = 0
        #: publishing channels replaced because a sender gave up waiting for a confirm there, on a
        #: link up and not blocked (L{_confirm_given_up}); counted in C{publishers_replaced} too
        self.confirms_given_up = 0
        self._publisher: Optional[_PublishChannel] = None
        #: publishes held while the broker blocks publishers (L{_publish_when_unblocked})
        self._held: List[Deferred] = []
        #: told the broker's reason when it blocks publishers, None when the block ends (or the link goes)
        self._block_listeners: List[Callable[[Optional[str]], None]] = []

    def add_block_listener(self, listener: Callable[[Optional[str]], None]) -> None:
        """C{listener(reason)} when the broker starts blocking this link's publishers (a
        memory or disk alarm: C{connection.blocked}), C{listener(None)} when it lifts the
        block or the link goes (the next link starts unblocked). So a caller can answer
        at once what needs a publish, instead of waiting for one to fail."""
        self._block_listeners.append(listener)

    def _notify_blocked(self, reason: Optional[str]) -> None:
        for listener in list(self._block_listeners):
            try:
                listener(reason)
            except Exception:
                self.log.failure("block listener {listener!r} raised", listener=listener)

    def publish(self, exchange: str, routing_key: str, message: Message, *, mandatory: bool = True) -> Deferred:
        """Fires once the broker has confirmed the message (see L{Transport.publish})."""
        publisher = self._publisher
        if self.connected and publisher is not None and publisher.open:
            if publisher.protocol.blocked is not None:
                return self._publish_when_unblocked(publisher.protocol.blocked, exchange, routing_key, message,
                                                    mandatory)
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
                if publisher.protocol.blocked is not None:
                    result = yield self._publish_when_unblocked(publisher.protocol.blocked, exchange, routing_key,
                                                                message, mandatory)
                else:
                    result = yield publisher.publish(exchange, routing_key, message, mandatory)
                return result
            # the publishing channel is being reopened; give it a moment
            yield deferLater(self.reactor, 0.05, lambda: None)

    # -- a broker that blocks publishers (connection.blocked)

    def _publish_when_unblocked(self, reason: str, exchange: str, routing_key: str, message: Message,
                                mandatory: bool) -> Deferred:
        """Hold a publish while the broker blocks publishers, then publish it.

        A publish written to a blocked connection makes RabbitMQ stop reading
        the connection altogether, the consumers' acks with it, and its
        confirm would come only when the alarm clears: so it is not written.
        It waits for C{connection.unblocked} at most C{operation_timeout};
        then, or when the caller gives up first (the bus's send timeout
        cancels it), it fails with L{Blocked}, which names the alarm.
        """
        started = self.reactor.seconds()

        def give_up(d: Deferred) -> None:
            if d in self._held:
                self._held.remove(d)
            d.errback(Blocked(
                f"publish to exchange {exchange!r} with routing key {routing_key!r} not sent: the broker blocks "
                f"publishers ({reason}; connection.blocked) and did not lift the block within "
                f"{self.reactor.seconds() - started:.1f} s"))

        held: Deferred = Deferred(give_up)
        self._held.append(held)
        held.addTimeout(self.operation_timeout, self.reactor, onTimeoutCancel=lambda result, timeout: result)
        held.addCallback(lambda _: self.publish(exchange, routing_key, message, mandatory=mandatory))
        return held

    def _connection_blocked(self, protocol: _AMQPProtocol, reason: str) -> None:
        """Called by the protocol: the broker blocks publishers (a resource alarm)."""
        self.log.warn("broker {url} blocks publishers ({reason}); publishes wait at most {timeout:.1f} s for it "
                      "to lift the block", url=protocol.url, reason=reason, timeout=self.operation_timeout)
        if protocol is self._protocol:
            self._notify_blocked(reason)

    def _connection_unblocked(self, protocol: _AMQPProtocol) -> None:
        """Called by the protocol: the broker lifted the block; the held publishes go out, in order."""
        self.log.info("broker {url} lifted the block on publishers; {count} held publish(es) go out",
                      url=protocol.url, count=len(self._held))
        self._release_held()
        if protocol is self._protocol:
            self._notify_blocked(None)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for d in held:
            d.callback(None)

    @defer.inlineCallbacks
    def _reopen_publisher(self, protocol: _AMQPProtocol) -> Any:
        try:
            ch = yield answer_within(protocol.open_channel(), self.operation_timeout, self.reactor, protocol)
            yield answer_within(ch.confirm_select(nowait=False), self.operation_timeout, self.reactor, protocol)
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
            self._replace_publisher(channel, "the broker refused (basic.nack) a message")
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

    def _confirm_given_up(self, channel: _PublishChannel, given_up: Deferred) -> None:
        """Called by a publishing channel: a sender gave up waiting for the
        confirm of C{given_up} (the bus's send timeout cancels it) while the
        link is up and the broker does not block publishers.

        The broker did not confirm in the sender's time. On a slow broker the
        confirm is merely late; but RabbitMQ 3.10.8 left channels that never
        confirmed again in the cluster partition scenario (the node holding
        the quorum queues' leaders cut off and paused under
        C{pause_minority}): a client linked again to a majority node right
        after the pause sent for 40 s on a link otherwise fine, every send
        timing out, no basic.nack, nothing, while links made a few seconds
        later to the same node published; a fresh channel on the same link
        was confirmed within about a second (most likely the channel's
        publishes went to the old leader, as after a node's kill, where
        3.10 refuses them instead: L{_nacked}). So the current publishing
        channel is replaced by a fresh one, as after a refusal: the sends
        after it go there. The old channel is closed once no sender waits on
        it any more; a late confirm there still settles whoever waits. At
        most one replacement is in progress at a time, so a slow broker
        costs a channel per send timeout at most.
        """
        if channel.retired:
            if channel.open and not channel.waiting(given_up):
                channel.release()  # its last sender gave up: nothing to wait for there
            return
        if (self._stopping or not self._running or channel is not self._publisher or channel.replacing
                or not self.connected):
            return
        self.confirms_given_up += 1
        self._replace_publisher(channel, "a sender gave up waiting for a confirm")

    @defer.inlineCallbacks
    def _replace_publisher(self, old: _PublishChannel, why: str) -> Any:
        """Open a fresh publishing channel; C{old} is closed once no sender waits on it."""
        old.replacing = True
        protocol = old.protocol
        try:
            ch = yield answer_within(protocol.open_channel(), self.operation_timeout, self.reactor, protocol)
            yield answer_within(ch.confirm_select(nowait=False), self.operation_timeout, self.reactor, protocol)
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
        self.log.info("{why} on publishing channel {old}; publishing on a fresh channel {new} from now on",
                      why=why, old=old.id, new=ch.id)
        old.retire()
