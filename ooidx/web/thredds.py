"""A THREDDS catalog of the registered datasets, on the web port.

    GET /thredds/catalog.xml   (controller.list, over the bus, bounded)

THREDDS clients (Unidata's siphon C{TDSCatalog}, intake-thredds, Panoply,
ncWMS, the netCDF-Java ToolsUI) browse a server by its catalog: an
InvCatalog 1.0 XML document whose C{<service>} names the OPeNDAP base URL
and whose C{<dataset urlPath=...>} entries are appended to it. Here the
service base is the proxy's C{/datasets/} (a dataset by name,
docs/data-path.md), so each dataset's OPENDAP access URL is
C{http://PROXY/datasets/NAME}, which ncdump, pydap and netCDF4 open.

The proxy's host is the one the client used to reach this port (its Host
header: the name it can resolve), on the proxy's own port and scheme, unless
the node is given the proxy's public URL. Reading follows the management
API's rule (C{read_token}: the operator token when set or when the web port
is not on loopback), as C{/api/datasets} does.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional
from xml.sax.saxutils import escape, quoteattr

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from magnet import ConnectionLost, NotConnected, RemoteError, Timeout, Unroutable
from ooidx.dap import valid_name
from ooidx.http.answers import Answer, HTTPError, error_answer
from ooidx.http.listen import ListenSpec

__all__ = ["CATALOG_PATH", "CALL_TIMEOUT", "ThreddsCatalog", "catalog_xml", "proxy_base"]

log = Logger()

#: Where the catalog is (the path THREDDS servers use).
CATALOG_PATH = b"/thredds/catalog.xml"
#: How long the catalog waits for the controller's list.
CALL_TIMEOUT = 10.0
#: The THREDDS InvCatalog 1.0 namespace.
NAMESPACE = "http://www.unidata.ucar.edu/namespaces/thredds/InvCatalog/v1.0"
XML_TYPE = b"application/xml; charset=utf-8"
#: The service's name in the catalog.
SERVICE = "odap"


def proxy_base(request: server.Request, proxy: Optional[ListenSpec], public_url: Optional[str] = None) -> str:
    """The OPeNDAP service base: C{public_url} if given (a trailing slash
    added), else the proxy's scheme and port on the host the client reached
    this port by (its Host header, else the proxy's interface), + /datasets/."""
    if public_url:
        return public_url.rstrip("/") + "/datasets/"
    if proxy is None:
        raise HTTPError(503, "Unavailable", "this web edge does not know where the proxy listens")
    host = _host_of(request.getHeader(b"host")) or proxy.interface
    if not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{proxy.scheme}://{host}:{proxy.port}/datasets/"


def _host_of(header: Optional[bytes]) -> Optional[str]:
    """The host of a Host header (no port), or None when absent or odd."""
    if not header:
        return None
    try:
        text = header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else None
    host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    if not host or any(c in host for c in "/?#@ \"'<>"):
        return None
    return host


def catalog_xml(records: Iterable[Any], base: str, title: str = "OOI Data Exchange") -> bytes:
    """The InvCatalog 1.0 document: one OPENDAP service at C{base}, one
    dataset (urlPath NAME) for each record with a valid name, sorted by name."""
    names: List[str] = sorted({str(r["name"]) for r in records
                               if isinstance(r, dict) and valid_name(r.get("name"))})
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<catalog xmlns={quoteattr(NAMESPACE)} xmlns:xlink="http://www.w3.org/1999/xlink" '
             f'name={quoteattr(title)} version="1.0.1">',
             f'  <service name={quoteattr(SERVICE)} serviceType="OPENDAP" base={quoteattr(base)}/>',
             f'  <dataset name={quoteattr(title + " datasets")} ID="ooidx">',
             '    <metadata inherited="true">',
             f'      <serviceName>{escape(SERVICE)}</serviceName>',
             '      <dataType>Grid</dataType>',
             '    </metadata>']
    for name in names:
        lines.append(f'    <dataset name={quoteattr(name)} ID={quoteattr("ooidx/" + name)} urlPath={quoteattr(name)}/>')
    lines += ['  </dataset>', '</catalog>', '']
    return "\n".join(lines).encode("utf-8")


class ThreddsCatalog:
    """The catalog route of the web edge: reads the controller's list over
    the bus (bounded by L{CALL_TIMEOUT}) and answers the catalog XML."""

    def __init__(self, bus: Any, *, check_operator: Callable[[server.Request], None], read_token: bool,
                 proxy: Optional[ListenSpec], public_url: Optional[str] = None,
                 timeout: float = CALL_TIMEOUT) -> None:
        self.bus = bus
        self._check_operator = check_operator
        self.read_token = read_token
        self.proxy = proxy
        self.public_url = public_url
        self.timeout = timeout

    def methods(self, path: bytes) -> Optional[Dict[bytes, Callable[[server.Request], Any]]]:
        if path == CATALOG_PATH:
            return {b"GET": self.render_catalog, b"HEAD": self.render_catalog}
        return None

    def render_catalog(self, request: server.Request) -> Deferred:
        if self.read_token:
            self._check_operator(request)
        base = proxy_base(request, self.proxy, self.public_url)
        d = self.bus.call_with("controller", "list", {}, timeout=self.timeout)

        def shaped(records: Any) -> Answer:
            if not isinstance(records, list):
                raise HTTPError(502, "BadReply", "the controller's list is not a list")
            return Answer(200, catalog_xml(records, base), XML_TYPE)

        return d.addCallback(shaped).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Answer:
        exc = failure.value
        if isinstance(exc, HTTPError):
            return error_answer(exc)
        if isinstance(exc, Unroutable):
            return error_answer(HTTPError(503, "Unavailable", "the dataset registry (controller) is not running"))
        if isinstance(exc, Timeout):
            return error_answer(HTTPError(503, "Unavailable",
                                          f"the controller did not answer within {self.timeout:g} seconds"))
        if isinstance(exc, (ConnectionLost, NotConnected)):
            return error_answer(HTTPError(503, type(exc).__name__, f"the message bus is not reachable: {exc}"))
        if isinstance(exc, RemoteError):
            return error_answer(HTTPError(502, exc.remote_type, exc.message))
        log.failure("thredds catalog: listing the datasets", failure)
        return error_answer(HTTPError(500, "InternalError", f"{type(exc).__name__} while listing the datasets"))
