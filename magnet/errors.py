"""Every failure magnet reports is one of these, so callers can tell them apart."""
from __future__ import annotations


class MagnetError(Exception):
    """Base of all magnet errors."""


class Refusal(Exception):
    """An operation declining a request (not found, not allowed, invalid).

    Raise a subclass from an operation to answer the caller with an error
    that is part of the service's contract: the bus logs it as one line, not
    as a traceback, since nothing is broken.
    """


class ConnectionLost(MagnetError):
    """The link to the broker went down while this operation was in flight."""


class NotConnected(MagnetError):
    """The operation needs a broker link and none came up in time."""


class Unroutable(MagnetError):
    """The broker had no queue to put the message in (mandatory + basic.return)."""


class NotConfirmed(MagnetError):
    """The broker refused to take responsibility for a message (basic.nack)."""


class Blocked(NotConfirmed):
    """The broker blocks publishers (C{connection.blocked}: a resource alarm,
    low on memory or disk) and did not lift the block in time; the message
    was not sent, so sending it again later duplicates nothing."""


class Timeout(MagnetError):
    """A wait on the network ran past its limit."""


class BadMessage(MagnetError):
    """A message could not be decoded: bad JSON, wrong content type, missing header."""


class BadFrame(MagnetError, ValueError):
    """Bytes from the broker that do not decode as AMQP: truncated, longer than
    what holds them, nested too deeply, or of an unknown field type (a
    ValueError too, as the decoders raised before it existed)."""


class BadURL(MagnetError):
    """A broker URL magnet cannot use."""


class RemoteError(MagnetError):
    """An operation failed on the remote side.

    Carries the remote exception's type name and message, so the caller can
    tell a KeyError in the attribute store from a timeout in a fetcher.
    """

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message


class UnknownOperation(RemoteError):
    """The service has no operation by that name."""


class BadArguments(RemoteError):
    """The operation exists but the arguments do not fit its signature."""


class StreamError(MagnetError):
    """A stream was aborted by its sender or broke in transit."""
