"""People's subscriptions over real HTTP on loopback: a memory:// bus (and
once RabbitMQ), the real Web edge on port 0, user_notification and
user_pub_sub, real HTTP clients (treq, an Agent reading SSE) and a real
webhook receiver that can succeed, fail, hang or be gone."""
from __future__ import annotations

import base64
import io
import json
import socket
import uuid
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task, threads
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

import magnet

from ooidx import cli, events
from ooidx.node.bootstrap import declare_topology
from ooidx.dissemination.notification import Notification
from ooidx.people.user_notification import UserNotification
from ooidx.people.user_pub_sub import UserPubSub
from ooidx.http.edge import mask_query
from ooidx.node.logs import LineObserver, Redactor
from ooidx.people.records import CHANGED_FANOUT
from ooidx.people.tickets import TicketError, make_ticket, parse_ticket, ticket_key
from ooidx.people.webhooks import WebhookDelivery
from ooidx.config import SecurityConfig
from ooidx.web.app import Web

from tests.support.doubles import FakePubSub, FakeStore
from tests.support.waiting import eventually, sleep

TOKEN = "operator-token-" + "y" * 20


class Receiver(Resource):
    """A webhook receiver: mode "ok" (200), "fail" (500) or "slow" (never answers)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.requests: List[Dict[str, Any]] = []
        self.verifications: List[Dict[str, Any]] = []
        self.hanging: List[Any] = []
        #: How the challenge is answered: echo, header (with `secret`), wrong, fail, slow, redirect, huge.
        self.verify_mode = "echo"
        self.secret: Optional[str] = None

    def answer_challenge(self, request: server.Request, challenge: str) -> Any:
        mode = self.verify_mode
        request.setHeader(b"content-type", b"application/json")
        if mode == "header":
            from standardwebhooks import Webhook
            request.setHeader(b"webhook-challenge-response",
                              Webhook(self.secret).endpoint_verification_response(challenge).encode())
            return b""
        if mode == "wrong":
            return json.dumps({"challenge": challenge[::-1]}).encode()
        if mode == "fail":
            request.setResponseCode(500)
            return b"{}"
        if mode == "slow":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if mode == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", b"http://169.254.169.254/latest/meta-data/")
            return b""
        if mode == "huge":
            return json.dumps({"challenge": challenge, "pad": "x" * 100_000}).encode()
        return json.dumps({"challenge": challenge}).encode()

    def render_POST(self, request: server.Request) -> Any:
        raw = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        body = json.loads(raw)
        if body.get("type") == "webhook.verification":  # the callback's challenge: echoed (verify_mode)
            self.verifications.append({"headers": headers, "body": body, "raw": raw})
            return self.answer_challenge(request, body["challenge"])
        self.requests.append({"headers": headers, "body": body, "raw": raw})
        if self.mode == "slow":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(200 if self.mode == "ok" else 500)
        return b"ok" if self.mode == "ok" else b"broken"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class SSE(Protocol):
    """Reads a text/event-stream: events (id, data) and comments."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: List[Dict[str, Any]] = []
        self.comments: List[str] = []
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            event: Dict[str, Any] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("id: "):
                    event["id"] = line[4:]
                elif line.startswith("data: "):
                    event["data"] = json.loads(line[6:])
            if "data" in event:
                self.events.append(event)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)

    def close(self) -> None:
        self.transport.stopProducing()

    @defer.inlineCallbacks
    def wait_for(self, count: int, timeout: float = 10.0) -> Any:
        yield eventually(lambda: len(self.events) >= count, timeout, f"{count} events")
        return self.events


class Stack:
    def __init__(self, url: Optional[str] = None, **options: Any) -> None:
        self.bus = magnet.connect(url or f"memory://people-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
        self.receiver = Receiver()
        self.receiver_port = reactor.listenTCP(0, server.Site(self.receiver), interface="127.0.0.1")
        self.hook = f"http://127.0.0.1:{self.receiver_port.getHost().port}/hook"
        self.dead_port = free_port()
        self.security = SecurityConfig(
            allow_private=False, allow_hosts=(f"127.0.0.1:{self.receiver_port.getHost().port}",
                                              f"127.0.0.1:{self.dead_port}"))
        self.store = FakeStore()
        self.notification = Notification("notification", self.bus, node="n")
        common = dict(node="n", security=self.security, webhook_attempts=options.get("attempts", 3),
                      webhook_base_delay=options.get("base_delay", 0.05), webhook_timeout=options.get("timeout", 1.0),
                      webhook_verify_timeout=options.get("verify_timeout", 1.0),
                      webhook_disable_after=options.get("disable_after", 20),
                      webhook_disabled_ttl=options.get("disabled_ttl", 7 * 24 * 3600.0))
        self.user_notification = UserNotification("user_notification", self.bus, **common)
        self.user_pub_sub = UserPubSub("user_pub_sub", self.bus, **common)
        self.web = Web("web", self.bus, node="n", port=0, interface="127.0.0.1", token=TOKEN,
                       access_log=True)  # the ticket test reads the access log
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.failures: List[Dict[str, Any]] = []
        self.streams: List[SSE] = []

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.bus.serve("attribute_store", self.store)
        self.pub_sub = FakePubSub(self.bus)
        yield self.bus.serve("pub_sub", self.pub_sub)
        self.failure_tail = yield events.subscribe(self.bus, r"^event\.failed\.", self.failures.append)
        for component in (self.notification, self.user_notification, self.user_pub_sub, self.web):
            yield component.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for s in self.streams:
            if s.transport is not None:
                s.close()
        for request in self.receiver.hanging:
            if not request.finished and not request._disconnected:
                request.finish()
        for component in (self.web, self.user_pub_sub, self.user_notification, self.notification):
            yield component.stopService()
        yield self.bus.stopService()
        yield self.receiver_port.stopListening()
        yield self.pool.closeCachedConnections()

    def url(self, path: str) -> str:
        return self.web.url + path

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, *, token: Optional[str] = None,
                raw: Optional[bytes] = None) -> Any:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield treq.request(method, self.url(path), data=data, headers=headers, pool=self.pool)
        content = yield response.content()
        value = json.loads(content) if content else None
        return response.code, value

    @defer.inlineCallbacks
    def person(self, name: Optional[str] = None) -> Any:
        name = name or "p" + uuid.uuid4().hex[:8]
        code, answer = yield self.request("POST", "/api/people", {"name": name}, token=TOKEN)
        assert code == 201, answer
        return answer["token"]

    @defer.inlineCallbacks
    def subscribe(self, token: str, **body: Any) -> Any:
        code, answer = yield self.request("POST", "/api/subscriptions", body, token=token)
        assert code == 201, answer
        return answer

    @defer.inlineCallbacks
    def subscribe_then_gone(self, token: str, **body: Any) -> Any:
        """Subscribe with a webhook on dead_port, whose receiver answers its challenge and then goes."""
        port = reactor.listenTCP(self.dead_port, server.Site(Receiver()), interface="127.0.0.1")
        try:
            answer = yield self.subscribe(token, **body)
        finally:
            yield port.stopListening()
        return answer

    @defer.inlineCallbacks
    def open_stream(self, path: str, token: Optional[str], last_id: Optional[str] = None) -> Any:
        """An SSE stream read over HTTP; with no token, as a browser's
        EventSource opens it (no Authorization header: a ?ticket= in C{path})."""
        headers = {b"Authorization": [f"Bearer {token}".encode()]} if token else {}
        if last_id:
            headers[b"Last-Event-ID"] = [last_id.encode()]
        agent = Agent(reactor, pool=self.pool)
        response = yield agent.request(b"GET", self.url(path).encode(), Headers(headers))
        assert response.code == 200, response.code
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
        client = SSE()
        response.deliverBody(client)
        self.streams.append(client)
        yield eventually(lambda: client.comments, 5, "the stream's first comment")
        return client

    @defer.inlineCallbacks
    def close_stream(self, client: SSE) -> Any:
        client.close()
        yield client.closed
        yield eventually(lambda: not self.web.subscriptions.streams, 5, "the server to see the client go")

    def emit(self, kind: str, dataset: Optional[str], **details: Any) -> defer.Deferred:
        return events.emit(self.bus, kind, dataset, **details)

    @defer.inlineCallbacks
    def watch_failures(self, token: str) -> Any:
        """The person's own stream of their webhooks' failures (event.failed.-): a list that fills."""
        sub = yield self.subscribe(token, kind="events", regex=r"^event\.failed\.")
        client = yield self.open_stream(sub["events"], token)
        return _Events(client)


