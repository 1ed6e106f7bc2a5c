"""The operator's CLI and its config (issue 18): ports from --config, the
exchange's own URLs for `get`, `config init`, the example configs in the
package, errors that say what to do. No socket: the HTTP client and
http.client's connection are stand-ins."""
from __future__ import annotations

import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from typing import Any, Dict, List

import yaml
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from ooidx import cli, examples
from ooidx.config import load
from ooidx.errors import Forbidden
from ooidx.urlpolicy import check_url

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


#: the real client, before any test patches it
RealClient = cli.HttpClient


class FakeClient:
    """Records where the CLI would connect; answers like a one-node daemon."""

    made: List["FakeClient"] = []

    def __init__(self, url: str, token: Any, timeout: Any = None, config_path: Any = None) -> None:
        self.url, self.token, self.config_path = url, token, config_path
        FakeClient.made.append(self)

    def status(self) -> Any:
        return succeed([{"node": "n1", "pid": 1, "components": {"fetcher": {"started": True}}}])

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Any:
        return succeed({"service": service, "op": op})


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True))
        cwd = os.getcwd()
        os.chdir(self.dir)  # no etc/dx.yaml here
        self.addCleanup(os.chdir, cwd)
        FakeClient.made = []
        self.patch(cli, "HttpClient", FakeClient)

    def config(self, name: str = "dx.yaml", **http: Any) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            yaml.safe_dump({"data_dir": "data", "security": {"token": "t0ken-0123456789abcdef"}, "http": http}, f)
        return path

    def run_cli(self, *argv: str, environ: Any = None) -> tuple:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(list(argv), out, err, environ or {})
        return code, out.getvalue(), err.getvalue()


class PortsFromConfigTests(Base):
    def test_status_uses_the_config_web_port(self) -> None:
        path = self.config(web_port=9123, proxy_port=9124)
        code, out, err = self.run_cli("--config", path, "status")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(FakeClient.made[0].url, "http://127.0.0.1:9123")
        self.assertIn("fetcher", out)

    def test_the_config_from_the_environment(self) -> None:
        path = self.config(web_port=9200)
        self.run_cli("status", environ={"OOIDX_CONFIG": path})
        self.assertEqual(FakeClient.made[0].url, "http://127.0.0.1:9200")

    def test_url_and_environment_win_over_the_config(self) -> None:
        path = self.config(web_port=9123)
        self.run_cli("--config", path, "--url", "http://h:1", "status")
        self.run_cli("--config", path, "status", environ={"OOIDX_URL": "http://h:2"})
        self.assertEqual([c.url for c in FakeClient.made], ["http://h:1", "http://h:2"])

    def test_every_interface_is_reached_on_loopback(self) -> None:
        path = self.config(web_port=9300, interface="0.0.0.0")
        self.run_cli("--config", path, "status")
        self.assertEqual(FakeClient.made[0].url, "http://127.0.0.1:9300")

    def test_the_token_comes_from_the_same_config(self) -> None:
        path = self.config(web_port=9123)
        code, _, err = self.run_cli("--config", path, "call", "fetcher", "ping")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual((FakeClient.made[0].token, FakeClient.made[0].config_path), ("t0ken-0123456789abcdef", path))

    def test_a_missing_config_says_how_to_make_one(self) -> None:
        code, _, err = self.run_cli("--config", "nope.yaml", "status")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("nope.yaml: cannot read config", err)
        self.assertIn("ooidx config init nope.yaml", err)

    def test_without_a_config_the_defaults(self) -> None:
        self.run_cli("status")
        self.assertEqual(FakeClient.made[0].url, cli.DEFAULT_URL)


class FakeResponse:
    def __init__(self, body: bytes) -> None:
        self.status, self.reason, self.body = 200, "OK", io.BytesIO(body)

    def getheader(self, name: str) -> Any:
        return str(len(self.body.getvalue())) if name == "Content-Length" else None

    def read(self, n: int = -1) -> bytes:
        return self.body.read(n)


class FakeConnection:
    opened: List[Dict[str, Any]] = []

    def __init__(self, host: str, port: int, timeout: float = 0) -> None:
        self.record: Dict[str, Any] = {"host": host, "port": port, "headers": {}}
        FakeConnection.opened.append(self.record)

    def putrequest(self, method: str, target: str, **_: Any) -> None:
        self.record["target"] = target

    def putheader(self, name: str, value: str) -> None:
        self.record["headers"][name] = value

    def endheaders(self) -> None:
        pass

    def getresponse(self) -> FakeResponse:
        return FakeResponse(b"Dataset {\n} grid;\n")

    def close(self) -> None:
        pass


