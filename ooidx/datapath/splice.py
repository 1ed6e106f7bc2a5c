"""A large body moved from the upstream's socket to the client's by the kernel
(Linux C{splice(2)} through a pipe), when the fetch and the client's
connection are in one process: the usual edge node, whose proxy and cache
(or fetcher) run inline.

Why: relayed through Python, every piece of a 128 MiB miss was copied out of
the upstream's socket, through Twisted's HTTP client, a magnet stream and
twisted.web, and copied into the client's socket; the node's CPU, not the
network, set the pace (0.33-0.47x the upstream asked directly, issue 15).
Spliced, the pages go from one socket to the other without a copy; a body
the cache keeps is duplicated in the kernel (C{tee(2)}) into a second pipe
and read from there once, for the store's writer (L{ooidx.datapath.cache}'s
tee, with its bounds: the client never waits on the disk).

How the two sides meet, in one process and without the bus learning of it:
  1. the proxy, waiting for the answer of a GET whose client is on plain TCP,
     says so in L{HANDOFFS} under the request's id (L{ClientEnd});
  2. the fetch that answers that request (the cache's miss path or the
     fetcher) finds it there when the answer is a 200 with a known length of
     at least L{SPLICE_MIN} bytes on a plain TCP upstream connection. It makes
     a L{Splice}, hangs it on the end, and opens the answer's stream as ever,
     with C{"spliced": true} in the start's metadata and no chunks: the
     stream still carries the status and headers, and its end (or abort)
     says how the transfer went;
  3. the proxy relays the start (status, headers, which Twisted buffers) and
     L{Splice.attach}es the client's connection; the splice waits until
     Twisted has written the head, then moves the body.
Anything else (TLS on either side, an unknown length, HEAD, the proxy in
another process, not Linux) takes the stream path, unchanged.

A hit goes the same way from the stored body's file (L{FileSplice}, taken by
the cache's serve in step 2): the pipes are filled from the file in the
cache's disk threads, one pipe a call, and drained to the client as here.

The transfer keeps the stream path's rules: exactly C{length} bytes or the
client's connection is closed short of them (never a truncated body passed
as whole); an upstream silent for the fetch timeout is an L{UpstreamTimeout};
a client that takes nothing for the proxy's C{stall_timeout} is cut off.
The upstream connection is closed at the end (the HTTP client's parser was
bypassed, so it cannot go back to the pool: one connect per large body).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import termios
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from ooidx.datapath.store import FromPipe, StoreError
from ooidx.errors import UpstreamError, UpstreamTimeout

__all__ = ["ClientEnd", "ClientGone", "FileSplice", "HANDOFFS", "Handoffs", "PIPE_SIZE", "SPLICE_MIN", "Splice",
           "available", "client_end", "upstream_connection"]

#: Bodies shorter than this take the stream path: the handoff's setup (two
#: pipes, a producer swap, a new upstream connection next time) is not worth it.
SPLICE_MIN = 1024 * 1024
#: The pipe's capacity asked of the kernel (the unprivileged maximum by
#: default, /proc/sys/fs/pipe-max-size); a refusal keeps the default 64 KiB.
PIPE_SIZE = 1024 * 1024
#: Seconds the proxy has to attach the client after the stream's start went
#: out; past it the fetch gives up (the proxy's own answer timeout is longer).
ATTACH_TIMEOUT = 30.0
#: Pipes a body fills for its client (one filling, the others draining in order).
CLIENT_PIPES = 4
#: Pipes a body's stored copy may have with the write threads: the copy's lag
#: is bounded by these and by the cache's tee (8 MiB).
STORE_PIPES = 16
#: Seconds a copy may wait for a store pipe to come back before it is dropped
#: (as the cache's tee drops a copy the disk keeps behind).
STORE_STALL = 2.0
#: Bytes moved in one turn of the reactor before the splice lets others run.
FAIR_SHARE = 8 * 1024 * 1024

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: "more is coming": TCP may fill whole segments (the client's socket has TCP_NODELAY)
_MORE = getattr(os, "SPLICE_F_MORE", 4)
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)


def _load_tee() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's tee(2): Python's os module has splice but not tee."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tee = libc.tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    tee.restype = ctypes.c_ssize_t
    return tee


_TEE = _load_tee()


def available() -> bool:
    """Whether this process can splice (Linux, Python 3.10+, libc's tee)."""
    return hasattr(os, "splice") and _TEE is not None and os.environ.get("OOIDX_NO_SPLICE") is None


class ClientGone(Exception):
    """The HTTP client went away (or stalled) while its body was being spliced."""


class ClientEnd:
    """A client connection that waits, in this process, for the answer to
    request C{request_id}: the proxy's side of a handoff."""

    def __init__(self, request_id: str, request: Any, transport: tcp.Connection) -> None:
        self.request_id = request_id
        self.request = request
        self.transport = transport
        #: set by the fetch that takes this end (L{Handoffs.take})
        self.splice: Optional["Splice"] = None
        self.closed = False

    def close(self) -> None:
        """The proxy is done with the request: a splice not attached by now
        never will be (the proxy answered otherwise, or the client left)."""
        self.closed = True
        HANDOFFS.forget(self.request_id, self)
        if self.splice is not None and not self.splice.attached:
            self.splice.cancel(ClientGone("the proxy did not take the spliced answer"))


class Handoffs:
    """The client ends waiting in this process, by request id. Process-wide by
    nature: a file descriptor means nothing in another process."""

    def __init__(self) -> None:
        self._ends: Dict[str, ClientEnd] = {}

    def expect(self, end: ClientEnd) -> None:
        self._ends[end.request_id] = end

    def take(self, request_id: Optional[str]) -> Optional[ClientEnd]:
        """The end waiting for C{request_id}, once (a second fetch for the same
        request, a redelivery, takes the stream path)."""
        if request_id is None:
            return None
        end = self._ends.pop(request_id, None)
        if end is None or end.closed or end.splice is not None:
            return None
        return end

    def forget(self, request_id: str, end: Optional[ClientEnd] = None) -> None:
        if end is None or self._ends.get(request_id) is end:
            self._ends.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._ends)


