"""People's whole path without a socket: the web edge's site (tests.fast.web.edge_support),
user_notification, user_pub_sub and notification on a memory:// bus on a Clock,
the attribute store and pub_sub as in-memory stand-ins, webhooks POSTed to a
fake poster and host names resolved by a fake resolver."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

from twisted.internet import defer

from ooidx.config import SecurityConfig
from ooidx import events
from ooidx.dissemination.notification import Notification
from ooidx.people.user_notification import UserNotification
from ooidx.people.user_pub_sub import UserPubSub

from tests.fast.web.edge_support import TOKEN, Connection, Edge, Response, sse_events
from tests.support.doubles import FakePubSub, FakeStore

#: Names the fake resolver knows: a public address, and one that is loopback.
ADDRESSES = {"hooks.example": ["93.184.216.34"], "localhost": ["127.0.0.1"], "sneaky.example": ["10.0.0.1"],
             "odd.example": ["not-an-address"]}


def resolve(host: str, port: int) -> defer.Deferred:
    if host not in ADDRESSES:
        return defer.fail(OSError(f"no such host {host}"))
    return defer.succeed(ADDRESSES[host])


class Poster:
    """The webhook POSTs: what was posted, and what each answers (a status, an
    exception, or C{"hang"}: a Deferred never fired, so the delivery's own timer decides)."""

    def __init__(self) -> None:
        self.posts: List[Dict[str, Any]] = []
        self.answers: List[Any] = []
        self.default: Any = 200
        self.hanging: List[defer.Deferred] = []

    def __call__(self, url: str, body: bytes, headers: Dict[str, str]) -> defer.Deferred:
        import json

        self.posts.append({"url": url, "body": json.loads(body), "headers": dict(headers)})
        answer = self.answers.pop(0) if self.answers else self.default
        if answer == "hang":
            d: defer.Deferred = defer.Deferred()
            self.hanging.append(d)
            return d
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        return defer.succeed(answer)

    def exchange(self, url: str, body: bytes, headers: Dict[str, str]) -> defer.Deferred:
        """The receiver's answer to a webhook's verification challenge: it
        echoes the challenge (as a receiver by the Standard Webhooks convention
        does), so subscriptions with a webhook become active."""
        import json

        self.verified = getattr(self, "verified", []) + [url]
        challenge = json.loads(body).get("challenge")
        return defer.succeed((200, {}, json.dumps({"challenge": challenge}).encode()))


class Stream:
    """An event stream read from its connection as it comes."""

    def __init__(self, edge: Edge, connection: Connection) -> None:
        self.edge = edge
        self.connection = connection

    @property
    def response(self) -> Response:
        response = self.connection.response()
        assert response is not None
        return response

    @property
    def events(self) -> List[Dict[str, Any]]:
        return sse_events(self.response.body)[0]

    @property
    def comments(self) -> List[str]:
        return sse_events(self.response.body)[1]

    def wait_for(self, count: int, seconds: float = 5.0) -> List[Dict[str, Any]]:
        self.edge.until(lambda: len(self.events) >= count, seconds)
        return self.events

    def close(self) -> None:
        self.connection.close()
        self.edge.until(lambda: True)

    @property
    def ended(self) -> bool:
        return self.response.complete


class People:
    """The stack, started; C{request} answers L{Response}s."""

    def __init__(self, case: Any, *, attempts: int = 3, base_delay: float = 1.0, allow_hosts: tuple = (),
                 **web: Any) -> None:
        self.case = case
        self.edge = Edge(case, **web)
        self.clock = self.edge.clock
        self.bus = self.edge.bus
        self.store = FakeStore()
        self.pub_sub = FakePubSub(self.bus)
        self.poster = Poster()
        security = SecurityConfig(allow_private=False, allow_hosts=tuple(allow_hosts))
        common = dict(node="n", security=security, clock=self.clock, webhook_attempts=attempts,
                      webhook_base_delay=base_delay, webhook_timeout=1.0, poster=self.poster, exchange=self.poster.exchange, resolver=resolve)
        self.notification = Notification("notification", self.bus, node="n", clock=self.clock)
        self.user_notification = UserNotification("user_notification", self.bus, **common)
        self.user_pub_sub = UserPubSub("user_pub_sub", self.bus, **common)
        self.failures: List[Dict[str, Any]] = []
        self.edge.start(self.notification, self.user_notification, self.user_pub_sub,
                        served={"attribute_store": self.store, "pub_sub": self.pub_sub})
        self.edge.wait(events.subscribe(self.bus, r"^event\.failed\.", self.failures.append))
        self.api = self.edge.web.subscriptions

    def request(self, method: str, path: str, body: Any = None, *, token: Optional[str] = None,
                **options: Any) -> Response:
        return self.edge.request(method, path, body, token=token, **options)

    def person(self, name: Optional[str] = None) -> str:
        name = name or "p" + uuid.uuid4().hex[:8]
        r = self.request("POST", "/api/people", {"name": name}, token=TOKEN)
        self.case.assertEqual(r.status, 201, r)
        return r.json()["token"]

    def subscribe(self, token: str, **body: Any) -> Dict[str, Any]:
        r = self.request("POST", "/api/subscriptions", body, token=token)
        self.case.assertEqual(r.status, 201, r)
        self.edge.until(lambda: True)
        return r.json()

    def open_stream(self, path: str, token: Optional[str], last_id: Optional[str] = None) -> Stream:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        connection = self.edge.open("GET", path, token=token, headers=headers)
        self.edge.until(lambda: connection.response() is not None)
        response = connection.response()
        self.case.assertEqual(response.status, 200, response)
        self.case.assertTrue(response.header("Content-Type").startswith("text/event-stream"))
        stream = Stream(self.edge, connection)
        self.edge.until(lambda: stream.comments)
        return stream

    def emit(self, kind: str, dataset: Optional[str], **details: Any) -> None:
        self.edge.wait(events.emit(self.bus, kind, dataset, **details))
        self.edge.until(lambda: True)

    def settle(self, seconds: float = 0.1) -> None:
        end = self.clock.seconds() + seconds
        self.edge.until(lambda: self.clock.seconds() >= end, seconds + 1)

    def watch_failures(self, token: str) -> Stream:
        sub = self.subscribe(token, kind="events", regex=r"^event\.failed\.")
        return self.open_stream(sub["events"], token)


__all__ = ["People", "Poster", "Stream", "TOKEN", "resolve", "ADDRESSES"]
