"""Where an HTTP edge listens: a port number or a Twisted endpoint string.

The web and proxy ports take either a plain port number (``8080``, on the
configured interface, as always) or a server endpoint string as
L{twisted.internet.endpoints.serverFromString} reads it::

    tcp:8080:interface=127.0.0.1
    tcp6:8080:interface=\\:\\:1
    ssl:8443:privateKey=/etc/ooidx/key.pem:certKey=/etc/ooidx/cert.pem

Only these three kinds are taken (an edge is a TCP port); a string that
names no interface gets the configured one (C{http.interface}, or the
component's own), so writing an endpoint never widens where a port listens
by surprise. An endpoint that names no C{backlog} listens with
L{DEFAULT_BACKLOG} (Twisted's own default, 50, makes a burst of new
clients past the 50th wait a second or more for the kernel to retry their
SYN: measured as a 1-2 s connect p99 with 500 clients in
tests/reliability/test_load_500.py). L{parse_listen} checks a value the way the config loader needs
it: every problem is one line (L{BadEndpoint}), and the key and certificate
files of an C{ssl:} endpoint are read then, not at the first connection.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from twisted.internet import endpoints

__all__ = ["ListenSpec", "BadEndpoint", "parse_listen", "KINDS", "LOOPBACK_NAMES", "is_loopback", "DEFAULT_BACKLOG"]

#: The endpoint kinds an edge may listen on.
KINDS = ("tcp", "tcp6", "ssl")
_OPTIONS = {
    "tcp": {"port", "interface", "backlog"},
    "tcp6": {"port", "interface", "backlog"},
    "ssl": {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain", "dhParameters", "sslmethod"},
}
_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")
#: Names that always mean this machine.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Connections the kernel completes for a port before the node accepts them,
#: unless the endpoint says C{backlog=} (the kernel caps it at
#: net.core.somaxconn).
DEFAULT_BACKLOG = 1024


class BadEndpoint(ValueError):
    """A listen value that is not a port number or an endpoint an edge can use; one line, saying why."""


@dataclass(frozen=True)
class ListenSpec:
    """A checked listen value: the endpoint string to hand to C{serverFromString},
    and what it says (the port, 0 for any free one; the interface, "" for every
    IPv4 address; whether it speaks TLS)."""

    description: str
    port: int
    interface: str
    tls: bool = False
    backlog: Optional[int] = None  # as the endpoint string gave it; None: DEFAULT_BACKLOG

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        """The endpoint string to listen with: the description, with
        C{backlog=DEFAULT_BACKLOG} when it gives none."""
        if self.backlog is not None:
            return self.description
        return f"{self.description}:backlog={DEFAULT_BACKLOG}"


def is_loopback(interface: str) -> bool:
    """Whether an interface only this machine can reach (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return interface == "localhost"


def _port(text: Any) -> int:
    if isinstance(text, bool) or not (isinstance(text, int) or (isinstance(text, str) and text.isascii()
                                                                   and text.isdigit())):
        raise BadEndpoint(f"the port must be a whole number 0-65535, got {str(text)[:40]!r}")
    port = int(text)
    if not 0 <= port <= 65535:
        raise BadEndpoint(f"the port must be a whole number 0-65535, got {port}")
    return port


def _interface(text: str, kind: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise BadEndpoint(f"interface must be an IP address, got {text[:60]!r}") from None
    if kind == "tcp6" and address.version != 6:
        raise BadEndpoint(f"a tcp6 endpoint listens on an IPv6 address, got {text!r}")
    return text


def _readable(path: str, option: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise BadEndpoint(f"{option}: cannot read {path}: {e.strerror or e}") from None
    except ValueError:  # a path the file system cannot name (a lone surrogate)
        raise BadEndpoint(f"{option}: not a usable file name") from None


def parse_listen(value: Union[int, str], interface: str = "127.0.0.1", *, read_files: bool = True) -> ListenSpec:
    """The L{ListenSpec} of a port number or an endpoint string; C{interface}
    is used when the value names none. L{BadEndpoint} (one line) otherwise.
    With C{read_files}, an C{ssl:} endpoint's key and certificate files must be readable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _tcp(_port(value), interface)
    if not isinstance(value, str):
        raise BadEndpoint(f"expected a port number or an endpoint string such as tcp:8080:interface=127.0.0.1, "
                          f"got {type(value).__name__}")
    text = value.strip()
    if text.isascii() and text.isdigit():
        return _tcp(_port(text), interface)
    if not text or "\n" in text or "\x00" in text:
        raise BadEndpoint("expected a port number or an endpoint string such as tcp:8080:interface=127.0.0.1")
    try:
        args, kwargs = endpoints._parse(text)
    except Exception as e:  # noqa: BLE001 - the tokenizer's own complaint, in one line
        raise BadEndpoint(f"not an endpoint string ({e})") from None
    kind = str(args[0]).lower() if args else ""
    if kind not in KINDS:
        raise BadEndpoint(f"an edge listens on a {', '.join(KINDS)} endpoint, got {str(args[0] if args else '')[:20]!r}"
                          " (e.g. tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=KEY.pem:certKey=CERT.pem)")
    if len(args) > 2:
        raise BadEndpoint(f"{kind}: too many positional parts (give KIND:PORT:option=value...)")
    options: Dict[str, str] = dict(kwargs)
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise BadEndpoint(f"{kind}: unknown option(s) {', '.join(unknown)[:80]} (known: {', '.join(sorted(_OPTIONS[kind]))})")
    if len(args) == 2 and "port" in options:
        raise BadEndpoint(f"{kind}: the port is given twice")
    raw_port = args[1] if len(args) == 2 else options.pop("port", None)
    options.pop("port", None)
    if raw_port is None:
        raise BadEndpoint(f"{kind}: no port (e.g. {kind}:8080)")
    port = _port(raw_port)
    if "backlog" in options:
        try:
            if not 1 <= int(options["backlog"]) <= 65535:
                raise ValueError
        except ValueError:
            raise BadEndpoint(f"{kind}: backlog must be a whole number 1-65535") from None
    if "interface" in options:
        where = _interface(options["interface"], kind)
    else:
        where = interface
        if kind == "tcp6" and ":" not in where:
            where = "::1" if is_loopback(where) else "::"  # the IPv6 counterpart of the configured interface
        if where:
            _interface(where, kind)
            options["interface"] = where
    if kind == "ssl":
        if "privateKey" not in options:
            raise BadEndpoint("ssl: privateKey=PATH (the key, and the certificate unless certKey= names it) "
                              "is required")
        if read_files:
            for option in _FILES:
                if option in options:
                    _readable(options[option], option)
    backlog = int(options["backlog"]) if "backlog" in options else None
    return ListenSpec(_describe(kind, port, options), port, where, kind == "ssl", backlog)


def _tcp(port: int, interface: str) -> ListenSpec:
    if interface:
        _interface(interface, "tcp")
        return ListenSpec(_describe("tcp", port, {"interface": interface}), port, interface)
    return ListenSpec(f"tcp:{port}", port, "")


def _describe(kind: str, port: int, options: Dict[str, str]) -> str:
    parts = [kind, str(port)] + [f"{k}={endpoints.quoteStringArgument(v)}" for k, v in sorted(options.items())]
    return ":".join(parts)
