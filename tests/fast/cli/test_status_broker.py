"""C{ooidx status} when the daemon cannot reach its broker: the status
request (over the bus) fails, and the daemon's /healthz (503) says why and
since when; status prints that one line (exit 1) instead of the bare error."""
from __future__ import annotations

import io
import json
import sys
import urllib.request
from typing import Any, Tuple

from ooidx import cli
from ooidx.cli.calls_cmd import broker_line

from tests.fast.cli.test_cli import URL, Answer, Web, http_error
from tests.fast.core.support import FastCase

SINCE = "2026-12-05T23:00:00Z"
HEALTH = {"ok": False, "broker": "down", "components": {"web": True},
          "broker_error": "ConnectionRefusedError: 127.0.0.1:5673", "broker_down_since": SINCE}


def broker_down(request: urllib.request.Request) -> Any:
    path = request.full_url[len(URL):]
    if path == "/api/status":
        return http_error(request, 503, json.dumps({"error": {"type": "NotConnected",
                                                              "message": "not connected"}}).encode())
    if path == "/healthz":
        return http_error(request, 503, json.dumps(HEALTH).encode())
    return http_error(request, 404, b'{"error": {"type": "NotFound", "message": "no"}}')


class StatusBrokerTests(FastCase):
    def run_cli(self, answer: Any, *argv: str) -> Tuple[int, str, str, Web]:
        web = Web(answer)
        self.patch(urllib.request, "build_opener", web.build_opener)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", err)
        code = cli.run(list(argv), stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue(), web

    def test_broker_unreachable_since(self) -> None:
        code, out, err, web = self.run_cli(broker_down, "--url", URL, "status")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(f"broker unreachable since {SINCE}: ConnectionRefusedError: 127.0.0.1:5673", err)
        self.assertEqual([r.full_url for r, _ in web.requests], [URL + "/api/status", URL + "/healthz"])
        self.assertIsNone(web.requests[1][0].get_header("Authorization"))

    def test_other_failures_keep_their_error(self) -> None:
        def healthy(request: urllib.request.Request) -> Any:
            if request.full_url.endswith("/healthz"):
                return Answer(json.dumps({"ok": True, "broker": "up"}).encode())
            return broker_down(request)

        code, out, err, _ = self.run_cli(healthy, "--url", URL, "status")
        self.assertEqual((code, err), (1, "error: NotConnected: not connected\n"))

    def test_healthz_not_json_keeps_the_error(self) -> None:
        def garbage(request: urllib.request.Request) -> Any:
            if request.full_url.endswith("/healthz"):
                return Answer(b"<html>", "text/html")
            return broker_down(request)

        code, out, err, _ = self.run_cli(garbage, "--url", URL, "status")
        self.assertEqual((code, err), (1, "error: NotConnected: not connected\n"))

    def test_broker_line(self) -> None:
        self.assertIsNone(broker_line(None))
        self.assertIsNone(broker_line({"ok": True}))
        self.assertTrue(broker_line({"broker_error": "not connected yet"}).startswith(
            "broker unreachable: not connected yet"))