class _Events:
    """The data of a stream's events, as a list (clear() forgets those seen so far)."""

    def __init__(self, client: SSE) -> None:
        self.client = client
        self.seen = 0

    def _all(self) -> List[Dict[str, Any]]:
        return [e["data"] for e in self.client.events[self.seen:]]

    def __iter__(self) -> Any:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self._all()[i]

    def clear(self) -> None:
        self.seen = len(self.client.events)


@pytest_twisted.async_yield_fixture
async def stack() -> Any:
    s = Stack()
    await s.start()
    yield s
    await s.stop()


def error_type(answer: Any) -> str:
    assert set(answer) == {"error"} and set(answer["error"]) == {"type", "message"}, answer
    assert answer["error"]["message"]
    return answer["error"]["type"]


# --------------------------------------------------------------------------- #
# people and tokens


@pytest_twisted.inlineCallbacks
def test_people_made_by_the_operator_only(stack: Stack) -> Any:
    code, answer = yield stack.request("POST", "/api/people", {"name": "alice"})
    assert code == 401 and error_type(answer) == "Unauthorized"
    code, answer = yield stack.request("POST", "/api/people", {"name": "alice"}, token="wrong-" + "x" * 20)
    assert code == 401
    code, answer = yield stack.request("POST", "/api/people", {"name": "alice"}, token=TOKEN)
    assert code == 201 and answer["name"] == "alice" and answer["token"].startswith("alice.")
    token = answer["token"]
    stored = stack.store.data["person:alice"]
    assert token not in json.dumps(stored) and len(stored["token_sha256"]) == 64
    code, answer = yield stack.request("POST", "/api/people", {"name": "alice"}, token=TOKEN)
    assert code == 409 and error_type(answer) == "Conflict"
    for bad in ({"name": "Alice!"}, {"name": ""}, {"name": "x" * 40}, {"name": 5}, {"nom": "bob"}, {}):
        code, answer = yield stack.request("POST", "/api/people", bad, token=TOKEN)
        assert code == 400, (bad, answer)
    code, answer = yield stack.request("POST", "/api/people", raw=b"{not json", token=TOKEN)
    assert code == 400 and error_type(answer) == "BadRequest"
    code, answer = yield stack.request("GET", "/api/people", token=TOKEN)
    assert code == 200 and [p["name"] for p in answer["people"]] == ["alice"]

    # the person's token works for their subscriptions; others do not
    code, answer = yield stack.request("GET", "/api/subscriptions", token=token)
    assert code == 200 and answer == {"subscriptions": []}
    for wrong in (None, TOKEN, token[:-1] + ("A" if token[-1] != "A" else "B"), "bob." + token.split(".", 1)[1],
                  "nodot", "alice."):
        code, answer = yield stack.request("GET", "/api/subscriptions", token=wrong)
        assert code == 401 and error_type(answer) == "Unauthorized", wrong
    code, answer = yield stack.request("PUT", "/api/subscriptions", {}, token=token)
    assert code == 405
    code, answer = yield stack.request("GET", "/api/subscriptions/a/b/c", token=token)
    assert code == 404


@pytest_twisted.inlineCallbacks
def test_subscription_requests_are_checked(stack: Stack) -> Any:
    token = yield stack.person()
    cases = [
        (b"[1, 2]", 400, "BadRequest"),
        (b"{bad", 400, "BadRequest"),
        (json.dumps({"kind": "things", "regex": "x"}).encode(), 400, "BadRequest"),
        (json.dumps({"regex": "x"}).encode(), 400, "BadRequest"),
        (json.dumps({"kind": "events"}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "(?=x)y"}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "a" * 5000}).encode(), 400, "InvalidRegex"),
        (json.dumps({"kind": "events", "regex": "x", "extra": 1}).encode(), 400, "BadRequest"),
        (json.dumps({"kind": "events", "regex": "x", "webhook": 5}).encode(), 400, "InvalidURL"),
        (json.dumps({"kind": "events", "regex": "x", "max_length": 0}).encode(), 400, "InvalidSubscription"),
        (json.dumps({"kind": "events", "regex": "x", "max_length": "many"}).encode(), 400, "InvalidSubscription"),
    ]
    for raw, status, kind in cases:
        code, answer = yield stack.request("POST", "/api/subscriptions", raw=raw, token=token)
        assert (code, error_type(answer)) == (status, kind), (raw[:60], answer)
    assert not [k for k in stack.store.data if k.startswith("user_subscription:")]


@pytest_twisted.inlineCallbacks
def test_forbidden_webhook_targets_are_refused_and_never_requested(stack: Stack) -> Any:
    token = yield stack.person()
    other = free_port()
    cases = [
        ("file:///etc/passwd", 400, "InvalidURL"),
        ("ftp://example.org/x", 400, "InvalidURL"),
        ("http://user:pw@example.org/x", 400, "InvalidURL"),
        (f"http://127.0.0.1:{other}/hook", 403, "Forbidden"),  # loopback, port not allowed
        (f"http://2130706433:{other}/hook", 403, "Forbidden"),  # the same, numerically
        ("http://10.1.2.3/hook", 403, "Forbidden"),
        ("http://192.168.0.10:8080/hook", 403, "Forbidden"),
        ("http://169.254.169.254/latest/meta-data", 403, "Forbidden"),
        ("http://[::1]/hook", 403, "Forbidden"),
        (f"http://localhost:{other}/hook", 403, "Forbidden"),  # a name that resolves to loopback
    ]
    for url, status, kind in cases:
        code, answer = yield stack.request("POST", "/api/subscriptions",
                                           {"kind": "events", "regex": ".", "webhook": url}, token=token)
        assert (code, error_type(answer)) == (status, kind), (url, answer)
    yield stack.emit("saved", "sst")
    yield sleep(0.2)
    assert stack.receiver.requests == []
    assert not [k for k in stack.store.data if k.startswith("user_subscription:")]


