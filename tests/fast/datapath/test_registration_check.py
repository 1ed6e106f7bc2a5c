"""controller.register checks the upstream (issue 16, point 1): the .dds and
.das are fetched through the fetcher (here a fake one on the memory:// bus
that answers with a stream or an error reply, as the real one does), and a
registration is refused with the upstream's reason unless check is false;
moving a name to another URL needs replace; failed events leave last_error
in the record. On a Clock: the "too slow" case is a fetcher that never answers."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.python.failure import Failure

from magnet import operation
from magnet.rpc import error_reply

from ooidx.errors import Forbidden, UpstreamError
from ooidx.cli.datasets_cmd import format_datasets, format_record

from tests.fast.core.support import settle
from tests.fast.datapath import test_controller_contract as contract

BASE = contract.BASE

DDS = b"Dataset {\n    Float32 sst[time = 2];\n} sst.nc;\n"
DAS = b"Attributes {\n    sst {\n        String units \"degC\";\n    }\n}\n"


class AnsweringFetcher:
    """A fetcher whose C{fetch} answers at the address: C{answers[suffix]} is
    (status, body), an exception (an error reply), or None (no answer at all)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.answers: Dict[str, Any] = {".dds": (200, DDS), ".das": (200, DAS)}
        self.urls: List[str] = []

    @operation
    def fetch(self, url: str, method: str = "GET", address: Optional[str] = None,
              request_id: Optional[str] = None, **kwargs: Any) -> Any:
        self.urls.append(url)
        answer = self.answers.get(url[url.rindex("."):])
        if answer is None:
            return None
        if isinstance(answer, Exception):
            return self.bus.send(address, error_reply(Failure(answer), request_id))
        status, body = answer
        writer = self.bus.open_stream(address, {"status": status, "reason": "R", "headers": []},
                                      correlation_id=request_id)
        d = writer.write(body)
        return d.addCallback(lambda _: writer.finish())

    @operation
    def fetch_dataset(self, **kwargs: Any) -> None:
        return None


class RegistrationCheckTests(contract.ControllerCase):
    def start(self, **kwargs: Any) -> Any:  # type: ignore[override]
        self.answering = AnsweringFetcher(self.bus)
        self.fetcher = self.answering  # served as "fetcher" by the base class
        return super().start(**kwargs)

    def register(self, **kwargs: Any) -> Any:
        kwargs.setdefault("check", True)
        return self.call("register", **kwargs)

    def refusal(self, **kwargs: Any) -> Tuple[str, str]:
        kwargs.setdefault("check", True)
        e = self.refused("register", **kwargs)
        return e.remote_type, e.message

    def test_a_dap_upstream_is_checked_and_accepted(self) -> None:
        self.start()
        record = self.register(name="sst", url=BASE)
        self.assertEqual(record["status"], "registered")
        self.assertEqual(self.answering.urls, [BASE + ".dds", BASE + ".das"])
        self.assertIsNone(record["last_error"])

    def test_a_404_is_refused_with_its_reason_and_nothing_is_registered(self) -> None:
        self.start()
        self.answering.answers[".dds"] = (404, b"Error {\n code = 404;\n message = \"no such file\";\n};\n")
        kind, message = self.refusal(name="sst", url=BASE)
        self.assertEqual(kind, "UpstreamError")
        self.assertIn("404", message)
        self.assertIn(BASE + ".dds", message)
        self.assertNotIn("dataset:sst", self.store.values)
        self.assertNotIn("registered", [e["kind"] for e in self.events])

    def test_not_dap_is_refused(self) -> None:
        self.start()
        self.answering.answers[".das"] = (200, b"<html><body>a web page</body></html>")
        kind, message = self.refusal(name="sst", url=BASE)
        self.assertEqual(kind, "UpstreamError")
        self.assertIn("not DAP", message)
        self.assertNotIn("dataset:sst", self.store.values)

    def test_the_fetchers_refusal_keeps_its_kind(self) -> None:
        self.start()
        self.answering.answers[".dds"] = UpstreamError("connection refused by data.example.org")
        self.assertEqual(self.refusal(name="sst", url=BASE)[0], "UpstreamError")
        self.assertIn("connection refused", self.refusal(name="sst", url=BASE)[1])
        self.answering.answers[".dds"] = Forbidden("a redirect to a private address")
        self.assertEqual(self.refusal(name="sst", url=BASE)[0], "Forbidden")

    def test_too_slow_is_refused_within_the_bound(self) -> None:
        controller = self.start()
        self.answering.answers[".dds"] = None
        d = self.bus.call("controller", "register", name="sst", url=BASE, check=True, timeout=60)
        failures: List[Failure] = []
        d.addErrback(failures.append)
        settle(self.clock)
        self.assertEqual(failures, [])
        self.clock.advance(controller.check_timeout + 0.01)
        settle(self.clock)
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0].value.remote_type, "UpstreamTimeout")
        self.assertNotIn("dataset:sst", self.store.values)

    def test_a_large_answer_is_cut_at_the_bound(self) -> None:
        controller = self.start()
        controller.check_max_bytes = 1000
        self.answering.answers[".dds"] = (200, b"Dataset {" + b" " * 5000)
        kind, message = self.refusal(name="sst", url=BASE)
        self.assertEqual(kind, "UpstreamError")
        self.assertIn("larger than 1000", message)

    def test_check_false_registers_without_asking(self) -> None:
        self.start()
        self.answering.answers[".dds"] = (404, b"")
        self.assertEqual(self.register(name="sst", url=BASE, check=False)["status"], "registered")
        self.assertEqual(self.answering.urls, [])

    def test_moving_a_name_needs_replace_and_says_what_it_replaced(self) -> None:
        self.start()
        self.register(name="sst", url=BASE)
        other = "http://data.example.org/opendap/other.nc"
        kind, message = self.refusal(name="sst", url=other)
        self.assertEqual(kind, "ValueError")
        self.assertIn("replace", message)
        self.assertEqual(self.store.values["dataset:sst"]["url"], BASE)
        moved = self.register(name="sst", url=other, replace=True)
        self.assertEqual((moved["url"], moved["replaced"]), (other, BASE))
        again = self.register(name="sst", url=other)  # the same URL: no replace needed
        self.assertNotIn("replaced", again)
        registered = [e for e in self.events if e["kind"] == "registered"]
        self.assertEqual(registered[1]["replaced"], BASE)

    def test_a_failed_event_leaves_last_error_shown_by_the_cli(self) -> None:
        from ooidx import events
        self.start()
        self.register(name="sst", url=BASE)
        self.wait(events.emit(self.bus, "failed", "sst", stage="dds", url=BASE, error="UpstreamError",
                              reason="the upstream answered 500"))
        settle(self.clock)
        record = self.call("get", name="sst")
        self.assertEqual(record["status"], "failed")
        self.assertEqual(record["last_error"]["reason"], "the upstream answered 500")
        self.assertIsInstance(record["last_error"]["time"], float)
        self.assertIn("the upstream answered 500", format_datasets([record]).splitlines()[1])
        self.assertIn("last error: ", format_record(record))
        self.assertIn("the upstream answered 500", format_record(record))

