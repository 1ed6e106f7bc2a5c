"""Multicast: one message to a set of addresses in one broker operation.

    result = yield bus.multicast(["pubsub.sub.a", "pubsub.sub.b"], message)
    result.delivered    # ("pubsub.sub.a",): the broker confirmed their copy
    result.unroutable   # ("pubsub.sub.b",): no such address, no copy

On RabbitMQ this is sender-selected distribution: one C{basic.publish} to
the default exchange, routing key the first address, header C{BCC} the
others (the broker routes the message with each of them as well, and removes
C{BCC} before delivery, so consumers never see the list), C{mandatory}, with
a publisher confirm. The memory transport does the same (L{magnet.memory}).

The catch is C{mandatory}: the broker returns a message only when it reached
no queue at all, so one address gone among ten is never reported by the
publish. So the bus knows which addresses exist (L{AddressBook}): an address
is checked at the broker (a passive C{queue.declare}, L{Transport.existing_queues})
on its first multicast and again when its check is older than the bus's
C{address_recheck} seconds, or after a publish to it came back unroutable;
only addresses known to exist are in the publish, and the others are
reported as unroutable. An address deleted at the broker is therefore
reported at most C{address_recheck} seconds after its deletion; the copies
sent to it in between were lost with the queue, as anything in it was.

A long list goes as several publishes (L{MAX_PER_PUBLISH} addresses, or
L{MAX_HEADER_BYTES} of addresses, in each): an AMQP content header must fit
in one frame. A publish that is not confirmed (a timeout, the link lost, the
broker's nack) fails the multicast with L{MulticastError}, which names the
addresses of that publish (they may or may not have their copy) and what
the others got, so a caller can retry those alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure

from magnet.errors import MagnetError, Unroutable
from magnet.message import Message
from magnet.transport import BCC_HEADER, CC_HEADER

__all__ = ["MulticastResult", "MulticastError", "AddressBook", "MAX_ADDRESSES", "MAX_PER_PUBLISH",
           "MAX_HEADER_BYTES", "check_addresses", "chunks"]

#: Addresses in one multicast: more is a caller's mistake, not a workload.
MAX_ADDRESSES = 10_000
#: Addresses in one publish (the first as routing key, the rest in C{BCC}).
MAX_PER_PUBLISH = 500
#: Bytes of the C{BCC} header in one publish, well inside RabbitMQ's
#: smallest usual frame (128 KiB), with the message's own headers beside it.
MAX_HEADER_BYTES = 32 * 1024
#: Longest address: an AMQP short string (a routing key, a queue name).
MAX_ADDRESS_BYTES = 255
#: Addresses remembered by an L{AddressBook} before it starts over.
MAX_REMEMBERED = 65_536


@dataclass(frozen=True)
class MulticastResult:
    """What a multicast did, by address (each in the caller's order)."""

    #: the broker confirmed the publish that carried their copy
    delivered: Tuple[str, ...] = ()
    #: no such address at the broker: they got no copy
    unroutable: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.delivered) + len(self.unroutable)


class MulticastError(MagnetError):
    """Some publishes of a multicast were not confirmed.

    C{failed} maps each address of those publishes to the reason (they may
    or may not have their copy: retrying them alone is the caller's choice);
    C{result} is what the other addresses got.
    """

    def __init__(self, failed: Mapping[str, str], result: MulticastResult) -> None:
        self.failed: Dict[str, str] = dict(failed)
        self.result = result
        reasons = sorted(set(self.failed.values()))
        super().__init__(f"multicast to {len(self.failed)} address(es) not confirmed: {'; '.join(reasons)[:500]}")


