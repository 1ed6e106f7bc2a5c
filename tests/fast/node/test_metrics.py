"""PrometheusObserver: what the bus does, as Prometheus text. (The parts
without child processes; those stay in tests/ooidx/test_metrics.py.)"""
from __future__ import annotations

import uuid
from typing import Any, List

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.logger import formatEvent

import magnet
from magnet import BusObserver, operation

from ooidx.node.metrics import PrometheusObserver, metric_label

from tests.fast.core.support import FastCase, LogEvents, drive, expand


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


@expand
class MetricsTests(FastCase):
    def test_implements_every_bus_observer_method(self) -> None:
        methods = [m for m in vars(BusObserver) if not m.startswith("_")]
        assert methods
        for m in methods:
            assert getattr(PrometheusObserver, m) is not getattr(BusObserver, m), m

    def test_registries_are_separate(self) -> None:
        a, b = PrometheusObserver(), PrometheusObserver()
        a.message_in("fetcher")
        assert b"magnet_messages_in_total{name=\"fetcher\"} 1.0" in a.generate()
        assert b"magnet_messages_in_total{name=\"fetcher\"}" not in b.generate()

    def test_per_use_names_fold_into_one_label(self) -> None:
        assert metric_label("magnet.listen.node-1.0123456789abcdef0123456789abcdef") == "magnet.listen"
        assert metric_label("notification.sub.dx.node.1.0123456789ab") == "notification.sub"
        assert metric_label("fetcher") == "fetcher"
        obs = PrometheusObserver()
        for _ in range(5):
            obs.message_in(f"magnet.listen.n.{uuid.uuid4().hex}")
        assert samples(obs.generate().decode())[("magnet_messages_in_total", frozenset({("name", "magnet.listen")}))] == 5

    def test_bus_name_labels_are_bounded(self) -> None:
        # a pub_sub subscription keeps its own label; the soak subscribes a new name every
        # 20 s, and every name stayed a series for good (docs/reliability.md#soak)
        from ooidx.node import metrics
        self.patch(metrics, "MAX_NAME_LABELS", 3)
        obs = PrometheusObserver()
        obs.message_out("fetcher")
        for i in range(3):
            obs.message_out(f"magnet.listen.n.{uuid.uuid4().hex}")  # folded: one value
        for i in range(5):
            obs.message_out(f"pubsub.sub.soak-{i}")
        obs.message_out("fetcher")  # given before the bound: keeps its value
        obs.inflight("pubsub.sub.soak-9", 1)
        obs.inflight("pubsub.sub.soak-9", -1)
        obs.unroutable("pubsub.sub.soak-0")
        s = samples(obs.generate().decode())
        out = {dict(labels)["name"]: v for (name, labels), v in s.items() if name == "magnet_messages_out_total"}
        assert out == {"fetcher": 2, "magnet.listen": 3, "pubsub.sub.soak-0": 1, metrics.OTHER_NAMES: 4}
        assert s[("magnet_inflight", frozenset({("name", metrics.OTHER_NAMES)}))] == 0
        assert s[("magnet_unroutable_total", frozenset({("name", "pubsub.sub.soak-0")}))] == 1
        assert len(obs._names) == 3

    def test_multicast_copies_for_missing_addresses_are_counted(self) -> None:
        from magnet.testing import MemoryBroker

        broker = MemoryBroker()
        self.addCleanup(broker.stop)
        obs = PrometheusObserver()
        bus = broker.bus(observer=obs)
        self.successResultOf(broker.bus().declare_address("pubsub.sub.here"))
        d = bus.multicast(["pubsub.sub.here", "pubsub.sub.gone", "user.ann.1"], magnet.Message(body=b"x"))
        broker.flush()
        assert self.successResultOf(d).unroutable == ("pubsub.sub.gone", "user.ann.1")
        s = samples(obs.generate().decode())
        assert s[("magnet_unroutable_total", frozenset({("name", "pubsub.sub.gone")}))] == 1
        assert s[("magnet_unroutable_total", frozenset({("name", "user.*")}))] == 1  # people's names stay out
        assert ("magnet_unroutable_total", frozenset({("name", "pubsub.sub.here")})) not in s

    def test_direct_calls(self) -> None:
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

    def test_counts_bus_traffic_on_memory(self) -> None:
        clock = task.Clock()
        obs = PrometheusObserver()
        bus = magnet.connect(f"memory://metrics-{uuid.uuid4().hex}", clock, observer=obs, rpc_timeout=5,
                             retry_limit=0)

        @defer.inlineCallbacks
        def traffic() -> Any:
            bus.startService()
            try:
                yield bus.serve("echo", Echo())
                assert (yield bus.call("echo", "echo", value=1)) == 1
                assert (yield bus.call("echo", "echo", value="x")) == "x"
                try:
                    yield bus.call("echo", "boom")
                except magnet.RemoteError:
                    pass
                else:
                    raise AssertionError("boom did not fail")

                # a worker queue whose handler fails: retry_limit=0 dead-letters at once
                yield bus.declare_worker_queue("work")
                failed = defer.Deferred()

                def handler(message: Any) -> None:
                    clock.callLater(0, failed.callback, None)
                    raise ValueError("bad")

                yield bus.consume("work", handler)
                yield bus.send_json("work", {"n": 1})
                yield failed
                yield task.deferLater(clock, 0.2, lambda: None)
            finally:
                yield bus.stopService()

        drive(self, clock, traffic())
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

    def test_a_metric_that_cannot_count_does_not_fail_the_bus(self) -> None:
        events = LogEvents(self)
        obs = PrometheusObserver()

        class Broken:
            def labels(self, *values: str) -> Any:
                raise OSError(28, "No space left on device")

        obs.messages_in = Broken()  # type: ignore[assignment]
        obs.message_in("fetcher")
        obs.message_in("fetcher")
        obs.message_out("fetcher")
        assert b'magnet_messages_out_total{name="fetcher"} 1.0' in obs.generate()
        logged: List[str] = [formatEvent(e) for e in events.events
                             if str(e.get("log_namespace", "")).startswith("ooidx.node.metrics")]
        assert len([line for line in logged if "could not count" in line]) == 1
