"""The errors of the data path (docs/data-path.md).

Plain exceptions: raised by an operation, their class name travels over the
bus as the remote type of the error reply (``RemoteError.remote_type``), and
the proxy maps that name to an HTTP status. Keep the names stable.
"""
from __future__ import annotations

__all__ = ["DXError", "UnknownDataset", "Forbidden", "InvalidName", "InvalidURL", "UpstreamError",
           "UpstreamTimeout", "InvalidRegex", "HTTP_STATUS", "http_status"]


from magnet.errors import Refusal


class DXError(Refusal):
    """Base of the data-path errors: refusals the caller is answered with."""


class UnknownDataset(DXError):
    """No such registered dataset (404)."""


class Forbidden(DXError):
    """URL not under a registered base URL, host not allowed, or private address (403)."""


class InvalidName(DXError):
    """A dataset name outside the safe character set (400)."""


class InvalidURL(DXError):
    """A malformed URL, or one with a scheme other than http(s) (400)."""


class UpstreamError(DXError):
    """Upstream unreachable, refused, reset, bad redirect, too large, broke mid-body (502)."""


class UpstreamTimeout(DXError):
    """Upstream did not answer within the fetcher's timeout (504)."""


class InvalidRegex(DXError):
    """A subscription or filter regex that is too long, invalid, or outside RE2's syntax (400)."""


#: error type name -> the HTTP status the proxy answers with.
HTTP_STATUS = {
    "UnknownDataset": 404,
    "Forbidden": 403,
    "InvalidName": 400,
    "InvalidURL": 400,
    "InvalidRegex": 400,
    "UpstreamError": 502,
    "UpstreamTimeout": 504,
}


def http_status(error_type: str) -> int:
    """The HTTP status for a remote error type (502 for anything not listed)."""
    return HTTP_STATUS.get(error_type, 502)
