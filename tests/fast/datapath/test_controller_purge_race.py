"""A fetch that ends just after a purge must not bring the dataset back.

The controller updates a record on a dataset's events (read, change, write)
and marks it purged on purge (read, change, write). Interleaved, the event's
write put back the record it had read before the purge: the purged dataset
showed as fetched again (the management page's browser test saw it under
load). Both now run under one lock per dataset in the controller.
"""
from __future__ import annotations

from typing import Any, List

from twisted.internet import defer

from magnet import operation

from ooidx import events
from tests.fast.datapath.test_controller_contract import BASE, ControllerCase, FakeStore


class HoldingStore(FakeStore):
    """A store whose next C{get} answers only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: List[defer.Deferred] = []
        self.hold_next = False

    @operation
    def get(self, key: str) -> Any:
        self._check()
        if key not in self.values:
            raise KeyError(key)
        value = dict(self.values[key])  # what the store holds now, as the caller reads it
        if self.hold_next:
            self.hold_next = False
            d: defer.Deferred = defer.Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: value)
        return value


class PurgeRaceTests(ControllerCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = HoldingStore()

    def test_a_fetched_event_that_ends_after_a_purge_does_not_bring_it_back(self) -> None:
        controller = self.start()
        self.call("register", name="sst", url=BASE)
        # the event's read of the record is held...
        self.store.hold_next = True
        self.wait(events.emit(self.bus, "fetched", "sst", url=BASE, bytes=12, addresses=["a"]))
        for _ in range(20):
            self.clock.advance(0.01)
        # ...while the operator purges the dataset
        purging = self.bus.call("controller", "purge", name="sst")
        for _ in range(20):
            self.clock.advance(0.01)
        # the event's read answers (with what it read before the purge)
        for d in self.store.held:
            d.callback(None)
        self.wait(purging)
        for _ in range(20):
            self.clock.advance(0.01)
        self.assertEqual(self.store.values["dataset:sst"]["status"], "purged")
        self.assertEqual(controller.datasets["sst"]["status"], "purged")
