"""What a proxy request asks for (docs/data-path.md): the request line's URI
made into a L{Target}, a URL (forward proxy) or a dataset by name
(C{/datasets/NAME.SUFFIX?CONSTRAINT}) or one saved version of it
(C{/datasets/NAME@VERSION.SUFFIX}, served by the persister from disk), and L{ProxyError}, the answer the
proxy gives itself (an HTTP status, an error kind, a message) before any of
an upstream's headers went out."""
from __future__ import annotations

import re
from typing import Optional, Tuple
from xml.sax.saxutils import escape, quoteattr

from ooidx.http.answers import HTTPError

__all__ = ["DAP_SUFFIXES", "DATASETS_PREFIX", "MAX_URI", "NAME", "ProxyError", "Target", "parse_target",
           "printable", "VERSION", "LATEST", "SAVED_SUFFIXES", "DAP2_ERROR_SUFFIXES", "DAP4_ERROR_SUFFIXES", "error_dialect", "dap2_error_body",
           "dap4_error_body"]

#: A dataset name (docs/data-path.md; the same as ooidx.dap.valid_name).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: A saved version's name: the persister's syntax (ooidx.dissemination.saved.VERSION), kept
#: here too since the data path does not import dissemination.
VERSION = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}\Z")
#: The version name that means a dataset's last saved version.
LATEST = "latest"
#: What a saved version is served as (the files of its directory).
SAVED_SUFFIXES = (".das", ".dds", ".dods", ".nc")
#: The suffixes a by-name path may end in; the longest match wins.
DAP_SUFFIXES = (".dods", ".das", ".dds", ".asc", ".ascii", ".html", ".info", ".ver", ".csv", ".nc",
                ".dmr", ".dmr.xml", ".dap")
#: What the datasets path looks like.
DATASETS_PREFIX = b"/datasets/"
#: The longest request target taken (414 past it).
MAX_URI = 8192
#: by-name suffixes, longest first
_SUFFIXES_LONGEST_FIRST = tuple(s.encode("ascii") for s in sorted(DAP_SUFFIXES, key=len, reverse=True))


#: Requests for these get their errors as a DAP 2 error object (C{Error { code; message; };}),
#: which netCDF-C (ncdump) and pydap parse and print; anything else gets plain text.
DAP2_ERROR_SUFFIXES = (".das", ".dds", ".dods", ".ascii", ".asc", ".csv")
#: ... and these (DAP 4) the DAP 4 one (C{<Error httpcode="N"><Message>...</Message></Error>}).
DAP4_ERROR_SUFFIXES = (".dmr", ".dap", ".dmr.xml", ".dap.xml")


def error_dialect(uri: bytes) -> Optional[str]:
    """How a client asking for C{uri} wants its errors: C{"dap2"}, C{"dap4"}, or
    None (plain text), from the suffix of the URI's path (by name or forward)."""
    path = uri.split(b"?", 1)[0].split(b"#", 1)[0].lower()
    if b"://" in path:
        rest = path.split(b"://", 1)[1]
        path = rest[rest.find(b"/"):] if b"/" in rest else b""
    for suffix in DAP4_ERROR_SUFFIXES:
        if path.endswith(suffix.encode("ascii")):
            return "dap4"
    for suffix in DAP2_ERROR_SUFFIXES:
        if path.endswith(suffix.encode("ascii")):
            return "dap2"
    return None


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def dap2_error_body(status: int, kind: str, message: str) -> bytes:
    """The OPeNDAP 2 error object for an error: the message a quoted string
    (backslashes and quotes escaped, one line), the HTTP status as its code."""
    text = _one_line(f"{kind}: {message}").replace("\\", "\\\\").replace('"', '\\"')
    return f'Error {{\n    code = {int(status)};\n    message = "{text}";\n}};\n'.encode("utf-8", "replace")


def dap4_error_body(status: int, kind: str, message: str) -> bytes:
    """The DAP 4 error response (its XML form) for an error."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error httpcode={quoteattr(str(int(status)))}>\n'
            f'  <Message>{escape(_one_line(f"{kind}: {message}"))}</Message>\n</Error>\n').encode("utf-8", "replace")


class ProxyError(HTTPError):
    """An answer other than the upstream's, before any header went out (a
    status, a JSON error's type and message, more headers)."""



