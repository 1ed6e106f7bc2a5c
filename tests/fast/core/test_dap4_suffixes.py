"""DAP 4's suffixes (.dmr, .dmr.xml, .dap) are DAP responses like DAP 2's: a
request by name for NAME.dmr is for dataset NAME (not a dataset named
'NAME.dmr'), a forward request for BASE.dap is under the dataset at BASE,
and a base URL registered with a DAP 4 suffix loses it."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ooidx import urlpolicy
from ooidx.dap import DapURL, dataset_url, split_url
from ooidx.datapath.controller import check_base_url
from ooidx.datapath.proxy_url import parse_target


class ByNameTests(SynchronousTestCase):
    def test_dmr_by_name_is_the_dataset(self) -> None:
        target = parse_target(b"/datasets/ts.dmr")
        self.assertEqual((target.name, target.suffix, target.query), ("ts", ".dmr", None))

    def test_dmr_xml_by_name_longest_suffix_wins(self) -> None:
        target = parse_target(b"/datasets/ts.dmr.xml")
        self.assertEqual((target.name, target.suffix), ("ts", ".dmr.xml"))

    def test_dap_by_name_keeps_the_constraint(self) -> None:
        target = parse_target(b"/datasets/ts.dap?dap4.ce=/time%5B0:1:2%5D")
        self.assertEqual((target.name, target.suffix, target.query), ("ts", ".dap", "dap4.ce=/time%5B0:1:2%5D"))

    def test_dotted_name_with_dap4_suffix(self) -> None:
        target = parse_target(b"/datasets/a.b.dap")
        self.assertEqual((target.name, target.suffix), ("a.b", ".dap"))


class ForwardTests(SynchronousTestCase):
    def test_split_url_knows_dap4(self) -> None:
        self.assertEqual(split_url("http://h/d/ts.nc.dmr"), DapURL("http://h/d/ts.nc", ".dmr", None))
        self.assertEqual(split_url("http://h/d/ts.nc.dmr.xml"), DapURL("http://h/d/ts.nc", ".dmr.xml", None))
        self.assertEqual(split_url("http://h/d/ts.nc.dap?dap4.ce=x"), DapURL("http://h/d/ts.nc", ".dap", "dap4.ce=x"))

    def test_dataset_url_round_trip(self) -> None:
        self.assertEqual(dataset_url("http://h/ts.nc", "dmr.xml"), "http://h/ts.nc.dmr.xml")

    def test_dap4_request_is_under_its_dataset(self) -> None:
        found = urlpolicy.check_registered("http://8.8.8.8/d/ts.nc.dap?dap4.ce=/time",
                                           {"ts": "http://8.8.8.8/d/ts.nc"})
        self.assertEqual(found, "ts")

    def test_dmr_request_is_under_its_dataset(self) -> None:
        found = urlpolicy.check_registered("http://8.8.8.8/d/ts.nc.dmr", {"ts": "http://8.8.8.8/d/ts.nc"})
        self.assertEqual(found, "ts")

    def test_base_url_registered_with_dmr_loses_it(self) -> None:
        self.assertEqual(check_base_url("http://8.8.8.8/d/ts.nc.dmr"), "http://8.8.8.8/d/ts.nc")
