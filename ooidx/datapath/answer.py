"""The answer to a request made to a listen address of one's own: a stream
(the upstream's answer) or an error reply, whichever comes first.

The csv component asks for a `.dods` and the controller checks a dataset
being registered the same way: post a request naming the address and a
request id, then wait for what arrives there under that id. Anything else
that arrives (a late stream, another request's answer) is drained and
dropped, so it never holds the sender's flow control.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from magnet import MagnetError, decode_reply
from magnet.rpc import ERROR, REPLY

__all__ = ["StreamAnswer"]


class StreamAnswer:
    """C{answer} fires with the stream whose correlation id is C{request_id},
    or fails with the remote error an error reply carries. Hand C{on_message}
    and C{on_stream} to C{bus.listen}."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.answer: Deferred = Deferred()

    def on_message(self, message: Any) -> None:
        if message.correlation_id != self.request_id or message.type not in (ERROR, REPLY):
            return
        if message.type == ERROR:
            try:
                decode_reply(message)
            except MagnetError as e:
                if not self.answer.called:
                    self.answer.errback(Failure(e))

    def on_stream(self, stream: Any) -> None:
        if stream.correlation_id != self.request_id or self.answer.called:
            stream.deliver(lambda data: None).addErrback(lambda _: None)
            return
        self.answer.callback(stream)
