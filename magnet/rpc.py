"""RPC over the bus: how requests and replies are encoded, and how a service
object's operations are found and called.

A request is a message of type C{call} with the operation's name in the
C{op} header and its keyword arguments as a JSON object. A reply has type
C{reply} (a JSON value, or raw bytes when the operation returned bytes) or
C{error} (a JSON object with the remote exception's type and message). The
reply goes to the request's C{reply_to}, which need not be the caller's own
address: that is third-party coordination.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from magnet.errors import BadArguments, BadMessage, RemoteError, UnknownOperation
from magnet.message import BINARY, Message

CALL = "call"
REPLY = "reply"
ERROR = "error"
OP_HEADER = "op"

F = TypeVar("F", bound=Callable[..., Any])

_TYPED_ERRORS: Dict[str, type] = {
    "UnknownOperation": UnknownOperation,
    "BadArguments": BadArguments,
}


def operation(method: F) -> F:
    """Mark a method as callable over the bus; nothing else on the object is."""
    method.__magnet_operation__ = True  # type: ignore[attr-defined]
    return method


def operations(service: object) -> Dict[str, Callable[..., Any]]:
    """The operations a service object exposes, by name."""
    found = {}
    for name in dir(type(service)):
        if name.startswith("_"):
            continue
        attr = getattr(service, name, None)
        if callable(attr) and getattr(attr, "__magnet_operation__", False):
            found[name] = attr
    return found


def request(op: str, kwargs: Dict[str, Any], **properties: Any) -> Message:
    properties.setdefault("persistent", False)
    return Message.of_json(kwargs, type=CALL, headers={OP_HEADER: op}, **properties)


def decode_request(message: Message) -> tuple:
    """(op, kwargs) of a request; L{BadMessage} if it is not one."""
    op = message.header(OP_HEADER)
    if not isinstance(op, str) or not op:
        raise BadMessage(f"header 'op' must be a non-empty string, got {op!r}")
    kwargs = message.json()
    if not isinstance(kwargs, dict):
        raise BadMessage(f"arguments must be a JSON object, got {type(kwargs).__name__}")
    return op, kwargs


def reply(value: Any, correlation_id: str | None) -> Message:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Message(body=bytes(value), content_type=BINARY, type=REPLY,
                       correlation_id=correlation_id, persistent=False)
    return Message.of_json(value, type=REPLY, correlation_id=correlation_id, persistent=False)


def error_reply(failure: Failure, correlation_id: str | None) -> Message:
    exc = failure.value
    if isinstance(exc, RemoteError):
        kind, text = exc.remote_type, exc.message
    else:
        kind, text = type(exc).__name__, str(exc)
    return Message.of_json({"type": kind, "message": text}, type=ERROR,
                           correlation_id=correlation_id, persistent=False)


def decode_reply(message: Message) -> Any:
    """The value a reply carries, or raise the L{RemoteError} an error reply carries.

    Third parties that receive replies meant for them call this too.
    """
    if message.type == ERROR:
        try:
            info = message.json()
            kind, text = str(info["type"]), str(info["message"])
        except (BadMessage, KeyError, TypeError):
            raise RemoteError("BadMessage", "undecodable error reply") from None
        raise _TYPED_ERRORS.get(kind, RemoteError)(kind, text)
    if message.type != REPLY:
        raise BadMessage(f"expected a reply, got a message of type {message.type!r}")
    if message.content_type == BINARY:
        return message.body
    return message.json()


def invoke(service_ops: Dict[str, Callable[..., Any]], service_name: str, message: Message) -> Deferred:
    """Run the operation a request names; the Deferred fails with a typed error
    for an unknown operation, arguments that do not fit, or an undecodable request."""
    try:
        method, kwargs = resolve(service_ops, service_name, message)
    except (BadMessage, UnknownOperation, BadArguments) as e:
        return fail(e)
    # A lambda, so that an argument named like maybeDeferred's own parameters still reaches the method.
    return maybeDeferred(lambda: method(**kwargs))


def resolve(service_ops: Dict[str, Callable[..., Any]], service_name: str,
            message: Message) -> Tuple[Callable[..., Any], Dict[str, Any]]:
    """The method a request names and the keyword arguments to call it with;
    raises L{BadMessage}, L{UnknownOperation} or L{BadArguments} (what
    L{invoke}'s Deferred fails with)."""
    op, kwargs = decode_request(message)
    method = service_ops.get(op)
    if method is None:
        known = ", ".join(sorted(service_ops)) or "none"
        raise UnknownOperation("UnknownOperation", f"{service_name} has no operation {op!r} (known: {known})")
    if not _fits(method, kwargs):
        try:
            inspect.signature(method).bind(**kwargs)
        except TypeError as e:
            raise BadArguments("BadArguments", f"{service_name}.{op}: {e}") from None
        except ValueError:
            return method, kwargs  # no signature to check (a builtin): the call itself refuses what does not fit
        taken = _bound_parameter(method)
        if taken is not None and taken in kwargs:
            # bind() takes it into **kwargs; the call would give it two values
            raise BadArguments("BadArguments", f"{service_name}.{op}: got an unexpected keyword argument {taken!r}")
    return method, kwargs


#: function -> (names it takes by keyword, names it requires, takes **kwargs, the
#: parameter a bound method's object fills (self), if any), or None when only
#: Signature.bind can tell (positional-only parameters without defaults)
_Shape = Tuple[FrozenSet[str], FrozenSet[str], bool, Optional[str]]
_SHAPES: "weakref.WeakKeyDictionary[Any, Optional[_Shape]]" = weakref.WeakKeyDictionary()


def _fits(method: Callable[..., Any], kwargs: Dict[str, Any]) -> bool:
    """True if C{method(**kwargs)} binds, decided from the method's parameters
    computed once per function (inspect.signature on every call costs more
    than a small operation). False means "ask Signature.bind", which then
    either binds or names what is wrong."""
    func = getattr(method, "__func__", method)
    try:
        shape = _SHAPES[func]
    except KeyError:
        shape = _shape(method)
        try:
            _SHAPES[func] = shape
        except TypeError:  # not weak-referenceable: no cache
            pass
    except TypeError:
        shape = _shape(method)
    if shape is None:
        return False
    names, required, var_keyword, bound = shape
    if not required.issubset(kwargs):
        return False
    if var_keyword:
        return bound is None or bound not in kwargs
    return names.issuperset(kwargs)


def _bound_parameter(method: Callable[..., Any]) -> Optional[str]:
    """The parameter of a bound method that its object fills (C{self}, C{cls}):
    its signature leaves it out, so a C{**kwargs} seems to take a keyword of
    that name, but the call gives it two values (TypeError)."""
    func = getattr(method, "__func__", None)
    if func is None or getattr(method, "__self__", None) is None:
        return None
    try:
        first = next(iter(inspect.signature(func).parameters.values()), None)
    except (TypeError, ValueError):
        return None
    if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return first.name
    return None


def _shape(method: Callable[..., Any]) -> Optional[_Shape]:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return None
    names, required, var_keyword = set(), set(), False
    for p in parameters:
        if p.kind is p.POSITIONAL_ONLY:
            if p.default is p.empty:
                return None
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
        elif p.kind is p.VAR_KEYWORD:
            var_keyword = True
    return frozenset(names), frozenset(required), var_keyword, _bound_parameter(method)

