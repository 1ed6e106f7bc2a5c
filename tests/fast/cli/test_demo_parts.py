"""The demo's parts without sockets (issue 18): its config allows only its own
upstream, the default still refuses loopback; the sample files (shipped, small,
CF, new values each step); the upstream's WSGI answers; and a status round
that ends as soon as the expected nodes answered (Clock-driven)."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from magnet import Message
from ooidx import cli
from ooidx.config import load, parse
from ooidx.demo import sample
from ooidx.demo.run import DemoOptions, commands, config_text
from ooidx.demo.upstream import DapFiles
from ooidx.node.daemon import STATUS_REPLY, cluster_status

ROOT = Path(__file__).resolve().parents[3]


class DemoConfigTests(SynchronousTestCase):
    def test_the_demo_config_allows_its_upstream_and_nothing_else(self) -> None:
        options = DemoOptions(directory=Path("/tmp/demo"), upstream_port=18099, web_port=18080, proxy_port=18100)
        config = parse(config_text(options), "/tmp/demo/demo.yaml", environ={})
        self.assertEqual(config.security.allow_hosts, ("127.0.0.1:18099",))
        self.assertFalse(config.security.allow_private)
        self.assertEqual((config.http.web_port, config.http.proxy_port), (18080, 18100))
        self.assertEqual(config.data_dir, "/tmp/demo/var")
        self.assertEqual(config.broker, ("memory://",))

    def test_the_default_still_refuses_loopback(self) -> None:
        config = load(str(ROOT / "etc" / "dx.yaml"), environ={})
        self.assertEqual(config.security.allow_hosts, ())
        self.assertFalse(config.security.allow_private)

    def test_the_three_commands(self) -> None:
        options = DemoOptions(directory=Path("d"), web_port=1, proxy_port=2)
        self.assertEqual(commands(options, " --config d/demo.yaml"),
                         ["ncdump -h http://127.0.0.1:2/datasets/grid", "xdg-open http://127.0.0.1:1/",
                          "ooidx --config d/demo.yaml events"])

    def test_not_through_a_broker(self) -> None:
        err = io.StringIO()
        code = cli.run(["--broker", "amqp://guest:guest@127.0.0.1/", "demo"], io.StringIO(), err, {})
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("demo does not go through --broker", err.getvalue())


class SampleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_shipped_small_and_cf(self) -> None:
        import netCDF4
        files = sample.shipped()
        self.assertEqual(sorted(files), sorted(sample.NAMES))
        self.assertLess(sum(p.stat().st_size for p in files.values()), 1 << 20)
        kinds = {}
        for name, path in files.items():
            with netCDF4.Dataset(path) as ds:
                self.assertEqual(ds.Conventions, "CF-1.8")
                kinds[name] = ds.featureType
                for var in ds.variables.values():
                    self.assertTrue(var.dimensions, f"{name}: {var.name} is a scalar (pydap cannot send it)")
                    self.assertTrue(hasattr(var, "units"), f"{name}: {var.name} has no units")
        self.assertEqual(kinds, {"timeseries": "timeSeries", "profile": "profile", "grid": "grid"})

    def test_the_shipped_files_are_step_0(self) -> None:
        import netCDF4
        made = sample.write_all(self.dir, 0)
        for name, path in sample.shipped().items():
            with netCDF4.Dataset(path) as a, netCDF4.Dataset(made[name]) as b:
                for var in a.variables:
                    self.assertEqual(a[var][:].tolist(), b[var][:].tolist(), f"{name}.{var}: run scripts/make-demo-data")

    def test_each_step_has_new_values(self) -> None:
        import netCDF4
        first = sample.write_all(self.dir / "a", 1)
        second = sample.write_all(self.dir / "b", 2)
        for name in sample.NAMES:
            with netCDF4.Dataset(first[name]) as a, netCDF4.Dataset(second[name]) as b:
                self.assertNotEqual(a["time"][:].tolist(), b["time"][:].tolist(), name)
        self.assertEqual(sorted(os.listdir(self.dir / "a")), ["grid.nc", "profile.nc", "timeseries.nc"])

    def test_an_unknown_name(self) -> None:
        with self.assertRaises(ValueError):
            sample.write_one(self.dir, "nope", 0)


class UpstreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        sample.write_all(self.dir, 0)

    def get(self, path: str, query: str = "") -> tuple:
        status: List[Any] = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
                   "SERVER_PORT": "8099", "SCRIPT_NAME": "", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
                   "wsgi.errors": io.StringIO(), "SERVER_PROTOCOL": "HTTP/1.1"}
        body = b"".join(DapFiles(self.dir)(environ, lambda s, h, e=None: status.append(s)))
        return status[0], body

    def test_dds_das_dods(self) -> None:
        status, body = self.get("/grid.nc.dds")
        self.assertEqual(status, "200 OK")
        self.assertIn(b"Float32 sst[time = 6][lat = 40][lon = 40];", body)
        status, body = self.get("/timeseries.nc.das")
        self.assertIn(b'standard_name "sea_water_temperature"', body)
        status, body = self.get("/profile.nc.dods", "depth")
        self.assertEqual(status, "200 OK")
        self.assertIn(b"\nData:\n", body)

    def test_unknown(self) -> None:
        self.assertEqual(self.get("/nope.nc.dds")[0], "404 Not Found")
        self.assertEqual(self.get("/../etc/passwd")[0], "404 Not Found")
        status, body = self.get("/")
        self.assertIn(b"/grid.nc", body)


class FakeBus:
    """listen/declare_fanout/send of a bus; nodes answer a status request when told."""

    def __init__(self) -> None:
        self.handler: Optional[Callable[[Message], None]] = None
        self.request: Optional[Message] = None
        self.closed = False

    def listen(self, handler: Callable[[Message], None]) -> Any:
        self.handler = handler
        bus = self

        class Listener:
            address = "reply-here"

            def close(self) -> Any:
                bus.closed = True
                return succeed(None)

        return succeed(Listener())

    def declare_fanout(self, name: str) -> Any:
        return succeed(None)

    def send(self, address: str, message: Message, mandatory: bool = True) -> Any:
        self.request = message
        return succeed(None)

    def answer(self, node: str) -> None:
        assert self.handler is not None and self.request is not None
        self.handler(Message.of_json({"node": node, "pid": 1}, type=STATUS_REPLY,
                                     correlation_id=self.request.correlation_id))


class ClusterStatusTests(SynchronousTestCase):
    def test_returns_once_the_expected_nodes_answered(self) -> None:
        bus, clock = FakeBus(), Clock()
        result: List[Any] = []
        cluster_status(bus, 1.5, clock, expect={"a", "b"}).addBoth(result.append)
        bus.answer("b")
        self.assertEqual(result, [])
        bus.answer("a")
        self.assertEqual([[r["node"] for r in result[0]]], [["a", "b"]])
        self.assertTrue(bus.closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_without_expectations_it_waits_the_timeout(self) -> None:
        bus, clock = FakeBus(), Clock()
        result: List[Any] = []
        cluster_status(bus, 1.5, clock).addBoth(result.append)
        bus.answer("a")
        clock.advance(1.4)
        self.assertEqual(result, [])
        clock.advance(0.1)
        self.assertEqual([r["node"] for r in result[0]], ["a"])

    def test_a_missing_node_costs_the_timeout_not_more(self) -> None:
        bus, clock = FakeBus(), Clock()
        result: List[Any] = []
        cluster_status(bus, 1.5, clock, expect={"a", "gone"}).addBoth(result.append)
        bus.answer("a")
        clock.advance(1.5)
        self.assertEqual([r["node"] for r in result[0]], ["a"])
