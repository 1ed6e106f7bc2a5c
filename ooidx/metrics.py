"""The bus's observations as Prometheus metrics, for C{GET /metrics} on the web port.

    observer = PrometheusObserver()
    bus = magnet.connect(url, reactor, observer=observer)
    ...
    body = observer.generate()          # Prometheus text format

Each observer keeps its metrics in a L{CollectorRegistry} of its own (never
prometheus_client's global one), so a process, or a test, can make as many
as it likes.

Names that are made per use (listen addresses, fanout subscription queues,
the RPC reply address) carry a random suffix; they are folded into one label
value each (C{magnet.listen}, C{NAME.sub}) so the number of series stays
bounded however long the daemon runs.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from magnet.observer import BusObserver

__all__ = ["PrometheusObserver", "CONTENT_TYPE", "metric_label"]

#: The content type of L{PrometheusObserver.generate}'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: RPC latency buckets, seconds: a local ping to a fetch that runs into its timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_LISTEN = re.compile(r"magnet\.listen\..*\Z", re.S)
_FANOUT_SUB = re.compile(r"(?P<fanout>.+?)\.sub\..+\.[0-9a-f]{12}\Z", re.S)


def metric_label(name: str) -> str:
    """The label value for a bus name: per-use names folded into one value."""
    if _LISTEN.match(name):
        return "magnet.listen"
    m = _FANOUT_SUB.match(name)
    if m:
        return m.group("fanout") + ".sub"
    return name


class PrometheusObserver(BusObserver):
    """A L{BusObserver} that counts what the bus does, in Prometheus metrics."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("magnet_messages_in", "Messages delivered to a consumer, by name",
                                   ["name"], registry=r)
        self.messages_out = Counter("magnet_messages_out", "Messages sent, by name", ["name"], registry=r)
        self.rpc_latency_seconds = Histogram("magnet_rpc_latency_seconds", "Time from an RPC call to its outcome",
                                             ["address", "op", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.handler_errors = Counter("magnet_handler_errors", "Handlers that failed, by name", ["name"],
                                      registry=r)
        self.inflight_gauge = Gauge("magnet_inflight", "Handlers running now, by name", ["name"], registry=r)
        self.dead_letters = Counter("magnet_dead_letters", "Messages dead-lettered, by the name they came from",
                                    ["name"], registry=r)
        self.component_up_gauge = Gauge("ooidx_component_up", "1 if the component is started on this node",
                                        ["component"], registry=r)

    # BusObserver ---------------------------------------------------------------

    def message_in(self, name: str) -> None:
        self.messages_in.labels(metric_label(name)).inc()

    def message_out(self, name: str) -> None:
        self.messages_out.labels(metric_label(name)).inc()

    def handler_error(self, name: str) -> None:
        self.handler_errors.labels(metric_label(name)).inc()

    def dead_letter(self, name: str) -> None:
        self.dead_letters.labels(metric_label(name)).inc()

    def inflight(self, name: str, delta: int) -> None:
        self.inflight_gauge.labels(metric_label(name)).inc(delta)

    def rpc_latency(self, address: str, op: str, seconds: float, outcome: str) -> None:
        self.rpc_latency_seconds.labels(metric_label(address), op, outcome).observe(max(0.0, seconds))

    # the daemon's own ----------------------------------------------------------

    def component_up(self, component: str, up: bool) -> None:
        """Record whether C{component} is started on this node."""
        self.component_up_gauge.labels(component).set(1 if up else 0)

    def components_up(self, components: Mapping[str, bool]) -> None:
        """Record the state of several components at once (from the daemon's health)."""
        for component, up in components.items():
            self.component_up(component, bool(up))

    def generate(self) -> bytes:
        """Every metric, in the Prometheus text format (L{CONTENT_TYPE})."""
        return generate_latest(self.registry)