class GetTests(Base):
    def setUp(self) -> None:
        super().setUp()
        import http.client
        FakeConnection.opened = []
        self.patch(http.client, "HTTPConnection", FakeConnection)

    def get(self, *argv: str) -> Dict[str, Any]:
        out = os.path.join(self.dir, "out.dds")
        code, _, err = self.run_cli(*argv[:-1], "get", argv[-1], "-o", out)
        self.assertEqual((code, err.split(" bytes -> ")[-1].strip()), (0, out), err)
        return FakeConnection.opened[-1]

    def test_the_exchange_url_with_the_config_proxy_port(self) -> None:
        path = self.config(proxy_port=9124)
        sent = self.get("--config", path, "http://127.0.0.1:9124/datasets/grid.dds?lat")
        self.assertEqual((sent["host"], sent["port"], sent["target"]), ("127.0.0.1", 9124, "/datasets/grid.dds?lat"))

    def test_the_exchange_url_on_loopback_without_proxy_or_config(self) -> None:
        sent = self.get("http://localhost:18100/datasets/grid.dods")
        self.assertEqual((sent["host"], sent["port"], sent["target"]), ("localhost", 18100, "/datasets/grid.dods"))

    def test_another_url_still_goes_through_the_proxy(self) -> None:
        sent = self.get("http://data.example.org:8100/datasets/sst.dds")
        self.assertEqual((sent["host"], sent["port"]), ("127.0.0.1", 8100))
        self.assertEqual(sent["target"], "http://data.example.org:8100/datasets/sst.dds")

    def test_own_url_rule(self) -> None:
        own = cli._own_url
        self.assertEqual(own("http://127.0.0.1:8100/datasets/a.dds", "http://127.0.0.1:8100"),
                         ("http://127.0.0.1:8100", "/datasets/a.dds"))
        self.assertEqual(own("http://dx.example.org:8100/datasets/a.das?x", "http://dx.example.org:8100"),
                         ("http://dx.example.org:8100", "/datasets/a.das?x"))
        self.assertIsNone(own("http://dx.example.org:8100/other/a.das", "http://dx.example.org:8100"))
        self.assertIsNone(own("http://other.example.org:8100/datasets/a", "http://127.0.0.1:8100"))
        self.assertIsNone(own("https://127.0.0.1:8100/datasets/a", "http://127.0.0.1:8100"))


class ConfigInitTests(Base):
    def test_init_writes_a_commented_config_the_daemon_loads(self) -> None:
        path = os.path.join(self.dir, "sub", "dx.yaml")
        code, out, _ = self.run_cli("config", "init", path)
        self.assertEqual(code, 0)
        self.assertIn("twistd -n ooidx --config", out)
        text = open(path).read()
        self.assertGreater(text.count("#"), 50)  # commented key by key
        config = load(path, environ={})
        self.assertEqual(config.data_dir, os.path.join(self.dir, "sub", "var", "ooidx"))
        self.assertEqual(config.security.allow_hosts, ())
        self.assertFalse(config.security.allow_private)

    def test_every_example_loads(self) -> None:
        for name in examples.NAMES:
            path = os.path.join(self.dir, f"{name}.yaml")
            self.assertEqual(self.run_cli("config", "init", path, "--example", name)[0], 0)
            load(path, environ={"OOIDX_BROKER": "amqp://u:p@127.0.0.1/"})

    def test_an_existing_file_is_kept(self) -> None:
        path = os.path.join(self.dir, "dx.yaml")
        open(path, "w").write("mine\n")
        code, _, err = self.run_cli("config", "init", path)
        self.assertEqual(code, 1)
        self.assertIn("exists; keeping it (--force overwrites it)", err)
        self.assertEqual(open(path).read(), "mine\n")
        self.assertEqual(self.run_cli("config", "init", path, "--force")[0], 0)
        self.assertNotEqual(open(path).read(), "mine\n")

    def test_an_unknown_example(self) -> None:
        code, _, err = self.run_cli("config", "init", "x.yaml", "--example", "big")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("no example config 'big'; there are dx, dx-rabbitmq, node-edge, node-worker", err)

    def test_the_checkout_configs_are_the_package_examples(self) -> None:
        """One copy of each example: etc/NAME.yaml is a link to the file the
        package ships (ooidx/examples), so the two cannot drift."""
        for name in examples.NAMES:
            path = os.path.join(ROOT, "etc", f"{name}.yaml")
            self.assertTrue(os.path.islink(path), f"etc/{name}.yaml is not a link to ooidx/examples/{name}.yaml")
            self.assertEqual(os.path.realpath(path), os.path.join(ROOT, "ooidx", "examples", f"{name}.yaml"))
            with open(path) as f:
                self.assertEqual(examples.text(name), f.read())

    def test_the_examples_are_package_data(self) -> None:
        import configparser
        setup = configparser.ConfigParser()
        setup.read(os.path.join(ROOT, "setup.cfg"))
        data = setup["options.package_data"]
        self.assertEqual(data["ooidx.examples"].strip(), "*.yaml")
        self.assertEqual(data["ooidx.demo"].strip(), "data/*.nc")