def check_addresses(addresses: Any) -> List[str]:
    """The addresses as a list, or a clear error: a non-empty sequence of
    distinct non-empty strings of at most 255 UTF-8 bytes, at most
    L{MAX_ADDRESSES} of them."""
    if isinstance(addresses, (str, bytes)) or not isinstance(addresses, Sequence):
        raise TypeError(f"addresses must be a sequence of strings, got {type(addresses).__name__}")
    if not addresses:
        raise ValueError("multicast needs at least one address")
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"multicast to {len(addresses)} addresses: at most {MAX_ADDRESSES} in one call")
    seen: Set[str] = set()
    for address in addresses:
        if not isinstance(address, str):
            raise TypeError(f"an address must be a string, got {type(address).__name__}: {address!r}"[:200])
        # at most 4 UTF-8 bytes a character: only a long address needs encoding to be measured
        if not address or (len(address) > MAX_ADDRESS_BYTES // 4
                           and len(address.encode("utf-8", "surrogatepass")) > MAX_ADDRESS_BYTES):
            raise ValueError(f"an address is 1 to {MAX_ADDRESS_BYTES} UTF-8 bytes, got {address[:40]!r}")
        if address in seen:
            raise ValueError(f"address {address!r} is listed twice")
        seen.add(address)
    return list(addresses)


def chunks(addresses: Sequence[str], per_publish: int = MAX_PER_PUBLISH,
           header_bytes: int = MAX_HEADER_BYTES) -> List[List[str]]:
    """C{addresses} split into the address lists of one publish each."""
    if not addresses:
        return []
    if len(addresses) <= per_publish and sum(map(len, addresses)) * 4 + 5 * len(addresses) <= header_bytes:
        return [list(addresses)]  # the usual case: one publish, nothing to measure
    out: List[List[str]] = []
    current: List[str] = []
    size = 0
    for address in addresses:
        cost = len(address.encode("utf-8")) + 5  # a longstr in an array: type octet, length, bytes
        if current and (len(current) >= per_publish or size + cost > header_bytes):
            out.append(current)
            current, size = [], 0
        current.append(address)
        size += cost
    if current:
        out.append(current)
    return out


class AddressBook:
    """Which addresses exist at the broker, as last checked, and when.

    L{known} fires with the set of the given addresses that exist, asking
    the transport only about those never checked or checked more than
    C{recheck} seconds ago (or forgotten); a check already on its way is
    shared, not repeated.
    """

    def __init__(self, bus: Any, recheck: float) -> None:
        self.bus = bus
        self.recheck = recheck
        #: address -> (exists, when checked)
        self.seen: Dict[str, Tuple[bool, float]] = {}
        self._checking: Dict[str, List[Deferred]] = {}
        #: passive checks asked of the broker so far (one per address)
        self.checks = 0

    def mark(self, addresses: Iterable[str], exists: bool) -> None:
        now = self.bus.clock.seconds()
        if len(self.seen) > MAX_REMEMBERED:
            self.seen.clear()
        for address in addresses:
            self.seen[address] = (exists, now)

    def forget(self, addresses: Iterable[str]) -> None:
        for address in addresses:
            self.seen.pop(address, None)

    def known(self, addresses: Sequence[str]) -> Deferred:
        now = self.bus.clock.seconds()
        seen = self.seen
        recheck = self.recheck
        fresh: Set[str] = set()  # known to exist, recently enough
        due: List[str] = []
        waits: List[Deferred] = []
        joined: Set[int] = set()
        for address in addresses:
            entry = seen.get(address)
            if entry is not None and now - entry[1] < recheck:
                if entry[0]:
                    fresh.add(address)
                continue
            inflight = self._checking.get(address)
            if inflight is None:
                due.append(address)
            elif id(inflight) not in joined:
                joined.add(id(inflight))
                waits.append(_wait(inflight))
        if due:
            waits.append(self._check(due))
        if not waits:
            return succeed(fresh)
        d = waits[0] if len(waits) == 1 else DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

        def answer(found: Any) -> Set[str]:
            # from the checks' own answers, not from the book (which may have started over meanwhile)
            for one in ([found] if len(waits) == 1 else [f for _, f in found]):
                fresh.update(one)
            return {a for a in addresses if a in fresh}

        def unwrap(failure: Failure) -> Failure:
            return failure.value.subFailure if hasattr(failure.value, "subFailure") else failure

        return d.addCallbacks(answer, unwrap)

    def _check(self, due: List[str]) -> Deferred:
        """Ask the broker about C{due}; a Deferred that fires with those of them that exist."""
        self.checks += len(due)
        waiters: List[Deferred] = []
        mine = _wait(waiters)
        for address in due:
            self._checking[address] = waiters

        def done(result: Any) -> None:
            for address in due:
                if self._checking.get(address) is waiters:
                    del self._checking[address]
            if not isinstance(result, Failure):
                result = {a for a in due if a in result}
                self.mark(result, True)
                self.mark([a for a in due if a not in result], False)
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        self.bus.transport.existing_queues(due).addBoth(done)
        return mine