class Target:
    """What a request asks for: a URL (forward proxy) or a dataset by name."""

    __slots__ = ("url", "name", "suffix", "query", "csv", "version")

    def __init__(self, url: Optional[str] = None, name: Optional[str] = None, suffix: str = "",
                 query: Optional[str] = None, version: Optional[str] = None) -> None:
        self.url = url
        self.version = version  # a saved version (NAME@VERSION), served from disk
        self.name = name
        self.suffix = suffix
        self.query = query  # None: no "?" at all; "" : a "?" with nothing after it
        self.csv = suffix == ".csv"

    def __repr__(self) -> str:
        return f"Target(url={self.url!r}, name={self.name!r}, suffix={self.suffix!r}, query={self.query!r}, version={self.version!r})"


def printable(raw: bytes, limit: int = 120) -> str:
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("..." if len(raw) > limit else "")


def _ascii(raw: bytes, what: str) -> str:
    """Bytes of a URI as text: printable ASCII only (clients percent-encode the rest)."""
    if any(b < 0x21 or b > 0x7E for b in raw):
        raise ProxyError(400, "InvalidURL", f"{what} has bytes that must be percent-encoded: {printable(raw)}")
    return raw.decode("ascii")


def parse_target(uri: bytes, own: Tuple[str, ...] = ()) -> Target:
    """The target of a request line's URI. C{own}: host:port spellings of this
    proxy, so that an absolute URI naming the proxy itself is served by name."""
    if len(uri) > MAX_URI:
        raise ProxyError(414, "URITooLong", f"the request target is longer than {MAX_URI} bytes")
    if uri.startswith(b"/"):
        return _by_name(uri)
    scheme, sep, rest = uri.partition(b"://")
    if not sep:
        raise ProxyError(400, "InvalidURL", f"not a path or an absolute http:// URL: {printable(uri)}")
    if scheme.lower() not in (b"http", b"https"):
        raise ProxyError(400, "InvalidURL", f"scheme {printable(scheme)!r} is not proxied (http and https only)")
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if not authority or authority.startswith(b":") or b"@" in authority:
        raise ProxyError(400, "InvalidURL", f"no host (or userinfo given) in {printable(uri)}")
    text = _ascii(uri, "the URL")
    if authority.decode("ascii").lower() in own:
        path = rest[len(authority):] or b"/"
        return _by_name(path)
    return Target(url=text)


def _by_name(path_and_query: bytes) -> Target:
    path, sep, query = path_and_query.partition(b"?")
    if not path.startswith(DATASETS_PREFIX):
        raise ProxyError(404, "NotFound", f"no such path: {printable(path)} (datasets are under /datasets/NAME.SUFFIX)")
    rest = path[len(DATASETS_PREFIX):]
    suffix = b""
    for candidate in _SUFFIXES_LONGEST_FIRST:
        if rest.endswith(candidate) and len(rest) > len(candidate):
            suffix = candidate
            rest = rest[: -len(candidate)]
            break
    version: Optional[str] = None
    if b"@" in rest:
        rest, _, raw_version = rest.partition(b"@")
        version = _version(raw_version, suffix.decode("ascii"))
    try:
        name = rest.decode("ascii")
    except UnicodeDecodeError:
        name = None
    if name is None or not NAME.match(name):
        raise ProxyError(400, "InvalidName", f"bad dataset name {printable(rest)}: expected "
                                             "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    text_query = _ascii(query, "the constraint expression") if sep else None
    if version is not None and text_query and suffix != b".das":
        # the saved .dds/.dods are the whole dataset: a projection or selection cannot be applied from disk
        raise ProxyError(400, "ConstraintNotSupported", f"constraints are not supported on saved versions "
                                                        f"(ask for {name}@{version}{suffix.decode('ascii')} whole)")
    return Target(name=name, suffix=suffix.decode("ascii"), query=text_query, version=version)


def _version(raw: bytes, suffix: str) -> str:
    """The version of a C{NAME@VERSION.SUFFIX} path, checked: a version name
    (C{YYYYmmddTHHMMSSZ-SHA12}) or C{latest}, and a suffix a saved version has."""
    try:
        version = raw.decode("ascii")
    except UnicodeDecodeError:
        version = ""
    if version != LATEST and not VERSION.match(version):
        raise ProxyError(400, "InvalidVersion", f"bad version {printable(raw)}: expected "
                                                f"YYYYmmddTHHMMSSZ-SHA12 or {LATEST}")
    if suffix not in SAVED_SUFFIXES:
        raise ProxyError(404, "NotFound", f"a saved version is served as {', '.join(SAVED_SUFFIXES)}, "
                                          f"not {suffix or 'without a suffix'}")
    return version


