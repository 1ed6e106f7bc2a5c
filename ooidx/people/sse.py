"""Server-Sent Events: one C{text/event-stream} response, paced by its client."""
from __future__ import annotations

import json
from typing import Any, Callable, List, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web import server
from zope.interface import implementer

__all__ = ["SSE", "gone"]

class SSE:
    """One Server-Sent Events response: C{send} writes an event, a comment
    every C{keepalive} seconds keeps proxies from closing it, and the
    client's going (or the web edge's stopping) calls C{on_close} once.

    It is the request's producer: while the client cannot keep up, C{paused}
    is set and the feeder stops taking messages (they stay in the queue)."""

    def __init__(self, request: server.Request, clock: Any, keepalive: float,
                 on_close: Callable[[], Any]) -> None:
        self.request = request
        self.closed = False
        self.paused = False
        self._on_close = on_close
        self._resumed: List[Callable[[], None]] = []
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.registerProducer(SSEProducer(self), True)
        request.write(b": ooidx event stream\nretry: 3000\n\n")
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self._keepalive.start(keepalive, now=False)
        request.notifyFinish().addBoth(lambda _: self.close())

    def _ping(self) -> None:
        if not self.closed:
            self.request.write(b": keep-alive\n\n")

    def send(self, data: Any, event_id: Optional[str] = None) -> None:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        out = b""
        if event_id:
            out += b"id: " + event_id.encode("ascii", "replace") + b"\n"
        out += b"data: " + text.encode("utf-8") + b"\n\n"
        self.request.write(out)

    def when_resumed(self, f: Callable[[], None]) -> None:
        self._resumed.append(f)

    def resume(self) -> None:
        self.paused = False
        waiting, self._resumed = self._resumed, []
        for f in waiting:
            f()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._keepalive.running:
            self._keepalive.stop()
        try:
            self.request.unregisterProducer()
        except Exception:  # pragma: no cover
            pass
        self._on_close()

    def finish(self) -> None:
        if not self.closed and not self.request.finished and not gone(self.request):
            # Unregistered first: finishing with a producer still registered makes
            # Twisted log a failure naming the request's URI (and its ?ticket=).
            try:
                self.request.unregisterProducer()
            except Exception:  # pragma: no cover
                pass
            self.request.finish()
        self.close()


@implementer(IPushProducer)
class SSEProducer:
    def __init__(self, sse: SSE) -> None:
        self.sse = sse

    def pauseProducing(self) -> None:
        self.sse.paused = True

    def resumeProducing(self) -> None:
        self.sse.resume()

    def stopProducing(self) -> None:
        self.sse.close()


def gone(request: server.Request) -> bool:
    """Whether the request's client has hung up."""
    return getattr(request, "_disconnected", False) or getattr(request.channel, "transport", None) is None
