"""A dataset's saved versions on the web port: what each one is, and what changed.

    GET /api/datasets/NAME/versions?limit=N        {"dataset", "versions": [manifest, ...]}  oldest first,
                                                   the last N (default 100, at most 1000)
    GET /api/datasets/NAME/versions/V              {"dataset", "version": manifest}   V: a version or "latest"
    GET /api/datasets/NAME/versions/V1/diff/V2?limit=N
                                                   {"dataset", "diff": change summary from V1 to V2}
                                                   (N: attribute changes listed, default 20, 0 to 1000)

A manifest (docs/dissemination.md) says when the version was fetched and
saved, the bytes and sha256 of each file, the coverage of its coordinates
and its change summary from the version before it
(L{ooidx.dissemination.changes}); the diff compares any two versions, either
way round. The answers come from the persister's worker queue (any
persister of the cluster answers: persisters with different subscription
names keep their own copies).

Reading is open or needs the operator token as the rest of the management
API (C{read_token}, L{ooidx.web.page}). Every input is checked here first:
a malformed name, version or limit is C{400} (C{InvalidName},
C{InvalidVersion}, C{BadRequest}), a dataset neither registered nor saved
or a version not saved C{404} (C{UnknownDataset}, C{UnknownVersion}), no
persister running C{503}. The errors are the web edge's JSON error.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from magnet import BadArguments, ConnectionLost, NotConfirmed, NotConnected, RemoteError, Timeout, \
    UnknownOperation, Unroutable

from ooidx.dissemination.changes import LIMIT, MAX_LIMIT
from ooidx.dissemination.persister import LATEST, valid_version
from ooidx.http.answers import HTTPError, error_answer, json_answer, printable
from ooidx.web.page import check_name

__all__ = ["VersionsApi", "DEFAULT_VERSIONS", "MAX_VERSIONS", "PERSISTER", "CALL_TIMEOUT"]

log = Logger(namespace="ooidx.web.versions")

#: The worker queue that answers for saved versions.
PERSISTER = "persister"
#: Versions listed unless ?limit= says otherwise; the most one request may ask for.
DEFAULT_VERSIONS, MAX_VERSIONS = 100, 1000
#: How long a persister may take (it reads manifests from its disk).
CALL_TIMEOUT = 15.0
#: Remote error type -> HTTP status.
STATUS = {"InvalidVersion": 400, "UnknownVersion": 404, "UnknownDataset": 404, "InvalidName": 400,
          "ValueError": 400, "TypeError": 400}
_PREFIX = b"/api/datasets/"


class VersionsApi:
    """The routes of C{/api/datasets/NAME/versions...}, for the web edge's route table:
    C{methods(path)} answers the handlers of C{path} by method, or None."""

    def __init__(self, bus: Any, *, check_operator: Callable[[server.Request], None], read_token: bool) -> None:
        self.bus = bus
        self._check_operator = check_operator
        self.read_token = read_token

    def methods(self, path: bytes) -> Optional[Dict[bytes, Callable[[server.Request], Any]]]:
        if not path.startswith(_PREFIX):
            return None
        rest = path[len(_PREFIX):].split(b"/")
        if len(rest) < 2 or rest[1] != b"versions" or not rest[0]:
            return None
        if len(rest) == 2:
            return {b"GET": self.render_list}
        if len(rest) == 3 and rest[2]:
            return {b"GET": self.render_version}
        if len(rest) == 5 and rest[2] and rest[3] == b"diff" and rest[4]:
            return {b"GET": self.render_diff}
        return None

    # handlers ------------------------------------------------------------------------

    def render_list(self, request: server.Request) -> Deferred:
        self._check_read(request)
        name, _ = self._parts(request)
        limit = self._limit(request, DEFAULT_VERSIONS, 1, MAX_VERSIONS)
        d = self._call("versions", {"name": name, "limit": limit})

        def listed(manifests: Any) -> Any:
            manifests = list(manifests or [])
            if manifests:
                return json_answer({"dataset": name, "versions": manifests})
            return self._registered(name).addCallback(
                lambda _: json_answer({"dataset": name, "versions": []}))

        return d.addCallback(listed).addErrback(self._failed, "versions")

    def render_version(self, request: server.Request) -> Deferred:
        self._check_read(request)
        name, (version,) = self._parts(request)
        self._limit(request, None, 0, 0, allowed=())
        d = self._call("version", {"name": name, "version": version})
        d.addCallback(lambda manifest: json_answer({"dataset": name, "version": manifest}))
        return d.addErrback(self._failed, "version")

    def render_diff(self, request: server.Request) -> Deferred:
        self._check_read(request)
        name, (before, after) = self._parts(request)
        limit = self._limit(request, LIMIT, 0, MAX_LIMIT)
        d = self._call("diff", {"name": name, "before": before, "after": after, "limit": limit})
        d.addCallback(lambda summary: json_answer({"dataset": name, "diff": summary}))
        return d.addErrback(self._failed, "diff")

    # checks --------------------------------------------------------------------------

    def _check_read(self, request: server.Request) -> None:
        if self.read_token:
            self._check_operator(request)

    def _parts(self, request: server.Request) -> Tuple[str, List[str]]:
        """(dataset name, [version, ...]) of the path, each checked."""
        rest = request.path[len(_PREFIX):].split(b"/")
        name = check_name(_text(rest[0]))
        versions = [_version(raw) for raw in rest[2:] if raw != b"diff"]
        return name, versions

    def _limit(self, request: server.Request, default: Optional[int], low: int, high: int,
               allowed: Tuple[bytes, ...] = (b"limit",)) -> Optional[int]:
        args = request.args or {}
        unknown = sorted(k.decode("ascii", "replace") for k in args if k not in allowed)
        if unknown:
            takes = "limit" if allowed else "no query parameters"
            raise HTTPError(400, "BadRequest", f"unknown query parameter(s): {', '.join(unknown)} (this takes "
                                               f"{takes})")
        if b"limit" not in args:
            return default
        raw = args[b"limit"][-1].decode("ascii", "replace")
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise HTTPError(400, "BadRequest", f"limit is a whole number from {low} to {high}")
        return int(raw)

    # calls ---------------------------------------------------------------------------

    def _call(self, op: str, kwargs: Dict[str, Any]) -> Deferred:
        return self.bus.call_with(PERSISTER, op, kwargs, timeout=CALL_TIMEOUT)

    def _registered(self, name: str) -> Deferred:
        """Fires if C{name} is registered (or the registry cannot say); an
        HTTPError 404 if the controller does not know it."""
        d = self.bus.call_with("controller", "get", {"name": name}, timeout=CALL_TIMEOUT)

        def unknown(failure: Failure) -> None:
            if failure.check(RemoteError) and failure.value.remote_type == "UnknownDataset":
                raise HTTPError(404, "UnknownDataset", f"no dataset {name!r} is registered or saved")
            log.info("versions of {name}: the registry did not answer ({error}); answering no versions",
                     name=name, error=failure.getErrorMessage())

        return d.addCallbacks(lambda _: None, unknown)

    def _failed(self, failure: Failure, op: str) -> Any:
        exc = failure.value
        if isinstance(exc, HTTPError):
            return error_answer(exc)
        if isinstance(exc, (Unroutable, UnknownOperation)):
            error = HTTPError(503, "Unavailable", "Saved versions are not available on this node: no persister "
                                                  "is running.")
        elif isinstance(exc, BadArguments):
            error = HTTPError(400, "BadRequest", exc.message)
        elif isinstance(exc, RemoteError):
            error = HTTPError(STATUS.get(exc.remote_type, 502), exc.remote_type, exc.message)
        elif isinstance(exc, Timeout):
            error = HTTPError(504, "Timeout", f"the persister did not answer within {CALL_TIMEOUT:g} seconds")
        elif isinstance(exc, (ConnectionLost, NotConfirmed, NotConnected)):
            error = HTTPError(503, type(exc).__name__, f"the message bus is not reachable: {exc}")
        elif isinstance(exc, CancelledError):
            error = HTTPError(503, "Cancelled", "the request was cancelled")
        else:
            log.failure("web versions: calling persister.{op}", failure, op=op)
            error = HTTPError(500, "InternalError", f"{type(exc).__name__} while calling persister.{op}")
        return error_answer(error)


def _text(raw: bytes) -> Optional[str]:
    try:
        return unquote(raw.decode("ascii"), errors="strict")
    except UnicodeDecodeError:
        return None


def _version(raw: bytes) -> str:
    version = _text(raw)
    if not valid_version(version):
        raise HTTPError(400, "InvalidVersion", f"{printable(raw)} is not a version: expected YYYYmmddTHHMMSSZ-"
                                               f"SHA12 (as GET /api/datasets/NAME/versions lists them) or {LATEST}")
    return str(version)
