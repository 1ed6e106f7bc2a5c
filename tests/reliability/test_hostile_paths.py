"""URL paths that escape a directory base, and CSV cells that a spreadsheet
would run, against a real `twistd -n ooidx` node (memory://, every
component, only the hostile upstream's loopback port allowed).

The hostile upstream (a threaded http.server on loopback) resolves a path the
lenient way real servers do: percent-decoded (WSGI servers turn ``%2f`` into
``/``; some decode twice), ``;params`` dropped from each segment (Tomcat, which
runs Hyrax and THREDDS: ``..;/`` is ``..``), ``\\`` taken for ``/`` (IIS),
NFKC-folded, then normalised. So ``/a/..%2fb/secret.nc.dds`` really is
``/b/secret.nc.dds`` there (the test shows it, asking the upstream directly).
With ``dir`` registered as ``http://HOST/a/``, every escape of
tests/fast/core/test_url_paths.py is tried through the forward proxy, as a
base URL to register, and by name and as CSV: each must get a clear 4xx, and
the upstream's log must show no request that resolves outside ``/a/``.

The same upstream serves ``/f/cells.nc.dods``: text cells starting with
``= + - @``, tab, CR (tests/fast/datapath/dods_bytes.py). Through the
exchange's ``.csv`` every such cell must go out escaped, and no field of the
file, read with ``,`` ``;`` or tab as the separator, may start a formula.

One JSON line per scenario (tests/reliability/results.py).
"""
from __future__ import annotations

import csv
import http.server
import io
import posixpath
import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set
from urllib.parse import unquote

import pytest

from tests.fast.core.test_url_paths import ESCAPES
from tests.fast.datapath.dods_bytes import ALL_CELLS, HOSTILE_CELLS, PLAIN_CELLS, SPLIT_CELLS, VALUES, dods, \
    formula_fields
from tests.reliability.hostile_node import Node, raw_exchange, start_node, status_of, stop_node
from tests.reliability.results import record

INSIDE = b"INSIDE /a/\n"
SECRET = b"SECRET outside /a/\n"


def interpretations(raw_path: str) -> Set[str]:
    """Every path a lenient server might resolve C{raw_path} to."""
    out = set()
    for rounds in (1, 2, 3):
        for tomcat in (False, True):
            path = raw_path
            if tomcat:  # path parameters go before decoding
                path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
            for _ in range(rounds):
                path = unquote(path, errors="replace")
            for p in (path, path.replace("\\", "/"), unicodedata.normalize("NFKC", path).replace("\\", "/")):
                if tomcat:
                    p = "/".join(segment.split(";", 1)[0] for segment in p.split("/"))
                out.add(posixpath.normpath("/" + p.lstrip("/")))
    return out


class HostileUpstream:
    """Files under /a/ and /b/, resolved the lenient way; /f/cells.nc.dods; a log of every request."""

    def __init__(self, root: Path) -> None:
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "a" / "inside.nc.dds").write_bytes(INSIDE)
        (root / "b" / "secret.nc.dds").write_bytes(SECRET)
        self.root = root
        self.requests: List[str] = []
        self.served_outside: List[str] = []
        cells = dods()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                raw = self.path.split("?", 1)[0]
                upstream.requests.append(self.path)
                if raw == "/f/cells.nc.dods":
                    return self._answer(200, cells, "application/octet-stream")
                resolved = sorted(interpretations(raw))
                if any(not p.startswith("/a/") for p in resolved):
                    upstream.served_outside.append(self.path)
                for p in resolved:  # the most lenient reading that names a file wins
                    f = upstream.root / p.lstrip("/")
                    if f.is_file():
                        return self._answer(200, f.read_bytes(), "text/plain")
                return self._answer(404, b"no such file\n", "text/plain")

            do_HEAD = do_GET

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile-paths")
    up = HostileUpstream(root / "up")
    (root / "node").mkdir()
    node = None
    try:
        node = start_node(root / "node", "hpath", upstream_port=up.port)
        yield {"node": node, "upstream": up}
    finally:
        if node is not None:
            stop_node(node)
        up.close()


def _raw_get(port: int, target: bytes, timeout: float = 30) -> bytes:
    return raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=timeout)


