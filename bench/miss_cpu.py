"""CPU seconds per GiB of the 128 MiB rows of C{bench.proxy_bench}, outside the harness.

    python bench/miss_cpu.py MODES [DOWNLOADS [REPEATS]]

MODES: a comma-separated list of C{direct} (pydap asked directly), C{floor}
(pydap through the cheapest HTTP hop there is: C{bench.relay_floor.forwarder},
the body spliced, no Python per byte; "node" is that hop), C{nostore}
(row 7: the node whose cache cannot keep the body), C{stored} (row 5: a miss
kept by the cache) and C{hit} (row 8). Each mode downloads DOWNLOADS (default 8)
bodies, checked as the rows check them, one after another, and prints the MB/s,
the CPU seconds per GiB (from C{/proc/PID/stat}) of the node, of the pydap
upstream and of the downloading client, and the node's peak RSS (sampled every
20 ms). On a loaded machine the MB/s swing; what a process spends per GiB
moves much less (docs/benchmarks.md, "The stored copy without the page cache").

Environment: C{PERF=TAG} runs C{perf record -g} on the server process during
each mode (into C{perf_TAG_MODE.data} here); C{PYSPY=TAG} runs C{py-spy record
--native} (C{pyspy_TAG_MODE.raw}); C{PAUSE=SECONDS} prints the node's pid and
waits before the first mode. Run it from the repository's root.
"""
import atexit
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.getcwd())
from bench import proxy_bench as pb  # noqa: E402


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(env: "pb.Environment", large: "pb.Large", mode: str, n: int) -> None:
    if mode == "stored":
        argv, node = pb.large_argv(large.url, env.proxy, "fetcher", fresh=True), env.node.pid
    elif mode == "nostore":
        argv, node = pb.large_argv(large.url, large.nostore_proxy, "fetcher", fresh=True), large.nostore_node.pid
    elif mode == "hit":
        argv, node = pb.large_argv(large.hit_url, env.proxy, "cache", fresh=False), env.node.pid
    elif mode == "direct":
        argv, node = pb.large_argv(large.url, None, None, fresh=True), env.upstream.proc.pid
    elif mode == "floor":
        # pydap through the cheapest hop there is (bench/relay_floor.py): what any proxy's miss could reach
        from urllib.parse import urlsplit
        from bench import relay_floor
        parts = urlsplit(large.url)
        hop, port = relay_floor.forwarder(parts.hostname, parts.port)
        atexit.register(os.kill, hop, signal.SIGKILL)
        argv = pb.large_argv(f"http://127.0.0.1:{port}{parts.path}", None, None, fresh=True)
        node = hop
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    up = env.upstream.proc.pid
    c0n, c0u, t0 = cpu(node), cpu(up), time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    profiler = None
    if os.environ.get("PYSPY"):
        profiler = subprocess.Popen(["py-spy", "record", "--native", "-r", "97", "-f", "raw", "-p", str(node),
                                     "-o", f"pyspy_{os.environ['PYSPY']}_{mode}.raw"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif os.environ.get("PERF"):
        profiler = subprocess.Popen(["perf", "record", "-g", "-p", str(node), "-o",
                                     f"perf_{os.environ['PERF']}_{mode}.data"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, stop = [0.0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], rss(node))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    done = 0
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("U "):
            done += 1
            if done == n:
                break
        elif line.startswith("E"):
            print("ERROR", line.strip(), flush=True)
            break
    t1 = time.monotonic()
    c1n, c1u, cc = cpu(node), cpu(up), cpu(p.pid)
    p.kill()
    p.wait()
    stop[0] = True
    sampler.join()
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait()
    gib = done * pb.LARGE / (1 << 30) or 1e-9
    print(f"{mode:8s} {done} x 128 MiB: {done * pb.LARGE / 1e6 / (t1 - t0):7.0f} MB/s  cpu s/GiB node "
          f"{(c1n - c0n) / gib:5.2f} upstream {(c1u - c0u) / gib:5.2f} client {cc / gib:5.2f}  "
          f"node peak RSS {peak[0]:.0f} MB  load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    modes = sys.argv[1].split(",")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    env = pb.Environment.get()
    large = env.large()
    pb.check_body(pb.fetch_checked(large.hit_url, env.proxy), large, "the hit URL's first download", "fetcher")
    time.sleep(2)  # stored before the hits
    if os.environ.get("PAUSE"):
        print("node pid", env.node.pid, "nostore pid", large.nostore_node.pid, flush=True)
        time.sleep(float(os.environ["PAUSE"]))
    for _ in range(repeats):
        for mode in modes:
            run(env, large, mode, n)
    print(f"idle RSS: node {rss(env.node.pid):.0f} MB, nostore node {rss(large.nostore_node.pid):.0f} MB")


if __name__ == "__main__":
    main()
