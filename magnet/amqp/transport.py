"""L{AMQPTransport}: the L{magnet.transport.Transport} the bus uses on RabbitMQ.

    transport = from_url("amqp://guest:guest@127.0.0.1:5672/", reactor)
    transport.start()

Built in layers: the link (L{magnet.amqp.connection.Link}: connecting,
reconnecting, waiting for the link), publishing on it
(L{magnet.amqp.publishing.Publishing}: confirms, refused publishes, the
broker's blocks), and here what else the bus asks of a transport:

  - declarations (queues, exchanges, bindings) on one control channel, one
    at a time, remembered and declared again after every reconnect, before
    the consumers resume and before the link counts as up;
  - consumers, one channel each, that survive reconnects, a channel the
    broker closes, and a cancel from the broker (their queue deleted: a
    queue declared here is declared again, with the rest of the remembered
    topology, and the consumers resume);
  - consumer liveness (L{magnet.amqp.liveness}): after every reconnect and
    then every C{liveness_interval}, every queue consumed is checked at the
    broker for its consumers, and what is missing is consumed again; every
    restart of a consumer is logged and counted (C{consumer_restarts}, and
    the observer's C{consumer_restarted}).
"""
from __future__ import annotations

import functools
import itertools
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, ConnectionClosed

from magnet.amqp import liveness
from magnet.amqp.channels import AMQPConsumer, _ConsumerChannel, _Pending, _PublishChannel
from magnet.amqp.liveness import LivenessCheck
from magnet.amqp.protocol import ChannelError, _AMQPProtocol, answer_within, channel_error, describe
from magnet.amqp.publishing import Publishing
from magnet.errors import ConnectionLost, Timeout, Unroutable
from magnet.transport import OnDelivery


