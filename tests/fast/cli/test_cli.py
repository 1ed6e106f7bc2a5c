"""ooidx.cli in-process, with no port and no subprocess: argument parsing and
usage errors, the HTTP client against a stand-in for urllib's opener (what it
sends, how each answer becomes an exit status), and the --broker client on a
memory:// bus driven by a task.Clock. The console entry point as a process,
and the HTTP client against a real web port, stay in tests/ooidx/test_cli.py."""
from __future__ import annotations

import io
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from email.message import Message as Headers
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer, task

import magnet

from ooidx import cli
from ooidx.component import Component
from ooidx.node.bootstrap import declare_topology
from ooidx.node.token import TOKEN_FILE

from tests.fast.core.support import FastCase, cases, drive, expand
from tests.support.doubles import EchoStore

TOKEN = "cli-test-token-" + "y" * 20
URL = "http://dx.test:8080"


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
        return Answer(json.dumps({"result": dict(kwargs, **({"replaced": "http://old/x"} if kwargs.get("replace")
                                                            else {}))}).encode())
    if (service, op) == ("controller", "get"):
        return Answer(json.dumps({"result": {"name": kwargs["name"], "url": "http://up/x", "status": "failed",
                                             "stale": True, "expect_every": 3600,
                                             "last_error": {"reason": "the upstream answered 404", "time": 0}}}
                                 ).encode())
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
        # the reason, then a hint of what to do (is a daemon running; where the CLI looked)
        assert (code, out) == (3, ""), err
        assert err.startswith(expected.rstrip("\n") + " (is a daemon running?"), err
        assert err.endswith(")\n") and err.count("\n") == 1, err

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
        assert header.split() == ["NAME", "STATUS", "URL", "REFRESH", "LAST", "FETCH", "HITS", "MISSES", "LAST",
                                  "ERROR"]
        assert row.split() == ["sst", "ok", "http://up/sst.nc", "60s", "-", "3", "1", "-"]
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list", "--json")
        assert json.loads(out)[0]["name"] == "sst"
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list", "--pattern", "none")
        assert (code, out) == (0, "no datasets registered\n")
        assert json.loads(self.web.requests[-1][0].data) == {"pattern": "none"}

    def test_datasets_register_check_replace_expect_every_and_show(self) -> None:
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "register", "sst", "http://up/x",
                                      "--no-check", "--replace", "--expect-every", "3600")
        assert (code, out) == (0, "registered sst: http://up/x (replaced http://old/x)\n"), err
        assert json.loads(self.web.requests[-1][0].data) == {"name": "sst", "url": "http://up/x", "check": False,
                                                             "replace": True, "expect_every": 3600.0}
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "show", "sst")
        assert code == 0, err
        assert "status: failed (stale: no new version in time)" in out
        assert "expect every: 3600 s" in out and "the upstream answered 404" in out
        code, out, err = self.run_cli("--url", URL, "--token", TOKEN, "datasets", "list", "--no-check")
        assert code != 0 and "--no-check" in err

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
        assert row[:4] == ["a", "?", "?", "-"] and row[-3:] == ["0", "0", "-"]
        assert len(row) == 9  # the date and the time of last_fetch

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
        code, _, err = self.run_cli("--url", URL, "events")
        assert code == 3 and err.startswith("error: cannot reach the daemon at http://dx.test:8080: refused ("), err

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
        self.bus_url = f"memory://cli-{uuid.uuid4().hex}"
        self.bus = magnet.connect(self.bus_url, self.clock, rpc_timeout=5)
        self.fetcher = Component("fetcher", self.bus, node="node-a")

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.fetcher.start()
        yield self.bus.serve("attribute_store", EchoStore())

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
            run(cli.COMMANDS["call"].run(self.ctx(out, "call", "notification", "ping")))
        assert e.exception.kind == "Unroutable"  # no notification runs
        # a fanout component that runs answers ping (on its NAME.ops queue; issue 18)
        notification = Component("notification", self.daemon.bus, node="node-a")
        run(notification.start())
        try:
            out = io.StringIO()
            run(cli.COMMANDS["call"].run(self.ctx(out, "call", "notification", "ping")))
            assert json.loads(out.getvalue())["component"] == "notification"
        finally:
            run(notification.stopService())
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