class TwistdWithoutConfigTests(SynchronousTestCase):
    def test_a_missing_config_says_how_to_make_one(self) -> None:
        from ooidx.node import tap
        options = tap.Options()
        missing = os.path.join(tempfile.mkdtemp(), "etc", "dx.yaml")
        options.parseOptions(["--config", missing])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        text = str(caught.exception.code)
        self.assertIn(f"{missing}: cannot read config: No such file or directory", text)
        self.assertIn(f"ooidx config init {missing}", text)
        self.assertIn(str(examples.path("dx")), text)

    def test_a_bad_config_gets_no_such_hint(self) -> None:
        from ooidx.node import tap
        path = os.path.join(tempfile.mkdtemp(), "dx.yaml")
        open(path, "w").write("nosuchkey: 1\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertNotIn("config init", str(caught.exception.code))


class RefusalSaysWhatToDoTests(SynchronousTestCase):
    def test_loopback(self) -> None:
        with self.assertRaises(Forbidden) as caught:
            check_url("http://127.0.0.1:8099/grid.nc")
        text = str(caught.exception)
        self.assertIn("127.0.0.1: loopback address refused", text)
        self.assertIn('add "127.0.0.1:8099" to security.allow_hosts', text)
        self.assertIn("security.allow_private: true", text)

    def test_ipv6_entry_is_bracketed(self) -> None:
        with self.assertRaises(Forbidden) as caught:
            check_url("http://[::1]:8099/x")
        self.assertIn('add "[::1]:8099" to security.allow_hosts', str(caught.exception))

    def test_allowed_as_said(self) -> None:
        check_url("http://127.0.0.1:8099/grid.nc", allow_hosts=["127.0.0.1:8099"])

    def test_the_cli_names_the_config_it_read(self) -> None:
        client = cli.HttpClient("http://127.0.0.1:8080", "t", config_path="etc/dx.yaml")
        body = json.dumps({"error": {"type": "Forbidden", "message": str(self.forbidden())}}).encode()
        error = urllib.error.HTTPError("http://x/api/call", 403, "Forbidden", {}, io.BytesIO(body))  # type: ignore
        failure = client._http_error(error, True)
        self.assertIn("security.allow_hosts", str(failure))
        self.assertIn(f"(the config this command read: {os.path.abspath('etc/dx.yaml')})", str(failure))

    @staticmethod
    def forbidden() -> Forbidden:
        try:
            check_url("http://127.0.0.1:9/x")
        except Forbidden as e:
            return e
        raise AssertionError("not refused")


class UnreachableSaysWhereTests(Base):
    """No daemon answers: the CLI says where it looked, and how to start one."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(cli, "HttpClient", RealClient)

        class Opener:
            def open(self, *a: Any, **k: Any) -> Any:
                raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

        self.patch(urllib.request, "build_opener", lambda *a: Opener())

    def test_from_the_config(self) -> None:
        path = self.config(web_port=9123)
        code, _, err = self.run_cli("--config", path, "status")
        self.assertEqual(code, cli.EXIT_UNREACHABLE)
        self.assertIn("cannot reach the daemon at http://127.0.0.1:9123", err)
        self.assertIn(f"(the web port of {path}; is that daemon running? twistd -n ooidx --config {path})", err)

    def test_without_a_config(self) -> None:
        code, _, err = self.run_cli("status")
        self.assertEqual(code, cli.EXIT_UNREACHABLE)
        self.assertIn("`twistd -n ooidx --config FILE` or `ooidx demo` starts one", err)

    def test_demo_every_below_a_second(self) -> None:
        code, _, err = self.run_cli("demo", "--every", "0.5")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("--every takes 1 second or more", err)
