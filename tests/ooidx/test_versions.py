"""Versions that say what changed, read on a real web port.

pydap's server (a subprocess) serves a netCDF file that this test rewrites
between refreshes: three time steps, then five and a new variable C{salt}.
The real fetcher, pub_sub and persister save two versions; the second's
manifest and C{saved} event carry a change summary that says exactly that
(time coverage before and after, decoded with the variable's CF units; the
variable added; the time dimension and the shapes it changed; no attribute
changed), and C{GET /api/datasets/NAME/versions}, C{.../versions/V} and
C{.../versions/V1/diff/V2} answer it, with 400 for what is malformed, 404 for
what is not saved, and the token where reading needs it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import jsonschema_rs
import pytest_twisted
import yaml

from tests.ooidx.dap_upstream import Upstream
from tests.ooidx.test_persister import TOKEN, exchange_for, publish, upstream  # noqa: F401 - the fixture

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0's nullable as JSON Schema's null type."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def documented(path: str, body: Dict[str, Any]) -> None:
    """C{body} fits the 200 answer docs/openapi.yaml gives for C{path}."""
    spec = yaml.safe_load(SPEC.read_text())
    answer = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    schema = dict(_json_schema(answer), components=_json_schema(spec["components"]))
    jsonschema_rs.validate(schema, body)


FIRST_TIME = {"count": 3, "first": 0.0, "last": 120.0, "min": 0.0, "max": 120.0,
              "start": "2020-01-01T00:00:00", "end": "2020-01-01T00:02:00"}
SECOND_TIME = {"count": 5, "first": 0.0, "last": 240.0, "min": 0.0, "max": 240.0,
               "start": "2020-01-01T00:00:00", "end": "2020-01-01T00:04:00"}


@pytest_twisted.ensureDeferred
async def test_two_versions_say_what_changed(tmp_path: Path, upstream: Upstream) -> None:  # noqa: F811
    ex = await exchange_for(tmp_path, upstream)
    try:
        one = await ex.refresh()
        publish(upstream, times=5, extra=True)
        two = await ex.refresh()
        summary = two["changes"]
        assert summary["from"] == one["version"] and summary["to"] == two["version"]
        assert summary["coverage"] == {"time": {"units": "seconds since 2020-01-01", "calendar": "standard",
                                                "before": FIRST_TIME, "after": SECOND_TIME}}
        assert summary["variables"] == {"added": ["salt"], "removed": [], "more": 0}
        assert summary["dimensions"] == {"time": {"before": 3, "after": 5}}
        assert [s["variable"] for s in summary["shapes"]] == ["level", "qc", "temp", "time"]
        assert summary["types"] == []
        assert summary["attributes"] == {"added": [], "removed": [], "changed": [], "count": 0, "more": 0}
        assert summary["text"] == ("time 2020-01-01T00:00:00 → 2020-01-01T00:04:00 (was 2020-01-01T00:00:00 → "
                                   "2020-01-01T00:02:00; 3 → 5 values); variable added: salt; dimension time 3 → 5")
        assert set(summary["sha256"]) == {"typed.das", "typed.dds", "typed.dods", "typed.nc"}
        assert all(s["before"] != s["after"] for s in summary["sha256"].values())

        # the list, oldest first, each manifest with its summary
        code, body = await ex.get("/api/datasets/typed/versions")
        assert code == 200, body
        assert [v["version"] for v in body["versions"]] == [one["version"], two["version"]]
        assert body["versions"][0]["changes"]["first"] is True
        assert body["versions"][1]["changes"] == summary
        assert body["versions"][1]["files"]["typed.dods"]["sha256"] == two["sha256"]
        documented("/api/datasets/{name}/versions", body)
        code, body = await ex.get("/api/datasets/typed/versions?limit=1")
        assert code == 200 and [v["version"] for v in body["versions"]] == [two["version"]]
        # one version, and the latest
        code, body = await ex.get(f"/api/datasets/typed/versions/{one['version']}")
        assert code == 200 and body["version"]["coverage"]["time"]["end"] == "2020-01-01T00:02:00"
        code, body = await ex.get("/api/datasets/typed/versions/latest")
        assert code == 200 and body["version"]["version"] == two["version"]
        documented("/api/datasets/{name}/versions/{version}", body)
        # any two, either way round
        code, body = await ex.get(f"/api/datasets/typed/versions/{one['version']}/diff/{two['version']}")
        assert code == 200 and body["diff"] == summary
        documented("/api/datasets/{name}/versions/{version}/diff/{other}", body)
        code, body = await ex.get(f"/api/datasets/typed/versions/{two['version']}/diff/{one['version']}?limit=0")
        assert code == 200
        assert body["diff"]["variables"]["removed"] == ["salt"]
        assert body["diff"]["coverage"]["time"]["before"] == SECOND_TIME
        assert body["diff"]["coverage"]["time"]["after"] == FIRST_TIME

        # bad input: a clear 4xx, JSON
        unsaved = "20200101T000000Z-0123456789ab"
        for path, status, kind in [
            ("/api/datasets/..%2Fetc/versions", 400, "InvalidName"),
            ("/api/datasets/typed/versions/not-a-version", 400, "InvalidVersion"),
            ("/api/datasets/typed/versions/..%2F..%2Fx", 400, "InvalidVersion"),
            (f"/api/datasets/typed/versions/{unsaved}", 404, "UnknownVersion"),
            (f"/api/datasets/typed/versions/{unsaved}/diff/latest", 404, "UnknownVersion"),
            (f"/api/datasets/typed/versions/latest/diff/{'x' * 300}", 400, "InvalidVersion"),
            ("/api/datasets/typed/versions?limit=0", 400, "BadRequest"),
            ("/api/datasets/typed/versions?limit=abc", 400, "BadRequest"),
            ("/api/datasets/typed/versions?from=1", 400, "BadRequest"),
            ("/api/datasets/typed/versions/latest?limit=1", 400, "BadRequest"),
            ("/api/datasets/typed/versions/latest/diff/latest?limit=5000", 400, "BadRequest"),
            ("/api/datasets/nosuch/versions", 404, "UnknownDataset"),
            ("/api/datasets/nosuch/versions/latest", 404, "UnknownVersion"),
        ]:
            code, body = await ex.get(path)
            assert (code, body["error"]["type"]) == (status, kind), (path, body)
        # registered, nothing saved yet: no versions
        await ex.bus.call("controller", "register", name="later", url=upstream.url("typed.nc"))
        code, body = await ex.get("/api/datasets/later/versions")
        assert (code, body) == (200, {"dataset": "later", "versions": []})
    finally:
        await ex.stop()


@pytest_twisted.ensureDeferred
async def test_reading_versions_needs_the_token_where_reading_does(tmp_path: Path, upstream: Upstream) -> Any:  # noqa: F811
    ex = await exchange_for(tmp_path, upstream, read_token=True)
    try:
        saved = await ex.refresh()
        for path in ("/api/datasets/typed/versions", f"/api/datasets/typed/versions/{saved['version']}",
                     "/api/datasets/typed/versions/latest/diff/latest"):
            code, body = await ex.get(path)
            assert code == 401 and "error" in body, (path, body)
            code, body = await ex.get(path, token="wrong" + TOKEN)
            assert code == 401, path
            code, body = await ex.get(path, token=TOKEN)
            assert code == 200, (path, body)
        assert body["diff"]["from"] == body["diff"]["to"] == saved["version"]
        assert body["diff"]["text"] == "new values; same variables, shapes, attributes and coverage"
    finally:
        await ex.stop()
