"""Payloads of any size, as ordered chunks with a start and an end marker.

A stream is a run of messages to one address, all carrying the same
C{x-stream} id and a C{x-seq} number: a C{stream-start} (JSON metadata,
such as an HTTP status and headers), C{stream-data} chunks (raw bytes), and a
C{stream-end} (the chunk count and byte total, so the receiver can tell a
complete stream from a truncated one) or a C{stream-error} (the sender gave
up; the receiver must not treat what it got as whole).

Memory is bounded on both sides: the writer keeps at most C{window} chunks
awaiting the broker's confirm and makes its caller wait beyond that; the
receiver acknowledges a chunk only after its sink has taken it, so the
consumer's prefetch bounds how much is held.
"""
from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Optional, Tuple

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from magnet.errors import BadMessage, StreamError, Timeout
from magnet.message import BINARY, Message

START = "stream-start"
DATA = "stream-data"
END = "stream-end"
ABORT = "stream-error"
STREAM_TYPES = frozenset((START, DATA, END, ABORT))
STREAM_HEADER = "x-stream"
SEQ_HEADER = "x-seq"

DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_WINDOW = 8
#: A piece written while nothing is buffered, of at least C{chunk_size /
#: MIN_PIECE_DIVISOR} and at most C{chunk_size} bytes, goes out as a chunk as it
#: is: no join, no copy (on the memory transport the receiver gets the very bytes
#: object that was written). Smaller pieces are joined (one copy) into chunks.
MIN_PIECE_DIVISOR = 4

Publish = Callable[[Message], Deferred]
Sink = Callable[[bytes], Optional[Deferred]]


class StreamWriter:
    """Sends one stream. C{write} returns a Deferred that fires when the caller
    may write more; a producer that waits for it never outruns the broker."""

    def __init__(self, publish: Publish, metadata: Dict[str, Any], *, correlation_id: Optional[str] = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, window: int = DEFAULT_WINDOW) -> None:
        self.stream_id = uuid.uuid4().hex
        self._publish = publish
        self._correlation_id = correlation_id
        self._chunk_size = chunk_size
        self._window = window
        self._seq = 0
        self._buffer: list = []  # pieces written, not yet a whole chunk
        self._buffered = 0
        self._min_piece = max(1, chunk_size // MIN_PIECE_DIVISOR)
        self._unconfirmed = 0
        self._waiting: Deque[Deferred] = deque()
        self._drained: list = []
        self._failure: Optional[Failure] = None
        self.bytes_sent = 0
        self.closed = False
        self._send(Message.of_json(metadata, **self._properties(START)))

    def _properties(self, kind: str) -> Dict[str, Any]:
        props = dict(type=kind, headers={STREAM_HEADER: self.stream_id, SEQ_HEADER: self._seq},
                     correlation_id=self._correlation_id, persistent=False)
        self._seq += 1
        return props

    def _send(self, message: Message) -> None:
        self._unconfirmed += 1
        d = self._publish(message)
        d.addCallbacks(self._confirmed, self._broken)

    def _confirmed(self, _: Any) -> None:
        self._unconfirmed -= 1
        self._release()

    def _broken(self, failure: Failure) -> None:
        self._unconfirmed -= 1
        if self._failure is None:
            self._failure = failure
        self._release()

    def _release(self) -> None:
        while self._waiting and (self._failure is not None or self._unconfirmed < self._window):
            d = self._waiting.popleft()
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(None)
        if self._unconfirmed == 0 and self._drained:
            drained, self._drained = self._drained, []
            for d in drained:
                if self._failure is not None:
                    d.errback(self._failure)
                else:
                    d.callback(self.bytes_sent)

    def _room(self) -> Deferred:
        if self._failure is not None:
            return fail(self._failure)
        if self._unconfirmed < self._window:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def write(self, data: bytes) -> Deferred:
        if self.closed:
            return fail(Failure(StreamError("write to a finished stream")))
        if self._failure is not None:
            return fail(self._failure)
        if data:
            size = self._chunk_size
            n = len(data)
            if self._buffer and self._min_piece <= n <= size and type(data) is bytes:
                # what is buffered goes first, as a chunk of its own, so that this
                # piece is not copied onto it
                self._flush()
            if not self._buffer and self._min_piece <= n <= size and type(data) is bytes:
                self._send_chunk(data)  # a chunk as it is
                return self._room()
            # pieces are joined once per chunk (one copy), not appended to a growing buffer
            self._buffer.append(bytes(data))
            self._buffered += n
            if self._buffered >= size:
                joined = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
                pos = 0
                while len(joined) - pos >= size:
                    self._send_chunk(joined[pos:pos + size] if pos or len(joined) > size else joined)
                    pos += size
                rest = joined[pos:]
                self._buffer = [rest] if rest else []
                self._buffered = len(rest)
        return self._room()

    def _flush(self) -> None:
        self._send_chunk(self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer))
        self._buffer = []
        self._buffered = 0

    def _send_chunk(self, chunk: bytes) -> None:
        self.bytes_sent += len(chunk)
        self._send(Message(body=chunk, content_type=BINARY, **self._properties(DATA)))

    def finish(self) -> Deferred:
        """Send what is buffered and the end marker; fires with the byte count
        once the broker has confirmed every message of the stream."""
        if self.closed:
            return fail(Failure(StreamError("stream already finished")))
        self.closed = True
        if self._buffer and self._failure is None:
            self._flush()
        self._buffer = []
        self._buffered = 0
        if self._failure is None:
            chunks = self._seq - 1
            self._send(Message.of_json({"chunks": chunks, "bytes": self.bytes_sent}, **self._properties(END)))
        return self._all_confirmed()

    def abort(self, reason: BaseException) -> Deferred:
        """Tell the receiver the stream will not complete."""
        if self.closed:
            return succeed(None)
        self.closed = True
        self._buffer.clear()
        self._buffered = 0
        self._send(Message.of_json({"type": type(reason).__name__, "message": str(reason)},
                                   **self._properties(ABORT)))
        d = self._all_confirmed()
        d.addErrback(lambda _: None)
        return d

    def _all_confirmed(self) -> Deferred:
        d: Deferred = Deferred()
        self._drained.append(d)
        self._release()
        return d


