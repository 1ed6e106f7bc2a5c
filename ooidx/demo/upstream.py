"""The demo's DAP upstream: pydap's netCDF handler under twisted.web.

pydap's core (a runtime dependency already) answers C{.das}, C{.dds},
C{.dods}, C{.dmr}, C{.ascii}, ... for one file through its
C{NetCDFHandler}, a WSGI application; its server (C{pydap[server]}, with
gunicorn and more) is not needed: L{DapFiles} maps C{/NAME.nc.SUFFIX} to
the file C{NAME.nc} of a directory and hands the request to a handler made
for that request (so a file renamed over by the demo's update is read
afresh). It runs in a one-thread pool: HDF5 is not thread-safe, and the
demo's updates run in the same pool. L{serve} is its process
(C{python -m ooidx.demo.upstream DIR PORT EVERY}), apart from the daemon's.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, List, Tuple

from twisted.python.threadpool import ThreadPool
from twisted.web import server
from twisted.web.wsgi import WSGIResource

__all__ = ["DapFiles", "listen", "serve"]

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


# --------------------------------------------------------------------------- #
# the upstream's own process


def serve(directory: Path, port: int, every: float, out: Any = None) -> None:  # pragma: no cover - a subprocess
    """Serve C{directory} on 127.0.0.1:C{port} and write new values every
    C{every} seconds (the first half a period in), until SIGTERM. Prints
    C{LISTENING} once it listens, C{STEP n} after each update. A process of
    its own: the daemon's persister writes netCDF files too, and the netCDF
    library must not be used from two threads of one process."""
    import os
    import signal
    import sys
    import time

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.internet.threads import deferToThreadPool

    from ooidx.demo import sample

    out = out or sys.stdout
    pool = ThreadPool(minthreads=1, maxthreads=1, name="ooidx-demo-upstream")
    pool.start()
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    try:
        listen(reactor, directory, port, pool)
    except Exception as e:  # noqa: BLE001 - said on stderr, status 2
        sys.stderr.write(f"{e}\n")
        pool.stop()
        raise SystemExit(2)
    step = [0]

    def said(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def update() -> Any:
        step[0] += 1
        d = deferToThreadPool(reactor, pool, sample.write_all, directory, step[0])
        d.addCallbacks(lambda _: said(f"STEP {step[0]} {time.strftime('%H:%M:%S')}"),
                       lambda f: said(f"FAILED cannot write new values: {f.getErrorMessage()}"))
        return d

    loop = LoopingCall(update)
    reactor.callLater(every / 2, loop.start, every, True)
    parent = os.getppid()

    def orphaned() -> None:  # the demo is gone (killed): so is its upstream
        if os.getppid() != parent:
            reactor.stop()

    LoopingCall(orphaned).start(1.0, now=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the demo, which stops this process
    reactor.callWhenRunning(said, "LISTENING")
    reactor.run()
    out.flush()
    os._exit(0)  # no thread left behind can keep a stopped upstream alive


if __name__ == "__main__":  # pragma: no cover
    import sys as _sys

    serve(Path(_sys.argv[1]), int(_sys.argv[2]), float(_sys.argv[3]))