# --------------------------------------------------------------------------- #
# streams


@pytest_twisted.inlineCallbacks
def test_sse_stream_and_what_is_kept_while_away(stack: Stack) -> Any:
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.")
    assert sub["kind"] == "events" and sub["queue"].startswith("user.") and sub["max_length"] == 10_000
    assert sub["events"] == f"/api/subscriptions/{sub['id']}/events"
    code, listed = yield stack.request("GET", "/api/subscriptions", token=token)
    assert [s["id"] for s in listed["subscriptions"]] == [sub["id"]]

    client = yield stack.open_stream(sub["events"], token)
    yield stack.emit("fetched", "sst")
    yield stack.emit("saved", "sst", version="v1")
    events_ = yield client.wait_for(1)
    assert events_[0]["data"]["topic"] == "event.saved.sst" and events_[0]["data"]["version"] == "v1"
    assert events_[0]["id"]
    yield sleep(0.1)
    assert len(client.events) == 1  # the fetched event did not match
    yield stack.close_stream(client)

    # away: these are kept in the person's durable queue
    for n in range(3):
        yield stack.emit("saved", f"ds{n}")
    yield sleep(0.1)
    again = yield stack.open_stream(sub["events"], token, last_id=events_[0]["id"])
    got = yield again.wait_for(3)
    assert [e["data"]["dataset"] for e in got] == ["ds0", "ds1", "ds2"]
    ids = [e["id"] for e in got]
    assert ids == sorted(ids) and ids[0] > events_[0]["id"]
    yield stack.close_stream(again)


@pytest_twisted.inlineCallbacks
def test_the_bound_drops_the_oldest(stack: Stack) -> Any:
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.", max_length=5)
    for n in range(12):
        yield stack.emit("saved", f"ds{n}")
    yield eventually(lambda: stack.user_notification.routed >= 12, 5, "routing")
    yield sleep(0.1)
    client = yield stack.open_stream(sub["events"], token)
    yield client.wait_for(5)
    yield sleep(0.2)
    assert [e["data"]["dataset"] for e in client.events] == [f"ds{n}" for n in range(7, 12)]
    yield stack.close_stream(client)


@pytest_twisted.inlineCallbacks
def test_keep_alive_comments(stack: Stack) -> Any:
    stack.web.subscriptions.keepalive = 0.1
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex="x")
    client = yield stack.open_stream(sub["events"], token)
    yield eventually(lambda: client.comments.count("keep-alive") >= 2, 5, "keep-alive comments")
    yield stack.close_stream(client)
    # the consumer is gone with the client: the queue keeps what comes next
    yield stack.emit("saved", "x1")
    yield sleep(0.1)
    queue = stack.bus.transport.broker.queues[sub["queue"]]
    assert len(queue.ready) == 1 and not queue.consumers


@pytest_twisted.inlineCallbacks
def test_delete_and_other_peoples_subscriptions(stack: Stack) -> Any:
    alice = yield stack.person()
    bob = yield stack.person()
    sub = yield stack.subscribe(alice, kind="events", regex=".")
    for path in (f"/api/subscriptions/{sub['id']}", f"/api/subscriptions/{sub['id']}/events"):
        code, answer = yield stack.request("GET", path, token=bob)
        assert code == 404 and error_type(answer) == "NotFound"
    code, answer = yield stack.request("DELETE", f"/api/subscriptions/{sub['id']}", token=bob)
    assert code == 404
    code, answer = yield stack.request("GET", f"/api/subscriptions/{sub['id']}", token=alice)
    assert code == 200 and answer["regex"] == "."
    code, answer = yield stack.request("DELETE", f"/api/subscriptions/{sub['id']}", token=alice)
    assert code == 200 and answer == {"deleted": sub["id"]}
    assert sub["queue"] not in stack.bus.transport.broker.queues
    code, answer = yield stack.request("DELETE", f"/api/subscriptions/{sub['id']}", token=alice)
    assert code == 404
    code, answer = yield stack.request("GET", "/api/subscriptions/../../x", token=alice)
    assert code == 404
    yield eventually(lambda: not stack.user_notification.records, 5, "the subscription to go")


@pytest_twisted.inlineCallbacks
def test_dataset_versions_reach_people_as_small_notices(stack: Stack) -> Any:
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="datasets", regex=r"^dataset\.sst$")
    assert stack.pub_sub.subscriptions == {sub["queue"]: r"^dataset\.sst$"}
    client = yield stack.open_stream(sub["events"], token)
    metadata = {"topic": "dataset.sst", "dataset": "sst", "url": "http://dap.example.org/sst.nc",
                "fetched": 1700000000.0, "das": "Attributes {}", "dds": "Dataset {}", "status": 200,
                "headers": [], "length": 3 * 65536}
    sent = yield stack.bus.send_stream(f"pubsub.sub.{sub['queue']}", metadata, [b"\x00" * 65536] * 3)
    assert sent == 3 * 65536
    got = yield client.wait_for(1)
    assert got[0]["data"] == {"topic": "dataset.sst", "dataset": "sst", "url": "http://dap.example.org/sst.nc",
                              "fetched": 1700000000.0, "length": 196608}
    yield sleep(0.1)
    assert len(client.events) == 1
    yield stack.close_stream(client)
    code, _ = yield stack.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
    assert code == 200 and stack.pub_sub.subscriptions == {}


# --------------------------------------------------------------------------- #
# stream tickets (a browser's EventSource cannot send an Authorization header)


