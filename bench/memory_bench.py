"""Group C{memory}: the resident size of an exchange node, idle and while 1 GiB streams through.

The environment is the proxy group's (L{bench.proxy_bench.Environment}): one
`twistd -n ooidx` node on memory:// with the whole data path (attribute_store,
controller, two fetchers, cache, proxyng, csv, web), a pydap upstream and a
twisted.web static server.

Sides:
  - C{ooidx} (subject): the node process.
  - C{static}: the twisted.web static server: the smallest Twisted HTTP
    server, the floor for a process that serves HTTP.

Rows (MB, resident set size from /proc/PID/status; lower is better, so a
ratio above 1 is how many times the baseline's size the node takes):
  1. idle RSS: no traffic; the mean over the measured window.
  2. peak RSS while 1 GiB streams through: one download of a 1 GiB body
     (through the proxy: upstream -> fetcher -> bus -> proxy -> client; for
     the static server: its own sparse file); the running peak. Bounded means
     this stays near the idle figure, whatever the size of the body.

The harness measures rates, so each load adds "RSS x elapsed seconds" to its
count: the rate is then the mean (idle) or the settled running peak (streaming).
"""
from __future__ import annotations

import time
from typing import Any, List

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from bench.harness import Benchmark, Group, Load, Settings
from bench.proxy_bench import Environment, RssLoad, download_argv


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class IdleRss(Load):
    """No traffic; C{completed} grows by the process's RSS (MB) times elapsed seconds."""

    def __init__(self, reactor: Any, pid: int) -> None:
        super().__init__(reactor)
        self.reactor = reactor
        self.pid = pid
        self._sampler: Any = None
        self._last = 0.0

    def _sample(self) -> None:
        now = time.perf_counter()
        self.completed += rss_mb(self.pid) * (now - self._last)
        self._last = now

    def _begin(self) -> None:
        self._last = time.perf_counter()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self.reactor
        self._sampler.start(0.05, now=True)

    def _drained(self) -> Deferred:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        return defer.succeed(None)


class _Side:
    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.env: Any = None

    def open(self) -> None:
        self.env = Environment.get()

    def close(self) -> None:
        pass

    def idle(self) -> Load:
        return IdleRss(self.reactor, self.pid())

    def streaming(self) -> Load:
        return RssLoad(self.reactor, self.big_argv(), self.pid())

    def pid(self) -> int:
        raise NotImplementedError

    def big_argv(self) -> List[str]:
        raise NotImplementedError


class NodeSide(_Side):
    def pid(self) -> int:
        return self.env.node.pid

    def big_argv(self) -> List[str]:
        return download_argv(self.env.big_direct, self.env.proxy)


class StaticSide(_Side):
    def pid(self) -> int:
        return self.env.static_proc.pid

    def big_argv(self) -> List[str]:
        return download_argv(f"{self.env.static}/big.bin")


def group() -> Group:
    return Group(
        name="memory",
        description="resident size of an exchange node (all components, memory://), idle and while 1 GiB "
                    "streams through, against a twisted.web static server",
        subject="ooidx",
        baselines=["static"],
        sides={"ooidx": NodeSide, "static": StaticSide},
        benchmarks=[
            Benchmark("idle RSS", "MB", lambda side: defer.succeed(side.idle())),
            Benchmark("peak RSS while 1 GiB streams through", "MB", lambda side: defer.succeed(side.streaming())),
        ],
    )