def _body(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


def test_directory_base_cannot_be_escaped(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    up: HostileUpstream = world["upstream"]
    # the escape is real at this upstream: asked directly, it serves the file outside /a/
    for tail in ("..%2fb/secret.nc.dds", "..;/b/secret.nc.dds", "..%5cb/secret.nc.dds", "%252e%252e/b/secret.nc.dds"):
        answer = _raw_get(up.port, f"/a/{tail}".encode())
        assert status_of(answer) == 200 and _body(answer) == SECRET, (tail, answer[:200])
    up.requests.clear()
    up.served_outside.clear()

    status, answer = node.register("dir", up.url("/a/"), check=False)
    assert status == 201, answer
    status, answer = node.register("inside", up.url("/a/inside.nc"), check=False)
    assert status == 201, answer
    # what is under /a/ is served, forward and by name
    answer = _raw_get(node.proxy_port, up.url("/a/inside.nc.dds").encode())
    assert status_of(answer) == 200 and _body(answer) == INSIDE, answer[:300]
    status, _, body = node.proxy_get("/datasets/inside.dds")
    assert status == 200 and body == INSIDE, (status, body)
    good_requests = len(up.requests)

    statuses: Dict[str, Dict[Any, int]] = {"forward": {}, "register": {}, "by-name": {}, "csv": {}}
    bad: List[Any] = []
    leaked: List[Any] = []
    for i, (what, tail) in enumerate(ESCAPES):
        url = up.url("/a/") + tail
        answer = _raw_get(node.proxy_port, url.encode("utf-8"))
        s = status_of(answer)
        statuses["forward"][s] = statuses["forward"].get(s, 0) + 1
        if s is None or not 400 <= s < 500:
            bad.append(("forward", what, s, answer[:200]))
        if SECRET in answer:
            leaked.append(("forward", what))
        status, reply = node.register(f"esc{i}", url, check=False)  # the registry's path rule, not the upstream
        statuses["register"][status] = statuses["register"].get(status, 0) + 1
        if not 400 <= status < 500:
            bad.append(("register", what, status, reply))
        for kind, suffix in (("by-name", ".dds"), ("csv", ".csv")):
            status, _, body = node.proxy_get(f"/datasets/esc{i}{suffix}")
            statuses[kind][status] = statuses[kind].get(status, 0) + 1
            if not 400 <= status < 500:
                bad.append((kind, what, status, body[:200]))
            if SECRET in body:
                leaked.append((kind, what))
    time.sleep(0.5)
    escapes_upstream = [r for r in up.requests[good_requests:]]
    tracebacks = node.tracebacks()
    lost = len(up.served_outside) + len(leaked)
    errors = len(bad) + len(tracebacks)
    tried = 4 * len(ESCAPES)
    record("hostile", "paths-directory-escape", inputs_tried=tried, lost=lost, errors=errors,
           notes=f"dir registered as http://HOST/a/ on a lenient loopback upstream that serves /b/secret for "
                 f"..%2f, ..;/, ..%5c, %252e%252e when asked directly; {len(ESCAPES)} escapes (encoded / \\ ;, "
                 f"double/triple encoding, overlong UTF-8, NFKC dots, %u, NUL) forward {statuses['forward']}, "
                 f"as base URLs {statuses['register']}, then by name {statuses['by-name']} and as CSV "
                 f"{statuses['csv']}; requests reaching the upstream for them: {len(escapes_upstream)}, "
                 f"resolving outside /a/: {len(up.served_outside)}; secret bytes to a client: {len(leaked)}")
    assert not bad, bad
    assert not leaked, leaked
    assert not up.served_outside, up.served_outside
    assert not escapes_upstream, escapes_upstream
    assert not tracebacks, tracebacks[:5]
    # the refusal says why
    answer = _raw_get(node.proxy_port, (up.url("/a/") + "..%2fb/secret.nc.dds").encode())
    assert status_of(answer) == 400 and b"encoded /" in _body(answer), answer[:400]


def test_formula_cells_are_escaped(world: Dict[str, Any]) -> None:
    node: Node = world["node"]
    up: HostileUpstream = world["upstream"]
    status, answer = node.register("cells", up.url("/f/cells.nc"), check=False)
    assert status == 201, answer
    status, headers, body = node.proxy_get("/datasets/cells.csv")
    assert status == 200, (status, body[:300])
    assert headers.get("content-type", "").startswith("text/csv")
    text = body.decode("utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    expected = ["'" + c for c in HOSTILE_CELLS] + list(SPLIT_CELLS) + list(PLAIN_CELLS)
    labels = [r[0] for r in rows[1:]]
    wrong = [(want, got) for want, got in zip(expected, labels) if want != got]
    wrong += [("a row", "missing")] * abs(len(expected) - len(labels))
    numbers_changed = [r[1] for r, v in zip(rows[1:], VALUES) if float(r[1]) != v or not re.fullmatch(r"-[0-9.]+", r[1])]
    live = formula_fields(text)
    escaped = sum(1 for c in HOSTILE_CELLS if "'" + c in labels)
    tracebacks = node.tracebacks()
    errors = len(wrong) + len(numbers_changed) + len(live) + len(tracebacks)
    record("hostile", "csv-formula-cells", inputs_tried=len(ALL_CELLS), errors=errors,
           notes=f"a loopback upstream's .dods with {len(HOSTILE_CELLS)} text cells starting with = + - @ tab CR "
                 f"(HYPERLINK, DDE cmd|), {len(SPLIT_CELLS)} with a formula after ; or tab, {len(PLAIN_CELLS)} plain "
                 f"(-1.5, +3, text) and a Float64 column of negatives, through /datasets/cells.csv: "
                 f"{escaped}/{len(HOSTILE_CELLS)} escaped with ', plain cells and negative numbers unchanged ({len(numbers_changed)} numbers "
                 f"changed); fields that start a formula when read with , ; or tab as separator: {len(live)}")
    assert not wrong, wrong
    assert not numbers_changed, numbers_changed
    assert not live, live
    assert not tracebacks, tracebacks[:5]