class LogCapture:
    """Every log line the process writes meanwhile, formatted as the daemon
    writes them but not redacted: what the code itself lets through."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.observer = LineObserver(self.out, node="n", redact=lambda text: text)

    def __enter__(self) -> "LogCapture":
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.observer)

    @property
    def text(self) -> str:
        return self.out.getvalue()


@defer.inlineCallbacks
def get_ticket(stack: Stack, token: str, sid: str) -> Any:
    code, answer = yield stack.request("POST", f"/api/subscriptions/{sid}/ticket", token=token)
    assert code == 200, answer
    return answer


@pytest_twisted.inlineCallbacks
def test_a_ticket_opens_the_stream_without_the_token(stack: Stack) -> Any:
    with LogCapture() as log:
        token = yield stack.person()
        sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.")
        before = reactor.seconds()
        answer = yield get_ticket(stack, token, sub["id"])
        ticket = answer["ticket"]
        assert set(answer) == {"ticket", "expires", "expires_in", "url"}
        assert answer["url"] == f"/api/subscriptions/{sub['id']}/events?ticket={ticket}"
        assert answer["expires_in"] == 60 and before + 59 <= answer["expires"] <= reactor.seconds() + 60
        assert token.split(".", 1)[1] not in ticket  # the person's secret is not in it

        # opened as an EventSource would: no Authorization header, the ticket in the URL
        client = yield stack.open_stream(answer["url"], None)
        yield stack.emit("saved", "t1")
        got = yield client.wait_for(1)
        assert got[0]["data"]["dataset"] == "t1"
        yield stack.close_stream(client)

        # single use: a ticket that opened its stream opens nothing again, even within its lifetime
        # (the attack: a ticket read from a log or a Referer, replayed)
        for n in (2, 3):
            yield stack.emit("saved", f"t{n}")
        yield sleep(0.1)
        code, refused = yield stack.request("GET", answer["url"])
        assert code == 401 and error_type(refused) == "TicketUsed", refused
        assert f"/api/subscriptions/{sub['id']}/ticket" in refused["error"]["message"]
        # a reconnect takes a new ticket, and says where it was in the query (an EventSource cannot set a header)
        fresh = yield get_ticket(stack, token, sub["id"])
        again = yield stack.open_stream(fresh["url"] + f"&last_event_id={got[0]['id']}", None)
        rest = yield again.wait_for(2)
        assert [e["data"]["dataset"] for e in rest] == ["t2", "t3"]
        # a stream stays open after its ticket was checked; the server ending it writes the access log line
        stack.web.subscriptions.close_streams()
        yield again.closed

        # never accepted for anything but that GET, neither in the query nor as a bearer token
        q = f"?ticket={ticket}"
        sid = sub["id"]
        for method, path in [("GET", f"/api/subscriptions/{sid}{q}"), ("DELETE", f"/api/subscriptions/{sid}{q}"),
                             ("GET", f"/api/subscriptions{q}"), ("POST", f"/api/subscriptions/{sid}/ticket{q}"),
                             ("GET", f"/api/events/stream{q}"), ("GET", f"/api/people{q}"),
                             ("POST", f"/api/call/controller/get_stats{q}")]:
            code, answer_ = yield stack.request(method, path, {} if method == "POST" else None)
            assert code == 401 and error_type(answer_) == "Unauthorized", (method, path, answer_)
        for method, path in [("GET", f"/api/subscriptions/{sid}"), ("DELETE", f"/api/subscriptions/{sid}"),
                             ("GET", f"/api/subscriptions/{sid}/events"), ("POST", f"/api/subscriptions/{sid}/ticket"),
                             ("GET", "/api/people")]:
            code, answer_ = yield stack.request(method, path, token=ticket)
            assert code == 401 and error_type(answer_) == "Unauthorized", (method, path, answer_)
        code, answer_ = yield stack.request("POST", f"/api/subscriptions/{sid}/events{q}")
        assert code == 405 and error_type(answer_) == "MethodNotAllowed"
        code, answer_ = yield stack.request("GET", f"/api/subscriptions/{sid}/ticket", token=token)
        assert code == 405
        code, answer_ = yield stack.request("GET", f"/api/subscriptions/{sid}", token=token)
        assert code == 200  # and the subscription is still there
    assert ticket not in log.text and ticket.rsplit(".", 1)[1] not in log.text, log.text
    assert f"/api/subscriptions/{sid}/events?ticket=*** " in log.text  # the access log, masked


@pytest_twisted.inlineCallbacks
def test_an_expired_ticket_is_refused(stack: Stack) -> Any:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    stack.web.subscriptions.clock = clock
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex=".")
    answer = yield get_ticket(stack, token, sub["id"])
    assert answer["expires"] == 1_700_000_060
    clock.advance(59.9)
    client = yield stack.open_stream(answer["url"], None)
    yield stack.close_stream(client)
    clock.advance(0.1)
    code, refused = yield stack.request("GET", answer["url"])
    assert code == 401 and error_type(refused) == "TicketExpired" and "/ticket" in refused["error"]["message"]
    # a new one works again
    fresh = yield get_ticket(stack, token, sub["id"])
    assert fresh["expires"] == 1_700_000_120 and fresh["ticket"] != answer["ticket"]
    client = yield stack.open_stream(fresh["url"], None)
    yield stack.close_stream(client)


def _altered(ticket: str, part: int, value: str) -> str:
    parts = ticket.split(".")
    parts[part] = value
    return ".".join(parts)


@pytest_twisted.inlineCallbacks
def test_tickets_that_are_not_for_this_stream(stack: Stack) -> Any:
    alice = yield stack.person("alice")
    bob = yield stack.person("bob")
    a1 = yield stack.subscribe(alice, kind="events", regex=".")
    a2 = yield stack.subscribe(alice, kind="events", regex="x")
    b1 = yield stack.subscribe(bob, kind="datasets", regex="^dataset\\.")
    hooked = yield stack.subscribe(alice, kind="events", regex="y", webhook=stack.hook)
    t1 = (yield get_ticket(stack, alice, a1["id"]))["ticket"]
    tb = (yield get_ticket(stack, bob, b1["id"]))["ticket"]

    def events(sid: str) -> str:
        return f"/api/subscriptions/{sid}/events"

    mac = t1.rsplit(".", 1)[1]
    tampered = [
        _altered(t1, 5, mac[:-1] + ("A" if mac[-1] != "A" else "B")),  # the MAC
        _altered(t1, 3, str(int(t1.split(".")[3]) + 3600)),  # a later expiry
        _altered(t1, 1, "bob"),  # another person
        _altered(t1, 2, a2["id"]),  # another subscription of the same person
        _altered(t1, 4, "A" * 16),  # another nonce
        _altered(t1, 1, "nobody"),  # a person who does not exist
        make_ticket(ticket_key("a guessed operator token"), "alice", a1["id"], "0" * 64, int(reactor.seconds()) + 60),
    ]
    for bad in tampered:
        for sid in {bad.split(".")[2], a1["id"]}:
            code, answer = yield stack.request("GET", f"{events(sid)}?ticket={bad}")
            assert code == 401 and error_type(answer) == "InvalidTicket", (bad, answer)
            assert "not valid" in answer["error"]["message"]

    # a good ticket on another stream: another subscription of hers, someone else's, his on hers
    for ticket, sid in [(t1, a2["id"]), (t1, b1["id"]), (tb, a1["id"]), (t1, "0" * 12), (t1, "nothex")]:
        code, answer = yield stack.request("GET", f"{events(sid)}?ticket={ticket}")
        assert code == 403 and error_type(answer) == "Forbidden", (sid, answer)
    # no ticket for someone else's subscription, nor a streamless one
    code, answer = yield stack.request("POST", f"/api/subscriptions/{a1['id']}/ticket", token=bob)
    assert code == 404 and error_type(answer) == "NotFound"
    code, answer = yield stack.request("POST", f"/api/subscriptions/{hooked['id']}/ticket", token=alice)
    assert code == 409 and error_type(answer) == "Conflict"
    code, answer = yield stack.request("POST", f"/api/subscriptions/{a1['id']}/ticket")
    assert code == 401 and error_type(answer) == "Unauthorized"

    # the subscription removed: 404; the person removed: 401
    t2 = (yield get_ticket(stack, alice, a2["id"]))["ticket"]
    code, _ = yield stack.request("DELETE", f"/api/subscriptions/{a2['id']}", token=alice)
    assert code == 200
    code, answer = yield stack.request("GET", f"{events(a2['id'])}?ticket={t2}")
    assert code == 404 and error_type(answer) == "NotFound"
    code, _ = yield stack.request("DELETE", "/api/people/bob", token=TOKEN)
    assert code == 200
    code, answer = yield stack.request("GET", f"{events(b1['id'])}?ticket={tb}")
    assert code == 401 and error_type(answer) == "InvalidTicket"
    # ... made again under the same name (a new token): the old ticket stays dead
    bob2 = yield stack.person("bob")
    b2 = yield stack.subscribe(bob2, kind="events", regex=".")
    forged_sid = _altered(tb, 2, b2["id"])
    for ticket, sid in [(tb, b1["id"]), (forged_sid, b2["id"])]:
        code, answer = yield stack.request("GET", f"{events(sid)}?ticket={ticket}")
        assert code == 401 and error_type(answer) == "InvalidTicket"
    # still good
    client = yield stack.open_stream(f"{events(a1['id'])}?ticket={t1}", None)
    yield stack.close_stream(client)


@pytest_twisted.inlineCallbacks
def test_malformed_tickets_are_a_clear_4xx(stack: Stack) -> Any:
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex=".")
    good = (yield get_ticket(stack, token, sub["id"]))["ticket"]
    path = f"/api/subscriptions/{sub['id']}/events"
    cases = [
        ("", 401, "InvalidTicket", "empty"),
        ("x" * 10_000, 401, "InvalidTicket", "too long"),
        (good + "A" * 300, 401, "InvalidTicket", "too long"),
        ("%C3%A9t%C3%A9", 401, "InvalidTicket", "ASCII"),  # UTF-8, not ASCII
        ("%FF%FE%00", 401, "InvalidTicket", "ASCII"),  # not even UTF-8
        ("abc", 401, "InvalidTicket", "6 parts"),
        ("v1.a.b", 401, "InvalidTicket", "6 parts"),
        (good + ".x", 401, "InvalidTicket", "6 parts"),
        (".....", 401, "InvalidTicket", "v1"),
        ("v1.....", 401, "InvalidTicket", "malformed"),
        (_altered(good, 0, "v2"), 401, "InvalidTicket", "v1"),
        (_altered(good, 1, "Alice"), 401, "InvalidTicket", "malformed"),
        (_altered(good, 2, "ZZ%2Fx"), 401, "InvalidTicket", "malformed"),
        (_altered(good, 3, "-5"), 401, "InvalidTicket", "malformed"),
        (_altered(good, 3, "9" * 40), 401, "InvalidTicket", "malformed"),
        (_altered(good, 5, "short"), 401, "InvalidTicket", "malformed"),
        (good + "%00", 401, "InvalidTicket", "malformed"),
        (good + "&ticket=" + good, 400, "BadRequest", "one ticket"),
    ]
    for raw, status, kind, words in cases:
        code, answer = yield stack.request("GET", f"{path}?ticket={raw}")
        assert (code, error_type(answer)) == (status, kind), (raw[:60], answer)
        assert words in answer["error"]["message"], (raw[:60], answer)
        assert raw not in answer["error"]["message"] or not raw
    # '?ticket' with no '=' is no ticket at all: the token is asked for
    code, answer = yield stack.request("GET", f"{path}?ticket")
    assert code == 401 and error_type(answer) == "Unauthorized"


def test_ticket_text() -> None:
    key = ticket_key("operator-token-" + "z" * 20)
    assert key == ticket_key("operator-token-" + "z" * 20) and len(key) == 32
    assert key != ticket_key("operator-token-" + "w" * 20)
    ticket = make_ticket(key, "alice", "0123456789ab", "f" * 64, 1_700_000_060, nonce="N" * 16)
    person, sid, expires, nonce, mac = parse_ticket(ticket)
    assert (person, sid, expires, nonce) == ("alice", "0123456789ab", 1_700_000_060, "N" * 16)
    assert parse_ticket(ticket.encode()) == parse_ticket(ticket)
    # the MAC covers the person's token hash: a new token, another MAC
    assert make_ticket(key, "alice", "0123456789ab", "e" * 64, 1_700_000_060, nonce="N" * 16) != ticket
    for bad in ("", b"", "x" * 257, "é", b"\xff", "a.b.c.d.e", ticket + ".", ticket.replace("v1", "v0"), 5, None):
        try:
            parse_ticket(bad)
        except TicketError as e:
            assert str(e)
        else:
            raise AssertionError(f"{bad!r} parsed")


def test_the_access_log_masks_tickets() -> None:
    assert mask_query(b"/api/subscriptions/x/events?ticket=SECRET") == b"/api/subscriptions/x/events?ticket=***"
    assert mask_query(b"/e?a=1&ticket=S&b=2") == b"/e?a=1&ticket=***&b=2"
    assert mask_query(b"/e?%74icket=S;ticket=T") == b"/e?%74icket=***;ticket=***"  # as request.args reads them
    assert mask_query(b"/e?tickets=1&x") == b"/e?tickets=1&x"
    assert mask_query(b"/e") == b"/e"
    # and, should a URL reach a log line some other way, the daemon's redactor masks it too
    assert Redactor()('"GET /e?x=1&ticket=v1.a.b HTTP/1.1" <Request uri=/e?ticket=T>') == \
        '"GET /e?x=1&ticket=*** HTTP/1.1" <Request uri=/e?ticket=***>'


# --------------------------------------------------------------------------- #
# a person's budgets: one person cannot exhaust the node for the others


@pytest_twisted.inlineCallbacks
def test_a_person_has_a_budget_of_streams(stack: Stack) -> Any:
    """The attack: one person opens thousands of SSE streams (a descriptor
    each). Past their budget the next one is 429; others still get theirs."""
    stack.web.subscriptions.max_streams_per_person = 3
    greedy = yield stack.person()
    other = yield stack.person()
    sub = yield stack.subscribe(greedy, kind="events", regex=r"^event\.saved\.")
    clients = []
    for _ in range(3):
        clients.append((yield stack.open_stream(sub["events"], greedy)))
    code, answer = yield stack.request("GET", sub["events"], token=greedy)
    assert code == 429 and error_type(answer) == "TooManyStreams"
    assert "close one first" in answer["error"]["message"]
    theirs = yield stack.subscribe(other, kind="events", regex=r"^event\.saved\.")
    yield stack.open_stream(theirs["events"], other)
    clients[0].close()
    yield clients[0].closed
    name = greedy.partition(".")[0]
    yield eventually(lambda: len(stack.web.subscriptions.streams_of.get(name, ())) == 2, 5,
                     "the server to see the stream go")
    yield stack.open_stream(sub["events"], greedy)


@pytest_twisted.inlineCallbacks
def test_a_person_has_a_budget_of_compiled_regexes(stack: Stack) -> Any:
    """The attack: 100 subscriptions of regexes like \\pL{440}x, each near RE2's
    compile budget, took the node from 215 to 703 MB. A person's regexes
    compiled together stay within their budget (429 past it)."""
    greedy = yield stack.person()
    first = yield stack.subscribe(greedy, kind="events", regex=r"\pL{440}x")
    assert first["id"]
    code, answer = yield stack.request("POST", "/api/subscriptions", {"kind": "events", "regex": r"\pL{440}y"},
                                       token=greedy)
    assert code == 429 and error_type(answer) == "OverBudget", answer
    assert "RE2 instructions" in answer["error"]["message"]
    code, answer = yield stack.request("POST", "/api/subscriptions", {"kind": "datasets", "regex": r"\pL{440}y"},
                                       token=greedy)
    assert code == 429, answer  # the budget covers both kinds
    yield stack.subscribe(greedy, kind="events", regex=r"^event\.saved\.")  # small ones still fit
    other = yield stack.person()
    yield stack.subscribe(other, kind="events", regex=r"\pL{440}x")


@pytest_twisted.inlineCallbacks
def test_a_person_has_a_budget_of_queued_messages(stack: Stack) -> Any:
    """The attack: 100 subscriptions x max_length 100,000 let one person have
    10 million messages queued. Their queues' bounds add up to at most their budget."""
    for component in (stack.user_notification, stack.user_pub_sub):
        component.max_queued_per_person = 25
    greedy = yield stack.person()
    yield stack.subscribe(greedy, kind="events", regex="a", max_length=10)
    yield stack.subscribe(greedy, kind="datasets", regex="b", max_length=10)
    code, answer = yield stack.request("POST", "/api/subscriptions", {"kind": "events", "regex": "c",
                                                                      "max_length": 10}, token=greedy)
    assert code == 429 and error_type(answer) == "OverBudget", answer
    assert "messages together" in answer["error"]["message"]
    yield stack.subscribe(greedy, kind="events", regex="c", max_length=5)