def _wait(waiters: List[Deferred]) -> Deferred:
    d: Deferred = Deferred()
    waiters.append(d)
    return d


@dataclass
class _Outcome:
    delivered: Set[str] = field(default_factory=set)
    unroutable: Set[str] = field(default_factory=set)
    failed: Dict[str, str] = field(default_factory=dict)


def multicast(bus: Any, book: AddressBook, addresses: Sequence[str], message: Message,
              timeout: Optional[float]) -> Deferred:
    """L{magnet.Bus.multicast}: see the module's docstring."""
    try:
        addresses = check_addresses(addresses)
        if not isinstance(message, Message):
            raise TypeError(f"multicast sends a Message, got {type(message).__name__}")
        for name in (CC_HEADER, BCC_HEADER):
            if name in message.headers:
                raise ValueError(f"a multicast message may not carry its own {name!r} header")
        fanouts = {name for name, kind in bus._kinds.items() if kind == "fanout"}
        if fanouts and not fanouts.isdisjoint(addresses):
            first = next(a for a in addresses if a in fanouts)
            raise ValueError(f"multicast goes to addresses, not fanouts: {first!r}")
    except (TypeError, ValueError) as e:
        return fail(e)
    d = book.known(addresses)
    d.addCallback(_publish_all, bus, book, addresses, message, timeout)
    return d


def _publish_all(existing: Set[str], bus: Any, book: AddressBook, addresses: List[str], message: Message,
                 timeout: Optional[float]) -> Deferred:
    outcome = _Outcome()
    outcome.unroutable.update(a for a in addresses if a not in existing)
    live = [a for a in addresses if a in existing]
    sends = []
    for chunk in chunks(live):
        one = message if len(chunk) == 1 else message.with_headers(**{BCC_HEADER: chunk[1:]})
        d = bus.send(chunk[0], one, mandatory=True, timeout=timeout)
        sends.append(d.addCallbacks(_confirmed, _not_confirmed, callbackArgs=(chunk, outcome),
                                    errbackArgs=(chunk, outcome, book)))
    done = DeferredList(sends) if sends else succeed(None)
    return done.addCallback(lambda _: _finish(bus, addresses, outcome))


def _confirmed(_: Any, chunk: List[str], outcome: _Outcome) -> None:
    outcome.delivered.update(chunk)


def _not_confirmed(failure: Failure, chunk: List[str], outcome: _Outcome, book: AddressBook) -> None:
    if failure.check(Unroutable):
        # returned: not one of them exists any more
        book.mark(chunk, False)
        outcome.unroutable.update(chunk)
        return
    reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    for address in chunk:
        outcome.failed[address] = reason


def _finish(bus: Any, addresses: List[str], outcome: _Outcome) -> MulticastResult:
    result = MulticastResult(delivered=tuple(a for a in addresses if a in outcome.delivered),
                             unroutable=tuple(a for a in addresses if a in outcome.unroutable))
    for address in result.unroutable:
        bus.observer.unroutable(address)
    if outcome.failed:
        raise MulticastError({a: outcome.failed[a] for a in addresses if a in outcome.failed}, result)
    return result
