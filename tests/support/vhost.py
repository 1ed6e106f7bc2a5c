"""A RabbitMQ virtual host of one's own on the machine's shared broker.

Component queues have fixed names (fetcher, cache, ...), so tests that run
nodes, and test runs that share a broker, each take a virtual host, made for
them and deleted after: nothing else consumes their queues, and what one
leaves behind cannot reach another. This is the one place that makes them
(tests/conftest.py's C{vhost} fixture and session broker, and the
reliability suite's node helpers, use it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Callable, Optional, Tuple
from urllib.parse import quote, urlsplit, urlunsplit

from tests.rabbitmq import url_host_port

CTL_TIMEOUT = 90


def _ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=CTL_TIMEOUT)


def manageable(url: str) -> bool:
    """True if rabbitmqctl here can manage the broker of C{url}: the local
    default node (127.0.0.1:5672). A private node on another port is not it
    (rabbitmqctl without C{-n} talks to the default node)."""
    return url_host_port(url) in (("127.0.0.1", 5672), ("localhost", 5672)) and shutil.which("rabbitmqctl") is not None


def own_vhost(url: str, label: str = "test") -> Optional[Tuple[str, Callable[[], None]]]:
    """A fresh virtual host on the broker of C{url}, with the URL's user
    allowed everything in it: C{(url of the vhost, delete)}. None where
    rabbitmqctl cannot manage that broker (a remote one) or refuses; the
    caller then decides (use the URL as it is, or a private node)."""
    if not manageable(url):
        return None
    parts = urlsplit(url)
    name = f"ooidx-{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if _ctl("add_vhost", name).returncode != 0:
            return None
        allowed = _ctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if allowed.returncode != 0:
        delete_vhost(name)
        return None
    return urlunsplit(parts._replace(path="/" + quote(name, safe=""))), lambda: delete_vhost(name)


def delete_vhost(name: str) -> bool:
    """Delete a virtual host; False (never an exception) if that failed."""
    try:
        return _ctl("delete_vhost", name).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
