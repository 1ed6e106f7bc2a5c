"""ooidx.node.logs: one line per event (text or JSON), naming time, level,
node and component, with every secret masked."""
from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure

from ooidx.config import parse
from ooidx.node.logs import CHILD_OUTPUT_NAMESPACE, LineObserver, Redactor, make_observer

from tests.fast.core.support import FastCase


def event(message: str, level: LogLevel = LogLevel.info, namespace: str = "magnet.amqp.AMQPTransport",
          **fields: Any) -> dict:
    return {"log_format": message, "log_level": level, "log_namespace": namespace, "log_time": 1700000000.25,
            **fields}


class LogLineTests(FastCase):
    def test_text_lines_name_time_level_node_and_component(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="edge-1")
        observer(event("fetched {url}", url="http://x/", component="fetcher"))
        observer(event("link up"))
        lines = out.getvalue().splitlines()
        assert lines == [
            "2023-11-14T22:13:20.250Z info     edge-1 fetcher: fetched http://x/",
            "2023-11-14T22:13:20.250Z info     edge-1 magnet.amqp: link up",
        ]

    def test_json_lines_are_one_object_per_line(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="w", format="json", component="fetcher")
        observer(event("a\nb {n}", n=1, level=LogLevel.warn))
        try:
            1 / 0
        except ZeroDivisionError:
            observer(event("it broke", level=LogLevel.error, log_failure=Failure()))
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        first, second = map(json.loads, lines)
        assert first == {"time": "2023-11-14T22:13:20.250Z", "level": "warn", "node": "w", "component": "fetcher",
                         "namespace": "magnet.amqp.AMQPTransport", "message": "a\nb 1"}
        assert second["message"] == "it broke" and "ZeroDivisionError" in second["traceback"]

    def test_a_failure_stays_on_one_text_line(self) -> None:
        out = io.StringIO()
        try:
            raise ValueError("bad")
        except ValueError:
            LineObserver(out, node="n")(event("oops", level=LogLevel.critical, log_failure=Failure()))
        assert out.getvalue().count("\n") == 1
        assert "critical" in out.getvalue() and "ValueError: bad" in out.getvalue()

    def test_no_secret_in_any_line(self) -> None:
        tmp_path = self.tmp_path()
        token = "operator-token-0123456789abcdef"
        config = parse(f"node: n\nbroker: amqp://dx:p%40ss-w0rd@rabbit:5672/dx\nsecurity: {{token: {token}}}\n"
                       "components: {fetcher: }\nlogging: {format: json}\n", str(tmp_path / "x.yaml"))
        out = io.StringIO()
        observer = make_observer(config, out)
        observer(event("connecting to {url}", url="amqp://dx:p%40ss-w0rd@rabbit:5672/dx"))
        observer(event("decoded {pw} and {other}", pw="p@ss-w0rd", other="amqps://u:zz-top@h/"))
        observer(event("token is {t}", t=token))
        try:
            raise RuntimeError(f"failed at amqp://dx:p%40ss-w0rd@rabbit:5672/dx with {token}")
        except RuntimeError:
            observer(event("boom", level=LogLevel.error, log_failure=Failure()))
        text = out.getvalue()
        for secret in ("p%40ss-w0rd", "p@ss-w0rd", "zz-top", token):
            assert secret not in text
        messages = [json.loads(line)["message"] for line in text.splitlines()]
        assert messages[:3] == ["connecting to amqp://dx:***@rabbit:5672/dx", "decoded *** and amqps://u:***@h/",
                                "token is ***"]

    def test_credentials_are_masked_the_same_way_whatever_they_are(self) -> None:
        """guest:guest and guest:wrong both read guest:*** (issue 18): the
        password literal is masked everywhere but in a URL's user name."""
        for password in ("guest", "wrong-pw"):
            redact = Redactor([password])
            line = redact(f"broker unreachable at amqp://guest:{password}@h:5672/ (amqp://guest:***@h:5672/%2F)")
            self.assertEqual(line, "broker unreachable at amqp://guest:***@h:5672/ (amqp://guest:***@h:5672/%2F)")
            self.assertEqual(redact(f"the password is {password}"), "the password is ***")

    def test_redactor_masks_url_passwords_and_added_secrets(self) -> None:
        redact = Redactor(["generated-token-xyz"])
        assert redact("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
        assert redact("no password amqp://guest@h/ here") == "no password amqp://guest@h/ here"
        assert redact("postgresql://u:pw@db/x, amqp://:p@h/") == "postgresql://u:***@db/x, amqp://:***@h/"
        assert redact("Bearer generated-token-xyz") == "Bearer ***"

    def test_level_filter(self) -> None:
        config = parse("node: n\ncomponents: {fetcher: }\nlogging: {level: warn}\n", "x.yaml")
        out = io.StringIO()
        observer = make_observer(config, out)
        observer(event("quiet", level=LogLevel.info))
        observer(event("loud", level=LogLevel.warn))
        observer(event("louder", level=LogLevel.error))
        assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == ["loud", "louder"]

    def test_child_output_is_relayed_as_it_is(self) -> None:
        config = parse("node: n\ncomponents: {fetcher: }\nlogging: {level: error}\n", "x.yaml")
        out = io.StringIO()
        observer = make_observer(config, out)
        child_line = "2023-11-14T22:13:20.250Z info     n fetcher: fetched amqp://a:b@c/"
        observer({"log_format": "[{tag}] {line}", "tag": "fetcher.0", "line": child_line, "stream": "stdout",
                  "log_level": LogLevel.info, "log_namespace": CHILD_OUTPUT_NAMESPACE, "log_time": 1.0})
        assert out.getvalue() == child_line.replace("a:b@", "a:***@") + "\n"

    def test_components_log_with_their_name(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="n")
        log = Logger(observer=observer, namespace="ooidx.component.Component")
        log.info("{component} started on {node}", component="csv", node="n")
        assert " n csv: csv started on n" in out.getvalue()

    def test_child_stderr_names_its_component_and_empty_lines_are_dropped(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="n")
        for line, stream in (("", "stdout"), ("", "stderr"), ("ImportError: no module x", "stderr")):
            observer({"log_format": "[{tag}] {line}", "tag": "fetcher.1", "line": line, "stream": stream,
                      "log_level": LogLevel.info, "log_namespace": CHILD_OUTPUT_NAMESPACE, "log_time": 1.0})
        assert out.getvalue().splitlines() == [
            "1970-01-01T00:00:01.000Z info     n fetcher: [fetcher.1] ImportError: no module x"]


class LogEdgeTests(FastCase):
    def test_a_line_with_no_format_is_empty_and_a_legacy_one_is_joined(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="n")
        observer({"log_namespace": "x.Y", "log_time": 1.0, "log_level": LogLevel.info})
        observer({"message": ("legacy", 5), "log_namespace": "log_legacy", "log_time": 1.0})
        lines = out.getvalue().splitlines()
        assert lines[0] == "1970-01-01T00:00:01.000Z info     n x: "
        assert lines[1] == "1970-01-01T00:00:01.000Z info     n log_legacy: legacy 5"

    def test_a_failure_without_a_message_and_one_that_cannot_show_its_traceback(self) -> None:
        class Broken(Failure):
            def __init__(self) -> None:
                try:
                    raise KeyError("inner")
                except KeyError:
                    super().__init__()

            def getTraceback(self, *args: Any, **kwargs: Any) -> str:
                raise RuntimeError("no traceback today")

        observer = LineObserver(io.StringIO(), node="n", format="json")
        fields = observer.fields({"log_namespace": "x", "log_time": 0.0, "log_failure": Broken()})
        assert fields["message"] == "'inner'" and fields["traceback"].startswith("<")

    def test_an_unknown_format_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            LineObserver(io.StringIO(), node="n", format="xml")

    def test_short_and_masked_secrets_are_not_kept(self) -> None:
        redact = Redactor()
        redact.add("abc")  # too short: would mangle ordinary words
        redact.add("***")
        redact.add(None)  # type: ignore[arg-type]
        assert redact("abc *** abcd") == "abc *** abcd"
        assert redact("") == ""

    def test_secrets_of_a_config(self) -> None:
        from ooidx.node.logs import secrets_of

        config = parse("broker: ['amqp://u:p%40ss@a/', 'amqp://u@b/']\n"
                       "components: {attribute_store: {url: 'postgresql://dx:dbpw@db/dx'}}\n"
                       "security: {token: tok-0123456789abcdef}\n", "x.yaml", environ={})
        assert set(secrets_of(config)) == {"p%40ss", "p@ss", "dbpw", "tok-0123456789abcdef"}
        assert secrets_of(None) == []

    def test_a_child_s_stderr_line_is_an_event_of_its_own(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, node="n")
        observer({"log_format": "[{tag}] {line}", "tag": "csv.0", "line": "oops\r", "stream": "stderr",
                  "log_level": LogLevel.warn, "log_namespace": CHILD_OUTPUT_NAMESPACE, "log_time": 1.0})
        assert out.getvalue() == "1970-01-01T00:00:01.000Z warn     n csv: [csv.0] oops\\r\n"


class OutOfFilesTests(FastCase):
    """A node out of open files: Twisted accepts each new client and closes it
    at once while it has a descriptor in reserve, else fails to accept and
    tries again at the next turn, logging a line each time; the node's log
    says it once every 10 s with the counts (measured without this: 16779
    lines in 15 s, 500 clients against a limit of 300)."""

    NS = "twisted.internet.tcp.Port"

    def emfile(self, observer: Any, at: float, closed: int, failed: int = 0) -> None:
        observer(event("EMFILE encountered; releasing reserved file descriptor.", namespace=self.NS, log_time=at))
        for i in range(closed):
            observer(event("EMFILE recovery: Closed socket from {address}", namespace=self.NS, log_time=at,
                           address=("127.0.0.2", 40000 + i)))
        observer(event("Re-reserving EMFILE recovery file descriptor.", namespace=self.NS, log_time=at))
        for _ in range(failed):
            observer(event("Could not accept new connection ({acceptError})", namespace=self.NS, log_time=at,
                           acceptError="EMFILE"))

    def observer(self) -> Any:
        config = parse("node: n\nbroker: memory://\ncomponents: {fetcher: }\n", "x.yaml")
        out = io.StringIO()
        return make_observer(config, out), out

    def test_connections_refused_for_want_of_files_are_counted_not_logged_each(self) -> None:
        observer, out = self.observer()
        self.emfile(observer, 1000.0, 300)
        self.emfile(observer, 1004.0, 200, failed=1000)
        observer(event("still serving"))
        self.emfile(observer, 1011.0, 50, failed=10)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("warn     n ooidx.node.limits: out of open files: 1 new connection(s) accepted and closed at "
                      "once, 0 accept(s) failed since the last such line (1 and 0 in all); raise the open files "
                      "limit (ulimit -n", lines[0])
        self.assertIn("still serving", lines[1])
        # 299 + 200 closed and 1000 failed since, and the first closed at 1011
        self.assertIn("out of open files: 500 new connection(s) accepted and closed at once, 1000 accept(s) "
                      "failed since the last such line (501 and 1000 in all)", lines[2])
        self.assertNotIn("EMFILE", out.getvalue())

    def test_other_lines_pass_as_they_are(self) -> None:
        observer, out = self.observer()
        observer(event("EMFILE in a message of our own", namespace="ooidx.datapath.cache"))
        observer(event("Could not accept new connection ({acceptError})", namespace=self.NS,
                       acceptError="ECONNABORTED"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Could not accept new connection (ECONNABORTED)", lines[1])
