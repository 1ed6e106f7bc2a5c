"""PrometheusObserver: what the bus does, as Prometheus text."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task

import magnet
from magnet import BusObserver, operation

from ooidx.metrics import PrometheusObserver, metric_label


class Echo:
    @operation
    def echo(self, value: Any) -> Any:
        return value

    @operation
    def boom(self) -> None:
        raise KeyError("nope")


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_implements_every_bus_observer_method() -> None:
    methods = [m for m in vars(BusObserver) if not m.startswith("_")]
    assert methods
    for m in methods:
        assert getattr(PrometheusObserver, m) is not getattr(BusObserver, m), m


def test_registries_are_separate() -> None:
    a, b = PrometheusObserver(), PrometheusObserver()
    a.message_in("fetcher")
    assert b"magnet_messages_in_total{name=\"fetcher\"} 1.0" in a.generate()
    assert b"magnet_messages_in_total{name=\"fetcher\"}" not in b.generate()


def test_per_use_names_fold_into_one_label() -> None:
    assert metric_label("magnet.listen.node-1.0123456789abcdef0123456789abcdef") == "magnet.listen"
    assert metric_label("notification.sub.dx.node.1.0123456789ab") == "notification.sub"
    assert metric_label("fetcher") == "fetcher"
    obs = PrometheusObserver()
    for _ in range(5):
        obs.message_in(f"magnet.listen.n.{uuid.uuid4().hex}")
    assert samples(obs.generate().decode())[("magnet_messages_in_total", frozenset({("name", "magnet.listen")}))] == 5


def test_direct_calls() -> None:
    obs = PrometheusObserver()
    obs.handler_error("cache")
    obs.dead_letter("cache")
    obs.inflight("cache", +1)
    obs.inflight("cache", +1)
    obs.inflight("cache", -1)
    obs.rpc_latency("attribute_store", "get", 0.02, "ok")
    obs.component_up("fetcher", True)
    obs.components_up({"cache": False})
    s = samples(obs.generate().decode())
    assert s[("magnet_handler_errors_total", frozenset({("name", "cache")}))] == 1
    assert s[("magnet_dead_letters_total", frozenset({("name", "cache")}))] == 1
    assert s[("magnet_inflight", frozenset({("name", "cache")}))] == 1
    key = frozenset({("address", "attribute_store"), ("op", "get"), ("outcome", "ok")})
    assert s[("magnet_rpc_latency_seconds_count", key)] == 1
    assert s[("magnet_rpc_latency_seconds_bucket", key | {("le", "0.025")})] == 1
    assert s[("magnet_rpc_latency_seconds_bucket", key | {("le", "0.01")})] == 0
    assert s[("ooidx_component_up", frozenset({("component", "fetcher")}))] == 1
    assert s[("ooidx_component_up", frozenset({("component", "cache")}))] == 0


@pytest_twisted.inlineCallbacks
def test_counts_bus_traffic_on_memory() -> Any:
    obs = PrometheusObserver()
    bus = magnet.connect(f"memory://metrics-{uuid.uuid4().hex}", reactor, observer=obs, rpc_timeout=5,
                         retry_limit=0)
    bus.startService()
    try:
        yield bus.serve("echo", Echo())
        assert (yield bus.call("echo", "echo", value=1)) == 1
        assert (yield bus.call("echo", "echo", value="x")) == "x"
        with pytest.raises(magnet.RemoteError):
            yield bus.call("echo", "boom")

        # a worker queue whose handler fails: retry_limit=0 dead-letters at once
        yield bus.declare_worker_queue("work")
        failed = defer.Deferred()

        def handler(message: Any) -> None:
            reactor.callLater(0, failed.callback, None)
            raise ValueError("bad")

        yield bus.consume("work", handler)
        yield bus.send_json("work", {"n": 1})
        yield failed
        yield task.deferLater(reactor, 0.2, lambda: None)
    finally:
        yield bus.stopService()

    s = samples(obs.generate().decode())
    assert s[("magnet_messages_out_total", frozenset({("name", "echo")}))] == 3
    assert s[("magnet_messages_in_total", frozenset({("name", "echo")}))] == 3
    assert s[("magnet_messages_in_total", frozenset({("name", "magnet.listen")}))] == 3  # the replies
    assert s[("magnet_handler_errors_total", frozenset({("name", "echo")}))] == 1
    assert s[("magnet_messages_out_total", frozenset({("name", "work")}))] == 1
    assert s[("magnet_handler_errors_total", frozenset({("name", "work")}))] == 1
    assert s[("magnet_dead_letters_total", frozenset({("name", "work")}))] == 1
    assert s[("magnet_inflight", frozenset({("name", "work")}))] == 0
    ok = frozenset({("address", "echo"), ("op", "echo"), ("outcome", "ok")})
    err = frozenset({("address", "echo"), ("op", "boom"), ("outcome", "error")})
    assert s[("magnet_rpc_latency_seconds_count", ok)] == 2
    assert s[("magnet_rpc_latency_seconds_count", err)] == 1

