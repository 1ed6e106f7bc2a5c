"""What any relay costs on this machine: a sender, a receiver, and between them
nothing or the cheapest relay there is (a process moving the bytes with
splice(2) through a pipe, no Python per byte).

    python bench/relay_floor.py [GIB [ROUNDS]]

Each round sends GIB GiB (default 1) from one process to another over
loopback TCP, directly and through the relay, and prints the MB/s, the
ratio and the receiver's CPU seconds per GiB. With three busy processes on two
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


def _sender(size: int) -> int:
    """Fork a process that sends C{size} bytes to the first connection; its port."""
    listener = _listen()
    port = listener.getsockname()[1]
    if os.fork() == 0:
        conn, _ = listener.accept()
        data = memoryview(os.urandom(BLOCK))
        sent = 0
        while sent < size:
            sent += conn.send(data[:min(BLOCK, size - sent)])
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


def _receive(port: int) -> tuple:
    s = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(BLOCK))
    got = 0
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    while True:
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
    size = int(float(sys.argv[1] if len(sys.argv) > 1 else 1) * (1 << 30))
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for _ in range(rounds):
        direct, direct_cpu = _receive(_sender(size))
        relayed, relayed_cpu = _receive(_relay(_sender(size)))
        print(f"direct {direct:6.0f} MB/s   spliced relay {relayed:6.0f} MB/s   ratio {relayed / direct:.2f}   "
              f"receiver CPU s/GiB {direct_cpu:.2f} / {relayed_cpu:.2f}", flush=True)


if __name__ == "__main__":
    main()
