"""notification: the ring of recent events, read on notification.api (memory://)."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

import magnet
from magnet import Message, RemoteError

from ooidx import events
from ooidx.node.bootstrap import declare_topology
from ooidx.dissemination.notification import API, Notification
from ooidx.node.bootstrap import component_class

from tests.support.waiting import eventually


@pytest_twisted.async_yield_fixture
async def node() -> Any:
    bus = magnet.connect(f"memory://notification-{uuid.uuid4().hex}", reactor, rpc_timeout=5)
    bus.startService()
    await declare_topology(bus)
    notification = Notification("notification", bus, node="n", ring_size=5)
    await notification.start()
    yield bus, notification
    await notification.stopService()
    await bus.stopService()


def test_registered() -> None:
    assert component_class("notification") is Notification


@pytest_twisted.inlineCallbacks
def test_recent_events_bounded_filtered_oldest_first(node: Any) -> Any:
    bus, notification = node
    for n in range(7):
        yield events.emit(bus, "saved" if n % 2 else "fetched", f"ds{n}", n=n)
    yield eventually(lambda: notification.received == 7)
    recent = yield bus.call(API, "recent")
    assert [e["n"] for e in recent] == [2, 3, 4, 5, 6]  # the ring keeps 5
    assert recent[-1]["topic"] == "event.fetched.ds6" and recent[-1]["node"] == bus.node
    saved = yield bus.call(API, "recent", regex=r"^event\.saved\.")
    assert [e["dataset"] for e in saved] == ["ds3", "ds5"]
    last = yield bus.call(API, "recent", limit=2)
    assert [e["n"] for e in last] == [5, 6]
    none = yield bus.call(API, "recent", regex="nothing-matches")
    assert none == []


@pytest_twisted.inlineCallbacks
def test_bad_arguments_are_refused(node: Any) -> Any:
    bus, _ = node
    for kwargs, remote_type in (({"regex": "(?=x)"}, "InvalidRegex"), ({"regex": "a" * 5000}, "InvalidRegex"),
                                ({"limit": 0}, "ValueError"), ({"limit": 10_000}, "ValueError"),
                                ({"limit": "5"}, "ValueError")):
        with pytest.raises(RemoteError) as e:
            yield bus.call(API, "recent", **kwargs)
        assert e.value.remote_type == remote_type, kwargs


@pytest_twisted.inlineCallbacks
def test_malformed_messages_are_ignored(node: Any) -> Any:
    bus, notification = node
    yield bus.send("notification", Message(body=b"{}", type="something-else", headers={"topic": "x"}),
                   mandatory=False)
    yield bus.send("notification", Message(body=b"not json", type="event", headers={"topic": "event.saved.x"}),
                   mandatory=False)
    yield bus.send("notification", Message.of_json([1, 2], type="event", headers={"topic": "event.saved.x"}),
                   mandatory=False)
    yield bus.send("notification", Message.of_json({}, type="event"), mandatory=False)
    yield eventually(lambda: notification.dropped == 4)
    yield events.emit(bus, "saved", "good")
    yield eventually(lambda: notification.received == 1)
    recent = yield bus.call(API, "recent")
    assert [e["dataset"] for e in recent] == ["good"]
