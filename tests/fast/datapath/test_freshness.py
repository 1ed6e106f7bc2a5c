"""Freshness (issue 16, point 7): a dataset registered with expect_every is
marked stale when no new version (fetched or saved event) came for 1.5x that
period; one stale event says so; the next version clears the mark. Time is
a Clock: the controller's freshness loop runs every freshness_interval."""
from __future__ import annotations

from typing import Any, List

from ooidx import events

from tests.fast.core.support import settle
from tests.fast.datapath import test_controller_contract as contract

BASE = contract.BASE


class FreshnessTests(contract.ControllerCase):
    def stale_events(self) -> List[Any]:
        return [e for e in self.events if e["kind"] == "stale"]

    def pass_time(self, seconds: float, step: float = 60.0) -> None:
        left = seconds
        while left > 0:
            self.clock.advance(min(step, left))
            settle(self.clock)
            left -= step

    def test_stale_after_one_and_a_half_periods_once_then_cleared(self) -> None:
        self.start()
        record = self.call("register", name="sst", url=BASE, expect_every=3600)
        self.assertEqual((record["expect_every"], record["stale"]), (3600.0, False))
        self.pass_time(5000)  # < 5400 s: not yet
        self.assertFalse(self.store.values["dataset:sst"]["stale"])
        self.assertEqual(self.stale_events(), [])
        self.pass_time(600)  # past 1.5 x 3600
        self.assertTrue(self.store.values["dataset:sst"]["stale"])
        self.assertTrue(self.call("get", name="sst")["stale"])
        [event] = self.stale_events()
        self.assertEqual((event["dataset"], event["expect_every"]), ("sst", 3600.0))
        self.pass_time(7200)  # still stale: no second event
        self.assertEqual(len(self.stale_events()), 1)
        # a new version clears it, and the clock starts again
        self.wait(events.emit(self.bus, "saved", "sst", url=BASE, versions=1, bytes=10))
        settle(self.clock)
        self.assertFalse(self.store.values["dataset:sst"]["stale"])
        self.pass_time(5000)
        self.assertEqual(len(self.stale_events()), 1)
        self.pass_time(600)
        self.assertEqual(len(self.stale_events()), 2)

    def test_a_fetched_event_clears_it_too(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE, expect_every=60)
        self.pass_time(180)
        self.assertTrue(self.store.values["dataset:sst"]["stale"])
        self.wait(events.emit(self.bus, "fetched", "sst", url=BASE, bytes=5, addresses=["p"]))
        settle(self.clock)
        self.assertFalse(self.store.values["dataset:sst"]["stale"])

    def test_no_expect_every_is_never_stale_and_a_bad_one_is_refused(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE)
        self.pass_time(10 * 24 * 3600, step=3600)
        self.assertFalse(self.store.values["dataset:sst"]["stale"])
        self.assertEqual(self.stale_events(), [])
        for bad in (0, -5, True, "3600"):
            self.assertEqual(self.refused("register", name="chl", url=BASE, expect_every=bad).remote_type,
                             "ValueError")
        self.assertNotIn("dataset:chl", self.store.values)

    def test_purged_datasets_are_not_flagged(self) -> None:
        self.start()
        self.call("register", name="sst", url=BASE, expect_every=60)
        self.call("purge", name="sst")
        self.pass_time(600)
        self.assertEqual(self.stale_events(), [])


class ControllerOptionsTests(contract.ControllerCase):
    def test_components_controller_sets_the_bounds(self) -> None:
        from ooidx import config as config_module
        from ooidx.config import ConfigError
        from ooidx.datapath.controller import Controller

        config = config_module.parse("components: {controller: {check_timeout: 3, check_max_bytes: 4096, "
                                     "freshness_interval: 30}}\n", "/tmp/dx.yaml", environ={})
        controller = Controller.from_config("controller", self.bus, config, node="n", clock=self.clock)
        self.assertEqual((controller.check_timeout, controller.check_max_bytes, controller.freshness_interval),
                         (3.0, 4096, 30.0))
        default = Controller.from_config("controller", self.bus, config_module.parse(
            "components: {controller: {}}\n", "/tmp/dx.yaml", environ={}), node="n", clock=self.clock)
        self.assertEqual((default.check_timeout, default.check_max_bytes), (8.0, 1024 * 1024))
        for bad in ("check_timeout: 30", "check_max_bytes: 10", "freshness_interval: -1", "colour: red"):
            with self.assertRaises(ConfigError):
                config_module.parse(f"components: {{controller: {{{bad}}}}}\n", "/tmp/dx.yaml", environ={})
