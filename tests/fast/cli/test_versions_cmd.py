"""`ooidx datasets versions NAME [--diff V1 V2]` against a stand-in for
urllib's opener (the web port's /api/datasets/NAME/versions answers, as
ooidx.web.versions gives them), and with --broker against a memory:// bus
whose persister and controller are stand-ins. No port, no subprocess."""
from __future__ import annotations

import io
import json
import sys
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

from ooidx import cli
from ooidx.cli import datasets_cmd

from tests.fast.cli.test_cli import TOKEN, URL, Answer, Web, http_error

V1 = "20260101T000000Z-aaaaaaaaaaaa"
V2 = "20260101T000200Z-bbbbbbbbbbbb"
FILES = {"sst.das": {"bytes": 1000, "sha256": "a" * 64}, "sst.dds": {"bytes": 200, "sha256": "b" * 64},
         "sst.dods": {"bytes": 2048, "sha256": "c" * 64}}
MANIFESTS = [
    {"dataset": "sst", "version": V1, "saved": 1767225600.0, "files": FILES,
     "changes": {"first": True, "text": "first version: 2 variable(s); time 2020-01-01 → 2020-01-01T00:02:00"}},
    {"dataset": "sst", "version": V2, "saved": 1767225720.0, "files": dict(FILES, **{"sst.nc": {"bytes": 3 << 20}}),
     "changes": {"first": False, "text": "time 2020-01-01 → 2020-01-01T00:04:00 (was …); variable added: salt"}},
]
DIFF = {"from": V1, "to": V2, "first": False,
        "text": "time 2020-01-01 → 2020-01-01T00:04:00 (was …); variable added: salt; attributes: 1 changed, 1 added",
        "attributes": {"changed": [{"variable": "sst", "name": "units", "before": {"type": "String", "value": "K"},
                                    "after": {"type": "String", "value": "degC"}}],
                       "added": [{"variable": "NC_GLOBAL", "name": "version", "type": "Int32", "value": 2}],
                       "removed": [], "count": 3, "more": 1}}


def error(request: urllib.request.Request, code: int, kind: str, message: str) -> Exception:
    return http_error(request, code, json.dumps({"error": {"type": kind, "message": message}}).encode())


def versions_api(request: urllib.request.Request) -> Any:
    """The web port's versions routes for one dataset, sst, with two versions."""
    url = urllib.parse.urlsplit(request.full_url)
    if request.get_header("Authorization") != f"Bearer {TOKEN}":
        return error(request, 401, "Unauthorized", "an operator token is required")
    parts = url.path.split("/")[3:]  # ['', 'api', 'datasets', NAME, 'versions', ...]
    name = urllib.parse.unquote(parts[0])
    if name == "empty" and parts[1:] == ["versions"]:
        return Answer(json.dumps({"dataset": name, "versions": []}).encode())
    if name != "sst":
        return error(request, 404, "UnknownDataset", f"no dataset {name!r} is registered or saved")
    if parts[1:] == ["versions"]:
        limit = int(urllib.parse.parse_qs(url.query).get("limit", ["100"])[0])
        return Answer(json.dumps({"dataset": "sst", "versions": MANIFESTS[-limit:]}).encode())
    if len(parts) == 5 and parts[3] == "diff":
        known = {V1, V2, "latest"}
        for v in (parts[2], parts[4]):
            if v not in known:
                return error(request, 404, "UnknownVersion", f"sst has no version {v}")
        return Answer(json.dumps({"dataset": "sst", "diff": DIFF}).encode())
    return error(request, 404, "NotFound", "no such page")


class VersionsCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.web = Web(versions_api)
        self.patch(urllib.request, "build_opener", self.web.build_opener)

    def run_cli(self, *argv: str) -> Tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", err)
        code = cli.run(["--url", URL, "--token", TOKEN, *argv], stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    def paths(self) -> List[str]:
        return [r.full_url[len(URL):] for r, _ in self.web.requests]

    def test_one_line_per_version_with_what_changed(self) -> None:
        code, out, err = self.run_cli("datasets", "versions", "sst")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.paths(), ["/api/datasets/sst/versions"])
        self.assertEqual(self.web.requests[0][0].get_method(), "GET")
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].startswith(V1 + "  2026-01-01 00:00:00Z  3.2 KiB  first version: 2 variable(s)"),
                        lines[0])
        self.assertIn("2026-01-01 00:02:00Z", lines[1])
        self.assertIn("3.0 MiB", lines[1])
        self.assertTrue(lines[1].endswith("variable added: salt"), lines[1])

    def test_limit_is_passed_on_and_checked(self) -> None:
        code, out, _ = self.run_cli("datasets", "versions", "sst", "--limit", "1")
        self.assertEqual(code, 0)
        self.assertEqual(self.paths(), ["/api/datasets/sst/versions?limit=1"])
        self.assertEqual(len(out.splitlines()), 1)
        for bad in (["--limit", "0"], ["--limit", "1001"], ["--limit", "1", "--diff", V1, V2]):
            code, _, err = self.run_cli("datasets", "versions", "sst", *bad)
            self.assertEqual(code, 2, bad)
            self.assertTrue(err)
        self.assertEqual(len(self.web.requests), 1)

    def test_json_prints_the_answer(self) -> None:
        code, out, _ = self.run_cli("datasets", "versions", "sst", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["versions"][1]["version"], V2)

    def test_no_versions_yet(self) -> None:
        code, out, _ = self.run_cli("datasets", "versions", "empty")
        self.assertEqual((code, out), (0, "no saved versions of empty\n"))

    def test_unknown_dataset_is_one_line(self) -> None:
        code, out, err = self.run_cli("datasets", "versions", "nosuch")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.strip().splitlines(), ["error: UnknownDataset: no dataset 'nosuch' is registered or saved"])

    def test_diff_prints_each_change_on_a_line(self) -> None:
        code, out, err = self.run_cli("datasets", "versions", "sst", "--diff", V1, "latest")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.paths(), [f"/api/datasets/sst/versions/{V1}/diff/latest"])
        self.assertEqual(out.splitlines(), [
            f"sst: {V1} → {V2}",
            "  time 2020-01-01 → 2020-01-01T00:04:00 (was …)",
            "  variable added: salt",
            "  attributes: 1 changed, 1 added",
            "  ~ sst.units: String K → String degC",
            "  + NC_GLOBAL.version: Int32 2",
            "  … 1 more attribute change(s)",
        ])

    def test_unknown_version_is_one_line(self) -> None:
        code, out, err = self.run_cli("datasets", "versions", "sst", "--diff", V1, "20990101T000000Z-cccccccccccc")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.strip().splitlines(),
                         ["error: UnknownVersion: sst has no version 20990101T000000Z-cccccccccccc"])

    def test_names_are_quoted_in_the_path(self) -> None:
        self.run_cli("datasets", "versions", "a/b")
        self.assertEqual(self.paths(), ["/api/datasets/a%2Fb/versions"])

    def test_diff_and_limit_only_go_with_versions(self) -> None:
        for argv in (["datasets", "show", "sst", "--diff", V1, V2], ["datasets", "list", "--limit", "3"],
                     ["datasets", "versions"]):
            code, _, err = self.run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertTrue(err)
        self.assertEqual(self.web.requests, [])


class FormatTests(SynchronousTestCase):
    def test_a_manifest_without_files_or_changes(self) -> None:
        text = datasets_cmd.format_versions({"dataset": "x", "versions": [{"version": V1}]})
        self.assertEqual(text.split(), [V1, "-", "-", "-"])

    def test_a_multi_line_change_text_stays_on_one_line(self) -> None:
        text = datasets_cmd.format_versions({"dataset": "x", "versions": [
            {"version": V1, "saved": 0, "files": {}, "changes": {"text": "a\nb"}}]})
        self.assertEqual(len(text.splitlines()), 1)
        self.assertTrue(text.endswith("a b"))


class Broker:
    """Stands in for BrokerClient: the persister's and controller's operations."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, str, Dict[str, Any]]] = []

    def call(self, service: str, op: str, kwargs: Dict[str, Any]) -> Any:
        from twisted.internet.defer import fail, succeed
        self.calls.append((service, op, kwargs))
        if (service, op) == ("persister", "versions"):
            return succeed(MANIFESTS if kwargs["name"] == "sst" else [])
        if (service, op) == ("persister", "diff"):
            return succeed(DIFF)
        if (service, op) == ("controller", "get"):
            return fail(cli.RemoteFailure("UnknownDataset", f"no dataset {kwargs['name']!r}"))
        raise AssertionError((service, op))


class BrokerTests(SynchronousTestCase):
    def run_command(self, broker: Broker, *argv: str) -> str:
        out = io.StringIO()
        ctx = cli.Context(cli.parser().parse_args(list(argv)), broker, out, io.StringIO())
        self.successResultOf(cli.COMMANDS["datasets"].run(ctx))
        return out.getvalue()

    def test_versions_from_the_persister(self) -> None:
        broker = Broker()
        out = self.run_command(broker, "datasets", "versions", "sst", "--limit", "5")
        self.assertEqual(broker.calls, [("persister", "versions", {"name": "sst", "limit": 5})])
        self.assertEqual(len(out.splitlines()), 2)

    def test_no_versions_of_an_unknown_dataset_is_its_error(self) -> None:
        broker = Broker()
        ctx = cli.Context(cli.parser().parse_args(["datasets", "versions", "nosuch"]), broker, io.StringIO(),
                          io.StringIO())
        failure = self.failureResultOf(cli.COMMANDS["datasets"].run(ctx), cli.RemoteFailure)
        self.assertEqual(failure.value.kind, "UnknownDataset")

    def test_diff_from_the_persister(self) -> None:
        broker = Broker()
        out = self.run_command(broker, "datasets", "versions", "sst", "--diff", V1, V2)
        self.assertEqual(broker.calls, [("persister", "diff", {"name": "sst", "before": V1, "after": V2})])
        self.assertIn("variable added: salt", out)
