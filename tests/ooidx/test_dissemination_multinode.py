"""Dissemination end to end across real daemons on RabbitMQ (issue 5, "Done
when: ... across daemons on RabbitMQ").

Two `twistd -n ooidx` processes share a RabbitMQ virtual host of this test's
own (the `isolated_broker` fixture of test_multinode):

- node A runs web, controller, attribute_store, pub_sub,
  notification, user_notification and user_pub_sub;
- node B runs fetcher (2 instances), cache, persister and csv; versions land
  under node B's data_dir.

The test runs a real pydap upstream (netCDF files it makes) and a webhook
receiver on loopback, both allowed through `security.allow_hosts` in both
nodes' configs, and talks to the exchange over HTTP only, on node A's web
port: the operator makes a person, the person subscribes twice to
`event\\.saved\\.` (one SSE stream the test reads, one webhook), the operator
registers the dataset and asks for it (POST .../refresh). Then, every wait
bounded:

- node B's persister wrote DATA_DIR_B/datasets/sst/VERSION/ with sst.nc
  (netCDF4 reads the same values as the upstream's file: the 1-D coordinate
  variables and the unconstrained 2-D variable), the DAP responses as the
  upstream serves them, and a manifest whose sha256 and sizes match the files;
- the saved event reached the SSE stream and the webhook receiver;
- a second refresh with the upstream unchanged makes no new version and no
  second saved event;
- the upstream's file changed, a refresh makes a second version (sequence 2)
  with the new values, and a second saved event on both deliveries.

On a failure, both daemons' logs and stderr are attached to the report
(sections "daemon node-a", "daemon node-b"). The daemons are stopped with SIGTERM at the end (and killed in
teardown whatever happens).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import netCDF4
import numpy as np
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

sys.path.insert(0, str(Path(__file__).parent))

from dap_upstream import Upstream, make_files  # noqa: E402
from test_multinode import isolated_broker  # noqa: E402,F401 - the fixture: a vhost of the test's own
from twistd_helpers import Daemon, environment, eventually, free_port, write_config  # noqa: E402

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]

TOKEN = "dissemination-multinode-" + uuid.uuid4().hex
NAME = "sst"
SAVED = r"event\.saved\."
#: How long the test waits, after the persister says a version is unchanged,
#: for a saved event that should not come.
QUIET = 2.0

NODE_A = {"web": None, "controller": None, "attribute_store": None, "pub_sub": None,
          "notification": None, "user_notification": None, "user_pub_sub": None}
NODE_B = {"fetcher": {"instances": 2, "timeout": 15}, "cache": None, "persister": None, "csv": None}


class Hook(Resource):
    """The webhook receiver: answers 200 and keeps what was POSTed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Dict[str, Any]] = []

    def render_POST(self, request: server.Request) -> bytes:
        body = request.content.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"unparsed": body.decode("utf-8", "replace")}
        if isinstance(parsed, dict) and parsed.get("type") == "webhook.verification":
            return json.dumps({"challenge": parsed["challenge"]}).encode()  # the callback's challenge, echoed
        self.requests.append({"path": request.path.decode(), "body": parsed,
                              "content-type": (request.getHeader(b"content-type") or b"").decode()})
        request.setResponseCode(200)
        return b"ok"

    def saved(self) -> List[Dict[str, Any]]:
        return [r["body"] for r in self.requests if str(r["body"].get("topic", "")).startswith("event.saved.")]