class AMQPTransport(Publishing):
    """The L{magnet.transport.Transport} on RabbitMQ.

    @param urls: one C{amqp://} / C{amqps://} URL or a list of them (a
        cluster: each reconnect attempt tries the next one).
    @param reactor: the reactor (time, TCP); tests pass their own.
    @param heartbeat: seconds between heartbeats (0: none); a broker silent
        for two intervals is taken for dead and the link is dropped.
    @param operation_timeout: how long a declaration or publish waits for the
        link to come up before it fails with L{NotConnected}.
    @param backoff: C{attempt -> seconds} between reconnect attempts.
    @param connect_timeout: limit of one TCP connect + AMQP handshake; an
        attempt still not connected (name resolution included) after twice it
        is given up and the next URL tried.
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
    @param liveness_interval: seconds between two checks that every queue
        consumed has its consumers at the broker (L{magnet.amqp.liveness});
        by default the heartbeat's interval, or 30 s without heartbeats; 0:
        no periodic check.
    @param observer: told of every consumer restart
        (C{consumer_restarted(queue, reason)}, see L{magnet.observer}); the
        daemon hands the bus's observer here (also settable later, as
        C{transport.observer}).
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

    #: seconds from the broker's cancel of a consumer (its queue deleted) to declaring the queue again
    REDECLARE_DELAY = 1.0

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
        liveness_interval: Optional[float] = None,
        observer: Any = None,
    ) -> None:
        Publishing.__init__(self, urls, reactor=reactor, heartbeat=heartbeat, operation_timeout=operation_timeout,
                            backoff=backoff, connect_timeout=connect_timeout, close_timeout=close_timeout,
                            auth_mechanism=auth_mechanism, tls_options=tls_options, nack_retries=nack_retries)
        self._control: Optional[Any] = None  # txAMQP channel for declarations
        self._control_lock = defer.DeferredLock()
        self._topology: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._consumers: "OrderedDict[int, AMQPConsumer]" = OrderedDict()
        self._tags = itertools.count(1)
        self._tag_prefix = f"magnet.{uuid.uuid4().hex[:8]}"
        #: queues whose consumers the broker cancelled, to declare again (L{_redeclare})
        self._lost_queues: Set[str] = set()
        self._redeclaring = False
        self._redeclare_call: Any = None
        if liveness_interval is None:
            liveness_interval = heartbeat if heartbeat > 0 else 30.0
        self.liveness = LivenessCheck(self, liveness_interval)
        self.observer = observer
        #: consumers restarted since the start, by reason (see L{magnet.amqp.liveness})
        self.consumer_restarts: Dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<AMQPTransport {', '.join(u.masked() for u in self.urls)} connected={self.connected}>"

    def stop(self) -> Deferred:
        """Close the link cleanly and stop reconnecting (and declaring lost queues again); fires within a bound."""
        if self._redeclare_call is not None and self._redeclare_call.active():
            self._redeclare_call.cancel()
        self._redeclare_call = None
        self.liveness.stop()
        return Publishing.stop(self)

    @property
    def blocked(self) -> Optional[str]:
        """The broker's reason while it blocks this link's publishers (a memory or disk alarm), else None."""
        protocol = self._protocol
        return protocol.blocked if protocol is not None and not protocol.lost else None

    def pending(self) -> Dict[str, int]:
        """Publishes waiting for the broker's confirm (every publishing channel of the link in
        use), and publishes held while the broker blocks publishers (see L{magnet.bus.Bus.pending})."""
        protocol = self._protocol
        unconfirmed = 0
        if protocol is not None:
            unconfirmed = sum(len(f.pending) for f in list(protocol.fast.values()) if isinstance(f, _PublishChannel))
        return {"unconfirmed": unconfirmed, "held": len(self._held)}

    def consumer_health(self) -> Dict[str, Any]:
        """What a health page shows of the consumers: the queues without a consumer now, restarts so far."""
        down: List[str] = sorted({c.queue for c in self._consumers.values() if not c.cancelled and not c.active})
        return {"down": down, "restarts": sum(self.consumer_restarts.values())}

    def _restarted(self, consumer: AMQPConsumer) -> None:
        """C{consumer} consumes again after it was lost: log it and count it."""
        reason, consumer._lost = consumer._lost or liveness.MISSING, None
        self.consumer_restarts[reason] = self.consumer_restarts.get(reason, 0) + 1
        self.log.info("consumer of queue {queue!r} restarted ({reason})", queue=consumer.queue, reason=reason)
        observer = self.observer
        if observer is not None and hasattr(observer, "consumer_restarted"):
            try:
                observer.consumer_restarted(consumer.queue, reason)
            except Exception:
                self.log.failure("the observer failed to count a consumer restart")

    # -- the link's setup and loss (see Link)

    @defer.inlineCallbacks
    def _link_ready(self, protocol: _AMQPProtocol) -> Any:
        """The publishing channel in confirm mode, then the topology and the consumers again."""
        publisher_ch = yield protocol.open_channel()
        yield publisher_ch.confirm_select(nowait=False)
        publisher = _PublishChannel(protocol, publisher_ch.id, publisher_ch)
        protocol.fast[publisher_ch.id] = publisher
        self._publisher = publisher
        self._control = None
        yield self._replay(protocol)
        self.liveness.start(protocol)

    def _link_lost(self, protocol: _AMQPProtocol, current: bool) -> None:
        """Publishes awaiting a confirm fail with L{ConnectionLost}; consumers wait for the next link."""
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
                    fast.consumer._lost = liveness.RECONNECT
        protocol.fast.clear()
        if current:
            self.liveness.stop()
            self._control = None
            # the next link starts unblocked: publishes held for this one wait for it instead
            self._release_held()
            if protocol.blocked is not None:
                self._notify_blocked(None)

    # -- declarations

    @defer.inlineCallbacks
    def _control_call(self, protocol: _AMQPProtocol, call: Callable[[Any], Deferred],
                      drop_link: bool = True) -> Any:
        """Run one synchronous method on the declarations channel (one at a time).

        No answer within C{operation_timeout} drops the link (the broker is
        not answering), unless not C{drop_link}: then only the channel is
        given up (a late answer must not be taken for the next request's),
        for a caller that can tell a broker that stopped reading this link
        (it blocks publishers) from a dead one.
        """
        yield self._control_lock.acquire()
        try:
            if protocol.lost:
                # queued behind another declaration while this link went: the caller
                # (L{_operation}) runs it again on the next link, which needs the lock now
                raise ConnectionClosed("the link went down while the declaration waited for its turn")
            ch = self._control
            if ch is None or ch.closed or ch.client is not protocol:
                ch = yield answer_within(protocol.open_channel(), self.operation_timeout, self.reactor,
                                         protocol if drop_link else None)
                self._control = ch
            try:
                result = yield answer_within(call(ch), self.operation_timeout, self.reactor,
                                             protocol if drop_link else None)
            except Timeout:
                if self._control is ch:
                    self._control = None
                    if not protocol.lost:
                        protocol.close_channel(ch).addErrback(lambda _: None)
                raise
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

    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True,
                         remember: bool = True) -> Deferred:
        """C{kind} is 'fanout', 'direct' or 'topic'. Remembered for replay, unless not
        C{remember} (a durable exchange the broker keeps, reconciled by its owner)."""
        if kind not in ("fanout", "direct", "topic", "headers"):
            return defer.fail(ValueError(f"unknown exchange kind {kind!r}"))

        def done(_: Any) -> None:
            if remember:
                self._topology[("exchange", name)] = ("exchange", name, kind, durable)

        d = self._operation(f"declare exchange {name!r}",
                            lambda p: self._declare_exchange_on(p, name, kind, durable))
        return d.addCallback(done)

    def bind_queue(self, queue: str, exchange: str, routing_key: str = "", *, remember: bool = True) -> Deferred:
        """Remembered for replay, unless not C{remember} (a binding of durable
        things the broker keeps, which its owner reconciles itself)."""

        def done(_: Any) -> None:
            if remember:
                self._topology[("bind", queue, exchange, routing_key)] = ("bind", queue, exchange, routing_key)

        d = self._operation(f"bind queue {queue!r} to {exchange!r}",
                            lambda p: self._bind_on(p, queue, exchange, routing_key))
        return d.addCallback(done)

    def unbind_queue(self, queue: str, exchange: str, routing_key: str = "") -> Deferred:
        """Remove a binding (and forget it): no error if there was none, even when the
        queue or the exchange does not exist, as RabbitMQ answers."""
        self._topology.pop(("bind", queue, exchange, routing_key), None)
        return self._operation(f"unbind queue {queue!r} from {exchange!r}", lambda p: self._control_call(
            p, lambda ch: ch.queue_unbind(queue=queue, exchange=exchange, routing_key=routing_key)))

    def bind_exchange(self, destination: str, source: str, routing_key: str = "", *,
                      remember: bool = True) -> Deferred:
        """Route what C{source} routes with C{routing_key} to the exchange C{destination}
        too (RabbitMQ's C{exchange.bind}). Remembered for replay unless not C{remember}."""

        def done(_: Any) -> None:
            if remember:
                self._topology[("xbind", destination, source, routing_key)] = (
                    "xbind", destination, source, routing_key)

        d = self._operation(f"bind exchange {destination!r} to {source!r}", lambda p: self._control_call(
            p, lambda ch: ch.exchange_bind(destination=destination, source=source, routing_key=routing_key)))
        return d.addCallback(done)

    def unbind_exchange(self, destination: str, source: str, routing_key: str = "") -> Deferred:
        """Remove an exchange-to-exchange binding (and forget it); no error if there was none
        (even when an exchange does not exist)."""
        self._topology.pop(("xbind", destination, source, routing_key), None)
        return self._operation(f"unbind exchange {destination!r} from {source!r}", lambda p: self._control_call(
            p, lambda ch: ch.exchange_unbind(destination=destination, source=source, routing_key=routing_key)))

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
                        or (k[0] == "bind" and k[2] == name) or (k[0] == "xbind" and name in k[1:3])]:
                del self._topology[key]

        forget()
        d = self._operation(f"delete exchange {name!r}", lambda p: self._control_call(
            p, lambda ch: ch.exchange_delete(exchange=name)))
        return d.addCallback(forget)

    def existing_queues(self, names: Sequence[str]) -> Deferred:
        """The set of C{names} that are queues at the broker now: a passive
        C{queue.declare} of each on the declarations channel, as the liveness
        check asks (a missing queue, 404, closes that channel; the next call
        opens a fresh one). A queue exclusive to another connection (405)
        exists: it takes publishes. Nothing is declared or remembered."""
        wanted = list(dict.fromkeys(names))

        @defer.inlineCallbacks
        def check(protocol: _AMQPProtocol) -> Any:
            found: Set[str] = set()
            for name in wanted:
                try:
                    # a broker that blocks publishers stops reading the link: no reason to drop it
                    yield self._control_call(protocol, lambda ch, n=name: ch.queue_declare(queue=n, passive=True),
                                             drop_link=False)
                except Closed as e:
                    if protocol.lost:
                        raise
                    error = channel_error(e)
                    code = error.reply_code if isinstance(error, ChannelError) else None
                    if code == 404:
                        continue
                    if code != 405:
                        raise error from None
                found.add(name)
            return found

        return self._operation(f"check {len(wanted)} queue(s)", check)

    def _forget_queue(self, name: str) -> None:
        for key in [k for k in self._topology if (k[0] == "queue" and k[1] == name)
                    or (k[0] == "bind" and k[1] == name)]:
            del self._topology[key]
        for consumer in [c for c in self._consumers.values() if c.queue == name]:
            consumer.cancelled = True
            self._consumers.pop(id(consumer), None)

    # -- consuming

    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 10, no_ack: bool = False) -> Deferred:
        """Fires with an L{AMQPConsumer} once the broker delivers to it (C{no_ack}:
        see L{magnet.transport.Transport.consume})."""
        if not 0 <= prefetch <= 65535:
            return defer.fail(ValueError(f"prefetch must be 0..65535, got {prefetch}"))
        consumer = AMQPConsumer(self, queue, on_delivery, prefetch, no_ack)

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
            yield answer_within(ch.basic_qos(prefetch_count=consumer.prefetch, global_=False),
                           self.operation_timeout, self.reactor, protocol)
            tag = f"{self._tag_prefix}.{next(self._tags)}"
            state = _ConsumerChannel(protocol, ch.id, consumer, tag)
            state.txchannel = ch
            protocol.fast[ch.id] = state
            yield answer_within(ch.basic_consume(queue=consumer.queue, consumer_tag=tag, no_ack=consumer.no_ack),
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
            yield answer_within(ch.basic_cancel(consumer_tag=state.tag), self.close_timeout, self.reactor)
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
        """The broker cancelled a consumer (C{basic.cancel}): its queue was deleted under it.

        A queue this transport declared is one its user still wants (it is
        declared again after every reconnect anyway), so after
        L{REDECLARE_DELAY} the remembered topology is declared again (the
        queue with its arguments and bindings, and whatever else of it is
        gone, such as its dead-letter queue) and the consumers of the queue
        resume. A queue someone else declared is left alone: its consumers
        resume when it is declared again.
        """
        consumer = state.consumer
        state.delivering = False
        if consumer._channel is state:
            consumer._channel = None
            consumer.active = False
            consumer._lost = liveness.CANCELLED
        mine = ("queue", consumer.queue) in self._topology
        if not consumer.cancelled:
            if mine:
                self.log.warn("broker cancelled the consumer of queue {queue!r} (queue deleted?); declaring it "
                              "again and resuming", queue=consumer.queue)
            else:
                self.log.warn("broker cancelled the consumer of queue {queue!r} (queue deleted?); it resumes "
                              "if the queue is declared again", queue=consumer.queue)
        state.release()
        if mine and not consumer.cancelled:
            self._lost_queues.add(consumer.queue)
            self._schedule_redeclare()

    def _schedule_redeclare(self) -> None:
        """One pass at a time, L{REDECLARE_DELAY} after the first cancel it takes.

        The delay takes every queue of one deletion spree in one pass, and
        gives the application a moment to cancel its consumer when it was the
        application (on another node) that deleted the queue: a queue whose
        consumers here are all cancelled by then is not declared again.
        """
        if self._redeclaring or self._redeclare_call is not None or not self._lost_queues:
            return
        self._redeclare_call = self.reactor.callLater(self.REDECLARE_DELAY, self._redeclare)

    def _redeclare(self) -> None:
        """Declare the remembered topology again on the link in use, then resume the consumers of the lost queues."""
        self._redeclare_call = None
        queues, self._lost_queues = self._lost_queues, set()
        wanted = sorted(q for q in queues if ("queue", q) in self._topology
                        and any(c.queue == q and not c.cancelled for c in self._consumers.values()))
        protocol = self._protocol
        if not wanted or protocol is None or protocol.lost or self._stopping:
            return  # nothing wanted, or the next link declares everything again anyway
        self._redeclaring = True

        @defer.inlineCallbacks
        def redeclare() -> Any:
            yield self._replay_topology(protocol)
            for name in wanted:
                self._resume_consumers_of(name)

        def done(result: Any) -> None:
            self._redeclaring = False
            if isinstance(result, Failure) and not protocol.lost:
                self.log.failure("declaring {queues} again after the broker cancelled their consumers",
                                 failure=result, queues=wanted)
            self._schedule_redeclare()

        redeclare().addBoth(done)

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
                    self._restarted(c)

                def not_resumed(f: Failure, c: AMQPConsumer = consumer) -> None:
                    c._resuming = False
                    self.log.warn("could not resume the consumer of {queue!r}: {reason}", queue=c.queue,
                                  reason=describe(f))

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
                consumer._lost = liveness.CHANNEL_CLOSED
            if was_active and not consumer.cancelled:
                self.log.warn("broker closed the channel of the consumer of {queue!r}: {code} {text}; "
                              "resuming it", queue=consumer.queue, code=code, text=text)
                if protocol is self._protocol and not protocol.lost:
                    self.reactor.callLater(0.1, self._resume_consumers_of, consumer.queue)
        elif self._control is not None and self._control.id == channel_id:
            self._control = None

    # -- replay

    @defer.inlineCallbacks
    def _replay(self, protocol: _AMQPProtocol) -> Any:
        """Declare the remembered topology again, then resume every consumer."""
        yield self._replay_topology(protocol)
        for consumer in list(self._consumers.values()):
            if consumer.cancelled or consumer._channel is not None:
                continue
            consumer._resuming = True
            try:
                yield self._replay_step(protocol, functools.partial(self._start_consumer, protocol, consumer),
                                        f"consumer of {consumer.queue!r}")
            finally:
                consumer._resuming = False
            if consumer._channel is not None:
                self._restarted(consumer)

    @defer.inlineCallbacks
    def _replay_topology(self, protocol: _AMQPProtocol) -> Any:
        """Declare every remembered queue, exchange and binding again, in the order first declared."""
        for entry in list(self._topology.values()):
            if entry[0] == "queue":
                step = functools.partial(self._declare_queue_on, protocol, entry[1], entry[2])
            elif entry[0] == "exchange":
                step = functools.partial(self._declare_exchange_on, protocol, entry[1], entry[2], entry[3])
            elif entry[0] == "xbind":
                step = functools.partial(self._control_call, protocol, functools.partial(
                    _exchange_bind, destination=entry[1], source=entry[2], routing_key=entry[3]))
            else:
                step = functools.partial(self._bind_on, protocol, entry[1], entry[2], entry[3])
            yield self._replay_step(protocol, step, f"{entry[0]} {entry[1]!r}")

    @defer.inlineCallbacks
    def _replay_step(self, protocol: _AMQPProtocol, step: Callable[[], Deferred], what: str) -> Any:
        """One replay step; a refusal is logged (the link stays), 405 RESOURCE_LOCKED is retried.

        After an abrupt loss the broker may not yet have noticed that the old
        connection is gone, and still hold its exclusive queues for a moment.
        """
        deadline = self.reactor.seconds() + min(self.operation_timeout, 10.0)
        waited = False
        while True:
            try:
                yield step()
                return
            except Closed as e:
                if protocol.going:  # the link went, not a refusal of this step: the attempt fails
                    raise
                error = channel_error(e)
            locked = isinstance(error, ChannelError) and error.reply_code == 405
            if locked and self.reactor.seconds() < deadline:
                if not waited:
                    self.log.info("after reconnecting, the {what} is still locked by the previous link; "
                                  "trying again for up to {seconds:.0f} s", what=what,
                                  seconds=deadline - self.reactor.seconds())
                waited = True
                yield deferLater(self.reactor, 0.2, lambda: None)
                continue
            self.log.error("after reconnecting, the broker refused the {what}: {reason}", what=what,
                           reason=error)
            return


def _exchange_bind(ch: Any, **fields: Any) -> Deferred:
    return ch.exchange_bind(**fields)


def from_url(url: Union[str, Sequence[str]], reactor: Any, **options: Any) -> AMQPTransport:
    """An L{AMQPTransport} (not started) for one broker URL or a list of them."""
    return AMQPTransport(url, reactor=reactor, **options)