# --------------------------------------------------------------------------- #
# webhooks


@pytest_twisted.inlineCallbacks
def test_webhook_delivery_and_its_failures(stack: Stack) -> Any:
    token = yield stack.person()
    failures = yield stack.watch_failures(token)
    sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.", webhook=stack.hook)
    assert sub["events"] is None
    code, answer = yield stack.request("GET", f"/api/subscriptions/{sub['id']}/events", token=token)
    assert code == 409 and error_type(answer) == "Conflict"

    yield stack.emit("saved", "ok1")
    yield eventually(lambda: stack.receiver.requests, 5, "the webhook POST")
    request = stack.receiver.requests[0]
    assert request["body"]["topic"] == "event.saved.ok1"
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["x-ooidx-subscription"] == sub["id"]

    # failing: retried (3 attempts), each failure an event, then given up and acked
    stack.receiver.mode = "fail"
    yield stack.emit("saved", "bad1")
    yield eventually(lambda: len([f for f in failures if f.get("given_up")]) == 1, 5, "giving up")
    mine = [f for f in failures if f.get("webhook_subscription") == sub["id"]]
    assert [f["attempt"] for f in mine] == [1, 2, 3] and mine[0]["topic"] == "event.failed.-"
    assert "HTTP 500" in mine[0]["reason"]
    assert len(stack.receiver.requests) == 4
    queue = stack.bus.transport.broker.queues[sub["queue"]]
    yield eventually(lambda: not queue.ready and not any(c.unacked for c in queue.consumers), 5, "the ack")

    # slow: each attempt times out
    failures.clear()
    stack.receiver.mode = "slow"
    yield stack.emit("saved", "slow1")
    yield eventually(lambda: any(f.get("given_up") for f in failures), 10, "giving up on a slow webhook")
    assert all("in time" in f["reason"] for f in failures), [f["reason"] for f in failures]

    # and the next message is delivered once the receiver is well again
    stack.receiver.mode = "ok"
    before = len(stack.receiver.requests)
    yield stack.emit("saved", "ok2")
    yield eventually(lambda: len(stack.receiver.requests) > before, 5, "delivery after the failures")
    assert stack.receiver.requests[-1]["body"]["dataset"] == "ok2"
    # failures of a webhook never went to a webhook subscription
    assert not [r for r in stack.receiver.requests if r["body"]["topic"].startswith("event.failed")]


