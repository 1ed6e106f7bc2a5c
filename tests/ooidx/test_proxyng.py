"""proxyng over real HTTP on loopback, against fake controller, csv and
attribute store components on a memory:// bus that keep to
docs/data-path.md (an answer is a stream to the proxy's listen address with
the request id as correlation id, or an error reply there)."""
from __future__ import annotations

import socket
import uuid
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

import magnet
from magnet import operation

from ooidx.node.bootstrap import declare_topology
from ooidx.errors import Forbidden, InvalidURL, UnknownDataset, UpstreamError, UpstreamTimeout
from ooidx.datapath.proxy import Proxy, ProxyError, parse_target

UP = "http://up.example.org/data"
DDS = b"Dataset {\n    Float64 time[time = 5];\n} sst;\n"
BIG = 24 * 1024 * 1024
#: The fake fetcher's stream chunks: small, so a stream that breaks after
#: 200 KB has sent body bytes (the default chunk would still be holding them).
CHUNK = 64 * 1024
EVIL_BODY = b"<html><script>document.cookie</script></html>"


def body_of(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


class FakeController:
    """route as the real controller answers it (docs/data-path.md), from a table."""

    def __init__(self, bus: magnet.Bus) -> None:
        self.bus = bus
        self.calls: List[Dict[str, Any]] = []
        self.writers: List[Any] = []
        self.records: List[Dict[str, Any]] = []
        self.registry: Dict[str, Dict[str, Any]] = {}
        self.routes = 0

    @operation
    def record(self, **kwargs: Any) -> None:
        self.records.append(kwargs)

    @operation
    def route(self, url: Optional[str] = None, dataset: Optional[str] = None, suffix: str = "",
              query: Optional[str] = None, method: str = "GET", address: Optional[str] = None,
              request_id: Optional[str] = None) -> Any:
        """route as the controller answers it: a name resolved from the registry it holds."""
        self.routes += 1
        if dataset is not None:
            record = self.registry.get(dataset)
            if record is None or record.get("status") == "purged":
                raise UnknownDataset(f"no dataset {dataset!r} is registered")
            url = record["url"] + suffix + ("?" + query if query is not None else "")
        return self._routed(url, method, dataset, address, request_id)

    def _routed(self, url: str, method: str = "GET", dataset: Optional[str] = None,
                address: Optional[str] = None, request_id: Optional[str] = None) -> Any:
        self.calls.append(dict(url=url, method=method, dataset=dataset, address=address, request_id=request_id))
        path = url.split("/data", 1)[1] if "/data" in url else url
        errors = {"/unknown": UnknownDataset, "/forbidden": Forbidden, "/invalid": InvalidURL,
                  "/upstream-error": UpstreamError, "/upstream-timeout": UpstreamTimeout}
        for prefix, exc in errors.items():
            if path.startswith(prefix):
                raise exc(f"fake: {prefix}")
        if path.startswith("/silent"):
            return {"via": "fetcher"}
        known = ("/ok", "/evil", "/manyheaders", "/notfound", "/chunked", "/big", "/midfail", "/chunkfail", "/short", "/stall", "/earlyfail")
        if not path.startswith(known):
            raise UpstreamError(f"fake: nothing at {path}")
        task.deferLater(reactor, 0, self._answer, path, method, address, request_id, url)
        return {"via": "fetcher"}

    def _answer(self, path: str, method: str, address: str, request_id: str, url: str = "x") -> Any:
        headers = [["Content-Type", "text/plain; charset=ascii"], ["X-Upstream", "one"], ["X-Upstream", "two"],
                   ["Connection", "close"], ["Keep-Alive", "timeout=5"], ["Proxy-Authenticate", "x"]]
        if path.startswith("/ok"):
            body = DDS + path.encode()
            return self._stream(address, request_id, 200, headers + [["Content-Length", str(len(body))]],
                                [] if method == "HEAD" else [body], length=len(body),
                                source="cache" if "cached" in path else "fetcher", url=url)
        if path.startswith("/evil"):
            return self._stream(address, request_id, 200,
                                [["Content-Type", "text/html"], ["Set-Cookie", "injected=1"],
                                 ["set-cookie2", "injected=2"], ["X-Odd", "a\x00b\x0bc\x1b"],
                                 ["X-Split", "a\rSet-Cookie: injected=3"], ["Bad Name", "x"],
                                 ["Content-Length", str(len(EVIL_BODY))]],
                                [EVIL_BODY], reason="OK\rSet-Cookie: injected=1")
        if path.startswith("/manyheaders"):
            return self._stream(address, request_id, 200, [[f"X-H-{i}", "v"] for i in range(400)], [b"x"])
        if path.startswith("/notfound"):
            return self._stream(address, request_id, 404, headers + [["Content-Length", "9"]], [b"not there"],
                                reason="Not Found Here")
        if path.startswith("/chunked"):
            return self._stream(address, request_id, 200, headers, [b"a" * 1000, b"b" * 1000])
        if path.startswith("/big"):
            body = body_of(BIG)
            chunks = [body[i:i + 65536] for i in range(0, BIG, 65536)]
            return self._stream(address, request_id, 200,
                                [["Content-Type", "application/octet-stream"], ["Content-Length", str(BIG)]],
                                chunks, length=BIG)
        if path.startswith("/midfail"):
            return self._stream(address, request_id, 200, headers + [["Content-Length", "1000000"]],
                                [b"x" * 200000], abort=True)
        if path.startswith("/chunkfail"):
            return self._stream(address, request_id, 200, headers, [b"x" * 200000], abort=True)
        if path.startswith("/earlyfail"):  # breaks before any byte of the body
            return self._stream(address, request_id, 200, headers + [["Content-Length", "100"]], [b"x"],
                                abort=True)
        if path.startswith("/short"):  # a complete stream with fewer bytes than declared
            return self._stream(address, request_id, 200, headers + [["Content-Length", "100"]], [b"x" * 50])
        if path.startswith("/stall"):
            writer = self.bus.open_stream(address, {"status": 200, "headers": [["Content-Length", "100000"]]},
                                          correlation_id=request_id, chunk_size=CHUNK)
            self.writers.append(writer)
            return writer.write(b"y" * 70000)
        raise UpstreamError(f"fake: nothing at {path}")

    @defer.inlineCallbacks
    def _stream(self, address: str, request_id: str, status: int, headers: list, chunks: list,
                length: Optional[int] = None, reason: str = "", abort: bool = False, source: str = "fetcher",
                url: str = "x") -> Any:
        meta = {"status": status, "reason": reason, "headers": headers, "url": url, "source": source,
                "length": length}
        writer = self.bus.open_stream(address, meta, correlation_id=request_id, chunk_size=CHUNK)
        self.writers.append(writer)
        for chunk in chunks:
            yield writer.write(chunk)
        if abort:
            yield writer.abort(UpstreamError("fake: broke mid-body"))
        else:
            yield writer.finish()


class FakeStore:
    def __init__(self) -> None:
        self.records = {"dataset:sst": {"name": "sst", "url": UP + "/ok/sst.nc", "status": "registered"},
                        "dataset:gone": {"name": "gone", "url": UP + "/ok/gone", "status": "purged"},
                        "dataset:with.dots": {"name": "with.dots", "url": UP + "/ok/dots", "status": "fetched"},
                        "dataset:hot": {"name": "hot", "url": UP + "/ok/cached/hot", "status": "fetched"}}
        self.gets = 0

    def records_by_name(self) -> Dict[str, Dict[str, Any]]:
        """The registry as the controller holds it in memory (the same records)."""
        return {key.split(":", 1)[1]: record for key, record in self.records.items()}

    @operation
    def get(self, key: str) -> Any:
        self.gets += 1
        if key not in self.records:
            raise KeyError(key)
        return self.records[key]


class FakeCSV:
    def __init__(self, bus: magnet.Bus) -> None:
        self.bus = bus
        self.calls: List[Dict[str, Any]] = []

    @operation
    @defer.inlineCallbacks
    def render(self, url: str, address: str, request_id: str, dataset: Optional[str] = None,
               method: str = "GET") -> Any:
        self.calls.append(dict(url=url, dataset=dataset, address=address, request_id=request_id))
        writer = self.bus.open_stream(address, {"status": 200, "headers": [["Content-Type", "text/csv"]],
                                                "source": "csv"}, correlation_id=request_id)
        yield writer.write(b"time\n0.0\n")
        yield writer.finish()


class Stack:
    def __init__(self, answer_timeout: float = 2.0, stream_idle_timeout: float = 1.0) -> None:
        self.bus = magnet.connect(f"memory://proxy-{uuid.uuid4().hex}", reactor, rpc_timeout=5,
                                  stream_idle_timeout=stream_idle_timeout)
        self.controller = FakeController(self.bus)
        self.store = FakeStore()
        self.csv = FakeCSV(self.bus)
        self.controller.registry = self.store.records_by_name()
        self.proxy = Proxy("proxyng", self.bus, node="node-a", port=0, interface="127.0.0.1",
                           answer_timeout=answer_timeout, lookup_timeout=3.0)
        self.pool = HTTPConnectionPool(reactor, persistent=True)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.bus.startService()
        yield declare_topology(self.bus)
        yield self.bus.serve("controller", self.controller)
        yield self.bus.serve("attribute_store", self.store)
        yield self.bus.serve("csv", self.csv)
        yield self.proxy.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.proxy.stopService()
        yield self.bus.stopService()

    @property
    def port(self) -> int:
        return self.proxy.port

    @defer.inlineCallbacks
    def get(self, path: str, method: str = "GET", headers: Optional[Dict[str, str]] = None) -> Any:
        response = yield treq.request(method, f"http://127.0.0.1:{self.port}{path}", headers=headers or {},
                                      pool=self.pool)
        content = yield response.content()
        return response.code, response.headers, content


@pytest_twisted.async_yield_fixture
async def stack() -> Any:
    s = Stack()
    await s.start()
    yield s
    await s.stop()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, read_delay: float = 0.0,
                 shutdown: bool = False) -> bytes:
    """Send raw bytes, return everything read until the server closes (or timeout)."""
    import time
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            return b"<<reset>>"
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        if read_delay:
            time.sleep(read_delay)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            chunks.append(b"<<timeout>>")
        except ConnectionResetError:
            chunks.append(b"<<reset>>")
        return b"".join(chunks)


