"""The demo's DAP upstream: pydap's netCDF handler under twisted.web.

pydap's core (a runtime dependency already) answers C{.das}, C{.dds},
C{.dods}, C{.dmr}, C{.ascii}, ... for one file through its
C{NetCDFHandler}, a WSGI application; its server (C{pydap[server]}, with
gunicorn and more) is not needed: L{DapFiles} maps C{/NAME.nc.SUFFIX} to
the file C{NAME.nc} of a directory and hands the request to a handler made
for that request (so a file renamed over by the demo's update is read
afresh). It runs in a one-thread pool: HDF5 is not thread-safe, and the
demo's updates run in the same pool.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, List, Tuple

from twisted.python.threadpool import ThreadPool
from twisted.web import server
from twisted.web.wsgi import WSGIResource

__all__ = ["DapFiles", "listen"]

_PATH = re.compile(r"/([A-Za-z0-9_.-]+\.nc)\.([a-z]+(?:\.[a-z]+)?)")


class DapFiles:
    """A WSGI application: pydap's answers for the C{.nc} files of C{directory}."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        match = _PATH.fullmatch(path)
        if path in ("", "/"):
            names = sorted(p.name for p in self.directory.glob("*.nc"))
            return _text(start_response, "200 OK", "DAP datasets here (append .dds, .das, .dods):\n"
                         + "".join(f"  /{n}\n" for n in names))
        if match is None or not (self.directory / match.group(1)).is_file():
            return _text(start_response, "404 Not Found", f"no dataset at {path}\n")
        from pydap.handlers.netcdf_handler import NetCDFHandler

        return NetCDFHandler(str(self.directory / match.group(1)))(environ, start_response)


def _text(start_response: Callable, status: str, text: str) -> List[bytes]:
    body = text.encode("utf-8")
    headers: List[Tuple[str, str]] = [("Content-Type", "text/plain; charset=utf-8"),
                                      ("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [body]


def listen(reactor: Any, directory: Path, port: int, pool: ThreadPool, interface: str = "127.0.0.1") -> Any:
    """Serve C{directory} on C{interface:port}; the listening port (its
    C{stopListening} ends it). C{pool} must run one thread and be started."""
    site = server.Site(WSGIResource(reactor, pool, DapFiles(directory)))
    site.displayTracebacks = False
    site.noisy = False
    return reactor.listenTCP(port, site, interface=interface)
