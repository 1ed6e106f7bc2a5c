"""The node with a wrong broker (issue 18), on a memory:// bus whose link is
held down: the web edge starts before the broker, /healthz's health says why
and since when, and a refused login stops the start with one critical line
and exit code 1."""
from __future__ import annotations

import uuid
from typing import Any, List

from twisted.internet.defer import Deferred, fail

from magnet.amqp.connection import LoginRefused
from ooidx.config import load
from ooidx.node import bootstrap as bootstrap_module
from ooidx.node.bootstrap import component_class
from ooidx.node.daemon import Daemon
from tests.fast.core.support import FastCase, LogEvents, settle, threadless
from tests.fast.node.test_daemon import Stand
from tests.ooidx.twistd_helpers import write_config


class WrongBrokerTests(FastCase):
    def node(self, link: Any) -> Any:
        """A node (fetcher and web) whose transport never comes up by itself:
        C{link()} is what waiting for it gives."""
        clock = threadless(self)
        config = load(str(write_config(self.tmp_path() / "node.yaml", node="wb",
                                       broker=f"memory://wb-{uuid.uuid4().hex}",
                                       components={"fetcher": None, "web": None},
                                       timeouts={"rpc": 5, "shutdown": 2})))
        self.patch(bootstrap_module, "component_class",
                   lambda name: Stand if name == "web" else component_class(name))
        fatal: List[int] = []
        node = Daemon(config, reactor=clock, on_fatal=fatal.append)
        transport = node.bus.transport
        transport.start = lambda: None  # the link never comes up
        transport.when_connected = lambda timeout=None: link()
        transport.last_error = "Connection was refused by other side: 111: Connection refused."
        self.addCleanup(lambda: node.stopService())
        return clock, node, fatal

    def test_an_unreachable_broker_starts_the_web_edge_and_health_says_why(self) -> None:
        clock, node, fatal = self.node(Deferred)
        node.startService()
        settle(clock)
        assert fatal == [] and not node.started
        assert node.components["web"].started and "fetcher" not in node.components
        health = node.health()
        assert health["ok"] is False and health["broker"] == "down"
        assert health["components"] == {"fetcher": False, "web": True}
        assert health["broker_error"] == "Connection was refused by other side: 111: Connection refused."
        assert health["broker_down_since"] == "1970-01-01T00:00:00Z"  # the clock's start

    def test_a_refused_login_is_one_critical_line_and_exit_1(self) -> None:
        events = LogEvents(self)
        refusal = LoginRefused("amqp://guest:***@h:5672/%2F refused the login: AMQP handshake failed: "
                               "403 ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN")
        clock, node, fatal = self.node(lambda: fail(refusal))
        node.startService()
        settle(clock)
        assert fatal == [1]
        critical = [e for e in events.events if e.get("log_level") is not None and e["log_level"].name == "critical"]
        assert len(critical) == 1, events.texts()
        from twisted.logger import formatEvent
        text = formatEvent(critical[0])
        assert "node wb cannot start: the broker" in text and "refused the login (403 ACCESS_REFUSED" in text, text
        assert "check the user and password of broker: in " in text and "node.yaml" in text, text
