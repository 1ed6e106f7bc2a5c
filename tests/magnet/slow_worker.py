"""A consumer in its own process that takes one message and never finishes it.

The fault tests kill it with SIGKILL in the middle of that message, to show
that the broker gives the message to another consumer.
"""
from __future__ import annotations

import sys

from twisted.internet import defer, task

import magnet


def main(reactor, url: str, queue: str) -> defer.Deferred:
    bus = magnet.connect(url, reactor, heartbeat=2)
    bus.startService()

    def handle(message: magnet.Message) -> defer.Deferred:
        print("got", message.json(), flush=True)
        return defer.Deferred()  # never done: the message stays unacknowledged

    d = bus.declare_worker_queue(queue)
    d.addCallback(lambda _: bus.consume(queue, handle, prefetch=1))
    d.addCallback(lambda _: print("ready", flush=True))
    return d.addCallback(lambda _: defer.Deferred())


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
