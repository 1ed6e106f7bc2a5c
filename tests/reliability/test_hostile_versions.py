"""Hostile input to the new endpoints of versions and feeds, against a real
`twistd -n ooidx` node (memory://, every component) with a pydap upstream:
malformed names and versions on the versions API, on the diff, on the
proxy's NAME@VERSION and on the Atom feeds, oversized limits, and a
registration of a name that is not a dataset name.

What must hold: each gets a clear 4xx with a JSON or DAP error body (never a
500 or a traceback), nothing is registered or changed, and the well-behaved
client is served throughout. One JSON line in the results file.
"""
from __future__ import annotations

import http.client
import time
from typing import Any, Iterator, List, Tuple
from urllib.parse import quote

import pytest

from tests.reliability.hostile_node import Node, start_node, stop_node, upstream_in
from tests.reliability.results import record

BAD_NAMES = ["..", "a b", "%2e%2e", "sst%00", "x" * 300, "é", "sst;rm", "<script>"]
BAD_VERSIONS = ["..", "v1", "2026", "20261205T000000Z", "20261205T000000Z-XYZ", "latest;", "%00", "l" * 300]


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any) -> Iterator[Node]:
    up = upstream_in(tmp_path_factory.mktemp("hostile-versions-up"))
    with up:
        n = start_node(tmp_path_factory.mktemp("hostile-versions"), "hver", upstream_port=up.port)
        n.upstream = up
        status, answer = n.register("sst", up.url("sst.nc"))
        assert status == 201, answer
        try:
            yield n
        finally:
            stop_node(n)


def get(port: int, path: str) -> Tuple[int, bytes]:
    """GET C{path} as a client would send it (spaces and non-ASCII escaped; escapes kept)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", quote(path, safe="/%?=&;@.:"), headers={"Host": "localhost"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def registry(node: Node) -> Any:
    """Which datasets are registered, at which URLs (their counters move on their own)."""
    status, answer = node.api("GET", "/api/datasets")
    assert status == 200, answer
    rows = answer.get("datasets", answer) if isinstance(answer, dict) else answer
    return sorted((d.get("name"), d.get("url"), d.get("status") == "purged") for d in rows)


def test_hostile_versions_and_feeds(node: Node) -> None:
    before = registry(node)
    tried: List[Tuple[str, int]] = []
    for name in BAD_NAMES:
        tried.append((f"/api/datasets/{name}/versions", get(node.web_port, f"/api/datasets/{name}/versions")[0]))
        tried.append((f"/feeds/datasets/{name}.atom", get(node.web_port, f"/feeds/datasets/{name}.atom")[0]))
        tried.append((f"proxy /datasets/{name}@latest.das", get(node.proxy_port, f"/datasets/{name}@latest.das")[0]))
    for version in BAD_VERSIONS:
        tried.append((f"versions/{version}", get(node.web_port, f"/api/datasets/sst/versions/{version}")[0]))
        tried.append((f"diff/{version}", get(node.web_port, f"/api/datasets/sst/versions/latest/diff/{version}")[0]))
        tried.append((f"proxy sst@{version}", get(node.proxy_port, f"/datasets/sst@{version}.dds")[0]))
    for query in ("limit=0", "limit=-1", "limit=99999999999999999999", "limit=x", "regex=(", "regex=" + "a" * 5000):
        tried.append((f"events.atom?{query}", get(node.web_port, f"/feeds/events.atom?{query}")[0]))
        tried.append((f"versions?{query}", get(node.web_port, f"/api/datasets/sst/versions?{query}")[0]))
    status, answer = node.register("../etc", node.upstream.url("sst.nc"))
    tried.append(("register ../etc", status))
    started = time.monotonic()
    ok_status, body = get(node.proxy_port, "/datasets/sst.das")
    took = time.monotonic() - started
    after = registry(node)
    tracebacks = node.tracebacks()
    errors = [t for t in tried if not (400 <= t[1] < 500)] + [("traceback", line) for line in tracebacks]
    changed = before != after
    record("hostile", "versions-and-feeds-input", inputs_tried=len(tried), errors=len(errors) + int(changed),
           notes=f"{len(tried)} malformed names, versions, limits and regexes on the versions API, its diff, the "
                 f"proxy's NAME@VERSION and the Atom feeds: statuses {sorted(set(s for _, s in tried))}; the "
                 f"registry unchanged: {not changed}; a well-behaved .das after: {ok_status} in {took * 1000:.0f} ms")
    assert not errors, errors[:10]
    assert not changed
    assert ok_status == 200 and b"sst" in body