def raw(port: int, data: bytes, **kw: Any) -> defer.Deferred:
    return deferToThread(raw_exchange, port, data, **kw)


def split_response(raw_bytes: bytes) -> tuple:
    head, _, body = raw_bytes.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: Dict[bytes, List[bytes]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return status, headers, body


# --------------------------------------------------------------------------- #
# parsing request targets (no network)


def test_parse_target_forward_and_by_name() -> None:
    t = parse_target(b"http://up.example.org/x.nc.dods?sst[0:1:2]&time>1")
    assert t.url == "http://up.example.org/x.nc.dods?sst[0:1:2]&time>1" and t.name is None
    t = parse_target(b"/datasets/sst.dds?time")
    assert (t.name, t.suffix, t.query) == ("sst", ".dds", "time")
    t = parse_target(b"/datasets/sst.nc.dods")
    assert (t.name, t.suffix, t.query) == ("sst.nc", ".dods", None)
    t = parse_target(b"/datasets/sst.dds?")
    assert t.query == ""
    t = parse_target(b"/datasets/sst")
    assert (t.name, t.suffix) == ("sst", "")
    assert parse_target(b"/datasets/sst.csv?time").csv
    # an absolute URI naming the proxy itself is by name
    t = parse_target(b"http://127.0.0.1:8100/datasets/sst.das", own=("127.0.0.1:8100",))
    assert (t.name, t.suffix) == ("sst", ".das")


@pytest.mark.parametrize("uri, status", [
    (b"file:///etc/passwd", 400),
    (b"ftp://host/x", 400),
    (b"http:///nohost", 400),
    (b"http://:80/x", 400),
    (b"http://user@host/x", 400),
    (b"gopher", 400),
    (b"/datasets/../etc/passwd", 400),
    (b"/datasets/..%2fetc", 400),
    (b"/datasets/a/b.dds", 400),
    (b"/datasets/.hidden.dds", 400),
    (b"/datasets/\xc3\xa9t\xc3\xa9.dds", 400),
    (b"/datasets/" + b"a" * 65 + b".dds", 400),
    (b"/datasets/sst.dds?\x00", 400),
    (b"http://host/a\x7fb", 400),
    (b"/other", 404),
    (b"/", 404),
    (b"/" + b"a" * 9000, 414),
])
def test_parse_target_refuses(uri: bytes, status: int) -> None:
    with pytest.raises(ProxyError) as info:
        parse_target(uri)
    assert info.value.status == status


# --------------------------------------------------------------------------- #
# answers passed on


@pytest_twisted.ensureDeferred
async def test_forward_proxy_passes_status_headers_and_body(stack: Stack) -> None:
    url = UP + "/ok/sst.nc.dds?time[0:1:2],lat&x=%22a%20b%22"
    data = await raw(stack.port, b"GET " + url.encode() + b" HTTP/1.1\r\nHost: up.example.org\r\n"
                     b"Connection: close\r\n\r\n")
    status, headers, body = split_response(data)
    assert status == 200
    assert body == DDS + url.split("/data", 1)[1].encode()
    assert headers[b"x-upstream"] == [b"one", b"two"]
    assert headers[b"content-type"] == [b"text/plain; charset=ascii"]
    assert b"keep-alive" not in headers and b"proxy-authenticate" not in headers
    assert headers[b"x-ooidx-source"] == [b"fetcher"]
    call = stack.controller.calls[-1]
    assert call["url"] == url  # the query string byte for byte
    assert call["method"] == "GET" and call["dataset"] is None
    assert call["address"].startswith("magnet.listen.") and len(call["request_id"]) == 32


@pytest_twisted.ensureDeferred
async def test_by_name_builds_the_url_from_the_registered_base(stack: Stack) -> None:
    data = await raw(stack.port, b"GET /datasets/sst.dds?time[0:1:2] HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    code, headers, body = split_response(data)
    assert code == 200
    call = stack.controller.calls[-1]
    assert call["url"] == UP + "/ok/sst.nc.dds?time[0:1:2]"
    assert call["dataset"] == "sst"
    assert body == DDS + b"/ok/sst.nc.dds?time[0:1:2]"
    code, _, _ = await stack.get("/datasets/with.dots.das")
    assert code == 200 and stack.controller.calls[-1]["url"] == UP + "/ok/dots.das"
    # the controller resolves the names (from its registry in memory): the proxy reads no record
    await stack.get("/datasets/sst.dds")
    assert stack.store.gets == 0
    assert stack.controller.routes == 3


@pytest_twisted.ensureDeferred
async def test_absolute_uri_to_the_proxy_itself_is_by_name(stack: Stack) -> None:
    data = await raw(stack.port, f"GET http://127.0.0.1:{stack.port}/datasets/sst.das HTTP/1.1\r\n"
                                 f"Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    assert split_response(data)[0] == 200
    assert stack.controller.calls[-1]["url"] == UP + "/ok/sst.nc.das"


@pytest_twisted.ensureDeferred
async def test_upstream_status_passed_on_with_the_standard_reason(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/notfound HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Not Found Here" not in data
    assert data.endswith(b"\r\n\r\nnot there")


@pytest_twisted.ensureDeferred
async def test_hostile_upstream_reason_headers_and_cookies(stack: Stack) -> None:
    """A reason phrase with CR in it, control characters in header values,
    cookies and HTML: the standard reason goes out, control characters are
    dropped, Set-Cookie never leaves, the answer is sandboxed."""
    data = await raw(stack.port, f"GET {UP}/evil HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"injected" not in head and b"Set-Cookie" not in head and b"set-cookie" not in head.lower()
    assert not any(b in head for b in (b"\x00", b"\x0b", b"\x1b", b"\r\r"))
    assert b"X-Odd: abc" in lines and b"Content-Security-Policy: sandbox" in lines
    assert b"Bad Name" not in head
    assert body == EVIL_BODY


@pytest_twisted.ensureDeferred
async def test_too_many_upstream_headers_are_a_502(stack: Stack) -> None:
    status, headers, body = await stack.get(f"/datasets/sst.das", headers={})  # the stack works
    assert status == 200
    data = await raw(stack.port, f"GET {UP}/manyheaders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 502 "), data[:200]
    assert b"BadAnswer" in data and b"X-H-1:" not in data


@pytest_twisted.ensureDeferred
async def test_head(stack: Stack) -> None:
    data = await raw(stack.port, b"HEAD /datasets/sst.dds HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    status, headers, body = split_response(data)
    assert status == 200 and body == b""
    assert headers[b"content-length"] == [str(len(DDS + b"/ok/sst.nc.dds")).encode()]
    assert stack.controller.calls[-1]["method"] == "HEAD"


@pytest_twisted.ensureDeferred
async def test_keep_alive_serves_several_requests_on_one_connection(stack: Stack) -> None:
    request = b"GET /datasets/sst.dds HTTP/1.1\r\nHost: localhost\r\n\r\n"
    data = await raw(stack.port, request + request + b"GET /datasets/sst.das HTTP/1.1\r\nHost: localhost\r\n"
                     b"Connection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.endswith(DDS + b"/ok/sst.nc.das")


@pytest_twisted.ensureDeferred
async def test_chunked_when_no_length(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/chunked HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    status, headers, body = split_response(data)
    assert headers[b"transfer-encoding"] == [b"chunked"]
    assert body.endswith(b"0\r\n\r\n") and body.count(b"a") == 1000


@pytest_twisted.ensureDeferred
async def test_csv_goes_to_the_csv_component(stack: Stack) -> None:
    code, headers, body = await stack.get("/datasets/sst.csv?time")
    assert code == 200 and body == b"time\n0.0\n"
    assert headers.getRawHeaders("Content-Type") == ["text/csv"]
    call = stack.csv.calls[-1]
    assert call["url"] == UP + "/ok/sst.nc.dods?time" and call["dataset"] == "sst"
    assert not stack.controller.calls


# --------------------------------------------------------------------------- #
# errors before the headers


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, status, kind", [
    ("/datasets/nosuch.dds", 404, "UnknownDataset"),
    ("/datasets/gone.dds", 404, "UnknownDataset"),
    (f"/p?u={UP}", 404, "NotFound"),
    ("/datasets/a%00b.dds", 400, "InvalidName"),
    ("/datasets/..%2F..%2Fetc.dds", 400, "InvalidName"),
    ("/datasets/%C3%A9.dds", 400, "InvalidName"),
])
async def test_by_name_errors(stack: Stack, path: str, status: int, kind: str) -> None:
    code, headers, body = await stack.get(path)
    assert code == status, body
    assert headers.getRawHeaders("Content-Type") == ["text/plain; charset=utf-8"]
    assert headers.getRawHeaders("X-Ooidx-Error") == [kind]
    assert body.endswith(b"\n") and len(body) < 400
    if path.endswith(".dds"):  # a DAP request: the DAP 2 error object
        assert headers.getRawHeaders("Content-Description") == ["dods_error"]
        assert body.startswith(f"Error {{\n    code = {status};\n    message = \"{kind}: ".encode()), body
    else:
        assert body.startswith(f"{status} ".encode())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, status, kind", [
    ("/unknown", 404, "UnknownDataset"),
    ("/forbidden", 403, "Forbidden"),
    ("/invalid", 400, "InvalidURL"),
    ("/upstream-error", 502, "UpstreamError"),
    ("/upstream-timeout", 504, "UpstreamTimeout"),
    ("/silent", 504, "GatewayTimeout"),
    ("/nothing-there", 502, "UpstreamError"),
])
async def test_remote_errors_become_statuses(stack: Stack, path: str, status: int, kind: str) -> None:
    data = await raw(stack.port, f"GET {UP}{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    code, headers, body = split_response(data)
    assert code == status, data
    assert headers[b"x-ooidx-error"] == [kind.encode()]
    assert headers[b"content-type"] == [b"text/plain; charset=utf-8"]
    assert int(headers[b"content-length"][0]) == len(body)


@pytest_twisted.ensureDeferred
async def test_no_controller_is_503(stack: Stack) -> None:
    await stack.bus.transport.delete_queue("controller")
    code, headers, body = await stack.get("/datasets/sst.dds")
    assert code == 503, body


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_other_methods_are_405(stack: Stack, method: str) -> None:
    code, headers, body = await stack.get("/datasets/sst.dds", method=method)
    assert code == 405
    assert headers.getRawHeaders("Allow") == ["GET, HEAD"]
    assert not stack.controller.calls


@pytest_twisted.ensureDeferred
async def test_connect_is_405(stack: Stack) -> None:
    data = await raw(stack.port, b"CONNECT up.example.org:443 HTTP/1.1\r\nHost: up.example.org:443\r\n"
                     b"Connection: close\r\n\r\n", timeout=3)
    assert split_response(data)[0] in (400, 405)


# --------------------------------------------------------------------------- #
# malformed HTTP


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9 extra\r\n\r\n",
    b"GET file:///etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET http:///etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /datasets/../../etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /datasets/a\x00b.dds HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "GET /datasets/\u00e9t\u00e9.dds HTTP/1.1\r\nHost: localhost\r\n\r\n".encode("utf-8"),
    b"GET /datasets/sst.dds HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /datasets/sst.dds HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /datasets/sst.dds HTTP/1.1\r\nHost: localhost\r\nbroken header line\r\n\r\n",
])
async def test_malformed_requests_get_4xx_and_never_reach_the_bus(stack: Stack, request_bytes: bytes) -> None:
    data = await raw(stack.port, request_bytes.replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n"),
                     timeout=3)
    # a 4xx, or (for requests too large to read) the connection cut
    assert data.startswith(b"HTTP/1.1 4") or (len(request_bytes) > 16000 and data in (b"", b"<<reset>>")), \
        data[:200]
    assert not stack.controller.calls
    assert stack.store.gets == 0


# --------------------------------------------------------------------------- #
# failures after the headers


@pytest_twisted.ensureDeferred
async def test_stream_error_after_headers_fails_the_transfer(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/midfail HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    status, headers, body = split_response(data.replace(b"<<reset>>", b""))
    assert status == 200 and headers[b"content-length"] == [b"1000000"]
    assert 0 < len(body) < 1000000  # closed short of the declared length


@pytest_twisted.ensureDeferred
async def test_stream_error_before_any_body_byte_is_502(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/earlyfail HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    status, headers, body = split_response(data)
    assert status == 502 and headers[b"x-ooidx-error"] == [b"UpstreamError"]
    assert b"x-upstream" not in headers


@pytest_twisted.ensureDeferred
async def test_stream_error_in_chunked_body_has_no_final_chunk(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/chunkfail HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    status, headers, body = split_response(data.replace(b"<<reset>>", b""))
    assert status == 200 and headers[b"transfer-encoding"] == [b"chunked"]
    assert not body.endswith(b"0\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_short_complete_stream_fails_the_transfer(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/short HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    status, headers, body = split_response(data.replace(b"<<reset>>", b""))
    assert status == 200 and len(body) == 50 and not data.endswith(b"<<timeout>>")


@pytest_twisted.ensureDeferred
async def test_stall_after_headers_fails_the_transfer(stack: Stack) -> None:
    data = await raw(stack.port, f"GET {UP}/stall HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), timeout=8)
    assert not data.endswith(b"<<timeout>>"), "the proxy must close a stalled transfer"
    status, headers, body = split_response(data.replace(b"<<reset>>", b""))
    assert status == 200 and len(body) == 65536


@pytest_twisted.ensureDeferred
async def test_curl_sees_a_failed_transfer(stack: Stack) -> None:
    from twisted.internet.utils import getProcessOutputAndValue
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "-o", "/dev/null", "--proxy", f"http://127.0.0.1:{stack.port}", UP + "/midfail"])
    assert code != 0, err
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "-o", "/dev/null", "--proxy", f"http://127.0.0.1:{stack.port}", UP + "/chunkfail"])
    assert code != 0, err


# --------------------------------------------------------------------------- #
# streaming with backpressure


@pytest_twisted.async_yield_fixture
async def patient_stack() -> Any:
    s = Stack(stream_idle_timeout=15.0)
    await s.start()
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_big_body_streams_with_backpressure(patient_stack: Stack) -> None:
    stack = patient_stack
    received: List[int] = []

    def slow_then_read() -> bytes:
        import time
        with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(f"GET {UP}/big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            time.sleep(2.0)  # read nothing: the proxy must hold the stream back
            received.append(stack.proxy.relayed)
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    data = await deferToThread(slow_then_read)
    status, headers, body = split_response(data)
    assert status == 200 and len(body) == BIG and body == body_of(BIG)
    # while the client read nothing, only a few MB (socket buffers, a chunk or two) went out
    assert received[0] < 8 * 1024 * 1024, received


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_body_releases_the_request(stack: Stack) -> None:
    def leave_early() -> None:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
            s.sendall(f"GET {UP}/big HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            s.recv(100000)

    await deferToThread(leave_early)
    for _ in range(100):
        if stack.proxy.active == 0:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert stack.proxy.active == 0


# --------------------------------------------------------------------------- #
# hot answers held at the proxy


async def _ticks(n: int = 5) -> None:
    for _ in range(n):
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_small_cache_answer_is_held_and_counted(stack: Stack) -> None:
    first = await stack.get("/datasets/hot.dds?x")
    assert first[0] == 200 and len(stack.controller.calls) == 1
    second = await stack.get("/datasets/hot.dds?x")
    assert len(stack.controller.calls) == 1, "the second request is answered at the proxy"
    assert second[0] == 200 and second[2] == first[2]
    for name in (b"Content-Type", b"X-Upstream", b"X-Ooidx-Source", b"Via", b"Content-Length"):
        assert second[1].getRawHeaders(name) == first[1].getRawHeaders(name), name
    head = await stack.get("/datasets/hot.dds?x", method="HEAD")  # a HEAD is its own answer
    assert head[0] == 200 and len(stack.controller.calls) == 2
    # not a cache answer: never held
    await stack.get("/datasets/sst.dds")
    await stack.get("/datasets/sst.dds")
    assert len(stack.controller.calls) == 4
    stack.proxy._record_answered()
    await _ticks()
    records = [r for r in stack.controller.records if r.get("count")]
    assert records == [dict(dataset="hot", url=UP + "/ok/cached/hot.dds?x", hit=True, bytes=len(first[2]),
                            status=200, count=1, requests=1)]


@pytest_twisted.ensureDeferred
async def test_held_answers_go_with_purge_and_change_events(stack: Stack) -> None:
    from ooidx import events

    async def asked(path: str) -> int:
        before = len(stack.controller.calls)
        response = await stack.get(path)
        assert response[0] == 200
        return len(stack.controller.calls) - before

    await asked("/datasets/hot.dds")
    assert await asked("/datasets/hot.dds") == 0
    await events.emit(stack.bus, "purged", "hot", url=UP + "/ok/cached/hot")
    await _ticks()
    assert await asked("/datasets/hot.dds") == 1, "dropped on event.purged"
    assert await asked("/datasets/hot.dds") == 0
    await events.emit(stack.bus, "cached", "hot", url=UP + "/ok/cached/hot.dds")
    await _ticks()
    assert await asked("/datasets/hot.dds") == 1, "dropped on event.cached of its URL"
    await stack.bus.send("cache.purge", magnet.rpc.request("purge", {"name": "hot", "base_url": None,
                                                                     "origin": "x"}))
    await _ticks()
    assert await asked("/datasets/hot.dds") == 1, "dropped on the caches' purge broadcast"
    stack.proxy.hot_ttl = 0.05
    await asked("/datasets/hot.dds?ttl")
    await task.deferLater(reactor, 0.1, lambda: None)
    assert await asked("/datasets/hot.dds?ttl") == 1, "held no longer than hot_ttl"


@pytest_twisted.ensureDeferred
async def test_stop_closes_keep_alive_connections() -> None:
    """A client holding a keep-alive connection does not keep a stopping proxy
    waiting: stop closes it (a Site's channels are wrappers whose transport is
    their wrapped channel's)."""
    stack = Stack()
    await stack.start()
    request = f"GET {UP}/ok HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    reading = raw(stack.port, request, timeout=20)
    await task.deferLater(reactor, 0.5, lambda: None)  # answered; the connection stays open
    assert stack.proxy._site is not None and stack.proxy._site.open_channels
    started = reactor.seconds()
    await stack.stop()
    data = await reading
    assert not data.endswith(b"<<timeout>>")
    assert data.startswith(b"HTTP/1.1 200")
    assert reactor.seconds() - started < 5


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_is_refused_on_the_proxy_port(stack: Stack) -> None:
    """The attack: a page whose name rebinds to 127.0.0.1 reads the proxy's
    own paths as its origin. The proxy port answers its paths only for its own
    names (421 otherwise); a forward-proxy request still names its upstream."""
    data = await raw(stack.port, b"GET /datasets/sst.dds HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    status, _, body = split_response(data)
    assert status == 421 and b"MisdirectedRequest" in body
    data = await raw(stack.port, b"GET /datasets/sst.dds HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert split_response(data)[0] == 200


@pytest_twisted.ensureDeferred
async def test_the_proxy_port_takes_endpoint_strings_tls_and_allowed_hosts(tmp_path: Any) -> None:
    """http.proxy_port as an ssl: endpoint string: the proxy speaks https with
    the configured key and certificate; the names of http.allowed_hosts are
    answered on its own paths, any other name still gets 421."""
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
    from twisted.web.http_headers import Headers

    from ooidx.config import load
    from tests.rabbitmq import TestCA

    ca = TestCA(tmp_path / "ca", name="ooidx proxy test CA")
    cert, key = ca.issue("proxy", hostnames=("127.0.0.1", "localhost"))
    path = tmp_path / "dx.yaml"
    path.write_text(f"http: {{proxy_port: 'ssl:0:privateKey={key}:certKey={cert}', allowed_hosts: [dx.example.org]}}\n"
                    f"data_dir: {tmp_path / 'data'}\n")
    stack = Stack()
    stack.proxy = Proxy.from_config("proxyng", stack.bus, load(str(path), environ={}), node="node-a", answer_timeout=2.0, lookup_timeout=3.0)
    await stack.start()
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        assert stack.proxy.url.startswith("https://127.0.0.1:") and stack.proxy.port != 0
        with open(ca.cert_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
        url = (stack.proxy.url + "/datasets/sst.dds").encode()
        response = await agent.request(b"GET", url)
        assert response.code == 200, await treq.content(response)
        assert (await treq.content(response)).startswith(DDS)
        response = await agent.request(b"GET", url, Headers({"Host": ["dx.example.org"]}))
        assert response.code == 200
        await treq.content(response)
        response = await agent.request(b"GET", url, Headers({"Host": ["evil.example"]}))
        assert response.code == 421
        await treq.content(response)
    finally:
        await pool.closeCachedConnections()
        await stack.stop()
