"""Which URLs the exchange may fetch, and connecting only to checked addresses.

The exchange is not an open proxy, and it must not become a way into the
network it runs in. The rules (issue 4, "Security"):

- Only C{http} and C{https} URLs, with a host, without credentials.
- Never an address on loopback, link-local, private (RFC 1918, unique local),
  shared (CGNAT), multicast, unspecified, reserved or otherwise non-global
  ranges, nor an IPv6 address that embeds one (IPv4-mapped, NAT64, 6to4),
  unless the config allows private addresses (C{security.allow_private}) or
  names that host in C{security.allow_hosts}. Numeric hosts are read the way
  C{inet_aton} and browsers read them (C{2130706433}, C{0x7f.1}, C{0177.0.0.1}
  are all 127.0.0.1).
- A host name is resolved once; if B{any} of its addresses is forbidden the
  URL is refused, and the connection goes to the address that was checked,
  never to a second resolution (no DNS rebinding). L{PolicyEndpointFactory}
  does this for L{twisted.web.client.Agent.usingEndpointFactory}, so the rule
  also holds for every redirect target the fetcher follows.
- By default only URLs under a registered dataset's base URL are fetched
  (L{check_registered}, the controller's check); C{security.allow_hosts} may
  open more hosts.
- A path an upstream could resolve outside a base (C{..%2f}, C{..;/},
  C{..%5c}, C{%252e%252e}, overlong UTF-8, ...) is refused before any base is
  compared, by L{check_path}: the one check for registration, forward-proxy,
  by-name and CSV requests.

C{allow_hosts} entries: a host name (C{dap.example.org}), a wildcard for its
subdomains (C{*.example.org}), or an IP address; each optionally with
C{:PORT}, which limits it to that port. An entry allows its host even when
the host's address is private: that is how an operator allows a dataset on a
local host explicitly (and how the tests allow their loopback upstream's
port, and nothing else on loopback).
"""
from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ooidx import dap
from ooidx.errors import Forbidden, InvalidURL, UpstreamError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
#: resolve(host, port) -> Deferred firing with a list of IP address strings.
Resolver = Callable[[str, int], Deferred]

SCHEMES = {"http": 80, "https": 443}

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class Target(NamedTuple):
    """A URL that passed the static checks: what to connect to."""

    url: str
    scheme: str
    host: str  # lower case, no brackets, no trailing dot
    port: int
    ip: Optional[IPAddress]  # the host as an address, when it is one


# --------------------------------------------------------------------------- #
# Addresses


def parse_ip(host: str) -> Optional[IPAddress]:
    """C{host} as an IP address if it is one in any form a resolver would
    accept (dotted quad, IPv6, and C{inet_aton}'s decimal / hex / octal and
    short forms), else C{None}."""
    host = host.strip("[]")
    if "%" in host:  # an IPv6 zone: fe80::1%eth0
        host = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    return _inet_aton(host)


def _inet_aton(host: str) -> Optional[ipaddress.IPv4Address]:
    parts = (host[:-1] if host.endswith(".") else host).split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        try:
            if re.fullmatch(r"0[xX][0-9A-Fa-f]*", part):
                numbers.append(int(part[2:] or "0", 16))
            elif re.fullmatch(r"0[0-7]+", part):
                numbers.append(int(part, 8))
            elif re.fullmatch(r"0|[1-9][0-9]*", part):
                numbers.append(int(part, 10))
            else:
                return None
        except ValueError:
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(value)


