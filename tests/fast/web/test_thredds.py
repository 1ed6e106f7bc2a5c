"""The THREDDS catalog on the web port (ooidx.web.thredds): an InvCatalog 1.0
document listing every registered dataset (controller.list), with its
OPENDAP service base at the proxy's /datasets/, read like /api/datasets."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Dict, List

import magnet
from magnet import operation
from twisted.trial.unittest import SynchronousTestCase

from tests.fast.web.edge_support import Edge

NS = {"t": "http://www.unidata.ucar.edu/namespaces/thredds/InvCatalog/v1.0"}


class FakeController:
    def __init__(self, records: Any) -> None:
        self.records = records

    @operation
    def list(self) -> List[Dict[str, Any]]:
        if isinstance(self.records, Exception):
            raise self.records
        return self.records


RECORDS = [{"name": "sst", "url": "http://up/sst.nc", "status": "ok"},
           {"name": "a.b-c", "url": "http://up/x.nc", "status": "ok"},
           {"name": "../bad", "url": "http://up/y.nc"}, "not a record"]


class ThreddsCatalogTests(SynchronousTestCase):
    def edge(self, records: Any = RECORDS, **options: Any) -> Edge:
        options.setdefault("proxy_port", 8100)
        return Edge(self, **options).start(served={"controller": FakeController(records)})

    def catalog(self, edge: Edge, **options: Any) -> ET.Element:
        response = edge.request("GET", "/thredds/catalog.xml", token=None, **options)
        self.assertEqual(response.status, 200, response.body)
        self.assertTrue(response.header("Content-Type").startswith("application/xml"))
        return ET.fromstring(response.body)

    def test_lists_every_dataset_under_the_proxy_service(self) -> None:
        root = self.catalog(self.edge())
        [service] = root.findall("t:service", NS)
        self.assertEqual(service.attrib, {"name": "odap", "serviceType": "OPENDAP",
                                          "base": "http://127.0.0.1:8100/datasets/"})
        datasets = root.findall(".//t:dataset[@urlPath]", NS)
        self.assertEqual([(d.get("name"), d.get("urlPath")) for d in datasets], [("a.b-c", "a.b-c"), ("sst", "sst")])
        self.assertEqual(root.find(".//t:metadata[@inherited='true']/t:serviceName", NS).text, "odap")

    def test_base_host_is_the_one_the_client_used(self) -> None:
        root = self.catalog(self.edge(allowed_hosts=("dx.example.org",)),
                            headers={"Host": "dx.example.org:8080"})
        self.assertEqual(root.find("t:service", NS).get("base"), "http://dx.example.org:8100/datasets/")

    def test_public_proxy_url_wins(self) -> None:
        root = self.catalog(self.edge(public_proxy_url="https://dap.example.org/"))
        self.assertEqual(root.find("t:service", NS).get("base"), "https://dap.example.org/datasets/")

    def test_tls_proxy_port_is_https(self) -> None:
        root = self.catalog(self.edge(proxy_port="ssl:8443:privateKey=k.pem:certKey=c.pem"))
        self.assertEqual(root.find("t:service", NS).get("base"), "https://127.0.0.1:8443/datasets/")

    def test_empty_registry_is_an_empty_catalog(self) -> None:
        root = self.catalog(self.edge([]))
        self.assertEqual(root.findall(".//t:dataset[@urlPath]", NS), [])

    def test_read_token_is_respected(self) -> None:
        edge = self.edge(read_token=True)
        response = edge.request("GET", "/thredds/catalog.xml", token=None)
        self.assertEqual(response.status, 401)
        response = edge.request("GET", "/thredds/catalog.xml")
        self.assertEqual(response.status, 200)

    def test_controller_missing_is_503(self) -> None:
        edge = Edge(self, proxy_port=8100).start()
        response = edge.request("GET", "/thredds/catalog.xml", token=None)
        self.assertEqual(response.status, 503, response.body)
        self.assertEqual(response.error()[0], "Unavailable")

    def test_controller_error_is_502(self) -> None:
        response = self.edge(magnet.RemoteError("Boom", "no")).request("GET", "/thredds/catalog.xml", token=None)
        self.assertEqual((response.status, response.error()[0]), (502, "Boom"))

    def test_only_get_and_head(self) -> None:
        response = self.edge().request("POST", "/thredds/catalog.xml", token=None)
        self.assertEqual(response.status, 405)
