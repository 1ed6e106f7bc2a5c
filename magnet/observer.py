"""Where the bus reports what it does, for metrics.

magnet knows nothing of Prometheus or DX; the daemon hands the bus an
observer that turns these calls into its metrics. The default does nothing.
"""
from __future__ import annotations


class BusObserver:
    def message_in(self, name: str) -> None:
        """A message was delivered to a consumer of C{name}."""

    def message_out(self, name: str) -> None:
        """A message was sent to C{name}."""

    def handler_error(self, name: str) -> None:
        """A handler for C{name} failed."""

    def dead_letter(self, name: str) -> None:
        """A message from C{name} was dead-lettered."""

    def unroutable(self, name: str) -> None:
        """A multicast's copy for address C{name} was not sent: no such address."""

    def inflight(self, name: str, delta: int) -> None:
        """Handlers for C{name} running now changed by C{delta}."""

    def rpc_latency(self, address: str, op: str, seconds: float, outcome: str) -> None:
        """A call finished (C{outcome} is 'ok' or 'error')."""

    def dead_letter_queue_redeclared(self, name: str) -> None:
        """The dead-letter queue of worker queue C{name} (C{NAME.dead}) was gone
        at the broker and was declared again (L{magnet.bus}). Counted by default
        as a restart of C{name} for the reason 'dead_letter_queue'."""
        self.consumer_restarted(name, "dead_letter_queue")

    def consumer_restarted(self, queue: str, reason: str) -> None:
        """A consumer of C{queue} consumes again after it was lost; C{reason} is
        'reconnect', 'cancelled' (its queue deleted), 'channel_closed' (by the
        broker: an error, consumer_timeout), 'missing' (found by the liveness
        check of L{magnet.amqp.liveness}) or 'dead_letter_queue' (its
        dead-letter queue declared again, L{dead_letter_queue_redeclared})."""