def send_stream(writer: StreamWriter, chunks: Iterable[bytes]) -> Deferred:
    """Write every chunk of an iterable, waiting for room between them, then finish."""
    iterator = iter(chunks)
    done: Deferred = Deferred()

    def next_chunk(_: Any = None) -> None:
        while True:
            try:
                chunk = next(iterator)
            except StopIteration:
                writer.finish().chainDeferred(done)
                return
            except Exception:
                failure = Failure()
                writer.abort(failure.value)
                done.errback(failure)
                return
            d = writer.write(chunk)
            if not d.called:
                d.addCallbacks(next_chunk, fail_done)
                return
            if isinstance(d.result, Failure):
                d.addErrback(fail_done)
                return

    def fail_done(failure: Failure) -> None:
        if not done.called:
            done.errback(failure)

    next_chunk()
    return done


class Stream:
    """One stream as it arrives. Hand it a sink with L{deliver}."""

    def __init__(self, stream_id: str, metadata: Any, correlation_id: Optional[str],
                 clock: IReactorTime, idle_timeout: float, on_close: Callable[[str], None]) -> None:
        self.stream_id = stream_id
        self.metadata = metadata
        self.correlation_id = correlation_id
        self.bytes_received = 0
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._expected = 1
        self._pending: Deque[Tuple[str, Message, Deferred]] = deque()
        self._sink: Optional[Sink] = None
        self._busy = False
        self._done: Deferred = Deferred()
        self._failure: Optional[Failure] = None
        self._finished = False
        self._idle = clock.callLater(idle_timeout, self._timed_out)

    def deliver(self, sink: Sink) -> Deferred:
        """Feed every chunk, in order, to C{sink} (which may return a Deferred to
        slow the stream down). Fires with the byte count at a complete end;
        fails with L{StreamError} if the stream was aborted, broke or stalled."""
        if self._sink is not None:
            raise StreamError("a stream has one sink")
        self._sink = sink
        if self._failure is not None:  # it failed before anyone read it
            failed: Deferred = Deferred()
            failed.errback(self._failure)
            return failed
        self._drain()
        return self._done

    def read_all(self, limit: int = 64 * 1024 * 1024) -> Deferred:
        """The whole body as bytes; for small payloads only (fails past C{limit})."""
        parts: list = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > limit:
                raise StreamError(f"stream larger than {limit} bytes")
            parts.append(data)

        return self.deliver(collect).addCallback(lambda _: b"".join(parts))

    # fed by the listener ---------------------------------------------------

    def _arrived(self, kind: str, message: Message) -> Deferred:
        """A message of this stream; the Deferred fires when it may be acked."""
        settled: Deferred = Deferred()
        if self._finished:
            settled.callback(None)
            return settled
        self._touch()
        seq = message.headers.get(SEQ_HEADER)
        if seq != self._expected:
            self._fail(StreamError(f"stream {self.stream_id}: expected chunk {self._expected}, got {seq!r}"))
            settled.callback(None)
            return settled
        self._expected += 1
        self._pending.append((kind, message, settled))
        self._drain()
        return settled

    def _drain(self) -> None:
        if self._sink is None or self._busy:
            return
        while self._pending and not self._finished:
            kind, message, settled = self._pending.popleft()
            if kind == DATA:
                self._busy = True
                d = maybeDeferred(self._sink, message.body)
                size = len(message.body)

                def taken(_: Any, settled: Deferred = settled, size: int = size) -> None:
                    self.bytes_received += size
                    self._busy = False
                    settled.callback(None)
                    self._drain()

                def refused(failure: Failure, settled: Deferred = settled) -> None:
                    self._busy = False
                    settled.callback(None)
                    self._fail(failure.value)

                d.addCallbacks(taken, refused)
                if self._busy:
                    return
            elif kind == END:
                settled.callback(None)
                self._end(message)
            else:
                settled.callback(None)
                self._abort(message)

    def _end(self, message: Message) -> None:
        try:
            info = message.json()
            complete = info.get("bytes") == self.bytes_received
        except (BadMessage, AttributeError):
            complete = False
        if not complete:
            self._fail(StreamError(f"stream {self.stream_id}: end marker does not match the {self.bytes_received} bytes received"))
            return
        self._close()
        self._done.callback(self.bytes_received)

    def _abort(self, message: Message) -> None:
        try:
            info = message.json()
            text = f"{info.get('type')}: {info.get('message')}"
        except (BadMessage, AttributeError):
            text = "aborted"
        self._fail(StreamError(f"sender aborted the stream: {text}"))

    def fail(self, exc: BaseException) -> None:
        """Give up on this stream (say, its sender is known to be gone): the
        Deferred of L{deliver} fails with C{exc}; what arrives later is dropped."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self._close()
        for _, _, settled in self._pending:
            settled.callback(None)
        self._pending.clear()
        if self._sink is None:
            # Nobody reads it yet (it waits in a listener's queue): keep the failure
            # for a later deliver() rather than leave an unhandled error behind.
            self._failure = Failure(exc)
            return
        self._done.errback(Failure(exc))

    def _close(self) -> None:
        self._finished = True
        if self._idle.active():
            self._idle.cancel()
        self._on_close(self.stream_id)

    def _touch(self) -> None:
        if self._idle.active():
            self._idle.reset(self._idle_timeout)

    def _timed_out(self) -> None:
        if self._busy or self._pending:
            # The wait is ours (a slow sink holds the chunks unacknowledged),
            # not the sender's: only silence while we are ready is a stall.
            self._idle = self._clock.callLater(self._idle_timeout, self._timed_out)
            return
        self._fail(Timeout(f"stream {self.stream_id}: nothing arrived for {self._idle_timeout} s"))

