"""Components' operations in memory, to serve on a bus in a test (fast tier
and broker tiers alike): written once here, not once per test module.

- L{FakeStore}: the attribute store's four operations (C{get}, C{set},
  C{query}, C{delete}) over a dict, C{data};
- L{FakePubSub}: pub_sub's C{subscribe} / C{unsubscribe}, a durable address per
  subscription name (the regex C{"("} is refused, as pub_sub refuses it);
- L{EchoStore}: a service on the C{attribute_store} queue for clients of the
  web port's /api/call (C{get} of key C{"a"}, C{echo}, C{raw} bytes);
- L{PubSubListing}: pub_sub's C{list} (two subscriptions), for the web page;
- L{FakeNotificationApi}: notification's C{recent} (one event);
- L{CallTarget}: every way a call through /api/call can end.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional

from twisted.internet import defer, task

import magnet
from magnet import operation

from ooidx.errors import Forbidden, InvalidRegex


class FakeStore:
    """The attribute store's four operations, in memory (JSON-copied values)."""

    def __init__(self) -> None:
        self.data: Dict[str, Any] = {}

    @operation
    def get(self, key: str) -> Any:
        return self.data[key]

    @operation
    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))

    @operation
    def query(self, regex: str) -> Dict[str, Any]:
        return {k: v for k, v in self.data.items() if re.search(regex, k)}

    @operation
    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


class FakePubSub:
    """pub_sub's subscribe/unsubscribe: a durable address per name."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.subscriptions: Dict[str, str] = {}

    @operation
    @defer.inlineCallbacks
    def subscribe(self, regex: str, name: str) -> Any:
        if regex == "(":
            raise magnet.RemoteError("InvalidRegex", "missing )")
        address = f"pubsub.sub.{name}"
        yield self.bus.transport.declare_queue(address, durable=True)
        self.subscriptions[name] = regex
        return {"name": name, "regex": regex, "address": address}

    @operation
    @defer.inlineCallbacks
    def unsubscribe(self, name: str) -> Any:
        self.subscriptions.pop(name, None)
        yield self.bus.transport.delete_queue(f"pubsub.sub.{name}")
        return True


class EchoStore:
    """What `ooidx call` and /api/call are tried on: a value, the arguments back, bytes."""

    @operation
    def get(self, key: str) -> Any:
        return {"a": [1, 2]}[key]

    @operation
    def echo(self, **kwargs: Any) -> Any:
        return kwargs

    @operation
    def raw(self) -> bytes:
        return b"\x00raw\xff"


class PubSubListing:
    """pub_sub's C{list}: two subscriptions, the persister's and one of a person's."""

    @operation
    def list(self) -> List[Dict[str, Any]]:
        return [{"name": "persister", "regex": "^dataset\\.", "address": "pubsub.sub.persister"},
                {"name": "user.ann.0123456789ab", "regex": "^dataset\\.secret-project",
                 "address": "pubsub.sub.user.ann.0123456789ab"}]


class FakeNotificationApi:
    """notification's C{recent} on C{notification.api}: one event, the questions kept in C{asked};
    the regex C{"("} is refused as notification refuses it."""

    def __init__(self) -> None:
        self.asked: List[Dict[str, Any]] = []

    @operation
    def recent(self, regex: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        self.asked.append({"regex": regex, "limit": limit})
        if regex == "(":
            raise InvalidRegex("missing ): (")
        return [{"topic": "event.registered.sst", "kind": "registered", "dataset": "sst", "time": 1.0,
                 "node": "n1"}][:limit]


class CallTarget:
    """Every way a call through the web port's /api/call can end, served on a
    queue (C{attribute_store} in the tests): a value, the arguments back, a
    refusal (C{Forbidden}), bytes, and an answer 5 s late on C{clock}."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    @operation
    def get(self, key: str) -> Any:
        return {"a": 1}[key]

    @operation
    def echo(self, **kwargs: Any) -> Any:
        return kwargs

    @operation
    def refuse(self) -> Any:
        raise Forbidden("127.0.0.1: loopback address refused")

    @operation
    def raw(self) -> bytes:
        return b"\x00\x01binary\xff"

    @operation
    def slow(self) -> defer.Deferred:
        return task.deferLater(self.clock, 5, lambda: "late")