class SSE(Protocol):
    """Reads a text/event-stream: events ({"id", "data"}) and comments."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: List[Dict[str, Any]] = []
        self.comments: List[str] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            event: Dict[str, Any] = {}
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("id:"):
                    event["id"] = line[3:].strip()
                elif line.startswith("data:"):
                    event["data"] = json.loads(line[5:].strip())
            if "data" in event:
                self.events.append(event)

    def connectionLost(self, reason: Any) -> None:
        self.lost = True

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.stopProducing()

    def saved(self) -> List[Dict[str, Any]]:
        return [e["data"] for e in self.events if str(e["data"].get("topic", "")).startswith("event.saved.")]


class Exchange:
    """The two daemons, the upstream, the webhook receiver, and the HTTP client side."""

    def __init__(self, tmp: Path, broker: str, upstream: Upstream, hook_port: int) -> None:
        self.tmp = tmp
        self.broker = broker
        self.upstream = upstream
        self.web_port = free_port()
        self.base = f"http://127.0.0.1:{self.web_port}"
        self.hook_url = f"http://127.0.0.1:{hook_port}/hook"
        self.security = {"token": TOKEN,
                         "allow_hosts": [f"127.0.0.1:{upstream.port}", f"127.0.0.1:{hook_port}"]}
        self.daemons: List[Daemon] = []
        self.data_dir_a = tmp / "node-a-data"
        self.data_dir_b = tmp / "node-b-data"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def start_node(self, name: str, components: Dict[str, Any], data_dir: Path) -> Daemon:
        # the broker (with its password) comes from the environment, as in production
        config = write_config(self.tmp / f"{name}.yaml", node=name, broker="amqp://guest@127.0.0.1:5672/",
                              components=components, data_dir=str(data_dir),
                              http={"web_port": self.web_port, "proxy_port": 0},
                              timeouts={"shutdown": 3, "rpc": 10, "send": 10},
                              security=self.security)
        daemon = Daemon(config, env=environment(OOIDX_BROKER=self.broker))
        self.daemons.append(daemon)
        return daemon

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, token: Optional[str] = TOKEN) -> Any:
        import treq
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        response = yield treq.request(method, self.base + path, headers=headers, pool=self.pool, timeout=20,
                                      data=json.dumps(body).encode() if body is not None else None)
        content = yield response.content()
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return response.code, parsed

    @defer.inlineCallbacks
    def stream(self, path: str, token: str) -> Any:
        """Open an SSE stream on node A's web port; fires with its reader once its first comment came."""
        response = yield Agent(reactor, pool=self.pool).request(
            b"GET", (self.base + path).encode(),
            Headers({b"Authorization": [f"Bearer {token}".encode()], b"Accept": [b"text/event-stream"]}))
        assert response.code == 200, response.code
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
        reader = SSE()
        response.deliverBody(reader)
        yield eventually(lambda: reader.comments, 10, "the SSE stream's first comment")
        return reader

    def versions(self) -> List[str]:
        directory = self.data_dir_b / "datasets" / NAME
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def check_version(ex: Exchange, saved: Dict[str, Any], upstream_file: Path, sequence: int) -> Dict[str, Any]:
    """What node B's persister wrote for the version of the event C{saved}."""
    version = saved["version"]
    directory = ex.data_dir_b / "datasets" / NAME / version
    assert saved["path"] == f"datasets/{NAME}/{version}"
    assert directory.is_dir(), f"{directory} is not there: {ex.versions()}"
    files = sorted(os.listdir(directory))
    assert files == ["manifest.json", f"{NAME}.das", f"{NAME}.dds", f"{NAME}.dods", f"{NAME}.nc"], files

    # netCDF4 reads what the upstream's file holds
    with netCDF4.Dataset(directory / f"{NAME}.nc") as got, netCDF4.Dataset(upstream_file) as want:
        assert got.title == want.title
        for var in ("time", "lat", "sst"):  # two 1-D coordinate variables, the 2-D variable unconstrained
            assert got[var].dimensions == want[var].dimensions, var
            assert got[var].shape == want[var].shape, var
            assert got[var].dtype == want[var].dtype, var
            np.testing.assert_array_equal(got[var][:], want[var][:], err_msg=var)
            assert got[var].units == want[var].units, var
        assert got["sst"].ndim == 2

    # the manifest matches the files
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["dataset"] == NAME and manifest["version"] == version and manifest["sequence"] == sequence
    assert manifest["url"] == ex.upstream.url(f"{NAME}.nc") and manifest["topic"] == f"dataset.{NAME}"
    assert manifest["node"] == "node-b"
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for name, info in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert info["bytes"] == len(data), name
        assert info["sha256"] == hashlib.sha256(data).hexdigest(), name
    dods_sha = manifest["files"][f"{NAME}.dods"]["sha256"]
    assert version.endswith("-" + dods_sha[:12])

    # the event says the same
    assert saved["topic"] == f"event.saved.{NAME}" and saved["kind"] == "saved" and saved["dataset"] == NAME
    assert saved["node"] == "node-b" and saved["component"] == "persister"
    assert saved["sha256"] == dods_sha and saved["versions"] == sequence and saved["netcdf"] is True
    assert saved["files"] == {f: info["bytes"] for f, info in manifest["files"].items()}
    return manifest