class ProxyAnswer:
    """What http.client's getresponse gives: a status, headers, a body read in chunks."""

    def __init__(self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None,
                 reason: str = "OK", break_after: Optional[int] = None) -> None:
        self.status, self.reason = status, reason
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._body = io.BytesIO(body)
        self.break_after = break_after

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name.lower(), default)

    def read(self, n: int = -1) -> bytes:
        if self.break_after is not None and self._body.tell() >= self.break_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        if self.break_after is not None:
            n = min(n, self.break_after - self._body.tell())
        return self._body.read(n)


class Proxy:
    """A stand-in for http.client.HTTPConnection to the exchange's proxy."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.connections: List["Proxy.Connection"] = []

    def __call__(self, host: str, port: int, timeout: Optional[float] = None) -> "Proxy.Connection":
        connection = Proxy.Connection(self, host, port, timeout)
        self.connections.append(connection)
        return connection

    class Connection:
        def __init__(self, proxy: "Proxy", host: str, port: int, timeout: Optional[float]) -> None:
            self.proxy, self.host, self.port, self.timeout = proxy, host, port, timeout
            self.request: Optional[Tuple[str, str]] = None
            self.headers: Dict[str, str] = {}
            self.closed = False

        def putrequest(self, method: str, target: str, skip_host: bool = False,
                       skip_accept_encoding: bool = False) -> None:
            assert skip_host and skip_accept_encoding
            self.request = (method, target)

        def putheader(self, name: str, value: str) -> None:
            self.headers[name] = value

        def endheaders(self) -> None:
            pass

        def getresponse(self) -> Any:
            answer = self.proxy.answer(self)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        def close(self) -> None:
            self.closed = True


@expand
class GetTests(FastCase):
    """ooidx get: a download through the proxy into a file, never half-written."""

    BODY = bytes(range(256)) * 800  # 200 KiB

    def setUp(self) -> None:
        import http.client

        self.proxy = Proxy(lambda c: ProxyAnswer(200, self.BODY, {"Content-Length": str(len(self.BODY))}))
        self.patch(http.client, "HTTPConnection", self.proxy)
        self.dir = self.tmp_path()

    def get(self, *argv: str, environ: Optional[Dict[str, str]] = None,
            stdout: Any = None) -> Tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        out = stdout if stdout is not None else io.StringIO()
        code = cli.run(["get", *argv], stdout=out, stderr=err, environ=environ or {})
        return code, err.getvalue()

    def test_a_url_through_the_proxy_into_a_file(self) -> None:
        target = str(self.dir / "sst.dods")
        code, err = self.get("http://dap.example.org/sst.nc.dods?sst", "-o", target,
                             environ={"OOIDX_PROXY": "http://proxy.test:8100"})
        assert (code, err) == (0, f"{len(self.BODY)} bytes -> {target}\n")
        assert open(target, "rb").read() == self.BODY
        assert os.listdir(self.dir) == ["sst.dods"]  # no .part left
        [c] = self.proxy.connections
        assert (c.host, c.port, c.timeout) == ("proxy.test", 8100, 60.0)
        assert c.request == ("GET", "http://dap.example.org/sst.nc.dods?sst")
        assert c.headers == {"Host": "dap.example.org", "User-Agent": "ooidx-get"}
        assert c.closed

    def test_a_dataset_path_goes_to_the_proxy_itself(self) -> None:
        target = str(self.dir / "x")
        code, err = self.get("/datasets/sst.dods", "-o", target, "--proxy", "http://127.0.0.1:9")
        assert code == 0, err
        [c] = self.proxy.connections
        assert c.request == ("GET", "/datasets/sst.dods") and c.headers["Host"] == "127.0.0.1:9"
        assert (c.host, c.port) == ("127.0.0.1", 9)

    def test_progress_is_shown_when_asked(self) -> None:
        clock = iter(range(0, 1000))
        import time

        self.patch(time, "monotonic", lambda: next(clock) * 0.2)
        code, err = self.get("/datasets/sst.dods", "-o", str(self.dir / "x"), "--progress")
        assert code == 0
        assert err.count("\r[") >= 2 and "100%" in err

    def test_to_stdout(self) -> None:
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8")
        code, err = self.get("/datasets/sst.dods", "-o", "-", stdout=out)
        assert code == 0, err
        assert raw.getvalue() == self.BODY
        code, err = self.get("/datasets/sst.dods", "-o", "-")  # a text-only stdout
        assert (code, err) == (2, "error: -o - needs a binary stdout\n")

    @cases("status, headers, body, expected", [
        (502, {"X-Ooidx-Error": "UpstreamError"}, b"the upstream said no", "error: UpstreamError: the upstream said no\n"),
        (404, {}, b"", "error: HTTP 404: Not Found\n"),
    ], ids=["typed", "plain"])
    def test_an_error_answer_is_exit_1_and_writes_nothing(self, status: int, headers: dict, body: bytes,
                                                          expected: str) -> None:
        self.proxy.answer = lambda c: ProxyAnswer(status, body, headers, reason="Not Found")
        code, err = self.get("/datasets/sst.dods", "-o", str(self.dir / "x"))
        assert (code, err) == (1, expected)
        assert os.listdir(self.dir) == []

    def test_a_short_body_is_an_error_and_leaves_nothing(self) -> None:
        self.proxy.answer = lambda c: ProxyAnswer(200, self.BODY[:1000], {"Content-Length": str(len(self.BODY))})
        code, err = self.get("/datasets/sst.dods", "-o", str(self.dir / "x"))
        assert (code, err) == (1, f"error: transfer failed: 1000 of {len(self.BODY)} bytes arrived\n")
        assert os.listdir(self.dir) == []

    def test_a_transfer_that_breaks_is_an_error_and_leaves_nothing(self) -> None:
        self.proxy.answer = lambda c: ProxyAnswer(200, self.BODY, break_after=65536)
        code, err = self.get("/datasets/sst.dods", "-o", str(self.dir / "x"))
        assert code == 1
        assert err.startswith("error: transfer failed after 65536 bytes: ConnectionResetError")
        assert os.listdir(self.dir) == []

    def test_an_unreachable_proxy_is_exit_3(self) -> None:
        self.proxy.answer = lambda c: ConnectionRefusedError(111, "Connection refused")
        code, err = self.get("/datasets/sst.dods", "-o", str(self.dir / "x"))
        assert (code, err) == (3, "error: cannot reach the proxy at http://127.0.0.1:8100: "
                                  "[Errno 111] Connection refused\n")


class OnBrokerTests(FastCase):
    """`ooidx --broker URL ...` in-process: task.react is run on a Clock and
    the broker is a memory:// bus (magnet.connect redirected to it)."""

    def setUp(self) -> None:
        from twisted.internet import task as task_module

        self.daemon = Bus(self)
        self.daemon.run(self.daemon.start())
        self.addCleanup(lambda: self.daemon.run(self.daemon.stop()))
        self.urls: List[str] = []
        real_connect = magnet.connect

        def connect(url: Any, reactor: Any = None, **options: Any) -> Any:
            self.urls.append(url)
            if str(url).startswith("amqp://dx.test"):  # the daemon's broker: its memory:// bus
                options.pop("connect_timeout", None)
                return real_connect(self.daemon.bus_url, self.daemon.clock, **options)
            return real_connect(url, reactor, **options)

        self.patch(magnet, "connect", connect)

        def react(main: Callable[[Any], Any]) -> None:
            drive(self, self.daemon.clock, main(self.daemon.clock))
            raise SystemExit(0)

        self.patch(task_module, "react", react)

    def run_cli(self, *argv: str) -> Tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(list(argv), stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    def test_a_call_straight_through_the_broker(self) -> None:
        code, out, err = self.run_cli("--broker", "amqp://dx.test/", "--timeout", "3", "call", "fetcher", "ping")
        assert code == 0, err
        assert json.loads(out)["node"] == "node-a"
        assert self.urls == ["amqp://dx.test/"]

    def test_an_error_answer_is_exit_1(self) -> None:
        code, out, err = self.run_cli("--broker", "amqp://dx.test/", "call", "attribute_store", "get", "key=zz")
        assert (code, out) == (1, "")
        assert err.startswith("error: KeyError: ")

    def test_no_daemon_answering_status_is_exit_1(self) -> None:
        code, out, err = self.run_cli("--broker", "amqp://dx.test/", "status")
        assert (code, err) == (1, "error: no daemon answered the status request\n")

    def test_a_broker_url_magnet_refuses_is_exit_2(self) -> None:
        code, out, err = self.run_cli("--broker", "amqp://u:pw@host:99999/", "status")
        assert code == 2 and err.startswith("error: ") and "pw@" not in err
