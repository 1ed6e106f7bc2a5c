"""Hostile input to the notices endpoints of a real `twistd -n ooidx` node
(memory://, every component): webhook secrets, callbacks that answer their
challenge wrongly, slowly, hugely or with a redirect to a forbidden address,
malformed subscription ids, oversized bodies, and the Atom feeds' names,
regexes and limits.

What must hold: a clear 4xx (a JSON error with its type and a message, never
a 500 or a traceback) and nothing changed (no subscription made, no secret
replaced, nothing reaching a forbidden address), the node alive throughout.
Each scenario appends one JSON line to the results file.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import quote

import pytest

from tests.reliability.hostile_node import Node, RecordingSocket, start_node, stop_node
from tests.reliability.results import latencies_ms, record


class Callback:
    """A webhook receiver on loopback (a thread): how it answers the challenge is C{mode}."""

    def __init__(self, forbidden_port: int) -> None:
        self.mode = "echo"
        self.forbidden_port = forbidden_port
        self.posts: List[Dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                outer.posts.append(body)
                mode = outer.mode
                if body.get("type") != "webhook.verification":
                    return self._send(200, b"{}")
                challenge = body["challenge"]
                if mode == "slow":
                    time.sleep(8)
                    return self._send(200, json.dumps({"challenge": challenge}).encode())
                if mode in ("redirect-forbidden", "redirect-metadata"):
                    target = (f"http://127.0.0.1:{outer.forbidden_port}/" if mode == "redirect-forbidden"
                              else "http://169.254.169.254/latest/meta-data/")
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                answers = {"wrong": json.dumps({"challenge": challenge[::-1]}).encode(),
                           "missing": b"{}", "notjson": b"<html>ok</html>", "empty": b"",
                           "huge": json.dumps({"challenge": challenge, "pad": "x" * 200_000}).encode(),
                           "echo": json.dumps({"challenge": challenge}).encode()}
                if mode in ("500", "404"):
                    return self._send(int(mode), b"{}")
                return self._send(200, answers[mode])

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[RecordingSocket]:
    with RecordingSocket() as sock:
        yield sock


@pytest.fixture(scope="module")
def callback(forbidden: RecordingSocket) -> Iterator[Callback]:
    c = Callback(forbidden.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any, callback: Callback) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("hostile-notices"), "hnotices",
                   extra_security={"allow_hosts": [f"127.0.0.1:{callback.port}"]})
    try:
        yield n
    finally:
        stop_node(n)


@pytest.fixture(scope="module")
def person(node: Node) -> str:
    status, answer = node.api("POST", "/api/people", {"name": "hostile"})
    assert status == 201, answer
    return answer["token"]


def check_refusal(status: int, answer: Any, expected: Tuple[int, ...], kind: Any = None) -> str:
    assert status in expected, (status, answer)
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert answer["error"]["message"] and answer["error"]["type"], answer
    if kind is not None:
        assert answer["error"]["type"] == kind, answer
    return answer["error"]["type"]


def subscriptions(node: Node, token: str) -> List[Dict[str, Any]]:
    status, answer = node.api("GET", "/api/subscriptions", token=token)
    assert status == 200, answer
    return answer["subscriptions"]


def healthy(node: Node) -> None:
    assert node.alive(), node.daemon.describe()
    assert not node.tracebacks(), node.tracebacks()[:5]


def test_callbacks_that_fail_their_challenge(node: Node, person: str, callback: Callback,
                                             forbidden: RecordingSocket) -> None:
    modes = ["wrong", "missing", "notjson", "empty", "huge", "500", "404", "redirect-forbidden",
             "redirect-metadata", "slow"]
    took: List[float] = []
    types: Dict[str, str] = {}
    before = subscriptions(node, person)
    for mode in modes:
        callback.mode = mode
        started = time.monotonic()
        status, answer = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": ".",
                                                                 "webhook": callback.url}, token=person, timeout=40)
        took.append(time.monotonic() - started)
        types[mode] = check_refusal(status, answer, (422,), "WebhookNotVerified")
        if mode.startswith("redirect"):
            assert "redirect" in answer["error"]["message"] and "forbidden" in answer["error"]["message"], answer
        if mode == "slow":
            assert took[-1] < 20, took[-1]
    # an unreachable callback and one on a forbidden address
    for url, expected in ((f"http://127.0.0.1:{forbidden.port}/hook", (403,)),
                          ("http://169.254.169.254/hook", (403,))):
        status, answer = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": ".", "webhook": url},
                                  token=person)
        check_refusal(status, answer, expected)
    assert subscriptions(node, person) == before  # nothing made
    assert not forbidden.connections  # no redirect was followed
    callback.mode = "echo"
    status, answer = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": ".",
                                                             "webhook": callback.url}, token=person)
    assert status == 201 and answer["secret"].startswith("whsec_"), answer
    node.api("DELETE", f"/api/subscriptions/{answer['id']}", token=person)
    healthy(node)
    record("hostile", "notices-webhook-challenge", inputs_tried=len(modes) + 2, errors=0,
           **{k: v for k, v in latencies_ms(took).items() if k != "mean_ms"},
           notes=f"callbacks refused with 422 WebhookNotVerified: {', '.join(modes)}; forbidden and "
                 "unreachable callbacks 403; no subscription made, no redirect followed")


def test_malformed_secrets(node: Node, person: str, callback: Callback) -> None:
    callback.mode = "echo"
    status, sub = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": "^event\\.saved\\.",
                                                          "webhook": callback.url}, token=person)
    assert status == 201, sub
    bad: List[Any] = ["", "whsec_", "whsec_short", "whsec_" + "!" * 44, "WHSEC_" + "A" * 44,
                      "whsec_" + "A" * 20, "whsec_" + "A" * 200, "whsec_" + "A" * 43 + "=\n", 12345, True,
                      ["whsec_" + "A" * 44], {"secret": "x"}, "whsec_" + "A" * 44 + "\x00", "x" * 100_000]
    tried = 0
    for secret in bad:
        for method, path, body in (
                ("POST", "/api/subscriptions", {"kind": "events", "regex": ".", "webhook": callback.url,
                                                "secret": secret}),
                ("POST", f"/api/subscriptions/{sub['id']}/secret", {"secret": secret})):
            status, answer = node.api(method, path, body, token=person)
            kind = check_refusal(status, answer, (400,))
            assert kind in ("InvalidSecret", "BadRequest"), answer
            assert not (isinstance(secret, str) and len(secret) > 8 and secret in answer["error"]["message"])
            tried += 1
    # a secret without a webhook; unknown fields
    status, answer = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": ".",
                                                             "secret": "whsec_" + "A" * 44}, token=person)
    check_refusal(status, answer, (400,))
    status, answer = node.api("POST", f"/api/subscriptions/{sub['id']}/secret", {"secrets": "x"}, token=person)
    check_refusal(status, answer, (400,))
    listed = subscriptions(node, person)
    assert [s["id"] for s in listed] == [sub["id"]]  # nothing made
    assert "rotated" not in listed[0]  # the secret never changed
    node.api("DELETE", f"/api/subscriptions/{sub['id']}", token=person)
    healthy(node)
    record("hostile", "notices-webhook-secrets", inputs_tried=tried + 2, errors=0,
           notes="malformed secrets at creation and rotation: 400 InvalidSecret, never echoed; "
                 "no subscription made, no secret replaced")


def test_subscription_ids_tokens_and_bodies(node: Node, person: str, callback: Callback) -> None:
    status, stream = node.api("POST", "/api/subscriptions", {"kind": "events", "regex": "."}, token=person)
    assert status == 201, stream
    ids = ["0", "zzzzzzzzzzzz", "0123456789ab", "..%2f..", "%00", "a" * 200, quote("é" * 6), "ABCDEF012345"]
    tried = 0
    for sid in ids:
        for method, suffix in (("POST", "secret"), ("POST", "verify"), ("GET", "deliveries")):
            status, answer = node.api(method, f"/api/subscriptions/{sid}/{suffix}", {} if method == "POST" else None,
                                      token=person)
            check_refusal(status, answer, (400, 404))
            tried += 1
    for method, suffix in (("POST", "secret"), ("POST", "verify"), ("GET", "deliveries")):
        # a stream subscription has no webhook; no token, another's token, the wrong method
        status, answer = node.api(method, f"/api/subscriptions/{stream['id']}/{suffix}",
                                  {} if method == "POST" else None, token=person)
        check_refusal(status, answer, (409,), "Conflict")
        status, answer = node.api(method, f"/api/subscriptions/{stream['id']}/{suffix}",
                                  {} if method == "POST" else None, token=None)
        check_refusal(status, answer, (401,))
        status, answer = node.api("DELETE", f"/api/subscriptions/{stream['id']}/{suffix}", token=person)
        check_refusal(status, answer, (405,))
        tried += 3
    # oversized bodies
    huge = b'{"kind": "events", "regex": ".", "webhook": "' + b"h" * (2 * 1024 * 1024) + b'"}'
    for path in ("/api/subscriptions", f"/api/subscriptions/{stream['id']}/secret"):
        status, answer = node.api("POST", path, raw=huge, token=person, headers={"Content-Type": "application/json"})
        check_refusal(status, answer, (413,))
        tried += 1
    assert [s["id"] for s in subscriptions(node, person)] == [stream["id"]]
    node.api("DELETE", f"/api/subscriptions/{stream['id']}", token=person)
    healthy(node)
    record("hostile", "notices-webhook-endpoints", inputs_tried=tried, errors=0,
           notes="malformed ids 404, a stream's webhook endpoints 409, no token 401, wrong method 405, "
                 "2 MiB bodies 413; nothing changed")


def test_feeds(node: Node) -> None:
    cases = [("/feeds/events.atom?regex=(", 400), ("/feeds/events.atom?regex=" + "a" * 5000, 400),
             ("/feeds/events.atom?regex=%ff%fe", 400), ("/feeds/events.atom?regex=a%00", 400),
             ("/feeds/events.atom?regex=" + quote("\\p{Foo}"), 400),
             ("/feeds/events.atom?regex=" + quote("(?P<x>a)(?P=x)"), 400),
             ("/feeds/events.atom?limit=0", 400), ("/feeds/events.atom?limit=1001", 400),
             ("/feeds/events.atom?limit=-1", 400), ("/feeds/events.atom?limit=1e3", 400),
             ("/feeds/events.atom?x=1", 400), ("/feeds/datasets/.atom", 400),
             ("/feeds/datasets/%2e%2e.atom", 400), ("/feeds/datasets/..%2f..%2fetc%2fpasswd.atom", 404),
             ("/feeds/datasets/" + "a" * 100 + ".atom", 400), ("/feeds/datasets/s%00t.atom", 400),
             ("/feeds/datasets/%c3%a9.atom", 400), ("/feeds/datasets/%ff.atom", 400),
             ("/feeds/datasets/nosuch.atom", 404), ("/feeds/datasets/sst", 404), ("/feeds/", 404),
             ("/feeds/datasets/sst.atom?limit=x", 400)]
    took = []
    for path, expected in cases:
        started = time.monotonic()
        status, answer = node.api("GET", path, token=None)
        took.append(time.monotonic() - started)
        check_refusal(status, answer, (expected,))
    status, body = node.api("POST", "/feeds/events.atom", {}, token=None)
    assert status == 405
    status, body = node.api("GET", "/feeds/events.atom?regex=" + quote("^event\\."), token=None)
    assert status == 200 and isinstance(body, bytes) and b"<feed" in body
    status, body = node.api("GET", "/metrics", token=None)
    assert status == 200 and b"ooidx_dataset_metrics_up" in body, body[:500]
    healthy(node)
    record("hostile", "notices-feeds", inputs_tried=len(cases) + 1, errors=0,
           **{k: v for k, v in latencies_ms(took).items() if k != "mean_ms"},
           notes="malformed dataset names, regexes and limits of the Atom feeds: 400/404 JSON; a good feed "
                 "and /metrics (per-dataset series) answered after")
