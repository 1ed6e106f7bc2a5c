"""Saved versions by name (NAME@VERSION.SUFFIX): the proxy's parsing of the
path, and the persister's C{open_version}, which streams a saved file byte
for byte (with the header fields a DAP client reads it by) to a listen
address, or refuses an unknown version as UnknownVersion (the proxy's 404)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from magnet import RemoteError, decode_reply
from magnet.rpc import ERROR

from ooidx.datapath.exchange import http_status
from ooidx.datapath.proxy_url import ProxyError, parse_target
from ooidx.dissemination import saved

from tests.fast.core.support import on_clock
from tests.fast.dissemination.test_persister import RigCase

V1 = "20261205T100000Z-0123456789ab"
V2 = "20261205T110000Z-ba9876543210"


class ParseTests(SynchronousTestCase):
    def test_a_version_by_name(self) -> None:
        t = parse_target(b"/datasets/sst.v2@" + V1.encode() + b".dds")
        self.assertEqual((t.name, t.version, t.suffix, t.query), ("sst.v2", V1, ".dds", None))

    def test_latest(self) -> None:
        t = parse_target(b"/datasets/sst@latest.dods")
        self.assertEqual((t.name, t.version, t.suffix), ("sst", "latest", ".dods"))

    def test_the_forward_spelling_naming_the_proxy(self) -> None:
        t = parse_target(b"http://127.0.0.1:8100/datasets/sst@latest.nc", ("127.0.0.1:8100",))
        self.assertEqual((t.name, t.version, t.suffix), ("sst", "latest", ".nc"))

    def test_no_version_is_the_live_dataset(self) -> None:
        self.assertIsNone(parse_target(b"/datasets/sst.dods").version)

    def test_the_syntax_is_the_persisters(self) -> None:
        for version in (V1, "latest", "20261205T100000Z-0123456789ab0", "2026-12-05", "LATEST", ""):
            with self.subTest(version=version):
                self.assertEqual(saved.valid_version(version), _parses(version))

    def test_bad_versions_are_400(self) -> None:
        for raw in (b"../x", b"2026", b"latest2", V1.upper().encode(), b"%41"):
            with self.subTest(raw=raw):
                e = self.assertRaises(ProxyError, parse_target, b"/datasets/sst@" + raw + b".das")
                self.assertEqual((e.status, e.kind), (400, "InvalidVersion"))

    def test_only_the_saved_files(self) -> None:
        for suffix in (b".html", b".csv", b".ascii", b""):
            with self.subTest(suffix=suffix):
                e = self.assertRaises(ProxyError, parse_target, b"/datasets/sst@latest" + suffix)
                self.assertEqual(e.status, 404)

    def test_constraints_are_not_applied_from_disk(self) -> None:
        for suffix in (b".dods", b".dds"):
            e = self.assertRaises(ProxyError, parse_target, b"/datasets/sst@latest" + suffix + b"?sst[0:1]")
            self.assertEqual((e.status, e.kind), (400, "ConstraintNotSupported"))
            self.assertIn("not supported on saved versions", e.message)
        self.assertEqual(parse_target(b"/datasets/sst@latest.dods?").query, "")
        self.assertEqual(parse_target(b"/datasets/sst@latest.das?sst").query, "sst")

    def test_the_persisters_refusals_as_http(self) -> None:
        self.assertEqual((http_status("UnknownVersion"), http_status("InvalidVersion")), (404, 400))
        self.assertEqual(http_status("UnknownDataset"), 404)


def _parses(version: str) -> bool:
    try:
        return parse_target(f"/datasets/sst@{version}.das".encode()).version == version
    except ProxyError:
        return False


def _write_version(root: str, name: str, version: str, sequence: int, files: Dict[str, bytes]) -> None:
    directory = os.path.join(root, "datasets", name, version)
    os.makedirs(directory)
    for suffix, data in files.items():
        with open(os.path.join(directory, name + suffix), "wb") as f:
            f.write(data)
    manifest = {"dataset": name, "version": version, "sequence": sequence, "saved": 1e9 + sequence,
                "files": {name + s: {"bytes": len(d)} for s, d in files.items()}}
    with open(os.path.join(directory, saved.MANIFEST), "w") as f:
        json.dump(manifest, f)


class OpenVersionTests(RigCase):
    """open_version through the bus, as the proxy asks (tell, the answer and the stream to its address)."""

    async def _ask(self, rig: Any, **kwargs: Any) -> Dict[str, Any]:
        got: Dict[str, Any] = {"messages": [], "streams": []}
        listener = await rig.bus.listen(got["messages"].append, on_stream=got["streams"].append)
        self.addCleanup(lambda: self.wait(listener.close()))
        kwargs.setdefault("method", "GET")
        await rig.bus.tell("persister", "open_version", listener.address, correlation_id="rid-1",
                           address=listener.address, request_id="rid-1", **kwargs)
        await self.until(lambda: got["messages"] and (got["streams"] or got["messages"][0].type == ERROR))
        reply = got["messages"][0]
        self.assertEqual(reply.correlation_id, "rid-1")
        if reply.type == ERROR:
            got["error"] = self.assertRaises(RemoteError, decode_reply, reply)
            return got
        got["answer"] = decode_reply(reply)
        stream = got["streams"][0]
        self.assertEqual(stream.correlation_id, "rid-1")
        chunks: List[bytes] = []
        await stream.deliver(chunks.append)
        got["meta"], got["body"] = stream.metadata, b"".join(chunks)
        return got

    async def _rig_with_versions(self) -> Any:
        rig = await self.rig()
        root = str(rig.data_dir)
        self.dods1 = b"Dataset {\n} sst;\nData:\n" + bytes(range(256)) * 3000
        _write_version(root, "sst", V1, 1, {".das": b"Attributes { v1 }\n", ".dds": b"Dataset { v1 } sst;\n",
                                            ".dods": self.dods1})
        _write_version(root, "sst", V2, 2, {".das": b"Attributes { v2 }\n", ".dds": b"Dataset { v2 } sst;\n",
                                            ".dods": b"v2", ".nc": b"CDF\x01v2"})
        return rig

    @on_clock
    async def test_a_saved_file_byte_for_byte(self) -> None:
        rig = await self._rig_with_versions()
        got = await self._ask(rig, name="sst", version=V1, part=".dods")
        self.assertEqual(got["body"], self.dods1)
        self.assertEqual(got["answer"]["version"], V1)
        meta = got["meta"]
        self.assertEqual((meta["status"], meta["length"], meta["version"]), (200, len(self.dods1), V1))
        headers = dict(meta["headers"])
        self.assertEqual(headers["Content-Description"], "dods_data")
        self.assertEqual(headers["X-Ooidx-Version"], V1)

    @on_clock
    async def test_latest_is_the_last_saved(self) -> None:
        rig = await self._rig_with_versions()
        got = await self._ask(rig, name="sst", version="latest", part=".dds")
        self.assertEqual(got["body"], b"Dataset { v2 } sst;\n")
        self.assertEqual(dict(got["meta"]["headers"])["Content-Description"], "dods_dds")
        self.assertEqual(got["meta"]["version"], V2)
        nc = await self._ask(rig, name="sst", version="latest", part=".nc")
        self.assertEqual((nc["body"], dict(nc["meta"]["headers"])["Content-Type"]),
                         (b"CDF\x01v2", "application/x-netcdf"))

    @on_clock
    async def test_head_sends_no_body(self) -> None:
        rig = await self._rig_with_versions()
        got = await self._ask(rig, name="sst", version=V1, part=".das", method="HEAD")
        self.assertEqual((got["body"], got["meta"]["length"]), (b"", len(b"Attributes { v1 }\n")))

    @on_clock
    async def test_unknown_versions(self) -> None:
        rig = await self._rig_with_versions()
        for kwargs in ({"name": "sst", "version": "20001205T100000Z-0123456789ab", "part": ".das"},
                       {"name": "nope", "version": "latest", "part": ".das"},
                       {"name": "sst", "version": V1, "part": ".nc"}):  # a version saved without its .nc
            got = await self._ask(rig, **kwargs)
            self.assertEqual(got["error"].remote_type, "UnknownVersion")
            self.assertEqual(got["streams"], [])

    @on_clock
    async def test_invalid_requests(self) -> None:
        rig = await self._rig_with_versions()
        got = await self._ask(rig, name="sst", version="../..", part=".das")
        self.assertEqual(got["error"].remote_type, "InvalidVersion")
        got = await self._ask(rig, name="sst", version=V1, part="/../../etc/passwd")
        self.assertEqual(got["error"].remote_type, "InvalidVersion")
