"""A real DAP upstream for the tests: netCDF files made with netCDF4, served
by pydap's own server (``pydap.wsgi.app.DapServer``) under twisted.web's
WSGI container, in a subprocess on a loopback port.

    files = make_files(tmp_path / "data")         # {"sst": path, ...}
    with Upstream(tmp_path / "data") as up:
        up.url("sst.nc")                          # http://127.0.0.1:PORT/sst.nc

Besides pydap's answers, the server has two paths of its own:

  - ``/broken/NAME.SUFFIX``: pydap's answer for ``/NAME.SUFFIX``, with its
    full Content-Length declared, but the connection is closed after half
    of the body (an upstream that fails mid-body);
  - ``/big/SIZE.bin``: SIZE bytes (a static-looking large file, streamed
    from a generator with backpressure), for the benchmark;
  - ``/pattern/SIZE.bin``: the same, but byte i is ``i % 251``
    (L{pattern_bytes}), so a body spliced from two transfers shows.
    ``?rate=N`` (on /big/ and /pattern/) sends at about N bytes a second
    (a slow upstream, so that a download is long in progress).

Run as a script it serves DIR and prints ``PORT <n>`` once listening:

    python tests/ooidx/dap_upstream.py DIR [--port N]
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

HERE = Path(__file__).resolve()

#: What the made files hold (so that the tests can compare with netCDF4).
TIME = 5
LAT = 4
LONG = 200_000


def pattern_bytes(size: int, offset: int = 0) -> bytes:
    """The body of ``/pattern/SIZE.bin`` (from C{offset}): byte i is i % 251."""
    start = offset % 251
    reps = (start + size) // 251 + 1
    return (bytes(range(251)) * reps)[start:start + size]


def make_files(directory: Path) -> Dict[str, Path]:
    """Write the test datasets; returns name -> path.

    - ``sst.nc``: a 1-D coordinate variable ``time`` (float64, 5), a
      coordinate variable ``lat`` (float32, 4) and a 2-D variable
      ``sst(time, lat)`` (float32), with attributes.
    - ``series.nc``: ``time`` (5) and a 1-D variable ``depth(time)`` (int32).
    - ``long.nc``: ``time`` (float64, LONG): a .dods of about 1.6 MB, whose
      broken copy fails well after the first bytes have reached a client.
    """
    import netCDF4
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    sst_path = directory / "sst.nc"
    with netCDF4.Dataset(sst_path, "w") as ds:
        ds.title = "ooidx test sea surface temperature"
        ds.createDimension("time", TIME)
        ds.createDimension("lat", LAT)
        t = ds.createVariable("time", "f8", ("time",))
        t.units = "days since 2000-01-01"
        t[:] = np.arange(TIME, dtype="f8") * 1.5
        lat = ds.createVariable("lat", "f4", ("lat",))
        lat.units = "degrees_north"
        lat[:] = np.linspace(-30, 30, LAT, dtype="f4")
        sst = ds.createVariable("sst", "f4", ("time", "lat"))
        sst.units = "degC"
        sst[:] = (np.arange(TIME * LAT, dtype="f4").reshape(TIME, LAT) / 4.0) + 10.0
    series_path = directory / "series.nc"
    with netCDF4.Dataset(series_path, "w") as ds:
        ds.createDimension("time", TIME)
        t = ds.createVariable("time", "f8", ("time",))
        t[:] = np.arange(TIME, dtype="f8")
        depth = ds.createVariable("depth", "i4", ("time",))
        depth[:] = np.arange(TIME, dtype="i4") * 10 - 3
    long_path = directory / "long.nc"
    with netCDF4.Dataset(long_path, "w") as ds:
        ds.createDimension("time", LONG)
        t = ds.createVariable("time", "f8", ("time",))
        t[:] = np.arange(LONG, dtype="f8")
    return {"sst": sst_path, "series": series_path, "long": long_path}


class Upstream:
    """pydap's server on 127.0.0.1 in a subprocess; stopped on exit."""

    def __init__(self, directory: Path, port: int = 0, startup_timeout: float = 30.0) -> None:
        self.directory = Path(directory)
        self.proc = subprocess.Popen([sys.executable, str(HERE), str(self.directory), "--port", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.port = self._read_port(startup_timeout)

    def _read_port(self, timeout: float) -> int:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(0.1):
                line = self.proc.stdout.readline()
                if line.startswith("PORT "):
                    return int(line.split()[1])
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        self.stop()
        raise RuntimeError(f"the DAP upstream did not start: {err[-3000:]}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> "Upstream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------- #
# the server process


def _serve(directory: str, port: int) -> None:  # pragma: no cover - runs in the subprocess
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool
    from twisted.web import resource, server
    from twisted.web.wsgi import WSGIResource

    from pydap.wsgi.app import DapServer

    # one thread: netCDF4 (HDF5) is not thread-safe, and concurrent reads crash the server
    pool = ThreadPool(minthreads=1, maxthreads=1, name="pydap")
    pool.start()
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    app = DapServer(directory)
    pydap = WSGIResource(reactor, pool, app)

    def pydap_body(path: bytes, query: bytes) -> tuple:
        """pydap's status, headers and body for a path (in a thread)."""
        env = {"REQUEST_METHOD": "GET", "PATH_INFO": path.decode("latin-1"), "QUERY_STRING": query.decode("latin-1"),
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(port), "SCRIPT_NAME": "", "wsgi.url_scheme": "http",
               "wsgi.input": __import__("io").BytesIO(), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
               "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
               "SERVER_PROTOCOL": "HTTP/1.1"}
        status_headers: list = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            status_headers[:] = [status, headers]
            return lambda data: None

        chunks = app(env, start_response)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return status_headers[0], status_headers[1], body

    class Broken(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> Any:
            from twisted.internet.threads import deferToThreadPool
            path = b"/" + b"/".join(request.postpath)
            query = request.uri.partition(b"?")[2]
            d = deferToThreadPool(reactor, pool, pydap_body, path, query)

            def answer(result: tuple) -> None:
                status, headers, body = result
                request.setResponseCode(int(status.split()[0]))
                for name, value in headers:
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        request.setHeader(name, value)
                request.setHeader(b"content-length", str(len(body)).encode())
                request.write(body[: len(body) // 2])
                reactor.callLater(0.05, request.channel.transport.loseConnection)

            d.addCallback(answer)
            return server.NOT_DONE_YET

    class Big(resource.Resource):
        isLeaf = True

        def __init__(self, pattern: bool = False) -> None:
            super().__init__()
            self.pattern = pattern

        def render_GET(self, request: server.Request) -> Any:
            name = request.postpath[-1] if request.postpath else b""
            try:
                size = int(name.split(b".")[0])
            except ValueError:
                request.setResponseCode(404)
                return b"no such file\n"
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(size).encode())
            block = b"\xab" * (256 * 1024)
            pattern = self.pattern
            try:
                rate = float(request.args.get(b"rate", [b"0"])[0])
            except ValueError:
                rate = 0.0

            class Producer:
                sent = 0
                paused = False

                scheduled = False

                def resumeProducing(self) -> None:
                    self.paused = False
                    if rate > 0 and self.scheduled:
                        return  # the next slow piece is already timed
                    self._more()

                def _more(self) -> None:
                    # a few blocks a turn of the reactor, so that the transport gets to say "pause"
                    self.scheduled = False
                    if rate > 0:
                        return self._slow()
                    for _ in range(16):
                        if self.paused or self.sent >= size:
                            break
                        n = min(len(block), size - self.sent)
                        piece = pattern_bytes(n, self.sent) if pattern else block[:n]
                        self.sent += len(piece)
                        request.write(piece)
                    if self.sent >= size:
                        if not request.finished and request.channel is not None:
                            request.unregisterProducer()
                            request.finish()
                    elif not self.paused and not self.scheduled:
                        self.scheduled = True
                        reactor.callLater(0, self._more)

                def _slow(self) -> None:
                    # one 64 KiB piece, then a pause that keeps to the rate
                    if self.paused or request.finished or request.channel is None:
                        return
                    n = min(65536, size - self.sent)
                    request.write(pattern_bytes(n, self.sent) if pattern else block[:n])
                    self.sent += n
                    if self.sent >= size:
                        request.unregisterProducer()
                        request.finish()
                    elif not self.scheduled:
                        self.scheduled = True
                        reactor.callLater(n / rate, self._more)

                def pauseProducing(self) -> None:
                    self.paused = True

                def stopProducing(self) -> None:
                    self.paused = True
                    self.sent = size

            producer = Producer()
            request.registerProducer(producer, True)
            reactor.callLater(0, producer.resumeProducing)
            return server.NOT_DONE_YET

        render_HEAD = render_GET

    class Root(resource.Resource):
        def getChild(self, path: bytes, request: server.Request) -> Any:
            if path == b"broken":
                return Broken()
            if path == b"big":
                return Big()
            if path == b"pattern":
                return Big(pattern=True)
            request.prepath.pop()
            request.postpath.insert(0, path)
            return pydap

    site = server.Site(Root())
    site.noisy = False
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    print(f"PORT {listening.getHost().port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--make", action="store_true", help="write the test files into DIRECTORY first")
    options = parser.parse_args()
    if options.make:
        make_files(Path(options.directory))
    _serve(options.directory, options.port)
