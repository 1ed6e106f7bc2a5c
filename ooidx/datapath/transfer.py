"""One fetch for the proxy (L{Transfer}): the request upstream (redirects
followed one checked hop at a time), then the answer streamed to the client's
address and, for a 200 GET the cache may keep, to the store (L{BodyPump}: the
upstream is paused while a stream has no room; a body that breaks off aborts
the streams)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional
from urllib.parse import urljoin

from twisted.internet.defer import (Deferred, DeferredList, inlineCallbacks, succeed)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ooidx import urlpolicy, wire
from ooidx.errors import Forbidden, InvalidURL, UpstreamError, UpstreamTimeout
from ooidx.datapath import splice
from ooidx.datapath.upstream import (REDIRECTS, UPSTREAM_READ_SIZE, USER_AGENT, ascii_url, classify,
                                     connection_header, content_length, discard, end_to_end, failure_reason,
                                     last_header, widen_reads)

#: The HTTP status the proxy answers for each error type (for the record).
ERROR_STATUS = {"Forbidden": 403, "InvalidURL": 400, "InvalidName": 400, "BadArguments": 400,
                "UpstreamTimeout": 504}
#: The largest chunk of a fetch's streams: a piece read from the upstream (at
#: most UPSTREAM_READ_SIZE) goes on as one chunk, not copied into smaller ones.
STREAM_CHUNK_SIZE = UPSTREAM_READ_SIZE
#: Chunks of a fetch's stream awaiting the broker's confirm (the bytes in
#: flight: STREAM_WINDOW times STREAM_CHUNK_SIZE at most).
STREAM_WINDOW = 4


class Sink:
    """One stream being written (to the client's address, or the store)."""

    def __init__(self, writer: Any, role: str) -> None:
        self.writer = writer
        self.role = role
        self.failure: Optional[Failure] = None

    def write(self, data: bytes) -> Optional[Deferred]:
        """Write; a Deferred if the writer has no room yet, else None."""
        if self.failure is not None:
            return None
        d = self.writer.write(data)
        d.addErrback(self._broken)
        if d.called:
            return None
        return d

    def _broken(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure

    def finish(self) -> Deferred:
        if self.failure is not None:
            return succeed(None)
        return self.writer.finish().addErrback(self._broken)

    def abort(self, exc: BaseException) -> Deferred:
        return self.writer.abort(exc)


class Transfer:
    """One fetch: request (following redirects), then stream the answer."""

    def __init__(self, fetcher: Any, url: str, method: str, address: str, request_id: Optional[str], *,
                 store: Optional[str] = None, validators: Optional[Dict[str, Optional[str]]] = None,
                 extra: Optional[Dict[str, Any]] = None, store_limit: Optional[int] = None,
                 tee: Any = None, not_modified: Any = None) -> None:
        """C{tee}: for a fetch made where the store is (the cache's miss path), a
        callable C{metadata -> writer} that gives the store's copy a local writer
        (C{write}, C{finish}, C{abort}, as a stream writer has) in place of a
        second stream on the bus; C{not_modified}: what to do on a 304 to a
        revalidation in place of posting C{serve} to C{store} (fires with None)."""
        self.fetcher = fetcher
        self.log = fetcher.log
        self.name = fetcher.name
        self.url = url
        self.method = method
        self.address = address
        self.request_id = request_id
        self.store = store
        self.store_limit = store_limit
        self.validators = validators or {}
        self.extra = extra or {}
        self.options = fetcher.options
        self.clock = fetcher.clock
        self.revalidated = False
        self.tee = tee
        self.not_modified = not_modified

    @inlineCallbacks
    def run(self) -> Any:
        self.fetcher.active += 1
        try:
            try:
                response = yield self._request()
            except Exception:  # noqa: BLE001 - every failure is answered
                exc = classify(Failure(), self.url, self.options.timeout)
                result = yield self.fetcher._refuse(self.address, self.request_id, self.url, exc, record=False)
                return result
            try:
                result = yield self._answer(response)
            except Exception:  # noqa: BLE001 - a bug: say so at the address rather than leave it waiting
                self.log.failure("{component}: answering {url} failed", component=self.name, url=self.url)
                result = yield self.fetcher._refuse(self.address, self.request_id, self.url,
                                                    UpstreamError("internal error in the fetcher"), record=False)
            return result
        finally:
            self.fetcher.active -= 1

    # the request -------------------------------------------------------------------

    @inlineCallbacks
    def _request(self) -> Any:
        agent = self.fetcher._make_agent()
        current = self.url
        method = self.method
        for hop in range(self.options.max_redirects + 1):
            urlpolicy.check_url(current, self.fetcher.allow_private, self.fetcher.allow_hosts)
            headers = Headers({b"User-Agent": [USER_AGENT]})
            if self.validators.get("etag"):
                headers.addRawHeader(b"If-None-Match", self.validators["etag"].encode("latin-1"))
            if self.validators.get("last_modified"):
                headers.addRawHeader(b"If-Modified-Since", self.validators["last_modified"].encode("latin-1"))
            response = yield self._with_timeout(agent.request(method.encode("ascii"), ascii_url(current), headers))
            location = response.headers.getRawHeaders(b"location")
            if response.code not in REDIRECTS or not location:
                self.final_url = current
                return response
            discard(response)
            if hop == self.options.max_redirects:
                raise UpstreamError(f"more than {self.options.max_redirects} redirects")
            target = urljoin(current, location[0].decode("latin-1").strip())
            try:
                urlpolicy.check_url(target, self.fetcher.allow_private, self.fetcher.allow_hosts)
            except InvalidURL as e:
                raise UpstreamError(f"bad redirect to {target[:200]}: {e}") from None
            except Forbidden as e:
                raise Forbidden(f"redirect to {target[:200]} refused: {e}") from None
            self.log.debug("{component}: {url} redirects ({status}) to {target}", component=self.name,
                           url=current, status=response.code, target=target)
            if response.code == 303 and method != "HEAD":
                method = "GET"
            current = target
        raise UpstreamError("redirect loop")  # not reached

    def _with_timeout(self, d: Deferred) -> Deferred:
        """C{d}, cancelled (an L{UpstreamTimeout}) if no answer came within the fetch timeout."""

        def timed_out(result: Any, timeout: float) -> None:
            raise UpstreamTimeout(f"no answer within {timeout:g} s")

        return d.addTimeout(self.options.timeout, self.clock, onTimeoutCancel=timed_out)

    # the answer ---------------------------------------------------------------------

    def _answer(self, response: Any) -> Deferred:
        status = response.code
        if status == 304 and (self.store or self.not_modified) and self.validators and any(self.validators.values()):
            discard(response)
            self.revalidated = True
            if self.not_modified is not None:
                d = self.not_modified()
            else:
                d = self.fetcher.bus.post(self.store, "serve", url=self.url, method=self.method,
                                          address=self.address, request_id=self.request_id, revalidated=True)

            def not_sent(f: Failure) -> Deferred:
                self.revalidated = False
                self.log.warn("{component}: cache {store} unreachable after a 304 for {url}: {reason}",
                              component=self.name, store=self.store, url=self.url, reason=f.getErrorMessage())
                return self.fetcher._refuse(self.address, self.request_id, self.url,
                                            UpstreamError("cache unreachable after revalidation"), record=False)

            return d.addCallbacks(lambda _: {"status": 304, "bytes": 0, "revalidated": True}, not_sent)
        headers = end_to_end(response.headers, connection_header(response))
        declared = content_length(response.headers)
        length = declared if self.method == "HEAD" else (
            None if response.length is UNKNOWN_LENGTH else response.length)
        if self.method == "GET" and length is not None and declared is None:
            # Twisted's client keeps Content-Length to itself (a connection
            # header to it); the upstream declared it, so pass it on.
            headers.append(["Content-Length", str(length)])
        if self.method == "GET" and length is not None and length > self.options.max_bytes:
            discard(response)
            return self.fetcher._refuse(self.address, self.request_id, self.url, UpstreamError(
                f"response of {length} bytes is over the limit of {self.options.max_bytes}"), record=False)
        metadata = {"status": status, "reason": response.phrase.decode("latin-1", "replace"),
                    "headers": headers, "url": self.url, "source": "fetcher", "length": length, **self.extra}
        bus = self.fetcher.bus
        spliced = self._splice(response, status, length)
        if spliced is not None:
            metadata[wire.SPLICED] = True
        sinks = [Sink(bus.open_stream(self.address, metadata, correlation_id=self.request_id,
                                       chunk_size=STREAM_CHUNK_SIZE, window=STREAM_WINDOW), "client")]
        storing = self.store or self.tee is not None
        if storing and self.method == "GET" and status == 200 and not (
                self.store_limit is not None and length is not None and length > self.store_limit):
            validators = {"etag": last_header(response.headers, b"etag"),
                          "last_modified": last_header(response.headers, b"last-modified")}
            store_metadata = {**metadata, "store": True, "validators": validators}
            if self.tee is not None:
                writer = self.tee(store_metadata)
            else:
                writer = bus.open_stream(self.store, store_metadata, correlation_id=self.request_id,
                                         chunk_size=STREAM_CHUNK_SIZE, window=STREAM_WINDOW)
            if writer is not None:
                sinks.append(Sink(writer, "store"))
        elif storing and self.method == "GET" and status == 200:
            self.log.debug("{component}: {url}: {length} bytes, over the cache's limit of {limit}; not stored",
                           component=self.name, url=self.url, length=length, limit=self.store_limit)
        if spliced is not None:
            return self._spliced(response, spliced, sinks, status)
        pump = BodyPump(self, sinks, status, store_limit=self.store_limit)
        response.deliverBody(pump)
        return pump.done

    def _splice(self, response: Any, status: int, length: Optional[int]) -> Optional[splice.Splice]:
        """A L{splice.Splice} for this answer if its body can go from socket to
        socket in this process (see L{ooidx.datapath.splice}), else None. The
        proxy's end is taken (and the splice hung on it) before the stream's
        start goes out, so the proxy finds it when the start arrives."""
        if (self.method != "GET" or status != 200 or length is None or length < splice.SPLICE_MIN
                or not splice.available()):
            return None
        if self.store is not None and self.tee is None:
            return None  # a copy for a store elsewhere goes as a second stream: bytes, in Python
        upstream = splice.upstream_connection(response)
        if upstream is None:
            return None
        end = splice.HANDOFFS.take(self.request_id)
        if end is None:
            return None
        job = splice.Splice(self.fetcher.network, upstream, length, idle_timeout=self.options.timeout,
                            log=self.log)
        end.splice = job
        return job

    def _spliced(self, response: Any, job: splice.Splice, sinks: List[Sink], status: int) -> Deferred:
        """The body moved by the kernel; the client's stream carries its start
        (sent already) and its end, or an abort if the transfer failed."""
        client = sinks[0]
        if len(sinks) > 1:
            job.store = sinks[1]
        self.fetcher.spliced += 1
        response.deliverBody(_Handoff(job))
        job.upstream_ready()

        def ended(sent: int) -> Deferred:
            return client.finish().addCallback(lambda _: {"status": status, "bytes": job.received})

        def failed(failure: Failure) -> Deferred:
            exc = failure.value
            if isinstance(exc, splice.ClientGone):
                exc = UpstreamError(f"stream to the client broke: {exc}")
            kind = type(exc).__name__
            self.log.info("{component}: {url}: {kind}: {message}", component=self.name, url=self.url,
                          kind=kind, message=str(exc))
            return client.abort(exc).addBoth(lambda _: {"error": kind, "message": str(exc),
                                                         "status": ERROR_STATUS.get(kind, 502),
                                                         "bytes": job.received})

        return job.outcome().addCallbacks(ended, failed)


class _Handoff(Protocol):
    """Receives a spliced body from Twisted's client: stops its reading at
    once and hands the bytes it had read already to the splice."""

    def __init__(self, job: splice.Splice) -> None:
        self.job = job

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.job.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.job.finished:
            return  # the splice closed the connection itself
        if reason is None or reason.check(ResponseDone):
            self.job.upstream_done = True  # the whole body came with the head: nothing to splice
            return
        if not self.job.attached or self.job.received < self.job.length:
            self.job.cancel(UpstreamError(f"upstream broke off the body after {self.job.received} bytes: "
                                          f"{failure_reason(reason)}"))


class BodyPump(Protocol):
    """Receives the body; writes each chunk to the streams, pausing the
    upstream while they have no room, and ends or aborts them."""

    def __init__(self, transfer: Transfer, sinks: List[Sink], status: int, *,
                 store_limit: Optional[int] = None) -> None:
        self.transfer = transfer
        self.status = status
        self.sinks = sinks
        self.client = sinks[0]
        #: past this many bytes the store streams (sinks[1:]) are aborted: the cache would not keep them
        self.store_limit = store_limit
        self.clock = transfer.clock
        self.timeout = transfer.options.timeout
        self.max_bytes = transfer.options.max_bytes
        self.bytes = 0
        self.finished = False
        self.paused = False
        self.done: Deferred = Deferred()
        self._idle: Any = None

    # the upstream side -----------------------------------------------------------

    def connectionMade(self) -> None:
        widen_reads(self.transport)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._fail(UpstreamError(f"body over the limit of {self.max_bytes} bytes"))
            return
        if self.store_limit is not None and self.bytes > self.store_limit and len(self.sinks) > 1:
            self._drop_stores(f"body over the cache's limit of {self.store_limit} bytes")
        waits = [d for d in (sink.write(data) for sink in self.sinks) if d is not None]
        if self._check_sinks():
            return
        if waits:
            self._disarm()
            if not self.paused:
                self.paused = True
                self.transfer.fetcher.pauses += 1
                self.transport.pauseProducing()
            DeferredList(waits, consumeErrors=True).addCallback(self._room)
        else:
            self._arm()

    def _room(self, _: Any) -> None:
        if self.finished or self._check_sinks():
            return
        if self.paused:
            self.paused = False
            self._arm()
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished:
            return
        if reason is None or reason.check(ResponseDone):
            self._finish()
        elif reason.check(PotentialDataLoss):
            # Delimited by the connection's close: what the upstream sent, but
            # unverifiable; the client gets it, the cache does not keep it.
            for sink in self.sinks[1:]:
                sink.abort(UpstreamError("body delimited by connection close (unverifiable)"))
            self.sinks = self.sinks[:1]
            self._finish()
        else:
            self._fail(UpstreamError(f"upstream broke off the body after {self.bytes} bytes: {failure_reason(reason)}"),
                       stop=False)

    # the streams' side ---------------------------------------------------------------

    def _drop_stores(self, why: str) -> None:
        """Stop feeding the store streams: aborted, so the cache drops what it got."""
        self.transfer.log.debug("{component}: {url}: store stream aborted: {why}", component=self.transfer.name,
                                url=self.transfer.url, why=why)
        for sink in self.sinks[1:]:
            sink.abort(UpstreamError(why))
        self.sinks = self.sinks[:1]

    def _check_sinks(self) -> bool:
        """Drop a broken store stream; give up if the client's broke. True if given up."""
        for sink in self.sinks[1:]:
            if sink.failure is not None:
                self.transfer.log.warn("{component}: store stream for {url} broke: {reason}",
                                       component=self.transfer.name, url=self.transfer.url,
                                       reason=sink.failure.getErrorMessage())
                sink.abort(UpstreamError("store stream broke"))
                self.sinks.remove(sink)
        if self.client.failure is not None:
            self._fail(UpstreamError(f"stream to the client broke: {self.client.failure.getErrorMessage()}"))
            return True
        return False

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        d = DeferredList([sink.finish() for sink in self.sinks], consumeErrors=True)

        def ended(_: Any) -> Dict[str, Any]:
            if self.client.failure is not None:
                return {"error": "UpstreamError", "message": "stream to the client broke", "status": 502,
                        "bytes": self.bytes}
            return {"status": self.status, "bytes": self.bytes}

        d.addCallback(ended).chainDeferred(self.done)

    def _fail(self, exc: Exception, stop: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self._disarm()
        self.transfer.log.info("{component}: {url}: {kind}: {message}", component=self.transfer.name,
                               url=self.transfer.url, kind=type(exc).__name__, message=str(exc))
        if stop and self.transport is not None:
            self.transport.stopProducing()
        d = DeferredList([sink.abort(exc) for sink in self.sinks], consumeErrors=True)
        kind = type(exc).__name__
        d.addCallback(lambda _: {"error": kind, "message": str(exc), "status": ERROR_STATUS.get(kind, 502),
                                 "bytes": self.bytes})
        d.chainDeferred(self.done)

    # idle timeout -------------------------------------------------------------------

    def _arm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.timeout)
        else:
            self._idle = self.clock.callLater(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _timed_out(self) -> None:
        self._idle = None
        self._fail(UpstreamTimeout(f"no data from upstream for {self.timeout:g} s after {self.bytes} bytes"))
