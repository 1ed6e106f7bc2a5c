"""Many HTTP/1.1 keep-alive DAP clients in one asyncio process, for the load
rows of the reliability suite (tests/reliability/test_load_500.py).

Five hundred Python threads (or processes) would measure the load generator,
not the node: here every client is a coroutine holding one kept-alive
connection, and the whole load costs one process. The client is a minimal
HTTP/1.1 one (a request line, a Host header; a body by Content-Length or
chunked), enough for the proxy's answers and nothing more.

    python -m tests.reliability.loadgen SPEC.json OUT.json

SPEC (JSON):
  - ``targets``: ``[{"port": P, "clients": N}, ...]``: N clients on the
    proxy at 127.0.0.1:P each;
  - ``sources``: how many loopback addresses (127.0.0.2, 127.0.0.3, ...)
    the clients connect from, in turn; the proxy counts requests in
    progress per client address (``components.proxyng.max_per_client``,
    default 100), and 500 clients from one address are not 500 clients;
  - ``seconds``: how long the clients ask (after the start);
  - ``hot``: ``{path: file}``, the few paths every client asks for (cache
    hits), each with the file holding its expected body;
  - ``misses``: ``[{"prefix": "/datasets/m.dods?x", "file": F}, ...]``, the
    paths of misses: PREFIX followed by a number no request used before;
  - ``miss_share``: the share of requests that are misses (0-1);
  - ``seed``: for the clients' random choices.

OUT (JSON): ``hits`` and ``misses`` (latencies in seconds of the answers
whose body was equal to the expected one), ``errors`` (their count and the
first few), ``wrong`` (bodies not equal), ``elapsed``, ``per_target``
(answers per target port), ``connect`` (connection set-up latencies),
``cpu_s`` (the CPU seconds the load generator itself took).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

#: Seconds one request may take (the proxy's own answer timeout is 75 s).
REQUEST_TIMEOUT = 60.0
#: Errors kept word for word (the count is of all).
SAMPLE = 20


class HTTPFailure(Exception):
    """An answer that is not HTTP/1.1 as expected (or none at all)."""


async def read_response(reader: asyncio.StreamReader) -> Tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one response."""
    line = await reader.readline()
    if not line:
        raise HTTPFailure("connection closed before the status line")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HTTPFailure(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    length: Optional[int] = None
    chunked = False
    keep = parts[0] == b"HTTP/1.1"
    while True:
        header = await reader.readline()
        if not header:
            raise HTTPFailure("connection closed in the headers")
        if header in (b"\r\n", b"\n"):
            break
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep = value != b"close" if keep else value == b"keep-alive"
    if chunked:
        body = bytearray()
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HTTPFailure("connection closed in a chunked body (no last chunk)")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, bytes(body), keep
    if length is not None:
        return status, await reader.readexactly(length), keep
    return status, await reader.read(), False


class Load:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        self.seconds = float(spec["seconds"])
        self.sources = max(1, int(spec.get("sources", 1)))
        self.miss_share = float(spec.get("miss_share", 0.3))
        self.hot = {path: open(f, "rb").read() for path, f in spec["hot"].items()}
        self.hot_paths = sorted(self.hot)
        self.misses = [(m["prefix"], open(m["file"], "rb").read()) for m in spec["misses"]]
        self.fresh = itertools.count(1)
        self.hits: List[float] = []
        self.miss_times: List[float] = []
        self.connects: List[float] = []
        self.errors = 0
        self.error_sample: List[str] = []
        self.wrong = 0
        self.wrong_sample: List[str] = []
        self.per_target: Dict[str, int] = {}
        self.stop_at = 0.0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_sample) < SAMPLE:
            self.error_sample.append(text[:300])

    async def connect(self, port: int, source: str) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        began = time.monotonic()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), limit=1 << 20), REQUEST_TIMEOUT)
        self.connects.append(time.monotonic() - began)
        return reader, writer

    async def client(self, number: int, port: int) -> None:
        rnd = random.Random(f"{self.spec.get('seed', 1)}-{number}")
        source = f"127.0.0.{2 + number % self.sources}"
        conn: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        host = f"127.0.0.1:{port}".encode()
        while time.monotonic() < self.stop_at:
            if rnd.random() < self.miss_share:
                prefix, expected = self.misses[rnd.randrange(len(self.misses))]
                path, miss = f"{prefix}{next(self.fresh)}", True
            else:
                path = self.hot_paths[rnd.randrange(len(self.hot_paths))]
                expected, miss = self.hot[path], False
            try:
                if conn is None:
                    conn = await self.connect(port, source)
                reader, writer = conn
                began = time.monotonic()
                writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                status, body, keep = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
                took = time.monotonic() - began
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HTTPFailure, ValueError) as e:
                self.error(f"{path}: {type(e).__name__}: {e}")
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if not keep:
                conn[1].close()
                conn = None
            if status != 200:
                self.error(f"{path}: HTTP {status}: {body[:200]!r}")
                continue
            if body != expected:
                self.wrong += 1
                if len(self.wrong_sample) < SAMPLE:
                    self.wrong_sample.append(f"{path}: {len(body)} bytes, expected {len(expected)}")
                continue
            (self.miss_times if miss else self.hits).append(took)
            self.per_target[str(port)] = self.per_target.get(str(port), 0) + 1
        if conn is not None:
            conn[1].close()

    async def run(self) -> Dict[str, Any]:
        began = time.monotonic()
        self.stop_at = began + self.seconds
        clients = []
        number = 0
        for target in self.spec["targets"]:
            for _ in range(int(target["clients"])):
                clients.append(self.client(number, int(target["port"])))
                number += 1
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - began
        return {"hits": self.hits, "misses": self.miss_times, "connect": self.connects, "errors": self.errors,
                "errors_sample": self.error_sample, "wrong": self.wrong, "wrong_sample": self.wrong_sample,
                "elapsed": elapsed, "per_target": self.per_target, "clients": number,
                "cpu_s": time.process_time()}


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    out = asyncio.run(Load(spec).run())
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
