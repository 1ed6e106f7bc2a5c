"""How many files a node may hold open, and so how many HTTP clients.

Every client connection to the proxy or web port is an open file. A process
starts with the soft limit of its parent (often 1024, the historical
default), which a node serving hundreds of DAP clients reaches: past it,
twisted.web accepts a new connection and closes it at once (its reserved
descriptor), so the client sees a reset, and nothing says why but a line per
refused connection. So a node started by twistd raises its soft limit as far
as the hard limit lets it (L{WANTED_FILES} at most, as a server started by
systemd with C{LimitNOFILE=} would have), and says at start how many
connections it can hold; when that is under L{LOW_FILES} it warns, naming
the limit and how to raise it (tests/reliability/test_load_500.py holds 500
clients on one node).
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

__all__ = ["OpenFiles", "raise_open_files", "WANTED_FILES", "LOW_FILES", "RESERVED_FILES"]

#: The soft limit a node raises itself to when the hard limit allows.
WANTED_FILES = 65536
#: Below this many open files a node warns at start.
LOW_FILES = 4096
#: Files a node holds besides its HTTP clients: the broker link, logs, the
#: cache's and the store's files, child processes' pipes (a generous guess).
RESERVED_FILES = 64


@dataclass(frozen=True)
class OpenFiles:
    """The open-files limit before and after L{raise_open_files}."""

    before: int
    after: int
    hard: int
    error: Optional[str] = None  # why raising it failed, if it did

    @property
    def connections(self) -> int:
        """About how many HTTP connections the node can hold at once."""
        return max(0, self.after - RESERVED_FILES)

    def note(self) -> str:
        """One line for the start log."""
        raised = f" (raised from {self.before})" if self.after != self.before else ""
        return (f"open files limit {self.after}{raised}, hard limit {_text(self.hard)}: room for about "
                f"{self.connections} HTTP connections at once")

    def warning(self) -> Optional[str]:
        """One line saying the limit is too low for a busy node, or None."""
        if self.after >= LOW_FILES:
            return None
        why = f" (raising it failed: {self.error})" if self.error else ""
        return (f"open files limited to {self.after} (hard limit {_text(self.hard)}){why}: the proxy and web "
                f"ports hold about {self.connections} connections at once, and past that a new client is "
                f"accepted and closed at once; raise the limit to at least {LOW_FILES} (ulimit -n, or "
                f"LimitNOFILE= in the systemd unit)")


def _text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def raise_open_files(getrlimit: Callable[[int], Tuple[int, int]] = resource.getrlimit,
                     setrlimit: Callable[[int, Tuple[int, int]], None] = resource.setrlimit) -> OpenFiles:
    """Raise the soft C{RLIMIT_NOFILE} up to the hard limit, at most
    L{WANTED_FILES} (never lower it); returns what it was and is."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    ceiling = WANTED_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_FILES)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        except (OSError, ValueError) as e:
            return OpenFiles(soft, soft, hard, str(e) or type(e).__name__)
        return OpenFiles(soft, ceiling, hard)
    after = soft if soft != resource.RLIM_INFINITY else WANTED_FILES
    return OpenFiles(after, after, hard)