#: The one registry of this process.
HANDOFFS = Handoffs()


def client_end(request_id: str, request: Any) -> Optional[ClientEnd]:
    """A L{ClientEnd} for C{request}, if its body could be spliced: a GET on a
    plain TCP connection (TLS needs the bytes in user space) whose producer
    is its HTTP channel (nothing else writes to it)."""
    if not available() or request.method != b"GET":
        return None
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "producer", None) is not channel:
        return None
    return ClientEnd(request_id, request, transport)


def upstream_connection(response: Any) -> Optional[tcp.Connection]:
    """The plain TCP connection under an HTTP client response (Twisted's
    client wraps it in a producer proxy), or None (TLS, or Twisted's insides
    have moved)."""
    transport = getattr(response, "_transport", None)
    connection = getattr(transport, "_producer", None)
    return connection if isinstance(connection, tcp.Connection) else None


class _Pipe:
    """A pipe and the bytes in it (as far as this process has put them)."""

    __slots__ = ("r", "w", "n")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.n = 0
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default capacity: slower, still correct

    def holding(self) -> bool:
        """Whether bytes are still in it (the kernel's count)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.r, termios.FIONREAD, b"\0\0\0\0"))[0] > 0
        except OSError:
            return True

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1


def _try_pipe() -> Optional[_Pipe]:
    try:
        return _Pipe()
    except OSError:
        return None


@implementer(IReadDescriptor)
class _UpstreamReader:
    """The reactor's view of the upstream's socket while the splice reads it
    (Twisted's own connection is taken off the reactor meanwhile)."""

    def __init__(self, splice: "Splice", fd: int) -> None:
        self.splice = splice
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.splice._pump()

    def connectionLost(self, reason: Failure) -> None:
        self.splice._fail(UpstreamError(f"upstream connection lost after {self.splice.received} bytes"))

    def logPrefix(self) -> str:
        return "splice-upstream"


@implementer(IPullProducer)
class Splice:
    """One body moved by the kernel. Each L{outcome} fires with the bytes the
    client got (C{length}) or fails with L{UpstreamError}, L{UpstreamTimeout}
    or L{ClientGone}; the store's writer (C{store}: C{write}/C{finish}/C{abort},
    as L{ooidx.datapath.transfer.Sink}) gets every byte and is finished or
    aborted before they fire."""

    def __init__(self, reactor: Any, upstream: tcp.Connection, length: int, *, store: Any = None,
                 idle_timeout: float = 30.0, attach_timeout: float = ATTACH_TIMEOUT,
                 log: Any = None) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.length = length
        self.store = store
        self.idle_timeout = idle_timeout
        self.stall_timeout = idle_timeout
        self.log = log
        self._result: Any = None  # the bytes sent, or a Failure, once finished
        self._observers: List[Deferred] = []
        self.attached = False
        self.finished = False
        #: the client was cut off for reading nothing (the proxy counts it)
        self.stalled = False
        self.received = 0  # bytes from the upstream (the prefix too)
        self.sent = 0  # bytes to the client (the prefix too)
        self._prefix: List[bytes] = []
        self._ready = False  # the upstream is off Twisted's hands and its prefix is in
        #: Twisted's client read the whole body itself (it may pool the connection: not ours to close)
        self.upstream_done = False
        self._end: Optional[ClientEnd] = None
        self._started = False
        # the client's pipes: the one being filled, those sealed (draining, in order), the free ones
        self._tail: Optional[_Pipe] = None
        self._unsealed = False  # the tail is due to be sealed (full, or the socket ran dry)
        self._queue: Deque[_Pipe] = deque()
        self._free: List[_Pipe] = []
        self._made = 0
        # the store's pipes: free ones, and all not yet closed (some are with the write thread)
        self._copies: List[_Pipe] = []
        self._all_copies: Set[_Pipe] = set()
        self._copies_made = 0
        self._copy_wait: Any = None
        self._writable = False
        self._registering = False
        self._store_held = False
        self._reader: Optional[_UpstreamReader] = None
        self._reading = False
        self._pumping = False
        self._last_read = self._last_write = reactor.seconds()
        self._watch = reactor.callLater(attach_timeout, self._not_attached, attach_timeout)

    def outcome(self) -> Deferred:
        """A Deferred of its own for each side (the fetch, the proxy): the
        bytes the client got, or the failure."""
        d: Deferred = Deferred()
        if self._result is None:
            self._observers.append(d)
        elif isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)
        return d

    def _settle(self, result: Any) -> None:
        self._result = result
        observers, self._observers = self._observers, []
        for d in observers:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # fed by the fetch ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Body bytes Twisted's client had read before the handoff."""
        if self.finished:
            return
        self.received += len(data)
        if self.received > self.length:
            self._fail(UpstreamError(f"the upstream sent more than the {self.length} bytes it declared"))
            return
        self._prefix.append(data)
        self._to_store(data)

    def upstream_ready(self) -> None:
        """Twisted's connection is paused and every byte it read has been fed."""
        self._ready = True
        self._start()

    # the proxy's side -------------------------------------------------------------

    def attach(self, end: ClientEnd, stall_timeout: float) -> Deferred:
        """The client's connection is the splice's until its outcome: its
        head (status and headers) is already in the transport's buffer."""
        if self.finished or self.attached:
            return self.outcome()
        self.attached = True
        self._end = end
        self.stall_timeout = stall_timeout
        transport = end.transport
        if transport.disconnected or transport.producer is not end.request.channel:
            self._fail(ClientGone("the client went away"))
            return self.outcome()
        if self._prefix:
            transport.write(b"".join(self._prefix))
            self.sent += sum(len(p) for p in self._prefix)
            self._prefix = []
        transport.unregisterProducer()
        # Twisted calls a pull producer's resumeProducing when its buffer is
        # empty; the first call, from registerProducer itself, is not that.
        self._registering = True
        transport.registerProducer(self, False)
        self._registering = False
        transport.startWriting()  # the head (and prefix) go out; then resumeProducing
        self._start()
        return self.outcome()

    def resumeProducing(self) -> None:
        """(IPullProducer) The client's transport has written all it held."""
        if self._registering or self.finished:
            return
        self._writable = True
        self._pump()

    def stopProducing(self) -> None:
        """(IPullProducer) The client's connection is gone."""
        self._fail(ClientGone("the client went away"))

    def cancel(self, exc: BaseException) -> None:
        self._fail(exc)

    # the pump ---------------------------------------------------------------------

    def _start(self) -> None:
        if self.finished or not (self._ready and self.attached) or self._started:
            return
        self._started = True
        if self._watch.active():
            self._watch.cancel()
        self._take_source()
        now = self.reactor.seconds()
        self._last_read = self._last_write = now
        self._watch = self.reactor.callLater(min(self.idle_timeout, self.stall_timeout) / 2, self._check)
        self._pump()

    def _take_source(self) -> None:
        """The body's source is the splice's from now on."""
        if self.received < self.length:
            # Twisted's connection off the reactor: the splice reads its socket now
            self.upstream.stopReading()
            self.upstream.stopWriting()
            self._reader = _UpstreamReader(self, self.upstream.fileno())

    def _pump(self) -> None:
        """Move what can be moved now; then wait for the upstream (a reader on
        its socket) or the client (the transport's next resumeProducing)."""
        if self._pumping or self.finished or not self._started:
            return
        self._pumping = True
        moved_bytes = 0
        try:
            while not self.finished:
                moved = False
                want_read = False
                if self._unsealed and self._seal():
                    moved = True
                if not self._unsealed and not self._store_held and self.received < self.length:
                    filled = self._fill()
                    if filled > 0:
                        moved = True
                        moved_bytes += filled
                    elif filled < 0:
                        want_read = True
                if self.finished:
                    return
                if self._queue and self._writable:
                    drained = self._drain()
                    if drained > 0:
                        moved = True
                        moved_bytes += drained
                if self.finished:
                    return
                if self.received >= self.length and self._tail is None and not self._queue:
                    self._succeed()
                    return
                if not moved:
                    self._read_when_ready(want_read)
                    return
                if moved_bytes >= FAIR_SHARE:
                    # let the reactor serve others; carry on in its next turn
                    self._read_when_ready(False)
                    self.reactor.callLater(0, self._pump)
                    return
        finally:
            self._pumping = False

    def _read_when_ready(self, want: bool) -> None:
        if want and not self._reading and self._reader is not None:
            self._reading = True
            self._last_read = self.reactor.seconds()  # the upstream's time starts now
            self.reactor.addReader(self._reader)
        elif not want and self._reading:
            self._reading = False
            self.reactor.removeReader(self._reader)

    # the pipes ----------------------------------------------------------------------

    def _tail_or_new(self) -> Optional[_Pipe]:
        if self._tail is None:
            if self._free:
                self._tail = self._free.pop()
            elif self._made < CLIENT_PIPES:
                self._tail = self._make_pipe()
                if self._tail is not None:
                    self._made += 1
        return self._tail

    def _make_pipe(self) -> Optional[_Pipe]:
        try:
            return _Pipe()
        except OSError as e:
            self._fail(UpstreamError(f"cannot make a pipe: {e.strerror}"))
            return None

    def _fill(self) -> int:
        """Upstream -> the tail pipe: the bytes moved; 0 if none could be
        (no pipe free, or the transfer ended); -1 to wait for the upstream."""
        tail = self._tail_or_new()
        if tail is None:
            return 0
        want = min(self.length - self.received, PIPE_SIZE - tail.n)
        try:
            n = os.splice(self.upstream.fileno(), tail.w, want, flags=_FLAGS)
        except BlockingIOError:
            if tail.n:
                # the socket is empty (or the pipe out of slots): what is in goes on now
                self._unsealed = True
                return 1 if self._seal() else 0
            return -1
        except OSError as e:
            self._fail(UpstreamError(f"upstream broke off the body after {self.received} bytes: {e.strerror}"))
            return 0
        if n == 0:
            self._fail(UpstreamError(f"upstream broke off the body after {self.received} bytes: "
                                     "connection closed"))
            return 0
        tail.n += n
        self.received += n
        self._last_read = self.reactor.seconds()
        if tail.n >= PIPE_SIZE or self.received >= self.length:
            self._unsealed = True
            self._seal()
        return n

    def _seal(self) -> bool:
        """The tail pipe goes to the client's queue, its bytes first duplicated
        into a pipe for the store (tee copies from a pipe's head: a pipe is
        sealed before anything of it is drained). False if the store has no
        pipe free yet (the copy is that far behind)."""
        tail = self._tail
        if tail is None:
            self._unsealed = False
            return False
        if self.store is not None:
            copy = self._copies.pop() if self._copies else (
                _try_pipe() if self._copies_made < STORE_PIPES else None)
            if copy is None:
                if self._copy_wait is None:
                    self._copy_wait = self.reactor.callLater(STORE_STALL, self._drop_store,
                                                             f"the store's copy stayed behind for {STORE_STALL:g} s")
                return False
            if copy not in self._all_copies:
                self._copies_made += 1
                self._all_copies.add(copy)
            teed = _TEE(tail.r, copy.w, tail.n, _FLAGS)  # type: ignore[misc]
            if teed != tail.n:
                why = os.strerror(ctypes.get_errno()) if teed < 0 else f"{teed} of {tail.n} bytes"
                self._copy_back(copy)
                self._drop_store(f"tee: {why}")
            else:
                copy.n = teed
                self._to_store(FromPipe(copy.r, teed, lambda copy=copy: self._copy_back(copy)))
        self._tail = None
        self._unsealed = False
        self._queue.append(tail)
        return True

    def _copy_back(self, copy: _Pipe) -> None:
        """A store pipe the write thread is done with (or that will not be read)."""
        if self.finished or self.store is None or copy.holding():
            self._all_copies.discard(copy)
            copy.close()
        else:
            copy.n = 0
            self._copies.append(copy)
        wait, self._copy_wait = self._copy_wait, None
        if wait is not None and wait.active():
            wait.cancel()
        if not self.finished:
            self._pump()

    def _to_store(self, data: Any) -> None:
        if self.store is None:
            if isinstance(data, FromPipe):
                data.release()
            return
        wait = self.store.write(data)
        if getattr(self.store, "failure", None) is not None:
            self._drop_store(f"the store's copy broke: {self.store.failure.getErrorMessage()}")
            return
        if wait is not None:
            self._store_held = True
            wait.addBoth(self._store_room)

    def _store_room(self, _: Any) -> None:
        self._store_held = False
        if not self.finished:
            self._pump()

    def _drop_store(self, why: str) -> None:
        wait, self._copy_wait = self._copy_wait, None
        if wait is not None and wait.active():
            wait.cancel()
        store, self.store = self.store, None
        self._store_held = False
        for copy in self._copies:
            self._all_copies.discard(copy)
            copy.close()
        self._copies = []
        if store is not None:
            if self.log is not None:
                self.log.warn("spliced body: the store's copy is dropped: {why}", why=why)
            store.abort(UpstreamError(why)).addErrback(lambda f: None)
        if not self.finished and self._started:
            self._pump()

    def _drain(self) -> int:
        """The queued pipes -> the client, in order: the bytes moved."""
        assert self._end is not None
        moved = 0
        fd = self._end.transport.fileno()
        while self._queue:
            head = self._queue[0]
            try:
                more = self.received < self.length or len(self._queue) > 1 or self._tail is not None
                n = os.splice(head.r, fd, head.n, flags=_FLAGS | _MORE if more else _FLAGS)
            except BlockingIOError:
                self._writable = False
                self._last_write = self.reactor.seconds()  # the client's time starts now
                self._end.transport.startWriting()  # resumeProducing when it can take more
                return moved
            except OSError as e:
                why = f"the client went away ({e.strerror})" if e.errno in _GONE else \
                    f"writing to the client failed: {e.strerror}"
                self._fail(ClientGone(why))
                return moved
            head.n -= n
            self.sent += n
            moved += n
            self._last_write = self.reactor.seconds()
            if head.n == 0:
                self._queue.popleft()
                self._free.append(head)
        return moved

    # time ---------------------------------------------------------------------------

    def _not_attached(self, timeout: float) -> None:
        self._fail(ClientGone(f"the proxy did not take the answer within {timeout:g} s"))

    def _check(self) -> None:
        """Every half timeout: an upstream that sent nothing, or a client that took nothing."""
        if self.finished:
            return
        now = self.reactor.seconds()
        if self._queue and not self._writable and now - self._last_write >= self.stall_timeout:
            self._stalled()
            return
        if self._reading and now - self._last_read >= self.idle_timeout:
            self._fail(UpstreamTimeout(f"no data from upstream for {self.idle_timeout:g} s after "
                                       f"{self.received} bytes"))
            return
        self._watch = self.reactor.callLater(min(self.idle_timeout, self.stall_timeout) / 2, self._check)

    def _stalled(self) -> None:
        """The client took nothing for stall_timeout: a reset, as the stream
        path does (its unread bytes would hold a graceful close forever)."""
        end = self._end
        self.stalled = True
        self._fail(ClientGone(f"the client read nothing for {self.stall_timeout:g} s"))
        if end is not None and not end.transport.disconnected:
            end.transport.abortConnection()

    # the end --------------------------------------------------------------------------

    def _succeed(self) -> None:
        self.finished = True
        self._release()
        store, self.store = self.store, None
        if store is None:
            self._settle(self.sent)
            return
        store.finish().addBoth(lambda _: self._settle(self.sent))

    def _fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        self._release()
        store, self.store = self.store, None
        failure = Failure(exc)
        if store is None:
            self._settle(failure)
            return
        store.abort(exc).addBoth(lambda _: self._settle(failure))

    def _release(self) -> None:
        """Give everything back: the client's connection to its HTTP channel,
        the pipes to the kernel; the upstream connection is closed."""
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self._reader)
        end = self._end
        if end is not None:
            transport = end.transport
            if transport.producer is self:
                transport.unregisterProducer()
                if not transport.disconnected:
                    transport.registerProducer(end.request.channel, True)
                    end.request.channel.resumeProducing()
        pipes = list(self._queue) + list(self._free) + ([self._tail] if self._tail is not None else [])
        self._queue.clear()
        self._free = []
        self._tail = None
        for pipe in pipes:
            pipe.close()
        for copy in self._copies:  # (those with the write thread close when they come back)
            self._all_copies.discard(copy)
            copy.close()
        self._copies = []
        wait, self._copy_wait = self._copy_wait, None
        if wait is not None and wait.active():
            wait.cancel()
        self._prefix = []
        self._close_source()

    def _close_source(self) -> None:
        """The transfer is over: the upstream's connection is closed (its
        parser was bypassed), unless Twisted's client read the body itself."""
        if not self.upstream.disconnected and not self.upstream_done:
            self.upstream.abortConnection()