@pytest_twisted.inlineCallbacks
def test_unreachable_webhook(stack: Stack) -> Any:
    token = yield stack.person()
    failures = yield stack.watch_failures(token)
    sub = yield stack.subscribe_then_gone(token, kind="events", regex=r"^event\.saved\.",
                                          webhook=f"http://127.0.0.1:{stack.dead_port}/hook")
    yield stack.emit("saved", "x")
    yield eventually(lambda: any(f.get("given_up") for f in failures), 5, "giving up")
    assert all(f["webhook_subscription"] == sub["id"] for f in failures)
    assert "ConnectionRefused" in failures[0]["reason"]


@pytest_twisted.inlineCallbacks
def test_a_failing_webhook_tells_its_person_only_and_never_its_url(stack: Stack) -> Any:
    r"""The attack: a person subscribes to ^event\.failed and reads another
    person's webhook URL (and its secret) out of the failure events; anyone
    reads it from GET /api/events. Now the failure names the subscription and
    the host only, and goes to its own person's streams only."""
    secret = "SECRET" + uuid.uuid4().hex
    victim = yield stack.person()
    victim_failures = yield stack.watch_failures(victim)
    attacker = yield stack.person()
    attacker_failures = yield stack.watch_failures(attacker)
    hook = f"http://127.0.0.1:{stack.dead_port}/hook/{secret}?sig={secret}x"
    sub = yield stack.subscribe_then_gone(victim, kind="events", regex=r"^event\.saved\.", webhook=hook)
    yield stack.emit("saved", "x")
    yield eventually(lambda: any(f.get("given_up") for f in victim_failures), 5, "giving up")
    failure = victim_failures[0]
    assert failure["webhook_subscription"] == sub["id"]
    assert failure["host"] == f"127.0.0.1:{stack.dead_port}"
    assert "url" not in failure and "person" not in failure
    yield sleep(0.2)  # what would have gone elsewhere has arrived by now
    assert len(attacker_failures) == 0, list(attacker_failures)
    assert not stack.failures, stack.failures  # the notification fanout (and so its ring) never saw it
    code, answer = yield stack.request("GET", "/api/events")
    assert code == 200 and secret not in json.dumps(answer)
    assert all(secret not in json.dumps(f) for f in victim_failures)


class _Delivery:
    def __init__(self) -> None:
        self.acked = 0
        self.nacked = 0

    def ack(self) -> None:
        self.acked += 1

    def nack(self, requeue: bool = True) -> None:
        self.nacked += 1


@pytest_twisted.inlineCallbacks
def test_webhook_backoff_with_a_clock() -> Any:
    bus = magnet.connect(f"memory://clock-{uuid.uuid4().hex}", reactor)
    bus.startService()
    sent: List[Any] = []
    clock = task.Clock()
    answers = [500, 503, defer.fail(ConnectionRefusedError("refused")), 204]
    posts: List[float] = []

    def post(url: str, body: bytes, headers: Dict[str, str]) -> Any:
        posts.append(clock.seconds())
        answer = answers.pop(0)
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

    record = {"id": "abcdef012345", "person": "p", "queue": "user.p.abcdef012345", "webhook": "https://h.example/"}
    delivery = WebhookDelivery(bus, record, post, clock, attempts=5, base_delay=1.0, max_delay=3.0,
                               report=lambda record, event: sent.append(event.json()))
    message = magnet.Message.of_json({"topic": "event.saved.x"})
    settled = _Delivery()
    delivery._on_message(message, settled)
    assert posts == [0.0] and settled.acked == 0
    clock.advance(0.99)
    assert len(posts) == 1
    clock.advance(0.01)
    assert posts == [0.0, 1.0]
    clock.advance(1.99)
    assert len(posts) == 2
    clock.advance(0.01)
    assert posts == [0.0, 1.0, 3.0]
    clock.advance(3.0)  # 4 s would be next, but max_delay is 3
    assert posts == [0.0, 1.0, 3.0, 6.0] and settled.acked == 1 and delivery.delivered == 1
    assert [e["attempt"] for e in sent] == [1, 2, 3] and not any(e["given_up"] for e in sent)

    # given up after the limit, acked, one event each failure
    sent.clear()
    answers[:] = [500, 500]
    delivery.attempts = 2
    settled = _Delivery()
    delivery._on_message(message, settled)
    clock.advance(1.0)
    assert settled.acked == 1 and delivery.given_up == 1 and [e["given_up"] for e in sent] == [False, True]

    # stopping mid-backoff gives the message back and never posts again
    answers[:] = [500, 200]
    settled = _Delivery()
    delivery._on_message(message, settled)
    yield delivery.stop()
    clock.advance(100)
    assert settled.nacked == 1 and settled.acked == 0 and answers == [200]
    yield bus.stopService()


