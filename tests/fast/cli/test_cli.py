"""ooidx.cli in-process, with no port and no subprocess: argument parsing and
usage errors, the HTTP client against a stand-in for urllib's opener (what it
sends, how each answer becomes an exit status), and the --broker client on a
memory:// bus driven by a task.Clock. The console entry point as a process,
and the HTTP client against a real web port, stay in tests/ooidx/test_cli.py."""
from __future__ import annotations

import io
import json
import sys
import urllib.error
import urllib.request
import uuid
from email.message import Message as Headers
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer, task

import magnet
from magnet import operation

from ooidx import cli
from ooidx.component import Component
from ooidx.node.bootstrap import declare_topology
from ooidx.node.token import TOKEN_FILE

from tests.fast.core.support import FastCase, cases, drive, expand

TOKEN = "cli-test-token-" + "y" * 20
URL = "http://dx.test:8080"


class Store:
    @operation
    def get(self, key: str) -> Any:
        return {"a": [1, 2]}[key]

    @operation
    def echo(self, **kwargs: Any) -> Any:
        return kwargs

    @operation
    def raw(self) -> bytes:
        return b"\x00raw\xff"


NODES = [
    {"node": "node-a", "pid": 11, "broker": "memory://", "components": {
        "fetcher": {"started": True, "instances": 2, "process": "inline"},
        "web": {"started": True, "instances": 1, "process": "inline"}}},
    {"node": "node-b", "pid": 22, "broker": "memory://", "components": {
        "csv": {"started": False, "instances": 3, "process": "child", "running": 1}}},
]


class Answer:
    """What urllib's opener gives back for a 200."""

    def __init__(self, body: bytes, content_type: str = "application/json") -> None:
        self._body = io.BytesIO(body)
        self.headers = Headers()
        self.headers["Content-Type"] = content_type

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)

    def readline(self, n: int = -1) -> bytes:
        return self._body.readline(n)

    def __enter__(self) -> "Answer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._body.close()


def http_error(request: urllib.request.Request, code: int, body: bytes, reason: str = "Nope") -> Exception:
    return urllib.error.HTTPError(request.full_url, code, reason, Headers(), io.BytesIO(body))


class Web:
    """A stand-in for the daemon's web port at the urllib level: each request
    is recorded and answered by C{answer(request)}."""

    def __init__(self, answer: Callable[[urllib.request.Request], Any]) -> None:
        self.answer = answer
        self.requests: List[Tuple[urllib.request.Request, Optional[float]]] = []

    def build_opener(self, *handlers: Any) -> "Web":
        assert any(isinstance(h, urllib.request.ProxyHandler) for h in handlers), "must never use a proxy"
        return self

    def open(self, request: urllib.request.Request, timeout: Optional[float] = None) -> Any:
        self.requests.append((request, timeout))
        result = self.answer(request)
        if isinstance(result, BaseException):
            raise result
        return result


def api(request: urllib.request.Request) -> Any:
    """A daemon's web API: /api/status open, /api/call with the token."""
    path = request.full_url[len(URL):]
    if path == "/api/status":
        return Answer(json.dumps({"nodes": NODES}).encode())
    if not path.startswith("/api/call/"):
        return http_error(request, 404, b'{"error": {"type": "NotFound", "message": "no such page"}}')
    if request.get_header("Authorization") != f"Bearer {TOKEN}":
        return http_error(request, 401, json.dumps({"error": {"type": "Unauthorized", "message": (
            "an operator token is required" if request.get_header("Authorization") is None
            else "the operator token is not valid")}}).encode())
    service, op = path[len("/api/call/"):].split("?")[0].split("/")
    kwargs = json.loads(request.data)
    if (service, op) == ("attribute_store", "echo"):
        return Answer(json.dumps({"result": kwargs}).encode())
    if (service, op) == ("attribute_store", "raw"):
        return Answer(b"\x00raw\xff", "application/octet-stream")
    if (service, op) == ("controller", "list"):
        return Answer(json.dumps({"result": [
            {"name": "sst", "status": "ok", "url": "http://up/sst.nc", "refresh": 60, "last_fetch": None,
             "hits": 3, "misses": 1}] if kwargs.get("pattern") != "none" else []}).encode())
    if (service, op) == ("controller", "register"):
        return Answer(json.dumps({"result": dict(kwargs)}).encode())
    if (service, op) in (("controller", "purge"), ("controller", "get_dataset")):
        return Answer(json.dumps({"result": {"name": kwargs["name"], "url": "http://up/x"}}).encode())
    if (service, op) == ("pub_sub", "list"):
        return Answer(json.dumps({"result": [{"name": "s1", "regex": "^a", "address": "q.s1"}]}).encode())
    if (service, op) == ("user_pub_sub", "list"):
        return Answer(json.dumps({"result": [{"person": "ann", "id": 7, "kind": "queue", "regex": "x"}]}).encode())
    if service == "user_notification":
        return http_error(request, 404, b'{"error": {"type": "UnknownService", "message": "nobody"}}')
    return http_error(request, 502, json.dumps({"error": {"type": "UnknownService",
                                                          "message": f"no {service}"}}).encode())