@defer.inlineCallbacks
def check_dap_responses(ex: Exchange, version: str) -> Any:
    """The .das, .dds and .dods were saved as the upstream serves them."""
    import treq
    directory = ex.data_dir_b / "datasets" / NAME / version
    for suffix in ("das", "dds", "dods"):
        response = yield treq.get(ex.upstream.url(f"{NAME}.nc.{suffix}"), pool=ex.pool, timeout=20)
        body = yield response.content()
        assert response.code == 200, (suffix, body[:300])
        assert (directory / f"{NAME}.{suffix}").read_bytes() == body, suffix


def rewrite_upstream(path: Path, scratch: Path) -> None:
    """The upstream's file, changed: other sst values (written aside, then renamed over it)."""
    scratch.mkdir(parents=True, exist_ok=True)
    make_files(scratch)
    with netCDF4.Dataset(scratch / f"{NAME}.nc", "a") as ds:
        ds["sst"][:] = ds["sst"][:] * 2 - 5.0
    os.replace(scratch / f"{NAME}.nc", path)


@pytest.fixture
def upstream(tmp_path: Path) -> Any:
    directory = tmp_path / "upstream"
    files = make_files(directory)
    with Upstream(directory) as up:
        up.files = files
        yield up


@pytest.fixture
def hook() -> Any:
    receiver = Hook()
    site = server.Site(receiver)
    site.log = lambda *a, **k: None  # type: ignore[assignment]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    receiver.port = port.getHost().port
    yield receiver
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def exchange(tmp_path: Path, isolated_broker: str, upstream: Upstream, hook: Hook) -> Any:  # noqa: F811
    ex = Exchange(tmp_path, isolated_broker, upstream, hook.port)
    yield ex
    for d in ex.daemons:
        d.terminate()
    for d in ex.daemons:
        d.kill()
    pytest_twisted.blockon(ex.pool.closeCachedConnections())


@pytest_twisted.ensureDeferred
async def test_saved_versions_reach_people_across_daemons(exchange: Exchange, hook: Hook, upstream: Upstream,
                                                          request: Any) -> None:
    ex = exchange
    try:
        await run(ex, hook, upstream)
    except BaseException:
        for d in ex.daemons:
            request.node.add_report_section("call", f"daemon {d.name}", d.describe())
        up = upstream.proc
        request.node.add_report_section("call", "upstream", f"pydap upstream pid {up.pid}, rc {up.poll()}, "
                                                            f"port {upstream.port}")
        raise