# --------------------------------------------------------------------------- #
# the operator's tail


@pytest_twisted.inlineCallbacks
def test_event_tail_over_sse(stack: Stack) -> Any:
    code, answer = yield stack.request("GET", "/api/events/stream")
    assert code == 401
    code, answer = yield stack.request("GET", "/api/events/stream?regex=(%3F%3Dx)", token=TOKEN)
    assert code == 400 and error_type(answer) == "InvalidRegex"
    yield stack.emit("registered", "old")
    yield eventually(lambda: stack.notification.ring, 5, "the ring")
    client = yield stack.open_stream("/api/events/stream?regex=%5Eevent%5C.(saved|registered)&recent=5", TOKEN)
    yield stack.emit("fetched", "a")
    yield stack.emit("saved", "b")
    got = yield client.wait_for(2)
    assert [e["data"]["topic"] for e in got] == ["event.registered.old", "event.saved.b"]
    yield stack.close_stream(client)


@pytest_twisted.inlineCallbacks
def test_ooidx_events_command(stack: Stack) -> Any:
    import io
    out, err = io.StringIO(), io.StringIO()
    run = threads.deferToThread(cli.run, ["--url", stack.web.url, "--token", TOKEN, "events", "--count", "2",
                                          r"^event\.saved\."], out, err, {})
    yield eventually(lambda: stack.web.subscriptions.streams, 5, "the command's stream")
    yield sleep(0.1)
    yield stack.emit("fetched", "no")
    yield stack.emit("saved", "one")
    yield stack.emit("saved", "two")
    code = yield run
    assert code == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "event.saved.one" in lines[0] and "event.saved.two" in lines[1]

    out, err = io.StringIO(), io.StringIO()
    code = yield threads.deferToThread(cli.run, ["--url", stack.web.url, "--token", "bad" * 8, "events"], out, err, {})
    assert code == 1 and "Unauthorized" in err.getvalue()


# --------------------------------------------------------------------------- #
# RabbitMQ


@pytest_twisted.inlineCallbacks
def test_kept_and_bounded_on_rabbitmq(broker_url: str) -> Any:
    s = Stack(broker_url)
    yield s.start()
    queue = None
    try:
        token = yield s.person()
        sub = yield s.subscribe(token, kind="events", regex=r"^event\.saved\.rmq", max_length=3)
        queue = sub["queue"]
        for n in range(6):
            yield s.emit("saved", f"rmq{n}")
        yield eventually(lambda: s.user_notification.routed >= 6, 10, "routing")
        yield sleep(0.3)
        client = yield s.open_stream(sub["events"], token)
        yield client.wait_for(3)
        yield sleep(0.3)
        assert [e["data"]["dataset"] for e in client.events] == ["rmq3", "rmq4", "rmq5"]
        yield s.close_stream(client)
        code, _ = yield s.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
        assert code == 200
        queue = None
    finally:
        if queue is not None:
            yield s.bus.transport.delete_queue(queue)
        yield s.stop()


def test_changed_fanout_name() -> None:
    assert CHANGED_FANOUT == "user_subscriptions.changed"


# --------------------------------------------------------------------------- #
# Standard Webhooks: signatures, the challenge, rotation, the delivery log


def verified(secret: str, request: Dict[str, Any]) -> Any:
    """What a receiver does: standardwebhooks checks the POST as it arrived (raises if forged)."""
    from standardwebhooks import Webhook
    return Webhook(secret).verify(request["raw"], request["headers"])


@pytest_twisted.inlineCallbacks
def test_webhooks_are_signed_and_verified_by_standardwebhooks(stack: Stack) -> Any:
    from standardwebhooks import WebhookVerificationError
    token = yield stack.person()
    sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.", webhook=stack.hook)
    secret = sub["secret"]
    assert secret.startswith("whsec_") and sub["state"] == "active" and sub["signed"] is True
    # the challenge came first, signed too, and the secret is shown once only
    assert len(stack.receiver.verifications) == 1
    challenge = stack.receiver.verifications[0]
    assert verified(secret, challenge)["type"] == "webhook.verification"
    assert challenge["headers"]["webhook-challenge"] == challenge["body"]["challenge"]
    for path in (f"/api/subscriptions/{sub['id']}", "/api/subscriptions"):
        code, answer = yield stack.request("GET", path, token=token)
        assert code == 200 and secret not in json.dumps(answer) and "secret" not in json.dumps(answer)
    assert secret not in json.dumps((yield stack.request("GET", "/api/user_subscriptions", token=TOKEN)))

    yield stack.emit("saved", "sig1")
    yield eventually(lambda: stack.receiver.requests, 5, "the signed POST")
    request = stack.receiver.requests[0]
    assert verified(secret, request)["dataset"] == "sig1"
    assert request["headers"]["webhook-id"].startswith("msg_")
    forged = dict(request, raw=request["raw"].replace(b"sig1", b"sig2"))
    with pytest.raises(WebhookVerificationError):
        verified(secret, forged)
    with pytest.raises(WebhookVerificationError):
        verified("whsec_" + "A" * 43 + "=", request)

    # retries keep the webhook-id (the receiver's key for dropping duplicates)
    stack.receiver.mode = "fail"
    yield stack.emit("saved", "retried")
    yield eventually(lambda: len([r for r in stack.receiver.requests if r["body"]["dataset"] == "retried"]) >= 2,
                     5, "a retry")
    tries = [r for r in stack.receiver.requests if r["body"]["dataset"] == "retried"]
    assert len({r["headers"]["webhook-id"] for r in tries}) == 1
    stack.receiver.mode = "ok"

    # rotation: a new secret, shown once; meanwhile POSTs verify with the old and the new one
    code, rotated = yield stack.request("POST", f"/api/subscriptions/{sub['id']}/secret", {}, token=token)
    assert code == 200 and rotated["secret"] != secret and rotated["previous_valid_until"]
    before = len(stack.receiver.requests)
    yield stack.emit("saved", "rotated")
    yield eventually(lambda: any(r["body"]["dataset"] == "rotated" for r in stack.receiver.requests[before:]),
                     10, "a POST after the rotation")
    after = [r for r in stack.receiver.requests[before:] if r["body"]["dataset"] == "rotated"][0]
    assert verified(rotated["secret"], after) and verified(secret, after)
    assert len(after["headers"]["webhook-signature"].split(" ")) == 2

    # a secret the person brings (bad ones refused, never echoed)
    own = "whsec_" + base64.b64encode(b"k" * 32).decode()
    code, answer = yield stack.request("POST", f"/api/subscriptions/{sub['id']}/secret", {"secret": own},
                                       token=token)
    assert code == 200 and answer["secret"] == own
    for bad in ("whsec_short", "nope" + own, 42, "whsec_" + "!" * 44, "whsec_" + base64.b64encode(b"k" * 80).decode()):
        code, answer = yield stack.request("POST", f"/api/subscriptions/{sub['id']}/secret", {"secret": bad},
                                           token=token)
        assert code == 400 and error_type(answer) == "InvalidSecret", answer
        assert str(bad) not in answer["error"]["message"]