USAGE_ERRORS = [
    [],
    ["call"],
    ["call", "fetcher"],
    ["call", "fetcher", "ping", "novalue"],
    ["call", "fetcher", "ping", "=1"],
    ["call", "fetcher", "ping", "a=1", "a=2"],
    ["--timeout", "-1", "call", "fetcher", "ping"],
    ["--timeout", "nan", "call", "fetcher", "ping"],
    ["--url", "ftp://x", "call", "fetcher", "ping"],
    ["--broker", "memory://", "call", "fetcher", "ping"],
    ["--broker", "not a url", "status"],
    ["nosuchcommand"],
    ["datasets", "register", "sst"],
    ["datasets", "list", "sst"],
    ["datasets", "purge"],
    ["datasets", "purge", "sst", "http://x/"],
    ["datasets", "purge", "sst", "--refresh", "5"],
    ["datasets", "purge", "sst", "--pattern", "x"],
    ["datasets", "register", "sst", "http://x/", "--refresh", "0"],
    ["events", "--count", "0"],
    ["events", "--recent", "1001"],
    ["get", "ftp://x/y", "-o", "out"],
    ["get", "http://x/y", "-o", "out", "--proxy", "https://proxy/"],
    ["get", "http://x/a b", "-o", "out"],
]


@expand
class CliTests(FastCase):
    def setUp(self) -> None:
        self.web = Web(api)
        self.patch(urllib.request, "build_opener", self.web.build_opener)

    def run_cli(self, *argv: str, environ: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
        """(exit status, stdout, stderr) of cli.run in-process (argparse's
        own messages, which go to sys.stderr, included)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", err)
        code = cli.run(list(argv), stdout=out, stderr=err, environ=environ if environ is not None else {})
        return code, out.getvalue(), err.getvalue()

    # ---------------------------------------------------------------- units (moved)

    def test_parse_params(self) -> None:
        assert cli.parse_params(["a=1", "b=x", "c={\"k\": [1]}", "d=NaN", "e=[1"]) == {
            "a": 1, "b": "x", "c": {"k": [1]}, "d": "NaN", "e": "[1"}
        with self.assertRaises(cli.UsageError):
            cli.parse_params(["x"])

    def test_adding_a_subcommand_is_one_function_and_one_registration(self) -> None:
        @cli.command("hello", "say hello", cli.arg("--name", default="world"))
        def hello(ctx: cli.Context) -> defer.Deferred:
            ctx.print(f"hello {ctx.args.name}")
            return defer.succeed(None)

        try:
            out = io.StringIO()
            assert cli.run(["hello", "--name", "dx"], stdout=out, stderr=io.StringIO(), environ={}) == 0
            assert out.getvalue() == "hello dx\n"
            with self.assertRaises(ValueError):
                cli.command("hello", "again")(hello)
        finally:
            del cli.COMMANDS["hello"]

    # ---------------------------------------------------------------- usage

    @cases("args", USAGE_ERRORS)
    def test_usage_errors_are_exit_2(self, args: List[str]) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, *args)
        assert code == 2, (out, err)
        assert err
        assert all(isinstance(r, urllib.request.Request) and "/api/call/" not in r.full_url
                   for r, _ in self.web.requests)

    def test_help_is_exit_0(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        assert cli.run(["--help"], stdout=out, stderr=io.StringIO(), environ={}) == 0
        assert "exit status: 0 done" in out.getvalue()

    # ---------------------------------------------------------------- over HTTP

    def test_call_with_arguments(self) -> None:
        code, out, err = self.run_cli("--url", URL + "/", "--token", TOKEN, "--timeout", "2.5", "call",
                                      "attribute_store", "echo", "n=1", "x=2.5", "b=true", "z=null",
                                      "l=[1,\"x\"]", "s=plain text", "q=\"42\"", "e=", "eq=a=b")
        assert code == 0, err
        assert json.loads(out) == {"n": 1, "x": 2.5, "b": True, "z": None, "l": [1, "x"], "s": "plain text",
                                   "q": "42", "e": "", "eq": "a=b"}
        [(request, timeout)] = self.web.requests
        assert request.full_url == URL + "/api/call/attribute_store/echo?timeout=2.5"
        assert request.get_method() == "POST"
        assert request.get_header("Content-type") == "application/json"
        assert request.get_header("User-agent") == "ooidx-cli"
        assert timeout == 2.5 + cli.HTTP_GRACE

    def test_bytes_result_is_shown_readably_on_a_text_stream(self) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "call", "attribute_store", "raw")
        assert (code, out) == (0, "\x00raw\\xff"), err  # NUL is UTF-8; 0xff is not

    def test_url_and_token_from_the_environment(self) -> None:
        code, out, err = self.run_cli("call", "attribute_store", "echo", "a=1",
                                      environ={"OOIDX_URL": URL, "OOIDX_TOKEN": TOKEN})
        assert code == 0, err
        assert json.loads(out) == {"a": 1}

    def test_wrong_or_missing_token(self) -> None:
        code, _, err = self.run_cli("--url", URL, "--token", "wrong-token-wrong-token", "call", "fetcher", "ping")
        assert code == 1
        assert err == "error: Unauthorized: the operator token is not valid\n"
        tmp_path = self.tmp_path()
        code, _, err = self.run_cli("--url", URL, "--config", str(tmp_path / "none.yaml"), "call", "fetcher", "ping")
        assert code == 2
        assert "none.yaml" in err
        (tmp_path / "dx.yaml").write_text("data_dir: data\n")
        code, _, err = self.run_cli("--url", URL, "--config", str(tmp_path / "dx.yaml"), "call", "fetcher", "ping")
        assert code == 1
        assert err.startswith("error: Unauthorized: an operator token is required")
        assert "OOIDX_TOKEN" in err

    def test_token_from_the_config_s_data_directory(self) -> None:
        tmp_path = self.tmp_path()
        (tmp_path / "dx.yaml").write_text("data_dir: data\n")
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / TOKEN_FILE).write_text(TOKEN + "\n")
        code, out, err = self.run_cli("--url", URL, "--config", str(tmp_path / "dx.yaml"),
                                      "call", "attribute_store", "echo")
        assert (code, json.loads(out)) == (0, {}), err

    def test_token_from_the_default_config(self) -> None:
        tmp_path = self.tmp_path()
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "dx.yaml").write_text("broker: memory://\ndata_dir: ../var\n")
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / TOKEN_FILE).write_text(TOKEN + "\n")
        self.monkeypatch().chdir(tmp_path)
        code, out, err = self.run_cli("--url", URL, "call", "attribute_store", "echo", "k=v")
        assert code == 0, err
        assert json.loads(out) == {"k": "v"}

    @cases("argv, expected", [
        (["call", "nosuch", "ping"], "error: UnknownService: no nosuch\n"),
        (["call", "user_notification", "list"], "error: UnknownService: nobody\n"),
    ])
    def test_error_answers_are_exit_1(self, argv: List[str], expected: str) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, *argv)
        assert (code, out, err) == (1, "", expected)

    def test_an_error_page_that_is_not_json_names_the_http_status(self) -> None:
        self.web.answer = lambda request: http_error(request, 503, b"<html>busy</html>", "Service Unavailable")
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "call", "fetcher", "ping")
        assert (code, err) == (1, "error: HTTP 503: Service Unavailable\n")

    def test_no_token_and_a_401_says_where_a_token_comes_from(self) -> None:
        code, out, err = self.run_cli("--url", URL, "call", "fetcher", "ping")
        assert code == 1
        assert "no token found: set OOIDX_TOKEN, pass --token" in err

    @cases("answer, expected", [
        (lambda r: Answer(b"not json"), "error: BadReply: the answer to the call is not JSON\n"),
        (lambda r: Answer(b'{"no": "result"}'), "error: BadReply: the answer has no result\n"),
    ], ids=["not_json", "no_result"])
    def test_a_bad_reply_is_an_error(self, answer: Any, expected: str) -> None:
        self.web.answer = answer
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "call", "fetcher", "ping")
        assert (code, err) == (1, expected)

    @cases("error, expected", [
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
         "error: cannot reach the daemon at http://dx.test:8080: [Errno 111] Connection refused\n"),
        (urllib.error.URLError(TimeoutError("timed out")),
         "error: cannot reach the daemon at http://dx.test:8080: no answer within 65 s\n"),
        (OSError("network is down"), "error: cannot reach the daemon at http://dx.test:8080: network is down\n"),
    ], ids=["refused", "timeout", "oserror"])
    def test_an_unreachable_daemon_is_exit_3(self, error: Exception, expected: str) -> None:
        self.web.answer = lambda request: error
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "--timeout", "60", "call", "fetcher", "ping")
        assert (code, out, err) == (3, "", expected)

    def test_status_table_needs_no_token(self) -> None:
        code, out, err = self.run_cli("--url", URL, "status")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["NODE", "COMPONENT", "STARTED", "INSTANCES", "PROCESS", "PID"]
        assert [line.split() for line in lines[1:]] == [
            ["node-a", "fetcher", "yes", "2", "inline", "11"],
            ["node-a", "web", "yes", "1", "inline", "11"],
            ["node-b", "csv", "NO", "1/3", "child", "22"],
        ]
        [(request, _)] = self.web.requests
        assert request.get_header("Authorization") is None

    def test_status_json(self) -> None:
        code, out, err = self.run_cli("--url", URL, "status", "--json")
        assert code == 0, err
        assert [n["node"] for n in json.loads(out)] == ["node-a", "node-b"]

    @cases("body, expected", [
        (b'{"nodes": []}', "error: no daemon answered the status request\n"),
        (b'{"nodes": 5}', "error: BadReply: the status answer has no list of nodes\n"),
        (b"[]", "error: BadReply: the status answer has no list of nodes\n"),
    ])
    def test_status_without_nodes_is_an_error(self, body: bytes, expected: str) -> None:
        self.web.answer = lambda request: Answer(body)
        code, out, err = self.run_cli("--url", URL, "status")
        assert (code, err) == (1, expected)

    def test_format_status_shows_nodes_without_components_and_bare_flags(self) -> None:
        table = cli.format_status([{"node": "n", "pid": 1, "components": {}},
                                   {"node": "m", "components": {"web": True, "csv": 0}}])
        assert [line.split() for line in table.splitlines()[1:]] == [
            ["n", "-", "-", "-", "-", "1"],
            ["m", "csv", "NO", "-", "-", "-"],
            ["m", "web", "yes", "-", "-", "-"],
        ]

    # ---------------------------------------------------------------- datasets, subscriptions

    def test_datasets_list_table_and_json(self) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list")
        assert code == 0, err
        header, row = out.splitlines()
        assert header.split() == ["NAME", "STATUS", "URL", "REFRESH", "LAST", "FETCH", "HITS", "MISSES"]
        assert row.split() == ["sst", "ok", "http://up/sst.nc", "60s", "-", "3", "1"]
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list", "--json")
        assert json.loads(out)[0]["name"] == "sst"
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list", "--pattern", "none")
        assert (code, out) == (0, "no datasets registered\n")
        assert json.loads(self.web.requests[-1][0].data) == {"pattern": "none"}

    def test_datasets_register_purge_refresh(self) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "register", "sst",
                                      "http://up/sst.nc", "--refresh", "90")
        assert (code, out) == (0, "registered sst: http://up/sst.nc (refresh every 90 s)\n"), err
        assert json.loads(self.web.requests[-1][0].data) == {"name": "sst", "url": "http://up/sst.nc",
                                                             "refresh": 90.0}
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "register", "sst", "http://up/x")
        assert out == "registered sst: http://up/x\n"
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "purge", "sst")
        assert (code, out) == (0, "purged sst\n")
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "refresh", "sst")
        assert (code, out) == (0, "fetching sst from http://up/x\n")
        assert self.web.requests[-1][0].full_url == URL + "/api/call/controller/get_dataset"

    def test_format_datasets_shows_times(self) -> None:
        table = cli.format_datasets([{"name": "a", "last_fetch": 0}])
        row = table.splitlines()[1].split()
        assert row[:4] == ["a", "?", "?", "-"] and row[-2:] == ["0", "0"]
        assert len(row) == 8  # the date and the time of last_fetch

    def test_subscriptions_of_pub_sub_and_people(self) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "subscriptions")
        assert code == 0, err
        assert "note: user_notification: UnknownService: nobody" in err
        blocks = out.split("\n\n")
        assert [line.split() for line in blocks[0].splitlines()] == [["NAME", "REGEX", "ADDRESS"],
                                                                    ["s1", "^a", "q.s1"]]
        assert [line.split() for line in blocks[1].splitlines()] == [
            ["PERSON", "ID", "KIND", "REGEX", "WEBHOOK"], ["ann", "7", "queue", "x", "-"]]
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "subscriptions", "--no-people", "--json")
        assert json.loads(out) == {"pub_sub": [{"name": "s1", "regex": "^a", "address": "q.s1"}], "people": []}

    def test_subscriptions_stop_when_the_daemon_is_gone(self) -> None:
        def answer(request: urllib.request.Request) -> Any:
            if "/pub_sub/" in request.full_url:
                return Answer(b'{"result": []}')
            return urllib.error.URLError("gone")

        self.web.answer = answer
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "subscriptions")
        assert code == 3 and "cannot reach the daemon" in err

    # ---------------------------------------------------------------- events over HTTP (SSE)

    def test_events_over_http_reads_the_stream(self) -> None:
        stream = (b": keep-alive\n\n"
                  b"data: {\"topic\": \"event.saved.sst\", \"node\": \"n1\", \"time\": 0, \"bytes\": 5}\n\n"
                  b"data: not json\n\n"
                  b"data: [1,\ndata: 2]\n\n"
                  b"data: {\"topic\": \"never.shown\"}\n\n")
        self.web.answer = lambda request: Answer(stream, "text/event-stream")
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "events", "^event\\.", "--recent", "5",
                                      "--count", "2")
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 2
        assert lines[0].split()[2:] == ["event.saved.sst", "n1", '{"bytes":', "5}"]
        assert lines[1] == "[1, 2]"
        [(request, _)] = self.web.requests
        assert request.full_url == URL + "/api/events/stream?regex=%5Eevent%5C.&recent=5"
        assert request.get_header("Authorization") == f"Bearer {TOKEN}"
        assert request.get_header("Accept") == "text/event-stream"

    def test_events_json_and_a_stream_that_ends(self) -> None:
        self.web.answer = lambda request: Answer(b"data: {\"topic\": \"a\"}\n\n", "text/event-stream")
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "events", "--json")
        assert code == 3
        assert json.loads(out) == {"topic": "a"}
        assert err == "error: the daemon at http://dx.test:8080 closed the event stream\n"

    def test_events_refused_or_unreachable(self) -> None:
        self.web.answer = lambda request: http_error(
            request, 400, b'{"error": {"type": "InvalidRegex", "message": "bad regex"}}')
        assert self.run_cli("--url", URL, "--token", TOKEN, "events", "(")[::2] == (
            1, "error: InvalidRegex: bad regex\n")
        self.web.answer = lambda request: urllib.error.URLError("refused")
        assert self.run_cli("--url", URL, "events")[::2] == (
            3, "error: cannot reach the daemon at http://dx.test:8080: refused\n")

    def test_format_event(self) -> None:
        assert cli.format_event([1]) == "[1]"
        assert cli.format_event({"topic": "t"}) == "-  t  -"

    def test_progress_bar(self) -> None:
        assert cli.progress_bar(512, None, 0) == "512 B "
        assert cli.progress_bar(1536, 3072, 1.0, width=4) == "[##  ] 1.5 KiB / 3.0 KiB  50% 1.5 KiB/s"
        assert cli.progress_bar(5 << 30, None, 1.0) == "5.0 GiB 5.0 GiB/s"


class Bus:
    """A bus with components, as a daemon would have them (memory://, on a Clock)."""

    def __init__(self, case: FastCase) -> None:
        self.case = case
        self.clock = task.Clock()
        self.bus = magnet.connect(f"memory://cli-{uuid.uuid4().hex}", self.clock, rpc_timeout=5)
        self.fetcher = Component("fetcher", self.bus, node="node-a")

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.fetcher.start()
        yield self.bus.serve("attribute_store", Store())

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.fetcher.stopService()
        yield self.bus.stopService()

    def run(self, d: Any) -> Any:
        return drive(self.case, self.clock, d)


class BrokerClientTests(FastCase):
    def setUp(self) -> None:
        self.daemon = Bus(self)
        self.daemon.run(self.daemon.start())
        self.addCleanup(lambda: self.daemon.run(self.daemon.stop()))

    def ctx(self, out: io.StringIO, *argv: str) -> cli.Context:
        args = cli.parser().parse_args(list(argv))
        return cli.Context(args, cli.BrokerClient(self.daemon.bus, timeout=2), out, io.StringIO())

    def test_broker_client(self) -> None:
        out = io.StringIO()
        run = self.daemon.run
        run(cli.COMMANDS["call"].run(self.ctx(out, "call", "fetcher", "ping")))
        assert json.loads(out.getvalue())["node"] == "node-a"
        with self.assertRaises(cli.RemoteFailure) as e:
            run(cli.COMMANDS["call"].run(self.ctx(out, "call", "attribute_store", "get", "key=nope")))
        assert (e.exception.kind, e.exception.code) == ("KeyError", cli.EXIT_ERROR)
        with self.assertRaises(cli.RemoteFailure) as e:
            run(cli.COMMANDS["call"].run(self.ctx(out, "call", "distributor", "ping")))
        assert e.exception.kind == "Unroutable"
        with self.assertRaises(cli.CliError) as e:  # no daemon on this bus answers the control fanout
            run(cli.COMMANDS["status"].run(self.ctx(out, "status")))
        assert "no daemon answered" in str(e.exception)

    def test_wrong_arguments_are_a_remote_bad_arguments(self) -> None:
        out = io.StringIO()
        with self.assertRaises(cli.CliError) as e:
            self.daemon.run(cli.COMMANDS["call"].run(self.ctx(out, "call", "attribute_store", "get", "k=1")))
        assert (e.exception.kind, e.exception.code) == ("BadArguments", cli.EXIT_ERROR)
        assert "missing a required argument: 'key'" in str(e.exception)

    def test_events_on_the_broker(self) -> None:
        from ooidx import events

        out = io.StringIO()
        ctx = self.ctx(out, "events", "^event\\.saved\\.", "--count", "2", "--json")
        d = cli.COMMANDS["events"].run(ctx)
        self.daemon.run(defer.succeed(None))  # subscribed
        for kind, dataset in (("saved", "a"), ("fetched", "x"), ("saved", "b"), ("saved", "c")):
            events.emit(self.daemon.bus, kind, dataset)
        self.daemon.run(d)
        assert [json.loads(line)["topic"] for line in out.getvalue().splitlines()] == ["event.saved.a",
                                                                                     "event.saved.b"]

    def test_events_on_the_broker_refuse_recent_and_bad_regexes(self) -> None:
        out = io.StringIO()
        with self.assertRaises(cli.UsageError):
            self.daemon.run(cli.COMMANDS["events"].run(self.ctx(out, "events", "--recent", "3")))
        with self.assertRaises(cli.UsageError):
            self.daemon.run(cli.COMMANDS["events"].run(self.ctx(out, "events", "(")))