async def run(ex: Exchange, hook: Hook, upstream: Upstream) -> None:
    began = time.monotonic()
    timings: Dict[str, float] = {}

    def mark(what: str) -> None:
        timings[what] = round(time.monotonic() - began, 2)

    # --- the two nodes: A first (pub_sub, the store), then B, whose persister subscribes through A
    a = ex.start_node("node-a", NODE_A, ex.data_dir_a)
    b = ex.start_node("node-b", NODE_B, ex.data_dir_b)
    for d in (a, b):
        await eventually(lambda: d.has(f"node {d.name} started") or d.proc.poll() is not None, 60,
                         f"{d.name} started")
        assert d.proc.poll() is None, d.describe()
    await eventually(lambda: b.has("persister: subscription persister -> pubsub.sub.persister"), 45,
                     "node B's persister subscribed through node A's pub_sub")
    mark("nodes up")
    code, health = await ex.request("GET", "/healthz", token=None)
    assert code == 200 and health["ok"] is True, health

    # --- a person, with two subscriptions to saved events: one read as SSE, one by webhook
    person = "p" + uuid.uuid4().hex[:8]
    code, made = await ex.request("POST", "/api/people", {"name": person})
    assert code == 201, made
    token = made["token"]
    code, by_hook = await ex.request("POST", "/api/subscriptions",
                                     {"kind": "events", "regex": SAVED, "webhook": ex.hook_url}, token=token)
    assert code == 201, by_hook
    assert by_hook["events"] is None and by_hook["webhook"] == ex.hook_url
    code, by_stream = await ex.request("POST", "/api/subscriptions", {"kind": "events", "regex": SAVED},
                                       token=token)
    assert code == 201, by_stream
    assert by_stream["events"] == f"/api/subscriptions/{by_stream['id']}/events"
    sse = await ex.stream(by_stream["events"], token)
    try:
        mark("subscribed")

        # --- register the dataset through node A's web API and ask for it
        url = upstream.url(f"{NAME}.nc")
        code, registered = await ex.request("POST", "/api/datasets", {"name": NAME, "url": url})
        assert code == 201, registered
        assert registered["dataset"]["name"] == NAME and registered["dataset"]["url"] == url
        code, asked = await ex.request("POST", f"/api/datasets/{NAME}/refresh")
        assert code == 202, asked

        # --- the saved event reaches the SSE stream and the webhook; node B wrote the version
        await eventually(lambda: sse.saved(), 30, "the saved event on the SSE stream")
        mark("first version saved (SSE)")
        (first,) = sse.saved()
        manifest = check_version(ex, first, upstream.files[NAME], sequence=1)
        await check_dap_responses(ex, first["version"])
        await eventually(lambda: hook.saved(), 20, "the saved event at the webhook")
        mark("first version at the webhook")
        (posted,) = hook.saved()
        assert posted == first
        assert ex.versions() == [first["version"]]
        assert not (ex.data_dir_a / "datasets").exists(), "node A has no persister: nothing lands there"

        # the controller's record follows the events
        async def record_has(versions: int) -> Any:
            code, body = await ex.request("GET", f"/api/datasets/{NAME}")
            record = body.get("dataset", {}) if code == 200 and isinstance(body, dict) else {}
            # (the fetched and saved events come from two nodes: either may be taken first)
            return record.get("versions") == versions and record.get("status") == "fetched" and record
        record = await eventually(lambda: record_has(1), 15, "the dataset record: fetched, versions 1", interval=0.2)
        assert record["size"] == first["bytes"] == manifest["files"][f"{NAME}.dods"]["bytes"]

        # --- asked again, the upstream unchanged: no new version, no second saved event
        unchanged = b.log().count(f"persister: dataset {NAME} unchanged")
        code, asked = await ex.request("POST", f"/api/datasets/{NAME}/refresh")
        assert code == 202, asked
        await eventually(lambda: b.log().count(f"persister: dataset {NAME} unchanged") > unchanged, 30,
                         "node B's persister found the version unchanged")
        await sleep(QUIET)  # a saved event, had there been one, would have come by now
        assert len(sse.saved()) == 1 and len(hook.saved()) == 1, (sse.saved(), hook.saved())
        assert ex.versions() == [first["version"]]
        mark("unchanged refresh checked")

        # --- the upstream's file changes: a second version, a second saved event
        rewrite_upstream(upstream.files[NAME], ex.tmp / "changed")
        code, asked = await ex.request("POST", f"/api/datasets/{NAME}/refresh")
        assert code == 202, asked
        await eventually(lambda: len(sse.saved()) >= 2, 30, "the second saved event on the SSE stream")
        mark("second version saved (SSE)")
        second = sse.saved()[1]
        assert second["version"] != first["version"] and second["sha256"] != first["sha256"]
        check_version(ex, second, upstream.files[NAME], sequence=2)
        await check_dap_responses(ex, second["version"])
        await eventually(lambda: len(hook.saved()) >= 2, 20, "the second saved event at the webhook")
        assert hook.saved()[1] == second
        assert ex.versions() == sorted([first["version"], second["version"]])
        # the first version is still as it was
        with netCDF4.Dataset(ex.data_dir_b / first["path"] / f"{NAME}.nc") as old:
            assert float(old["sst"][0, 0]) == 10.0
        await eventually(lambda: record_has(2), 15, "the dataset record: versions 2", interval=0.2)
        assert [e["data"]["version"] for e in sse.events] == [first["version"], second["version"]]
        assert len(hook.requests) == 2, hook.requests
        assert all(r["content-type"].startswith("application/json") for r in hook.requests), hook.requests
        mark("second version at the webhook")
    except BaseException:
        sse.close()
        raise

    # --- both nodes stop cleanly on SIGTERM, with nothing alarming in their logs; node A's
    # web edge ends the SSE stream the person still holds open
    for d in (a, b):
        d.terminate()
    for d in (a, b):
        await eventually(lambda: d.proc.poll() is not None, 30, f"{d.name} exited after SIGTERM")
        assert d.proc.returncode == 0, d.describe()
    await eventually(lambda: sse.lost, 10, "the SSE stream ended by node A's stop")
    for d in (a, b):
        log = d.log()
        assert f"node {d.name} stopped cleanly" in log, d.describe()
        assert "Traceback" not in log and "Unhandled" not in log, d.describe()
        assert TOKEN not in log and token not in log and "guest:guest@" not in log, d.describe()
    mark("stopped")
    print(f"timings (s from the start of the test): {timings}")


from tests.support.waiting import sleep  # noqa: E402 - one implementation for the suite
