"""The fetcher's transfers are bounded on their own (max_transfers), apart
from the bus's message slots: a fetch request is settled as soon as its
transfer starts; past the bound it waits for a transfer to end. And the new
limits are config options with validation. No broker, no port, no sleep."""
from __future__ import annotations

from typing import Any, List

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from ooidx.config import ConfigError, FetcherOptions, ProxyOptions, SecurityConfig, parse
from ooidx.datapath.fetcher import Fetcher


class FakeAgent:
    """request() answers only when the test says so."""

    def __init__(self) -> None:
        self.requests: List[Deferred] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append(d)
        return d


class FakeBus:
    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.sent: List[Any] = []

    def send(self, address: str, message: Any) -> Deferred:
        self.sent.append((address, message))
        return succeed(None)

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return succeed(None)


def make_fetcher(max_transfers: int) -> Any:
    clock = task.Clock()
    bus = FakeBus(clock)
    fetcher = Fetcher("fetcher", bus, node="n", clock=clock,
                      options=FetcherOptions(timeout=30.0, max_transfers=max_transfers),
                      security=SecurityConfig(allow_hosts=("data.example.org",)))
    agent = FakeAgent()
    fetcher._agent = agent
    return fetcher, agent, bus, clock


class TransferBoundTests(SynchronousTestCase):
    def fetch(self, fetcher: Fetcher, n: int) -> Deferred:
        return fetcher.fetch(url=f"http://data.example.org/{n}.dods", method="GET", address=f"reply.{n}",
                             request_id=f"r{n}")

    def test_settled_at_the_end_and_bounded_on_their_own(self) -> None:
        fetcher, agent, bus, clock = make_fetcher(max_transfers=2)
        self.assertEqual(fetcher.prefetch, 2)  # its consumer takes as many requests as it runs transfers
        first, second, third = (self.fetch(fetcher, n) for n in range(3))
        # the first two are running (the upstream has not answered yet): their requests are not settled
        # (a fetcher that dies now leaves them to the broker for another fetcher)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(fetcher.active, 2)
        # the third waits for room
        self.assertNoResult(third)
        self.assertEqual(len(agent.requests), 2)
        # a transfer ends (refused upstream: an error reply at its address): its request is
        # settled with the summary, and the third starts
        agent.requests[0].errback(ConnectionRefusedError())
        summary = self.successResultOf(first)
        self.assertEqual((summary["error"], summary["status"]), ("UpstreamError", 502))
        self.assertNoResult(third)
        self.assertEqual(len(agent.requests), 3)
        self.assertEqual(bus.sent[0][0], "reply.0")
        # every transfer ends (here: no answer within the fetch timeout): nothing is left
        clock.advance(30.0)
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual((fetcher.active, fetcher.room.tokens, fetcher._running), (0, 2, set()))
        self.assertEqual(sorted(address for address, _ in bus.sent), ["reply.0", "reply.1", "reply.2"])

    def test_stop_waits_for_running_transfers_bounded(self) -> None:
        fetcher, agent, bus, clock = make_fetcher(max_transfers=4)
        self.fetch(fetcher, 0)
        stopped = fetcher.tearDown()
        self.assertNoResult(stopped)
        agent.requests[0].errback(ConnectionRefusedError())
        self.successResultOf(stopped)
        # a transfer that does not end in time does not hold the stop for ever
        fetcher, agent, bus, clock = make_fetcher(max_transfers=4)
        fetcher.options = FetcherOptions(timeout=1000.0, max_transfers=4)
        self.fetch(fetcher, 0)
        stopped = fetcher.tearDown()
        clock.advance(10.0)
        self.successResultOf(stopped)


class ConfigTests(SynchronousTestCase):
    def parse(self, components: str) -> Any:
        return parse(f"node: n\ncomponents:\n{components}", "/etc/ooidx/dx.yaml", environ={})

    def test_defaults_and_values(self) -> None:
        config = self.parse("  fetcher:\n  proxyng:\n")
        self.assertEqual(config.components["fetcher"].options.max_transfers, 64)
        self.assertEqual(config.components["proxyng"].options,
                         ProxyOptions(max_per_client=100, stall_timeout=5.0))
        config = self.parse("  fetcher: {max_transfers: 5}\n  proxyng: {max_per_client: 4, stall_timeout: 2.5,"
                            " port: 0}\n")
        self.assertEqual(config.components["fetcher"].options.max_transfers, 5)
        self.assertEqual(config.components["proxyng"].options, ProxyOptions(0, None, 4, 2.5))

    def test_bad_values_are_one_line_errors(self) -> None:
        for text, key in [("  fetcher: {max_transfers: 0}\n", "components.fetcher.max_transfers"),
                          ("  fetcher: {max_transfers: many}\n", "components.fetcher.max_transfers"),
                          ("  proxyng: {max_per_client: 0}\n", "components.proxyng.max_per_client"),
                          ("  proxyng: {stall_timeout: 0}\n", "components.proxyng.stall_timeout"),
                          ("  proxyng: {stall_timeout: .nan}\n", "components.proxyng.stall_timeout"),
                          ("  web: {stall_timeout: 3}\n", "components.web.stall_timeout")]:
            with self.assertRaises(ConfigError) as caught:
                self.parse(text)
            self.assertIn(key, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
