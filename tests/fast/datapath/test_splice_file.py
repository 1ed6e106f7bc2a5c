"""A stored body spliced from its file (ooidx.datapath.splice.FileSplice; no
broker, no port, time on a task.Clock, the disk threads played by the test):
one pipe is filled at a time, each fill's result is queued for the client in
order, and the file and the pipes are let go only when no thread holds them,
whatever ends the transfer (the whole body, a client that never attaches, a
disk that stops answering, a file shorter than its entry). The bytes' own
path, with the cache and the proxy, is tests/ooidx/test_splice.py."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, List, Tuple

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ooidx.datapath import splice
from ooidx.datapath.store import StoreError

SIZE = 3 * splice.PIPE_SIZE + 12345


def pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


class Threads:
    """The cache's C{_io}, played by the test: calls wait until it runs them."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred]] = []
        self.most = 0

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((f, args, d))
        self.most = max(self.most, len(self.calls))
        return d

    def run_one(self) -> None:
        f, args, d = self.calls.pop(0)
        d.callback(f(*args))


class Channel:
    def __init__(self) -> None:
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1


class Transport:
    """What a splice uses of the client's tcp.Connection, over one end of a socket pair."""

    def __init__(self, sock: socket.socket, channel: Channel) -> None:
        self.sock = sock
        self.producer: Any = channel
        self.disconnected = False
        self.aborted = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def unregisterProducer(self) -> None:
        self.producer = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def startWriting(self) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted += 1
        self.disconnected = True


class Request:
    method = b"GET"

    def __init__(self, channel: Channel) -> None:
        self.channel = channel


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FileSpliceTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not hasattr(os, "splice"):
            raise self.skipTest("splice(2) is Linux's")
        self.clock = task.Clock()
        self.threads = Threads()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(pattern(SIZE))
        self.fds = open_fds()
        self.file = open(path, "rb", buffering=0)
        self.addCleanup(self.file.close)
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.channel = Channel()
        self.transport = Transport(self.ours, self.channel)
        self.end = splice.ClientEnd("r1", Request(self.channel), self.transport)  # type: ignore[arg-type]

    def job(self, length: int = SIZE) -> splice.FileSplice:
        return splice.FileSplice(self.clock, self.file.fileno(), length, self.threads, idle_timeout=10.0,
                                 attach_timeout=30.0)

    def read_client(self) -> bytes:
        out = bytearray()
        while True:
            try:
                data = self.theirs.recv(1 << 20)
            except BlockingIOError:
                return bytes(out)
            if not data:
                return bytes(out)
            out += data

    def transfer(self, job: splice.FileSplice) -> bytes:
        """The disk threads and the client, in turn, until the transfer is over: what the client read."""
        got = bytearray()
        for _ in range(1000):
            if job.finished:
                break
            if self.threads.calls:
                self.threads.run_one()
            got += self.read_client()
            job.resumeProducing()  # the transport's buffer is empty: more
        return bytes(got + self.read_client())

    def test_a_body_goes_whole_one_fill_at_a_time_and_everything_is_let_go(self) -> None:
        job = self.job()
        outcome = job.attach(self.end, stall_timeout=5.0)
        quiet = job.quiet()
        got = self.transfer(job)
        self.assertEqual(self.successResultOf(outcome), SIZE)
        self.assertEqual(got, pattern(SIZE))
        self.assertEqual(self.threads.most, 1)  # never two fills at once
        self.successResultOf(quiet)
        self.assertIs(self.transport.producer, self.channel)  # the connection back to its HTTP channel
        self.assertEqual(open_fds(), self.fds + 3)  # the file and the socket pair: no pipe left
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_splice_nobody_attaches_gives_up_and_reads_nothing(self) -> None:
        job = self.job()
        outcome = job.outcome()
        self.clock.advance(30.0)
        self.failureResultOf(outcome, splice.ClientGone)
        self.successResultOf(job.quiet())
        self.assertEqual(self.threads.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_disk_that_stops_answering_fails_it_and_its_pipe_waits_for_the_thread(self) -> None:
        job = self.job()
        outcome = job.attach(self.end, stall_timeout=60.0)
        self.threads.run_one()  # a first pipe: in the client's socket
        job.resumeProducing()
        self.assertEqual(len(self.threads.calls), 1)  # the next fill: stuck in the disk
        quiet = job.quiet()
        self.clock.advance(9.0)
        self.assertNoResult(outcome)
        self.clock.advance(6.0)
        self.failureResultOf(outcome, StoreError)
        self.assertNoResult(quiet)  # the thread still holds the file and a pipe
        f, args, _ = self.threads.calls[0]
        os.fstat(args[1])  # (the pipe is still open: the thread may write to it)
        self.threads.run_one()  # the disk answers, late
        self.successResultOf(quiet)
        self.assertEqual(open_fds(), self.fds + 3)
        self.assertIs(self.transport.producer, self.channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_file_shorter_than_its_entry_cuts_the_client_short(self) -> None:
        job = self.job(SIZE + 1)
        outcome = job.attach(self.end, stall_timeout=5.0)
        self.transfer(job)
        failure = self.failureResultOf(outcome, StoreError)
        self.assertIn(f"ends after {SIZE} bytes", failure.getErrorMessage())
        self.successResultOf(job.quiet())
        self.assertEqual(open_fds(), self.fds + 3)
