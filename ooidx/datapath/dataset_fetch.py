"""fetch_dataset's work (L{DatasetFetch}, docs/dissemination.md): a dataset's
.das and .dds whole, the subscribers' addresses from pub_sub, then the .dods
streamed to all of them at once (L{DodsPump}: the slowest sets the pace, a
broken stream is dropped, the others go on)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.internet.defer import (Deferred, DeferredList, inlineCallbacks)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from magnet.errors import MagnetError, RemoteError, Unroutable

from ooidx import dap, events
from ooidx.errors import UpstreamError, UpstreamTimeout
from ooidx.datapath.transfer import BodyPump, Sink, Transfer
from ooidx.datapath.upstream import classify, connection_header, content_length, discard, end_to_end, failure_reason

#: The largest .das / .dds fetch_dataset reads (they travel whole, in the stream's start).
MAX_METADATA_BYTES = 16 * 1024 * 1024


class DatasetFetch:
    """One fetch_dataset: .das and .dds whole, route, .dods to every address."""

    def __init__(self, fetcher: Any, name: str, base: str, pub_sub: str, request_id: Optional[str],
                 to: Optional[List[str]] = None) -> None:
        self.fetcher = fetcher
        self.to = to
        self.log = fetcher.log
        self.name = name
        self.base = base
        self.pub_sub = pub_sub
        self.request_id = request_id
        self.topic = f"dataset.{name}"
        self.stage = "das"

    @inlineCallbacks
    def run(self) -> Any:
        fetcher = self.fetcher
        fetcher.active += 1
        try:
            try:
                texts = {}
                for part in ("das", "dds"):
                    self.stage = part
                    texts[part] = yield self._whole(dap.dataset_url(self.base, part))
                self.stage = "route"
                addresses = unique(self.to) if self.to else (yield self._route())
                if not addresses:
                    self.log.info("{component}: dataset {dataset}: no subscription matches {topic}; "
                                  ".dods not fetched", component=fetcher.name, dataset=self.name, topic=self.topic)
                    summary = {"dataset": self.name, "addresses": [], "bytes": 0, "status": None}
                    yield self._event("fetched", url=self.base, addresses=0, delivered=0, bytes=0)
                    return summary
                self.stage = "dods"
                summary = yield self._stream_dods(texts, addresses)
            except Exception:  # noqa: BLE001 - every failure becomes an event
                failure = Failure()
                exc = failure.value if failure.check(RemoteError, Unroutable, MagnetError) and \
                    self.stage == "route" else classify(failure, self.base, fetcher.options.timeout)
                summary = {"dataset": self.name, "error": type(exc).__name__, "message": str(exc),
                           "stage": self.stage}
            if "error" in summary:
                self.log.warn("{component}: dataset {dataset} not fetched ({stage}): {error}: {message}",
                              component=fetcher.name, dataset=self.name, stage=summary.get("stage", self.stage),
                              error=summary["error"], message=summary["message"])
                yield self._event("failed", url=self.base, stage=summary.get("stage", self.stage),
                                  error=summary["error"], reason=summary["message"][:500],
                                  bytes=summary.get("bytes", 0))
            else:
                self.log.info("{component}: dataset {dataset} fetched: {bytes} bytes of .dods to {count} "
                              "address(es)", component=fetcher.name, dataset=self.name, bytes=summary["bytes"],
                              count=len(summary["addresses"]))
                yield self._event("fetched", url=self.base, addresses=len(summary["addresses"]),
                                  delivered=len(summary["delivered"]), bytes=summary["bytes"],
                                  length=summary.get("length"))
            return summary
        finally:
            fetcher.active -= 1

    def _event(self, kind: str, **details: Any) -> Deferred:
        return events.emit(self.fetcher.bus, kind, self.name, component=self.fetcher.name, **details)

    def _transfer(self, url: str) -> "Transfer":
        return Transfer(self.fetcher, url, "GET", "", self.request_id)

    @inlineCallbacks
    def _whole(self, url: str) -> Any:
        """The text of a small answer (.das, .dds): 200 only, at most 16 MiB."""
        transfer = self._transfer(url)
        response = yield transfer._request()
        if response.code != 200:
            discard(response)
            raise UpstreamError(f"{url[-200:]} answered {response.code}")
        limit = min(MAX_METADATA_BYTES, self.fetcher.options.max_bytes)
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            discard(response)
            raise UpstreamError(f"{url[-200:]} is {response.length} bytes, over the limit of {limit}")
        collect = Collect(limit, self.fetcher.options.timeout, transfer.clock)
        response.deliverBody(collect)
        body = yield collect.done
        return body.decode("utf-8", "replace")

    def _route(self) -> Deferred:
        d = self.fetcher.bus.call(self.pub_sub, "route", topic=self.topic)

        def check(addresses: Any) -> List[str]:
            if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
                raise UpstreamError(f"{self.pub_sub}.route answered {str(addresses)[:200]}, not a list of addresses")
            return unique(addresses)

        return d.addCallback(check)

    @inlineCallbacks
    def _stream_dods(self, texts: Dict[str, str], addresses: List[str]) -> Any:
        url = dap.dataset_url(self.base, "dods")
        transfer = self._transfer(url)
        response = yield transfer._request()
        if response.code != 200:
            discard(response)
            raise UpstreamError(f"{url[-200:]} answered {response.code}")
        max_bytes = self.fetcher.options.max_bytes
        length = None if response.length is UNKNOWN_LENGTH else response.length
        if length is not None and length > max_bytes:
            discard(response)
            raise UpstreamError(f"{url[-200:]} is {length} bytes, over the limit of {max_bytes}")
        headers = end_to_end(response.headers, connection_header(response))
        if length is not None and content_length(response.headers) is None:
            headers.append(["Content-Length", str(length)])
        metadata = {"topic": self.topic, "dataset": self.name, "url": self.base,
                    "fetched": self.fetcher.clock.seconds(), "das": texts["das"], "dds": texts["dds"],
                    "status": response.code, "headers": headers, "length": length}
        bus = self.fetcher.bus
        sinks = [Sink(bus.open_stream(a, metadata, correlation_id=self.request_id), a) for a in addresses]
        pump = DodsPump(transfer, sinks, response.code)
        response.deliverBody(pump)
        summary = yield pump.done
        summary.update(dataset=self.name, addresses=addresses, length=length)
        if "error" in summary:
            summary["stage"] = "dods"
        return summary


def unique(addresses: List[str]) -> List[str]:
    """The addresses in their order, each once."""
    return list(dict.fromkeys(addresses))


class Collect(Protocol):
    """A small body, whole: at most C{limit} bytes, each piece within C{timeout} of the last."""

    def __init__(self, limit: int, timeout: float, clock: Any) -> None:
        self.limit = limit
        self.timeout = timeout
        self.clock = clock
        self.parts: List[bytes] = []
        self.size = 0
        self.done: Deferred = Deferred()
        self._idle: Any = None

    def connectionMade(self) -> None:
        self._idle = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._end(UpstreamError(f"body over the limit of {self.limit} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            self._end(UpstreamError(f"upstream broke off the body after {self.size} bytes: {failure_reason(reason)}"))

    def _timed_out(self) -> None:
        self._end(UpstreamTimeout(f"no data from upstream for {self.timeout:g} s after {self.size} bytes"))
        if self.transport is not None:
            self.transport.stopProducing()

    def _end(self, exc: Optional[Exception]) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.done.called:
            return
        if exc is None:
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(Failure(exc))


class DodsPump(BodyPump):
    """The .dods to every subscriber's stream: a stream that breaks is
    dropped (the others go on); the transfer fails when none is left. A body
    the upstream delimits by closing the connection cannot be verified, so
    every stream is aborted (nothing half is passed as whole)."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.finished and reason is not None and reason.check(PotentialDataLoss):
            self._fail(UpstreamError("body delimited by connection close (unverifiable)"), stop=False)
            return
        super().connectionLost(reason)

    def _check_sinks(self) -> bool:
        for sink in list(self.sinks):
            if sink.failure is not None:
                self.transfer.log.warn("{component}: dataset stream to {address} broke: {reason}",
                                       component=self.transfer.name, address=sink.role,
                                       reason=sink.failure.getErrorMessage())
                sink.abort(UpstreamError("stream broke"))
                self.sinks.remove(sink)
        if not self.sinks:
            self._fail(UpstreamError("every subscriber's stream broke"))
            return True
        return False

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        d = DeferredList([sink.finish() for sink in self.sinks], consumeErrors=True)

        def ended(_: Any) -> Dict[str, Any]:
            delivered = [sink.role for sink in self.sinks if sink.failure is None]
            if not delivered:
                return {"error": "UpstreamError", "message": "every subscriber's stream broke", "status": 502,
                        "bytes": self.bytes}
            return {"status": self.status, "bytes": self.bytes, "delivered": delivered}

        d.addCallback(ended).chainDeferred(self.done)