def forbidden_reason(ip: IPAddress) -> Optional[str]:
    """Why the exchange must not connect to C{ip} (a short phrase), or C{None}
    if it is a global unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.sixtofour is not None:
            embedded = ip.sixtofour
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} (embedded in an IPv6 address)" if reason else None
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT) address"
    if ip.is_private:
        return "private address"
    if ip.is_reserved:
        return "reserved address"
    if not ip.is_global:
        return "non-global address"
    return None


# --------------------------------------------------------------------------- #
# allow_hosts


def _entry(entry: str) -> Tuple[str, Optional[int]]:
    entry = entry.strip().lower()
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, ""
    if not port:
        return host.rstrip("."), None
    # a port that is not a number (the config refuses one) matches no port; ASCII
    # digits only: "²".isdigit() is True, and int("²") raises
    return host.rstrip("."), (int(port) if port.isascii() and port.isdigit() else -1)


def host_allowed(allow_hosts: Iterable[str], host: str, port: int, ip: Optional[IPAddress] = None) -> bool:
    """Whether an C{allow_hosts} entry names C{host} (or its address C{ip}) and C{port}."""
    host = host.lower().rstrip(".").strip("[]")
    for raw in allow_hosts:
        name, entry_port = _entry(raw)
        if entry_port is not None and entry_port != port:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and parse_ip(host) is None:
                return True
            continue
        if name == host:
            return True
        entry_ip = parse_ip(name)
        if entry_ip is not None and (entry_ip == parse_ip(host) or entry_ip == ip):
            return True
    return False


def check_address(ip: IPAddress, host: str, port: int, *, allow_private: bool = False,
                  allow_hosts: Iterable[str] = ()) -> None:
    """Raise L{Forbidden} unless the exchange may connect to C{ip} (for C{host}:C{port})."""
    if allow_private:
        return
    reason = forbidden_reason(ip)
    if reason is None or host_allowed(allow_hosts, host, port, ip):
        return
    shown = host if str(ip) == host else f"{host} ({ip})"
    raise Forbidden(f"{shown}: {reason} refused; to allow it, add \"{f'[{host}]' if ':' in host else host}:{port}\" to security.allow_hosts (or set security.allow_private: true) in the daemon's config and restart it")


# --------------------------------------------------------------------------- #
# URLs


def parse_url(url: Any) -> Target:
    """The static checks: a string, http or https, a host, no credentials, a
    valid port. Raises L{InvalidURL} (another scheme included)."""
    if not isinstance(url, str) or not url:
        raise InvalidURL(f"expected a URL, got {url!r}"[:200])
    if len(url) > 8192:
        raise InvalidURL("URL longer than 8192 characters")
    if any(c in url for c in "\r\n\t\x00 ") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidURL("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidURL(f"malformed URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidURL(f"scheme {parts.scheme or '(none)'!r} refused (only http and https)")
    if "@" in parts.netloc:
        raise InvalidURL("credentials in URLs are not supported")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidURL("URL has no host")
    if "\\" in parts.netloc or not re.fullmatch(r"[A-Za-z0-9._~\-:%\[\]]+", parts.netloc):
        raise InvalidURL(f"malformed host in URL: {parts.netloc!r}"[:200])
    if port == 0:
        raise InvalidURL("port 0")
    if port is None:
        port = SCHEMES[scheme]
    return Target(url, scheme, host.lower(), port, parse_ip(host))


def check_url(url: Any, allow_private: bool = False, allow_hosts: Iterable[str] = ()) -> Target:
    """L{parse_url}, and the address rule when the host is an address. A host
    name is checked when it is resolved (L{PolicyEndpointFactory})."""
    target = parse_url(url)
    if target.ip is not None:
        check_address(target.ip, target.host, target.port, allow_private=allow_private, allow_hosts=allow_hosts)
    return target


#: How many rounds of percent-decoding a path segment is checked through
#: (C{%25252e} is three); a segment still changing after that is refused.
MAX_DECODE_ROUNDS = 4
#: Characters a server may take for a path separator although they are not C{/}.
_SLASH_LIKE = frozenset("\\\u2215\uff0f\uff3c\ufe68\u00a5\u20a9")
_IIS_ESCAPE = re.compile(r"%u[0-9a-f]{4}", re.IGNORECASE)
_ONLY_DOTS = re.compile(r"[.\s]+")


def _layers(segment: str) -> List[str]:
    """C{segment} and what it decodes to, round after round, until it stops
    changing; L{InvalidURL} for bytes that are not UTF-8 (overlong forms such
    as C{%c0%ae} included) or a segment encoded more than L{MAX_DECODE_ROUNDS} times."""
    layers = [segment]
    for _ in range(MAX_DECODE_ROUNDS):
        try:
            decoded = unquote_to_bytes(layers[-1]).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidURL(f"the URL path has percent-escapes that are not UTF-8 "
                             f"(overlong or broken sequences such as %c0%ae are refused): {segment[:80]!r}") from None
        if decoded == layers[-1]:
            return layers
        layers.append(decoded)
    raise InvalidURL(f"the URL path is percent-encoded more than {MAX_DECODE_ROUNDS} times: {segment[:80]!r}")


def check_path(url: str) -> str:
    """The one check of a URL's path, for every way a URL comes in: a base URL
    being registered (L{ooidx.datapath.controller.check_base_url}), and a
    forward-proxy, by-name or CSV request (L{check_registered}). Returns the
    path; raises L{InvalidURL} with the reason.

    The path is compared with a base URL's exactly, as text, but the upstream
    server decodes it first (WSGI servers turn C{%2f} into C{/}; Tomcat, which
    runs Hyrax and THREDDS, drops C{;parameters} so that C{..;/} is C{..};
    IIS and Windows take C{\\} for C{/}). So each C{/}-separated segment is
    percent-decoded, round after round (C{%252e} is C{%2e} is C{.}), and
    every round, also after Unicode NFKC folding (C{%ef%bc%8e} is a
    fullwidth C{.}), is refused when it
      - is C{.} or C{..} or only dots and blanks (C{...}, C{.. });
      - holds a C{/} that was encoded (C{%2f}), a C{\\} (C{%5c}) or a slash look-alike;
      - holds a C{;} (path parameters: C{..;/}, C{;jsessionid=});
      - holds a control character (C{%00}, C{%0a});
      - holds an IIS C{%uXXXX} escape;
    and escapes that do not decode as UTF-8 (C{%c0%ae}, C{%c0%af}) are
    refused too. Empty segments (C{//}) stay. The query string is not the
    path and is not looked at (a DAP constraint is passed on byte for byte)."""
    try:
        path = urlsplit(url).path
    except ValueError as e:
        raise InvalidURL(f"malformed URL: {e}") from None
    for raw in path.split("/"):
        for layer in _layers(raw):
            for text in {layer, unicodedata.normalize("NFKC", layer)}:
                if text and _ONLY_DOTS.fullmatch(text):
                    raise InvalidURL(f"the URL path has a {raw[:40]!r} segment (it reads as . or ..): refused")
                if "/" in text:
                    raise InvalidURL(f"the URL path has an encoded / in {raw[:60]!r}: refused")
                if any(c in _SLASH_LIKE for c in text):
                    raise InvalidURL(f"the URL path has a backslash or a slash look-alike in {raw[:60]!r}: refused")
                if ";" in text:
                    raise InvalidURL(f"the URL path has a ; (path parameters) in {raw[:60]!r}: refused")
                if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
                    raise InvalidURL(f"the URL path has a control character in {raw[:60]!r}: refused")
                if _IIS_ESCAPE.search(text):
                    raise InvalidURL(f"the URL path has a %u escape in {raw[:60]!r}: refused")
    return path


def is_under(url: str, base: str, *, path_checked: bool = False) -> bool:
    """Whether C{url} is the dataset at C{base} or one of its responses
    (C{base} + a DAP suffix, any constraint), or, when C{base} ends in C{/}, a
    URL below that directory. Scheme and host compare case-insensitively,
    default ports are implied; the path compares exactly, and a URL whose
    path L{check_path} refuses is never under anything (C{path_checked}: the
    caller has checked it already, as L{check_registered} does once for all bases)."""
    try:
        u, b = urlsplit(url), urlsplit(base)
        u_port = u.port or SCHEMES.get(u.scheme.lower())
        b_port = b.port or SCHEMES.get(b.scheme.lower())
    except ValueError:
        return False
    if (u.scheme.lower(), (u.hostname or "").rstrip("."), u_port) != (
            b.scheme.lower(), (b.hostname or "").rstrip("."), b_port):
        return False
    if not path_checked:
        try:
            check_path(url)
        except InvalidURL:
            return False
    path = u.path or "/"
    base_path = b.path or "/"
    if base_path.endswith("/"):
        return path.startswith(base_path)
    if path == base_path:
        return True
    split = dap.split_url(path)
    return split.suffix is not None and split.base == base_path


def check_registered(url: Any, bases: Union[Mapping[str, str], Iterable[Tuple[str, str]]],
                     allow_hosts: Iterable[str] = (), allow_private: bool = False) -> Optional[str]:
    """The controller's check of a requested URL: the name of the registered
    dataset whose base URL it is under (the longest base wins), or C{None}
    when no dataset's but an C{allow_hosts} entry allows its host.

    C{bases}: dataset name -> base URL (a mapping or pairs). Raises
    L{InvalidURL} for a malformed URL, another scheme or a path L{check_path}
    refuses (before any base is looked at), and L{Forbidden} for a forbidden
    address, or a URL under no base URL and no allowed host."""
    target = check_url(url, allow_private=allow_private, allow_hosts=allow_hosts)
    check_path(target.url)
    items = bases.items() if isinstance(bases, Mapping) else bases
    found: Optional[Tuple[int, str]] = None
    for name, base in items:
        if isinstance(base, str) and is_under(target.url, base, path_checked=True) and (found is None or len(base) > found[0]):
            found = (len(base), name)
    if found is not None:
        return found[1]
    if host_allowed(allow_hosts, target.host, target.port):
        return None
    raise Forbidden(f"{target.host}: URL is not under a registered dataset's base URL")


# --------------------------------------------------------------------------- #
# Connecting to checked addresses only


def getaddrinfo_resolver(reactor: Any) -> Resolver:
    """Resolve with the system resolver (getaddrinfo) in the reactor's thread pool."""
    from twisted.internet.threads import deferToThreadPool

    def resolve(host: str, port: int) -> Deferred:
        d = deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, host, port, 0,
                              socket.SOCK_STREAM)
        return d.addCallback(lambda infos: [info[4][0] for info in infos])

    return resolve


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """Resolves the host once, refuses it if any address is forbidden, and
    connects (TCP, or TLS with the host name for SNI and verification) to the
    first checked address."""

    log = Logger()

    def __init__(self, reactor: Any, resolver: Resolver, scheme: str, host: str, port: int, *,
                 allow_private: bool, allow_hosts: Sequence[str], timeout: float,
                 tls_policy: Any = None) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._scheme = scheme
        self._host = host
        self._port = port
        self._allow_private = allow_private
        self._allow_hosts = allow_hosts
        self._timeout = timeout
        self._tls_policy = tls_policy
        self.address: Optional[IPAddress] = None

    def connect(self, protocolFactory: Any) -> Deferred:
        d = self._addresses()
        d.addCallback(self._connect, protocolFactory)
        return d

    def _addresses(self) -> Deferred:
        literal = parse_ip(self._host)
        if literal is not None:
            return succeed([literal])
        d = self._resolver(self._host, self._port)
        d.addTimeout(self._timeout, self._reactor)

        def parsed(addresses: List[str]) -> List[IPAddress]:
            ips = []
            for a in addresses:
                ip = parse_ip(str(a))
                if ip is None:
                    raise UpstreamError(f"{self._host}: resolved to something that is not an address")
                ips.append(ip)
            if not ips:
                raise UpstreamError(f"{self._host}: resolved to no address")
            return ips

        return d.addCallback(parsed)

    def _connect(self, ips: List[IPAddress], protocolFactory: Any) -> Deferred:
        for ip in ips:  # every address must pass, whichever one we use
            check_address(ip, self._host, self._port, allow_private=self._allow_private,
                          allow_hosts=self._allow_hosts)
        ip = ips[0]
        self.address = ip
        if isinstance(ip, ipaddress.IPv6Address):
            endpoint: Any = TCP6ClientEndpoint(self._reactor, str(ip), self._port, timeout=self._timeout)
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, str(ip), self._port, timeout=self._timeout)
        if self._scheme == "https":
            if self._tls_policy is not None:
                options = self._tls_policy.creatorForNetloc(self._host.encode("idna"), self._port)
            else:
                from twisted.internet.ssl import optionsForClientTLS
                options = optionsForClientTLS(self._host)
            endpoint = wrapClientTLS(options, endpoint)
        self.log.debug("connecting to {host}:{port} at {ip}", host=self._host, port=self._port, ip=str(ip))
        return endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class PolicyEndpointFactory:
    """For C{Agent.usingEndpointFactory}: every connection the agent makes
    goes through L{CheckedEndpoint}, with the host exactly as the agent parsed
    it from the request URL."""

    def __init__(self, reactor: Any, *, allow_private: bool = False, allow_hosts: Sequence[str] = (),
                 timeout: float = 30.0, resolver: Optional[Resolver] = None, tls_policy: Any = None) -> None:
        self._reactor = reactor
        self.allow_private = allow_private
        self.allow_hosts = tuple(allow_hosts)
        self.timeout = timeout
        self.resolver = resolver or getaddrinfo_resolver(reactor)
        self.tls_policy = tls_policy

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        scheme = uri.scheme.decode("ascii", "replace").lower()
        if scheme not in SCHEMES:
            raise InvalidURL(f"scheme {scheme!r} refused (only http and https)")
        host = uri.host.decode("ascii", "replace").lower().rstrip(".")
        if not host or "@" in host:
            raise InvalidURL(f"bad host {host!r}")
        return CheckedEndpoint(self._reactor, self.resolver, scheme, host, uri.port,
                               allow_private=self.allow_private, allow_hosts=self.allow_hosts,
                               timeout=self.timeout, tls_policy=self.tls_policy)
