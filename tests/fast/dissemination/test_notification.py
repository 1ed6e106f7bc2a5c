"""notification: the ring of recent events, read on notification.api (memory://, on a Clock)."""
from __future__ import annotations

import uuid
from typing import Any

import magnet
from magnet import Message, RemoteError

from ooidx import events
from ooidx.dissemination.notification import API, Notification
from ooidx.node.bootstrap import component_class, declare_topology

from tests.fast.core.support import ClockCase, on_clock


class NotificationTests(ClockCase):
    async def node(self) -> Any:
        bus = magnet.connect(f"memory://notification-{uuid.uuid4().hex}", self.clock, rpc_timeout=5)
        bus.startService()
        await declare_topology(bus)
        notification = Notification("notification", bus, node="n", ring_size=5)
        await notification.start()

        async def stop() -> None:
            await notification.stopService()
            await bus.stopService()

        self.addCleanup(lambda: self.wait(stop()))
        return bus, notification

    def test_registered(self) -> None:
        assert component_class("notification") is Notification

    @on_clock
    async def test_recent_events_bounded_filtered_oldest_first(self) -> None:
        node = await self.node()
        bus, notification = node
        for n in range(7):
            await events.emit(bus, "saved" if n % 2 else "fetched", f"ds{n}", n=n)
        await self.advance_until(lambda: notification.received == 7)
        recent = await bus.call(API, "recent")
        assert [e["n"] for e in recent] == [2, 3, 4, 5, 6]  # the ring keeps 5
        assert recent[-1]["topic"] == "event.fetched.ds6" and recent[-1]["node"] == bus.node
        saved = await bus.call(API, "recent", regex=r"^event\.saved\.")
        assert [e["dataset"] for e in saved] == ["ds3", "ds5"]
        last = await bus.call(API, "recent", limit=2)
        assert [e["n"] for e in last] == [5, 6]
        none = await bus.call(API, "recent", regex="nothing-matches")
        assert none == []

    @on_clock
    async def test_bad_arguments_are_refused(self) -> None:
        node = await self.node()
        bus, _ = node
        for kwargs, remote_type in (({"regex": "(?=x)"}, "InvalidRegex"), ({"regex": "a" * 5000}, "InvalidRegex"),
                                    ({"limit": 0}, "ValueError"), ({"limit": 10_000}, "ValueError"),
                                    ({"limit": "5"}, "ValueError")):
            with self.assertRaises(RemoteError) as e:
                await bus.call(API, "recent", **kwargs)
            assert e.exception.remote_type == remote_type, kwargs

    @on_clock
    async def test_malformed_messages_are_ignored(self) -> None:
        node = await self.node()
        bus, notification = node
        await bus.send("notification", Message(body=b"{}", type="something-else", headers={"topic": "x"}),
                       mandatory=False)
        await bus.send("notification", Message(body=b"not json", type="event", headers={"topic": "event.saved.x"}),
                       mandatory=False)
        await bus.send("notification", Message.of_json([1, 2], type="event", headers={"topic": "event.saved.x"}),
                       mandatory=False)
        await bus.send("notification", Message.of_json({}, type="event"), mandatory=False)
        await self.advance_until(lambda: notification.dropped == 4)
        await events.emit(bus, "saved", "good")
        await self.advance_until(lambda: notification.received == 1)
        recent = await bus.call(API, "recent")
        assert [e["dataset"] for e in recent] == ["good"]
