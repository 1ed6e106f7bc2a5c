"""The csv component's render (ooidx.datapath.csv.CSV) on a memory:// bus on
a threadless Clock: the .dods got through a fake controller, decoded, and
streamed as CSV to the asker's address; every failure an error reply there
(an upstream error status, an undecodable or too large .dods, no answer in
time, a controller error, a bad URL). No broker, no socket."""
from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

from twisted.internet import defer

import magnet
from magnet import RemoteError, operation
from magnet.rpc import decode_reply

from ooidx.datapath.csv import CSV
from ooidx.errors import Forbidden

from tests.fast.core.support import FastCase, bus_down, bus_up, cases, drive, expand, settle, threadless
from tests.fast.datapath.dods_bytes import dods

URL = "http://data.example.org/opendap/sst.nc.dods?x"


class FakeController:
    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.status = 200
        self.body = dods(("plain", "=1+1"), (1.5, -2.5))
        self.mode = "stream"
        self.asked: List[Dict[str, Any]] = []

    @operation
    def route(self, url: Optional[str] = None, dataset: Optional[str] = None, suffix: str = "",
              query: Optional[str] = None, method: str = "GET", *, address: str,
              request_id: Optional[str] = None) -> Any:
        self.asked.append({"url": url, "dataset": dataset})
        if self.mode == "forbidden":
            raise Forbidden("not registered")
        if self.mode == "stream":
            self.bus.send_stream(address, {"status": self.status}, [self.body[:10], self.body[10:]],
                                 correlation_id=request_id)
        return {"via": "fetcher"}


@expand
class RenderTests(FastCase):
    def start(self, **options: Any) -> CSV:
        self.clock = threadless(self)
        self.bus = magnet.connect(f"memory://csv-{uuid.uuid4().hex}", self.clock, node="n", rpc_timeout=5)
        self.controller = FakeController(self.bus)
        self.streams: List[Dict[str, Any]] = []
        self.messages: List[Any] = []
        options.setdefault("answer_timeout", 10.0)
        csv = CSV("csv", self.bus, node="n", clock=self.clock, **options)

        @defer.inlineCallbacks
        def go() -> Any:
            yield bus_up(self.bus)
            yield self.bus.serve("controller", self.controller)
            self.listener = yield self.bus.listen(self.messages.append, on_stream=self.on_stream)
            yield csv.start()

        drive(self, self.clock, go())
        self.addCleanup(self.stop, csv)
        return csv

    def stop(self, csv: CSV) -> None:
        drive(self, self.clock, bus_down(self.bus, csv))

    def on_stream(self, stream: Any) -> None:
        chunks: List[bytes] = []
        self.streams.append({"metadata": stream.metadata, "chunks": chunks, "id": stream.correlation_id})
        stream.deliver(chunks.append).addErrback(lambda _: None)

    def render(self, seconds: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("url", URL)
        kwargs.setdefault("address", self.listener.address)
        kwargs.setdefault("request_id", "r1")
        drive(self, self.clock, self.bus.post("csv", "render", **kwargs))
        settle(self.clock)
        if seconds:
            self.clock.advance(seconds)
            settle(self.clock)

    def error(self) -> RemoteError:
        self.assertEqual(len(self.messages), 1, self.messages)
        with self.assertRaises(RemoteError) as caught:
            decode_reply(self.messages[0])
        self.assertEqual(self.messages[0].correlation_id, "r1")
        return caught.exception

    def test_rendered(self) -> None:
        csv = self.start()
        self.render(dataset="sst")
        # by URL only: the controller finds the dataset (route takes a url or a name, not both)
        self.assertEqual(self.controller.asked, [{"url": URL, "dataset": None}])
        got = self.streams[0]
        self.assertEqual(got["id"], "r1")
        self.assertIn(["Content-Type", "text/csv; charset=utf-8"], got["metadata"]["headers"])
        self.assertIn(["Content-Disposition", 'inline; filename="sst.csv"'], got["metadata"]["headers"])
        text = b"".join(got["chunks"]).decode()
        self.assertEqual(text.splitlines()[1:], ["plain,1.5", "'=1+1,-2.5"])  # the formula cell escaped
        self.assertEqual(csv.rendered, 1)

    def test_unescaped_by_config_and_head(self) -> None:
        self.start(formula_escape=False)
        self.render()
        self.assertIn("=1+1,-2.5", b"".join(self.streams[0]["chunks"]).decode())
        self.render(method="HEAD", request_id="r2")
        self.assertEqual(self.streams[1]["chunks"], [])

    @cases("status, body, kind", [(404, b"Error { code = 404; };", "UpstreamError"),
                                  (200, b"not a dods answer", "UpstreamError")])
    def test_upstream_problems(self, status: int, body: bytes, kind: str) -> None:
        self.start()
        self.controller.status, self.controller.body = status, body
        self.render()
        self.assertEqual(self.error().remote_type, kind)
        self.assertEqual(self.streams, [])

    def test_too_large(self) -> None:
        self.start(max_bytes=20)
        self.render()
        self.assertEqual(self.error().remote_type, "UpstreamError")

    def test_no_answer_in_time(self) -> None:
        self.start(answer_timeout=3.0)
        self.controller.mode = "silent"
        self.render(seconds=3.0)
        self.assertEqual(self.error().remote_type, "UpstreamTimeout")

    def test_controller_error(self) -> None:
        self.start()
        self.controller.mode = "forbidden"
        self.render()
        self.assertEqual(self.error().remote_type, "Forbidden")
        self.flushLoggedErrors()

    def test_not_a_dods_url(self) -> None:
        self.start()
        self.render(url="http://data.example.org/sst.nc.das")
        self.assertEqual(self.error().remote_type, "InvalidURL")
        self.assertEqual(self.controller.asked, [])

    def test_without_an_address_it_is_dropped(self) -> None:
        self.start()
        self.render(address="")
        self.assertEqual((self.messages, self.controller.asked), ([], []))