def _file_to_pipe(fd: int, pipe_w: int, offset: int, want: int) -> int:
    """(In a disk thread) up to C{want} bytes of the file from C{offset} into an
    empty pipe: the bytes moved, fewer at the file's end or when the pipe is
    full (its capacity may be the default 64 KiB). The file's position is not
    used (C{offset_src}): threads never share it."""
    moved = 0
    while moved < want:
        try:
            n = os.splice(fd, pipe_w, want - moved, offset_src=offset + moved, flags=_FLAGS)
        except BlockingIOError:
            break  # the pipe is full
        if n == 0:
            break  # the file's end
        moved += n
    return moved


class FileSplice(Splice):
    """A stored body moved by the kernel from its file to the client's socket
    (a hit, L{ooidx.datapath.cache}): the pipes are filled from the file in the
    cache's disk threads (C{in_thread}, as its C{_io}: a read never blocks the
    reactor), one pipe a call, and drained to the client on the reactor thread
    as L{Splice} drains them. The file (C{fd}) stays the caller's: it is read
    until L{quiet} fires, which is after the outcome, once no thread holds it
    or a pipe. C{idle_timeout}: seconds a pipe's fill may take before the
    transfer fails (a disk that stopped answering), as an upstream's silence."""

    def __init__(self, reactor: Any, fd: int, length: int, in_thread: Callable[..., Deferred], *,
                 idle_timeout: float = 30.0, attach_timeout: float = ATTACH_TIMEOUT, log: Any = None) -> None:
        super().__init__(reactor, None, length, idle_timeout=idle_timeout,  # type: ignore[arg-type]
                         attach_timeout=attach_timeout, log=log)
        self.fd = fd
        self._in_thread = in_thread
        self._ready = True  # no prefix: the file is read from its start
        #: the pipe a disk thread is filling (none of the others), and since when
        self._filling: Optional[_Pipe] = None
        self._fill_started = 0.0
        self._quiet: List[Deferred] = []

    def quiet(self) -> Deferred:
        """Fires once the transfer is over and no disk thread reads the file
        any more: then (only) may the caller close it."""
        d: Deferred = Deferred()
        if self.finished and self._filling is None:
            d.callback(None)
        else:
            self._quiet.append(d)
        return d

    def _take_source(self) -> None:
        pass  # the file is read by the disk threads, from _fill

    def _close_source(self) -> None:
        self._wake_quiet()

    def _fill(self) -> int:
        """Hand a free pipe to a disk thread to be filled (one at a time): 0,
        nothing moved yet; the pipe is queued for the client in L{_filled}."""
        if self._filling is not None:
            return 0
        tail = self._tail_or_new()
        if tail is None:
            return 0
        self._tail = None
        self._filling = tail
        self._fill_started = self.reactor.seconds()
        want = min(self.length - self.received, PIPE_SIZE)
        try:
            d = self._in_thread(_file_to_pipe, self.fd, tail.w, self.received, want)
        except Exception as e:  # noqa: BLE001 - the pool refused the call: the transfer fails
            d = _failed(e)
        d.addCallbacks(self._filled, self._fill_failed, callbackArgs=(tail,), errbackArgs=(tail,))
        d.addErrback(lambda f: self.log.failure("spliced body: after a fill", f) if self.log is not None else None)
        return 0

    def _filled(self, n: int, pipe: _Pipe) -> None:
        self._filling = None
        if self.finished:
            pipe.close()
            self._wake_quiet()
            return
        if n <= 0:
            pipe.close()
            self._fail(StoreError(f"the stored body ends after {self.received} bytes, not {self.length}"))
            return
        pipe.n = n
        self.received += n
        self._last_read = self.reactor.seconds()
        self._queue.append(pipe)
        self._pump()

    def _fill_failed(self, failure: Failure, pipe: _Pipe) -> None:
        self._filling = None
        pipe.close()
        if self.finished:
            self._wake_quiet()
            return
        self._fail(StoreError(f"reading the stored body after {self.received} bytes: "
                              f"{failure.getErrorMessage()}"))

    def _check(self) -> None:
        if not self.finished and self._filling is not None and \
                self.reactor.seconds() - self._fill_started >= self.idle_timeout:
            self._fail(StoreError(f"the disk gave nothing for {self.idle_timeout:g} s after "
                                  f"{self.received} bytes"))
            return
        super()._check()

    def _wake_quiet(self) -> None:
        if not self.finished or self._filling is not None:
            return
        waiting, self._quiet = self._quiet, []
        for d in waiting:
            d.callback(None)


def _failed(exc: BaseException) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(exc))
    return d
