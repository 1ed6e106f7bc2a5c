"""Helpers for the dissemination tests (issue 5): a fake pub_sub that keeps
the contract's subscribe/route, an event recorder on the notification
fanout, and a twisted.web upstream of made-up DAP datasets (for the cases a
real pydap server cannot show: a .dods that breaks mid-body, a large one)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.web import resource, server

from magnet import Message, operation

from ooidx import events


class FakePubSub:
    """subscribe(regex, name) -> {"name", "regex", "address"} (a durable queue
    pubsub.sub.NAME); route(topic) -> matching addresses, each once."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.subscriptions: Dict[str, Dict[str, str]] = {}
        self.routed: List[str] = []

    @operation
    def subscribe(self, regex: str, name: Optional[str] = None) -> Any:
        name = name or f"anon{len(self.subscriptions)}"
        re.compile(regex)
        address = f"pubsub.sub.{name}"
        self.subscriptions[name] = {"name": name, "regex": regex, "address": address}
        d = self.bus.transport.declare_queue(address, durable=True)
        return d.addCallback(lambda _: dict(self.subscriptions[name]))

    @operation
    def route(self, topic: str) -> List[str]:
        self.routed.append(topic)
        out: List[str] = []
        for sub in self.subscriptions.values():
            if re.search(sub["regex"], topic) and sub["address"] not in out:
                out.append(sub["address"])
        return out


class EventLog:
    """Every event on the notification fanout, to wait for by kind."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self._waiters: List[Any] = []
        self.subscription: Any = None

    @classmethod
    def on(cls, bus: Any) -> defer.Deferred:
        log = cls()

        def got(message: Message) -> None:
            if message.type == events.EVENT:
                log.add(message.json())

        d = bus.subscribe(events.NOTIFICATION, got)
        return d.addCallback(lambda s: setattr(log, "subscription", s) or log)

    def add(self, event: Dict[str, Any]) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            kind, dataset, d = waiter
            if event.get("kind") == kind and (dataset is None or event.get("dataset") == dataset):
                self._waiters.remove(waiter)
                d.callback(event)

    def of(self, kind: str, dataset: Optional[str] = None) -> List[Dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind and (dataset is None or e.get("dataset") == dataset)]

    def next(self, kind: str, dataset: Optional[str] = None, timeout: float = 10.0, *, skip: int = 0) -> defer.Deferred:
        """The (skip+1)-th event of this kind (counting those already seen)."""
        seen = self.of(kind, dataset)
        if len(seen) > skip:
            return defer.succeed(seen[skip])
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((kind, dataset, d))
        d.addTimeout(timeout, reactor)
        if skip:
            d.addCallback(lambda _: self.next(kind, dataset, timeout, skip=skip))
        return d

    def cancel(self) -> defer.Deferred:
        return self.subscription.cancel() if self.subscription is not None else defer.succeed(None)


DAS = b'Attributes {\n    x {\n        String units "m";\n    }\n}\n'
DDS = b"Dataset {\n    Float64 x[x = 2];\n} made;\n"


class _Dods(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, mode: str) -> None:
        super().__init__()
        self.body = body
        self.mode = mode

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(len(self.body)).encode())
        if self.mode == "broken":
            request.write(self.body[: len(self.body) // 2])
            reactor.callLater(0.05, request.channel.transport.loseConnection)
            return server.NOT_DONE_YET
        if self.mode == "big":
            producer = _Producer(request, self.body)
            request.registerProducer(producer, False)
            return server.NOT_DONE_YET
        return self.body


class _Producer:
    """A pull producer: 64 KiB a call."""

    def __init__(self, request: server.Request, body: bytes) -> None:
        self.request = request
        self.body = body
        self.at = 0
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.at >= len(self.body):
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.request.write(self.body[self.at:self.at + 65536])
        self.at += 65536

    def stopProducing(self) -> None:
        self.stopped = True


class _Text(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"text/plain")
        return self.body


def dataset_site(datasets: Dict[str, Dict[str, Any]]) -> server.Site:
    """NAME.das / NAME.dds / NAME.dods for each entry {"dods": bytes, "mode":
    "whole"|"broken"|"big", "dds_status": 200}."""
    root = resource.Resource()
    for name, spec in datasets.items():
        root.putChild(f"{name}.das".encode(), _Text(spec.get("das", DAS)))
        root.putChild(f"{name}.dds".encode(), _Text(spec.get("dds", DDS), spec.get("dds_status", 200)))
        root.putChild(f"{name}.dods".encode(), _Dods(spec["dods"], spec.get("mode", "whole")))
    site = server.Site(root)
    site.log = lambda *a, **k: None  # type: ignore[assignment]
    return site
