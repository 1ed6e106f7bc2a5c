"""The HTTP edge toolkit: how the web port and people's API answer.

Every answer is an L{Answer} (status, body, type, headers), or an
L{HTTPError} raised and turned into a JSON error body, so clients never
parse an HTML error page. The handlers of L{ooidx.web} and L{ooidx.people}
return these and share the token check and the JSON arguments reader here,
instead of calling back into the web component.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Dict, List, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

__all__ = ["HTTPError", "Answer", "JSON_TYPE", "json_answer", "error_answer", "result_answer", "prepare",
           "answer", "printable", "check_bearer", "json_arguments", "json_kind"]

log = Logger(namespace="ooidx.http")

JSON_TYPE = b"application/json"

#: Reason phrases Twisted does not know (it would send "Unknown Status").
REASONS = {421: b"Misdirected Request"}


class HTTPError(Exception):
    """An answer other than 200, with a JSON error body."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[Dict[bytes, bytes]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}


class Answer:
    """What to answer: a status, a body and its content type, more headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: bytes,
                 headers: Optional[Dict[bytes, bytes]] = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def json_answer(value: Any, status: int = 200, headers: Optional[Dict[bytes, bytes]] = None) -> Answer:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
    return Answer(status, body, JSON_TYPE, headers)


def error_answer(error: HTTPError) -> Answer:
    return json_answer({"error": {"type": error.kind, "message": error.message}}, error.status, error.headers)


def result_answer(result: Any) -> Answer:
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Answer(200, bytes(result), b"application/octet-stream")
    try:
        return json_answer({"result": result})
    except (TypeError, ValueError) as e:
        return error_answer(HTTPError(502, "BadReply", f"the result is not JSON: {e}"))


def prepare(request: server.Request, answer: Answer) -> bytes:
    """Set the status and headers of C{answer}; its body, to be written."""
    request.setResponseCode(answer.status, REASONS.get(answer.status))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Content-Type", answer.content_type)
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Length", str(len(answer.body)).encode("ascii"))
    return answer.body


def answer(request: server.Request, result: Any) -> Any:
    """Answer with an L{Answer} now, or with the one a Deferred fires with later."""
    if isinstance(result, Answer):
        return prepare(request, result)
    gone: List[bool] = []

    def client_gone(_: Any) -> None:
        gone.append(True)
        result.cancel()

    request.notifyFinish().addErrback(client_gone)

    def to_answer(failure: Failure) -> Answer:
        if failure.check(HTTPError):
            return error_answer(failure.value)
        if not gone:
            log.failure("answering {path}", failure, path=printable(request.path))
        return error_answer(HTTPError(500, "InternalError", "internal error"))

    def send(answer: Answer) -> None:
        if gone or request.finished or not isinstance(answer, Answer):
            return  # not an Answer: a stream (server-sent events) already under way
        request.write(prepare(request, answer))
        request.finish()

    result.addErrback(to_answer).addCallback(send)
    result.addErrback(lambda f: log.failure("writing an answer to {path}", f, path=printable(request.path)))
    return server.NOT_DONE_YET


def printable(raw: bytes, limit: int = 80) -> str:
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("..." if len(raw) > limit else "")


def no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_bearer(request: server.Request, expected: Optional[str]) -> None:
    """Raise 401 unless the request carries C{Authorization: Bearer EXPECTED}
    (compared in constant time). No expected token refuses everyone."""
    challenge = {b"WWW-Authenticate": b'Bearer realm="ooidx"'}
    header = request.getHeader(b"authorization")
    if not header:
        raise HTTPError(401, "Unauthorized", "an operator token is required (Authorization: Bearer TOKEN)",
                        challenge)
    scheme, _, given = header.partition(b" ")
    wanted = (expected or "").encode("utf-8")
    if scheme.lower() != b"bearer" or not wanted or not hmac.compare_digest(given.strip(), wanted):
        raise HTTPError(401, "Unauthorized", "the operator token is not valid", challenge)


def json_arguments(request: server.Request, max_body: int) -> Dict[str, Any]:
    """The request body as a JSON object (empty body: no arguments); 400 otherwise."""
    request.content.seek(0)
    body = request.content.read(max_body + 1)
    if not body.strip():
        return {}
    try:
        kwargs = json.loads(body, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPError(400, "BadRequest", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "BadRequest", "the body is nested too deeply") from None
    if not isinstance(kwargs, dict):
        raise HTTPError(400, "BadRequest",
                        f"the body must be a JSON object of arguments, not {json_kind(kwargs)}")
    return kwargs
