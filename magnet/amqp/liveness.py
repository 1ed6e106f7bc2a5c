"""Consumer liveness: every consumer the transport means to have is checked, and restarted when missing.

A consumer can stop without the link going down: the broker closes its
channel (an error on it, C{consumer_timeout}, an operator's
C{rabbitmqctl close_connection} of a sibling), cancels it (its queue
deleted), or a bug or a lost frame leaves it registered here and absent
there. Users of AMQP services report consumers that stopped after an
"auto-reconnect" that said it succeeded, unnoticed for days. So, right after
every (re)connect and then every C{interval} seconds (the heartbeat's, by
default), L{LivenessCheck} asks the broker, for every queue the transport
consumes, how many consumers it has (a passive C{queue.declare}), and:

  - a consumer with no channel here (lost, and not being restarted) is
    consumed again;
  - consumers of a queue the broker counts none for are restarted: their
    channel closed (what they held goes back to the queue) and consumed
    again. (Only none counts: the count takes in other nodes' consumers, and
    a quorum queue with a single active consumer counts only the active one.)
  - a queue the broker no longer has is declared again with the remembered
    topology when this transport declared it (as after the broker's cancel),
    else left until someone declares it.

No check runs while the broker blocks the link's publishers (a memory or
disk alarm): RabbitMQ then stops reading the link, and an unanswered check
must not drop it (one already asked then gives up its channel, not the link).

Every restart, by this check or by the transport's own handling of a cancel,
a closed channel or a reconnect, is logged and counted
(L{magnet.observer.BusObserver.consumer_restarted}, C{consumer_restarts}).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, List, Optional

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed

from magnet.amqp.protocol import ChannelError, _AMQPProtocol, channel_error, describe

if TYPE_CHECKING:  # pragma: no cover
    from magnet.amqp.channels import AMQPConsumer

#: why a consumer was restarted: the label values of magnet_consumer_restarts_total
RECONNECT = "reconnect"
CANCELLED = "cancelled"
CHANNEL_CLOSED = "channel_closed"
MISSING = "missing"


class LivenessCheck:
    """The periodic check of one transport's consumers (see the module's docstring)."""

    log = Logger()

    def __init__(self, transport: Any, interval: float) -> None:
        """C{transport}: the L{magnet.amqp.transport.AMQPTransport} whose consumers are checked."""
        self.transport = transport
        self.interval = interval
        self._loop: Optional[LoopingCall] = None
        self._running: Optional[defer.Deferred] = None
        #: checks done, for tests and health
        self.checks = 0

    def start(self, protocol: _AMQPProtocol) -> None:
        """Check now (the link was just set up) and then every C{interval} while C{protocol} is the link."""
        self.stop()
        if self.interval <= 0:
            return
        loop = LoopingCall(self.check, protocol)
        loop.clock = self.transport.reactor
        self._loop = loop
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("the consumer liveness check stopped", failure=f))

    def stop(self) -> None:
        """No more checks (the link is gone, or the transport stops)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def check(self, protocol: _AMQPProtocol) -> Optional[defer.Deferred]:
        """One pass over every queue consumed (at most one pass at a time; a pass never fails)."""
        if self._running is not None or protocol.lost or self.transport._stopping:
            return None
        if protocol.blocked is not None:
            return None  # the broker reads nothing of this link until the block lifts: the next tick checks
        d = self._check(protocol)
        self._running = d

        def done(result: Any) -> None:
            self._running = None
            if isinstance(result, Failure) and not protocol.lost:
                self.log.failure("checking that every queue has its consumer", failure=result)

        d.addBoth(done)
        return None  # the loop does not wait for a slow broker: the next tick skips while this one runs

    @defer.inlineCallbacks
    def _check(self, protocol: _AMQPProtocol) -> Any:
        self.checks += 1
        transport = self.transport
        wanted: "OrderedDict[str, List[AMQPConsumer]]" = OrderedDict()
        for consumer in list(transport._consumers.values()):
            if not consumer.cancelled:
                wanted.setdefault(consumer.queue, []).append(consumer)
        for queue, consumers in wanted.items():
            if protocol.lost or transport._stopping or protocol.blocked is not None:
                return
            if queue in transport._lost_queues or transport._redeclaring:
                continue  # the broker cancelled them: being declared again already
            count = yield self._consumer_count(protocol, queue)
            if count is None:
                continue
            consumers = [c for c in consumers if not c.cancelled and not c._resuming]
            missing = [c for c in consumers if c._channel is None]
            live = [c for c in consumers if c._channel is not None]
            if live and count == 0:
                for consumer in live:
                    self._drop(consumer)
                missing += live
                self.log.warn("queue {queue!r} has no consumer at the broker, {mine} here: restarting them",
                              queue=queue, mine=len(live))
            if missing:
                for consumer in missing:
                    consumer._lost = MISSING
                self.log.warn("{n} consumer(s) of queue {queue!r} not consuming: consuming again",
                              n=len(missing), queue=queue)
                transport._resume_consumers_of(queue)

    @defer.inlineCallbacks
    def _consumer_count(self, protocol: _AMQPProtocol, queue: str) -> Any:
        """The broker's count of C{queue}'s consumers; None if it has no such queue (or did not say)."""
        transport = self.transport
        try:
            # a broker that blocks publishers stops reading the link: no answer then is no reason to drop it
            ok = yield transport._control_call(protocol, lambda ch: ch.queue_declare(queue=queue, passive=True),
                                               drop_link=False)
        except Closed as e:
            if protocol.going:  # the link went (e.g. the node paused): nothing to say of the queue
                return None
            error = channel_error(e)
            if isinstance(error, ChannelError) and error.reply_code == 404:
                if ("queue", queue) in transport._topology:
                    self.log.warn("queue {queue!r} is gone at the broker; declaring it again", queue=queue)
                    for consumer in list(transport._consumers.values()):
                        if consumer.queue == queue and consumer._channel is not None:
                            self._drop(consumer)
                            consumer._lost = CANCELLED
                    transport._lost_queues.add(queue)
                    transport._schedule_redeclare()
                return None
            self.log.warn("could not check the consumers of {queue!r}: {reason}", queue=queue, reason=error)
            return None
        except Exception as e:  # noqa: BLE001 - a timeout or a lost link: the next pass tries again
            if not protocol.lost:
                self.log.warn("could not check the consumers of {queue!r}: {reason}", queue=queue,
                              reason=describe(Failure(e)))
            return None
        return int(getattr(ok, "consumer_count", 0))

    @staticmethod
    def _drop(consumer: "AMQPConsumer") -> None:
        """Forget C{consumer}'s channel and close it (what it holds goes back to the queue)."""
        state = consumer._channel
        consumer._channel = None
        consumer.active = False
        if state is not None:
            state.delivering = False
            state.release()

