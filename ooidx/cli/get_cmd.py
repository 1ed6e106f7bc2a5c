"""C{ooidx get}: download a URL through the exchange's proxy into a file,
with a progress bar."""
from __future__ import annotations

import os
import urllib.parse
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed

from ooidx.cli.registry import (DEFAULT_PROXY, PROXY_ENV, CliError, Context, RemoteFailure, Unreachable,
                                UsageError, arg, command)

@command(
    "get", "download a URL through the exchange's proxy into a file, with a progress bar",
    arg("target", metavar="URL",
        help="/datasets/NAME.SUFFIX?CONSTRAINT, the exchange's own http://HOST:PORT/datasets/... URL, "
             "or any other http(s):// URL (asked of the proxy as a forward proxy)"),
    arg("-o", "--output", required=True, metavar="FILE",
        help="the file to write (a temporary file beside it, renamed once complete); - for stdout"),
    arg("--proxy", metavar="URL", help=f"the exchange's proxy (default: ${PROXY_ENV}, else http.proxy_port of "
                                       f"--config, else {DEFAULT_PROXY})"),
    arg("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal"),
)
def get(ctx: Context) -> Deferred:
    """Blocking, like the HTTP client: the download runs to its end before the Deferred fires."""
    try:
        size, path = download(ctx)
    except CliError as e:
        return fail(e)
    ctx.stderr.write(f"{size} bytes -> {path}\n")
    return succeed(None)


def download(ctx: Context) -> Tuple[int, str]:
    """Stream the target through the proxy into the output file; (bytes, path)."""
    import http.client
    import tempfile
    import time

    args = ctx.args
    proxy = args.proxy or ctx.environ.get(PROXY_ENV) or ctx.proxy
    parts = urllib.parse.urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"--proxy must be an http:// URL, got {proxy!r}")
    target = args.target
    own = _own_url(target, proxy)
    if own is not None:  # the exchange's own URL (http://127.0.0.1:8100/datasets/NAME.dods): asked of it directly
        proxy, target = own
        parts = urllib.parse.urlsplit(proxy)
    if target.startswith("/"):
        request_target = target
    elif target.startswith(("http://", "https://")):
        request_target = target  # absolute-URI: the proxy serves it as a forward proxy
    else:
        raise UsageError(f"URL must be http://..., https://... or /datasets/NAME.SUFFIX, got {target!r}")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in request_target):
        raise UsageError("URL has characters that must be percent-encoded")
    wait = args.timeout if args.timeout is not None else 60.0
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=wait)
    to_stdout = args.output == "-"
    tmp: Any = None
    received = 0
    try:
        try:
            conn.putrequest("GET", request_target, skip_host=True, skip_accept_encoding=True)
            host = urllib.parse.urlsplit(target).netloc if not target.startswith("/") else parts.netloc
            conn.putheader("Host", host)
            conn.putheader("User-Agent", "ooidx-get")
            conn.endheaders()
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach the proxy at {proxy}: {e}") from None
        if response.status != 200:
            text = response.read(4096).decode("utf-8", "replace").strip()
            kind = response.getheader("X-Ooidx-Error") or f"HTTP {response.status}"
            raise RemoteFailure(kind, text or response.reason, response.status)
        length = response.getheader("Content-Length")
        total = int(length) if length and length.isdigit() else None
        show = args.progress or (hasattr(ctx.stderr, "isatty") and ctx.stderr.isatty())
        if to_stdout:
            out = getattr(ctx.stdout, "buffer", None)
            if out is None:
                raise UsageError("-o - needs a binary stdout")
        else:
            directory = os.path.dirname(os.path.abspath(args.output))
            tmp = tempfile.NamedTemporaryFile(dir=directory, prefix="." + os.path.basename(args.output) + ".",
                                              suffix=".part", delete=False)
            out = tmp
        started = last = time.monotonic()
        while True:
            try:
                chunk = response.read(64 * 1024)
            except (OSError, http.client.HTTPException) as e:
                raise CliError(f"transfer failed after {received} bytes: {type(e).__name__}: {e}") from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            now = time.monotonic()
            if show and now - last >= 0.1:
                last = now
                ctx.stderr.write("\r" + progress_bar(received, total, now - started))
                ctx.stderr.flush()
        if total is not None and received != total:
            raise CliError(f"transfer failed: {received} of {total} bytes arrived")
        if show:
            ctx.stderr.write("\r" + progress_bar(received, total, time.monotonic() - started) + "\n")
        if tmp is not None:
            tmp.flush()
            os.fsync(tmp.fileno())
            tmp.close()
            os.replace(tmp.name, args.output)
            tmp = None
        else:
            out.flush()
        return received, args.output
    finally:
        conn.close()
        if tmp is not None:
            tmp.close()
            try:
                os.unlink(tmp.name)
            except OSError:
                pass


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _own_url(target: str, proxy: str) -> Optional[Tuple[str, str]]:
    """(proxy, /datasets/... path) when C{target} is an URL of an exchange's
    proxy itself, else None: such a URL is not forwarded, it is the request.
    An URL under /datasets/ is one when it names the proxy's host (or both
    are loopback) and port, or any loopback port (an exchange on other ports
    than the config's: forwarding to loopback would be refused anyway)."""
    if not target.startswith("http://"):
        return None
    try:
        t, p = urllib.parse.urlsplit(target), urllib.parse.urlsplit(proxy)
        t_port, p_port = t.port or 80, p.port or 80
    except ValueError:
        return None
    if not t.path.startswith("/datasets/") or not t.hostname or not p.hostname:
        return None
    same = t_port == p_port and t.hostname.lower() == p.hostname.lower()
    if not (same or _is_loopback(t.hostname)):
        return None
    return f"http://{t.netloc}", t.path + (f"?{t.query}" if t.query else "")


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def progress_bar(done: int, total: Optional[int], elapsed: float, width: int = 30) -> str:
    """One line: a bar when the total is known, bytes and rate either way."""
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
            n /= 1024
        return f"{n:.1f} GiB"

    rate = f"{size(done / elapsed)}/s" if elapsed > 0 else ""
    if total:
        filled = min(width, int(width * done / total))
        return f"[{'#' * filled}{' ' * (width - filled)}] {size(done)} / {size(total)} {100 * done // total:3d}% {rate}"
    return f"{size(done)} {rate}"
