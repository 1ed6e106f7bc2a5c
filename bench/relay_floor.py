"""What any relay costs on this machine: a sender, a receiver, and between them
nothing or the cheapest relay there is (a process moving the bytes with
splice(2) through a pipe, no Python per byte).

    python bench/relay_floor.py [GIB [ROUNDS]] [--check]

Each round sends GIB GiB (default 1) from one process to another over
loopback TCP, directly and through the relay, and prints the MB/s, the
ratio and the receiver's CPU seconds per GiB. With C{--check} the receiver
checks every byte as C{bench.proxy_bench}'s downloader does (byte i is
i % 251, compared a chunk of up to 1 MiB at a time, in Python): the regime
of the proxy's 128 MiB rows, where the receiver's own work per byte is larger. With three busy processes on two
cores, the ratio is the ceiling of what a proxy's miss can reach against the
upstream asked directly (docs/benchmarks.md, "Socket to socket"). Linux only.
"""
from __future__ import annotations

import fcntl
import os
import resource
import socket
import sys
import time

BLOCK = 1 << 20


def _listen() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


#: byte i of a checked body is i % 251 (as the proxy bench's upstream sends it)
PATTERN = bytes(range(251)) * (BLOCK // 251 + 2)


def _sender(size: int) -> int:
    """Fork a process that sends C{size} bytes to the first connection; its port."""
    listener = _listen()
    port = listener.getsockname()[1]
    if os.fork() == 0:
        conn, _ = listener.accept()
        data = memoryview(PATTERN)
        sent = 0
        while sent < size:
            start = sent % 251
            sent += conn.send(data[start:start + min(BLOCK, size - sent)])
        conn.close()
        os._exit(0)
    listener.close()
    return port


def _relay(upstream: int) -> int:
    """Fork a process that splices everything from C{upstream} to its first client; its port."""
    listener = _listen()
    port = listener.getsockname()[1]
    if os.fork() == 0:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as twisted.web sets it
        up = socket.create_connection(("127.0.0.1", upstream))
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, BLOCK)
        while True:
            n = os.splice(up.fileno(), w, BLOCK)
            if n == 0:
                break
            while n:
                n -= os.splice(r, client.fileno(), n, flags=getattr(os, "SPLICE_F_MORE", 4))
        client.close()
        os._exit(0)
    listener.close()
    return port


def forwarder(host: str, port: int) -> tuple:
    """Fork the cheapest HTTP hop there is, for C{bench/miss_cpu.py}'s C{floor}
    mode: one connection at a time, the request's head passed to a new
    connection to C{host:port}, the answer's head back, and its body
    (C{Content-Length} bytes) spliced socket -> pipe -> socket. Returns (pid, port)."""
    listener = _listen()
    mine = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, BLOCK)
        while True:
            client, _ = listener.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = b""
            while b"\r\n\r\n" not in head:
                piece = client.recv(65536)
                if not piece:
                    break
                head += piece
            if not head:
                client.close()
                continue
            up = socket.create_connection((host, port))
            up.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += up.recv(65536)
            end = answer.index(b"\r\n\r\n") + 4
            length = 0
            for line in answer[:end].split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            client.sendall(answer)
            left = length - (len(answer) - end)
            try:
                while left > 0:
                    n = os.splice(up.fileno(), w, min(BLOCK, left))
                    if n == 0:
                        break
                    left -= n
                    while n:
                        n -= os.splice(r, client.fileno(), n, flags=getattr(os, "SPLICE_F_MORE", 4) if left else 0)
            except OSError:
                pass
            up.close()
            client.close()
    listener.close()
    return pid, mine


def _receive(port: int, check: bool = False) -> tuple:
    s = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(BLOCK))
    reader = s.makefile("rb", buffering=BLOCK) if check else None
    got = 0
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    while True:
        if reader is not None:
            chunk = reader.read(BLOCK)  # (as http.client reads a body: up to 1 MiB, whole)
            n = len(chunk)
            if n and PATTERN[got % 251:got % 251 + n] != chunk:
                raise SystemExit(f"the body differs within bytes {got}-{got + n}")
        else:
            n = s.recv_into(buf)
        if not n:
            break
        got += n
    elapsed, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    s.close()
    while True:  # reap the sender and the relay
        try:
            os.wait()
        except ChildProcessError:
            break
    return got / elapsed / 1e6, cpu / (got / (1 << 30))


def main() -> None:
    check = "--check" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--check"]
    size = int(float(args[0] if args else 1) * (1 << 30))
    rounds = int(args[1]) if len(args) > 1 else 3
    for _ in range(rounds):
        direct, direct_cpu = _receive(_sender(size), check)
        relayed, relayed_cpu = _receive(_relay(_sender(size)), check)
        print(f"direct {direct:6.0f} MB/s   spliced relay {relayed:6.0f} MB/s   ratio {relayed / direct:.2f}   "
              f"receiver CPU s/GiB {direct_cpu:.2f} / {relayed_cpu:.2f}", flush=True)


if __name__ == "__main__":
    main()