@pytest_twisted.inlineCallbacks
def test_a_callback_that_does_not_answer_its_challenge_is_refused(stack: Stack) -> Any:
    token = yield stack.person()
    reasons = {}
    for mode, words in (("wrong", "another challenge"), ("fail", "HTTP 500"), ("slow", "within"),
                        ("redirect", "forbidden address"), ("huge", "too large")):
        stack.receiver.verify_mode = mode
        queues = set(stack.bus.transport.broker.queues)
        code, answer = yield stack.request("POST", "/api/subscriptions", {
            "kind": "events", "regex": ".", "webhook": stack.hook}, token=token)
        assert code == 422 and error_type(answer) == "WebhookNotVerified", (mode, answer)
        assert words in answer["error"]["message"], (mode, answer)
        reasons[mode] = answer["error"]["message"]
        assert set(stack.bus.transport.broker.queues) == queues  # nothing made
        code, listed = yield stack.request("GET", "/api/subscriptions", token=token)
        assert listed["subscriptions"] == [], mode
    assert "169.254" not in reasons["redirect"] or "forbidden" in reasons["redirect"]
    # the Standard Webhooks endpoint verification header is an answer too
    own = "whsec_" + base64.b64encode(b"s" * 32).decode()
    stack.receiver.verify_mode, stack.receiver.secret = "header", own
    sub = yield stack.subscribe(token, kind="events", regex=".", webhook=stack.hook, secret=own)
    assert sub["secret"] == own and sub["state"] == "active"


@pytest_twisted.inlineCallbacks
def test_delivery_log_and_disabled_after_failures_in_a_row() -> Any:
    stack = Stack(attempts=2, base_delay=0.02, disable_after=4)
    yield stack.start()
    try:
        token = yield stack.person()
        failures = yield stack.watch_failures(token)
        sub = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.", webhook=stack.hook)
        yield stack.emit("saved", "a")
        yield eventually(lambda: stack.receiver.requests, 5, "the first POST")
        path = f"/api/subscriptions/{sub['id']}/deliveries"
        yield eventually(lambda: [k for k in stack.store.data if k.startswith("webhook_log:")], 5, "the log")
        code, log = yield stack.request("GET", path, token=token)
        assert code == 200 and log["state"] == "active"
        stack.receiver.mode = "fail"
        for name in ("b", "c", "d"):
            yield stack.emit("saved", name)
        yield eventually(lambda: any(f.get("disabled") for f in failures), 10, "the disabled event")
        event = [f for f in failures if f.get("disabled")][0]
        assert event["webhook_subscription"] == sub["id"] and event["consecutive_failures"] == 4
        assert event["enable"].endswith(f"/{sub['id']}/verify")
        code, record = yield stack.request("GET", f"/api/subscriptions/{sub['id']}", token=token)
        assert record["state"] == "disabled" and "4 failed deliveries" in record["disabled_reason"]
        code, log = yield stack.request("GET", path, token=token)
        assert code == 200 and log["state"] == "disabled" and log["consecutive_failures"] >= 4
        first = log["deliveries"][-1]
        assert first["ok"] is True and first["status"] == 200 and first["attempt"] == 1
        assert set(first) >= {"time", "status", "attempt", "latency"} and first["latency"] >= 0
        failed = [e for e in log["deliveries"] if not e["ok"]]
        assert failed and all(e["status"] == 500 for e in failed) and {e["attempt"] for e in failed} == {1, 2}
        # disabled: nothing more is POSTed; what arrives waits in the queue
        yield sleep(0.3)
        count = len(stack.receiver.requests)
        yield stack.emit("saved", "kept")
        yield sleep(0.3)
        assert len(stack.receiver.requests) == count
        # a verification that fails changes nothing; one that passes enables it, and what waited arrives
        stack.receiver.verify_mode = "wrong"
        code, answer = yield stack.request("POST", f"/api/subscriptions/{sub['id']}/verify", token=token)
        assert code == 422 and error_type(answer) == "WebhookNotVerified"
        code, record = yield stack.request("GET", f"/api/subscriptions/{sub['id']}", token=token)
        assert record["state"] == "disabled"
        stack.receiver.verify_mode, stack.receiver.mode = "echo", "ok"
        code, answer = yield stack.request("POST", f"/api/subscriptions/{sub['id']}/verify", token=token)
        assert code == 200 and answer["state"] == "active" and "secret" not in answer
        yield eventually(lambda: any(r["body"]["dataset"] == "kept" for r in stack.receiver.requests), 5,
                         "what waited, delivered")
        code, log = yield stack.request("GET", path, token=token)
        assert log["deliveries"][0]["ok"] is True
        # the log is bounded
        assert len(log["deliveries"]) <= 50
        # the log goes with the subscription
        yield stack.request("DELETE", f"/api/subscriptions/{sub['id']}", token=token)
        assert not [k for k in stack.store.data if k.startswith("webhook_log:")]
    finally:
        yield stack.stop()


@pytest_twisted.inlineCallbacks
def test_a_disabled_webhook_not_verified_again_expires() -> Any:
    stack = Stack(attempts=1, base_delay=0.02, disable_after=2, disabled_ttl=0.4)
    yield stack.start()
    try:
        token = yield stack.person()
        failures = yield stack.watch_failures(token)
        keep = yield stack.subscribe(token, kind="events", regex=r"^event\.saved\.", webhook=stack.hook)
        stack.receiver.mode = "fail"
        sub = yield stack.subscribe(token, kind="events", regex=r"^event\.fetched\.", webhook=stack.hook)
        for name in ("a", "b"):
            yield stack.emit("fetched", name)
        yield eventually(lambda: any(f.get("disabled") for f in failures), 10, "disabled")
        yield eventually(lambda: any(f.get("expired") for f in failures), 10, "the expiry event")
        expired = [f for f in failures if f.get("expired")][0]
        assert expired["webhook_subscription"] == sub["id"] and "not verified again" in expired["reason"]
        yield eventually(lambda: sub["queue"] not in stack.bus.transport.broker.queues, 5, "the queue removed")
        code, answer = yield stack.request("GET", f"/api/subscriptions/{sub['id']}", token=token)
        assert code == 404
        assert not [k for k in stack.store.data if k.endswith(sub["id"])]
        # the active one stays
        code, answer = yield stack.request("GET", f"/api/subscriptions/{keep['id']}", token=token)
        assert code == 200 and answer["state"] == "active"
    finally:
        yield stack.stop()
