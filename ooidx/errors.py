"""The errors of the data path (docs/data-path.md), as they cross the bus.

Each travels as an error reply (L{magnet.rpc.error_reply}) whose type is the
class name; the proxy maps it to an HTTP status (404, 403, 400, 502, 504).
"""
from __future__ import annotations


class UnknownDataset(Exception):
    """No dataset is registered under that name (404)."""


class Forbidden(Exception):
    """The URL is not under a registered base URL, its host is not allowed, or it
    resolves to a private / loopback address (403)."""


class InvalidName(Exception):
    """A dataset name outside the safe character set (400)."""


class InvalidURL(Exception):
    """A malformed URL (400)."""


class UpstreamError(Exception):
    """The upstream was unreachable, refused, reset, redirected badly, sent too
    much or broke off mid-body (502)."""


class UpstreamTimeout(Exception):
    """The upstream did not answer within the fetcher's timeout (504)."""
