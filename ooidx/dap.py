"""DAP 2 URLs: a dataset's base URL, the response suffix, the constraint.

A DAP 2 request URL (OPeNDAP DAP 2.0, ESE-RFC-004, section 6) is the
dataset's URL, a suffix naming the response, and an optional constraint
expression after C{?}:

    http://server/dods/nc/fnoc1.nc.dds?u[0:1:1][0:1:2][0:1:3]
    \\_______ base ___________/\\sfx/\\_______ constraint ______/

The constraint is kept exactly as the client sent it (percent-escapes,
commas, brackets, quotes, C{&} selections, function calls): the exchange
never decodes or re-encodes it, so the upstream sees the same bytes.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

#: The DAP 2 responses (.asc is the short form of .ascii), and .csv, our own.
DAP_SUFFIXES = (".das", ".dds", ".dods", ".asc", ".ascii", ".html", ".info", ".ver")
CSV_SUFFIX = ".csv"
SUFFIXES = DAP_SUFFIXES + (CSV_SUFFIX,)

#: The three responses that make up a dataset (metadata, structure, data).
DATASET_PARTS = ("das", "dds", "dods")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class DapURL(NamedTuple):
    """A DAP request URL taken apart.

    C{base}: the dataset's URL (no suffix, no constraint). C{suffix}: one of
    L{SUFFIXES} with its dot, or C{None} for a URL without one (the base URL
    itself, or any other URL under it). C{constraint}: the raw query string
    after C{?}, byte-for-byte, or C{None} when the URL has no C{?} (an empty
    string when it ends in a bare C{?})."""

    base: str
    suffix: Optional[str]
    constraint: Optional[str]

    @property
    def url(self) -> str:
        return dataset_url(self.base, self.suffix, self.constraint)


def split_url(url: str) -> DapURL:
    """Take a DAP URL apart into base, suffix and raw constraint.

    The suffix is recognized only at the end of the path (before the C{?}),
    so a dataset file named C{x.dds.nc} keeps its name; a path without a
    known suffix comes back with C{suffix=None} and the whole path as base.
    A fragment (C{#...}) is not part of a request and is dropped."""
    if not isinstance(url, str):
        raise TypeError(f"a DAP URL is a string, got {type(url).__name__}")
    head, sep, query = url.partition("?")
    if not sep:
        head = head.partition("#")[0]
    constraint: Optional[str] = query if sep else None
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if head.endswith(suffix) and len(head) > len(suffix) and not head[: -len(suffix)].endswith("/"):
            return DapURL(head[: -len(suffix)], suffix, constraint)
    return DapURL(head, None, constraint)


def dataset_url(base: str, suffix: Optional[str] = None, constraint: Optional[str] = None) -> str:
    """The request URL for a response of the dataset at C{base}: the inverse of L{split_url}.

    C{suffix} may be given with or without its dot (C{"dds"} or C{".dds"});
    C{constraint} is appended unchanged after C{?}."""
    url = base
    if suffix:
        if not suffix.startswith("."):
            suffix = "." + suffix
        if suffix not in SUFFIXES:
            raise ValueError(f"not a DAP response suffix: {suffix!r} (known: {', '.join(SUFFIXES)})")
        url += suffix
    if constraint is not None:
        url += "?" + constraint
    return url


def valid_name(name: object) -> bool:
    """Whether C{name} is a safe dataset name: 1-64 characters of letters,
    digits, C{_ . -}, starting with a letter or digit (so never C{.} or C{..},
    never a path)."""
    return isinstance(name, str) and name not in (".", "..") and _NAME.match(name) is not None
