"""The link to the broker: connecting, reconnecting, waiting for the link, closing it.

L{Link} is the part of L{magnet.amqp.transport.AMQPTransport} that knows about
one TCP (or TLS) connection at a time and nothing of queues or consumers. It
connects, tries each broker URL of a cluster in turn, backs off after a
failure, reconnects after a loss, bounds every wait, and tells the link
listeners. Two hooks belong to the transport: L{Link._link_ready} (open the
publishing channel in confirm mode, declare the remembered topology again and
resume every consumer) runs before the link counts as up, L{Link._link_lost}
(fail the publishes awaiting a confirm, mark the consumers idle) runs when a
link goes.

Why not L{twisted.application.internet.ClientService}
---------------------------------------------------
ClientService (Twisted 26.10, C{twisted/application/_client_service.py}) was
read and tried for this loop; it does not fit, for these reasons:

  1. A link lost while it is being set up breaks its state machine. Setup
     (AMQP handshake, confirm.select, topology replay, consumers) would run in
     C{prepareConnection}, after the endpoint has connected, so the state is
     still C{Connecting}; a broker that refuses the login (it closes the
     connection, 403), a TLS handshake refused by either side, or the setup
     timeout (the connection is aborted) all end in C{connectionLost}, whose
     proxy then calls C{_clientDisconnected}, for which C{Connecting} has no
     transition: automat raises C{NoTransition} out of C{connectionLost} (tried:
     an unhandled error on every refused attempt). Those are exactly the
     attempts whose reason we must log cleanly.
  2. One endpoint: a cluster is several URLs, each attempt the next one, and
     each with its own TLS creator; ClientService would need an endpoint
     wrapper that keeps that rotation state on the side.
  3. The backoff is not ours: after a loss ClientService waits
     C{retryPolicy(1)} before it reconnects and counts the loss as a failed
     attempt; magnet reconnects at once after a loss (the broker was fine a
     moment ago; the link's consumers are idle until then) and backs off only
     after failed attempts, C{backoff(n)} for the n-th failure in a row.
  4. Waiting for the link is bounded in time here (C{operation_timeout}, then
     L{NotConnected} naming the last attempt's error); C{whenConnected} counts
     failed attempts, and a cancelled waiter stays in its list until the next
     connect (one per timed-out publish during an outage).
  5. Stopping: ClientService's C{stopService} drops TCP (C{loseConnection})
     and waits for the close without a bound. magnet sends
     C{connection.close}, waits for close-ok at most C{close_timeout}, then
     closes the socket and aborts it if it does not go within 2 s.

What ClientService would give (a start/stop state machine, backoff) is a
small part of this module; the rest (setup before "up", the confirm state and
consumers, time-bounded waiting, the AMQP close) would be needed around it
anyway. The backoff policy itself is Twisted's (L{backoffPolicy}), and the
waits here (for the link, for the setup of an attempt, for close-ok and the
socket's close) are bounded with C{Deferred.addTimeout}.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, ConnectionClosed

from magnet.amqp.protocol import _AMQPProtocol, _ProtocolFactory, channel_error, describe
from magnet.amqp.tls import tls_creator, trust_description
from magnet.amqp.wire import BrokerURL, load_spec, parse_url
from magnet.errors import BadURL, ConnectionLost, NotConnected, Timeout
from magnet.transport import LinkListener


class LoginRefused(NotConnected):
    """The broker refused the login (403 ACCESS_REFUSED): no retry helps until
    the credentials change, so whoever waits for the link is told at once."""


class Link:
    """One link at a time to one of the brokers, kept up until L{stop}.

    See L{magnet.amqp.transport.AMQPTransport} for the parameters.
    """

    log = Logger()

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        reactor: Any,
        heartbeat: float,
        operation_timeout: float,
        backoff: Optional[Callable[[int], float]],
        connect_timeout: float,
        close_timeout: float,
        auth_mechanism: str,
        tls_options: Any,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise BadURL("no broker URL given")
        self.urls: List[BrokerURL] = [parse_url(u) for u in urls]
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.operation_timeout = operation_timeout
        self.backoff = backoff if backoff is not None else backoffPolicy(initialDelay=0.5, maxDelay=30.0,
                                                                         factor=1.7)
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.auth_mechanism = auth_mechanism.upper()
        self.tls_options = tls_options
        if tls_options is not None and any(u.has_tls_options for u in self.urls):
            raise BadURL("TLS options given both in the broker URL (cacertfile, certfile, keyfile, "
                         "server_name_indication) and as tls_options: give them one way")
        #: the TLS connection creator of each amqps URL, made (and its files read) once, here
        self._tls: Dict[BrokerURL, Any] = {}
        for url in self.urls:
            if url.tls:
                self._tls[url] = tls_options if tls_options is not None else tls_creator(url)
        #: why the last connection attempt failed (no password in it), None once connected
        self.last_error: Optional[str] = None
        self.spec = load_spec()

        #: True while the link is up (topology replayed, consumers resumed).
        self.connected = False
        self._protocol: Optional[_AMQPProtocol] = None  # the link in use, once up
        self._attempt_protocol: Optional[_AMQPProtocol] = None  # the link being set up
        self._running = False
        self._stopping = False
        self._url_index = -1
        self._failures = 0
        self._retry_call: Any = None
        self._connecting: Optional[Deferred] = None
        self._waiters: List[Deferred] = []
        self._listeners: List[LinkListener] = []
        self._stopped_d: Optional[Deferred] = None

    # -- the transport's part

    def _link_ready(self, protocol: _AMQPProtocol) -> Deferred:
        """Make a fresh, authenticated link ready for use; it counts as up once this fires."""
        raise NotImplementedError

    def _link_lost(self, protocol: _AMQPProtocol, current: bool) -> None:
        """C{protocol}'s connection is gone (C{current}: it was the link in use, not an attempt)."""
        raise NotImplementedError

    # -- connecting

    def start(self) -> None:
        """Begin connecting (and keep reconnecting with backoff)."""
        if self._running:
            return
        self._stopped_d = None
        self._running = True
        self._stopping = False
        self._connect()

    def _connect(self) -> None:
        self._retry_call = None
        if not self._running or self._stopping:
            return
        self._url_index = (self._url_index + 1) % len(self.urls)
        url = self.urls[self._url_index]
        self.log.debug("connecting to {url}", url=url)
        d = self._attempt(url)
        self._connecting = d
        d.addCallbacks(self._attempt_succeeded, self._attempt_failed, errbackArgs=(url,))

    def _endpoint(self, url: BrokerURL) -> Any:
        endpoint = HostnameEndpoint(self.reactor, url.host, url.port, timeout=self.connect_timeout)
        if url.tls:
            endpoint = wrapClientTLS(self._tls[url], endpoint)
        return endpoint

    def _tls_trust_description(self, url: BrokerURL) -> Tuple[str, Optional[str]]:
        """What the broker's certificate is checked against (see L{trust_description})."""
        return trust_description(url, self.tls_options)

    @defer.inlineCallbacks
    def _attempt(self, url: BrokerURL) -> Any:
        """Connect to C{url} and set the link up, within C{connect_timeout + operation_timeout}."""
        heartbeat = url.heartbeat if url.heartbeat is not None else self.heartbeat
        factory = _ProtocolFactory(lambda: _AMQPProtocol(self, url, self.spec, self.reactor, heartbeat))
        # HostnameEndpoint's timeout bounds each TCP connect, not the name resolution
        # before them (getaddrinfo in the reactor's thread pool, which a busy pool
        # delays without a bound): an attempt that hung there would leave the link
        # down for ever, no other URL tried. Twice the connect timeout leaves room
        # for the staggered connects to several addresses of one name.
        bound = 2 * self.connect_timeout

        def not_connected(result: Failure, seconds: float) -> Failure:
            return Failure(ConnectionLost(f"{url.masked()} did not connect within {seconds:.1f} s "
                                          f"(name resolution and TCP connect)"))

        protocol = yield self._endpoint(url).connect(factory).addTimeout(bound, self.reactor,
                                                                         onTimeoutCancel=not_connected)
        self._attempt_protocol = protocol

        def too_slow(result: Failure, seconds: float) -> Failure:
            self.log.warn("broker {url} did not complete the connection setup in time; dropping it",
                          url=protocol.url)
            return Failure(Timeout(f"the connection setup with {url.masked()} did not complete within "
                                   f"{seconds:.1f} s"))

        try:
            yield self._setup(protocol, url).addTimeout(self.connect_timeout + self.operation_timeout,
                                                        self.reactor, onTimeoutCancel=too_slow)
        except BaseException:
            if not protocol.lost and protocol.transport is not None:
                protocol.transport.abortConnection()
            raise
        finally:
            self._attempt_protocol = None
        if protocol.lost:
            raise ConnectionLost("link lost while declaring the topology again")
        return protocol

    @defer.inlineCallbacks
    def _setup(self, protocol: _AMQPProtocol, url: BrokerURL) -> Any:
        mechanism = url.mechanism or self.auth_mechanism
        try:
            yield protocol.authenticate(url.username, url.password, mechanism=mechanism)
        except Closed:
            if protocol.tls_error:
                raise ConnectionLost(protocol.tls_error) from None
            reason = protocol.close_reason or "connection closed during the handshake"
            refused = LoginRefused if reason.startswith("403") else ConnectionLost
            raise refused(f"AMQP handshake failed: {reason}") from None
        yield self._link_ready(protocol)

    def _attempt_succeeded(self, protocol: _AMQPProtocol) -> None:
        self._connecting = None
        if self._stopping:
            protocol.transport.abortConnection()
            return
        self._failures = 0
        self.last_error = None
        self._protocol = protocol
        self.connected = True
        self.log.info("connected to broker {url}", url=protocol.url)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)
        self._notify(True)

    def _attempt_failed(self, failure: Failure, url: BrokerURL) -> None:
        self._connecting = None
        if self._stopping or not self._running:
            return
        self._failures += 1
        delay = self.backoff(self._failures)
        self.last_error = describe(failure)
        refused = failure.check(LoginRefused) is not None
        # A refused login with someone waiting for the link is theirs to report
        # (the daemon stops with one critical line naming it): info here, then.
        emit = self.log.info if refused and self._waiters else self.log.warn
        emit("broker {url} refused the login ({reason}), retrying in {delay:.1f} s" if refused else
             "broker unreachable at {url} ({reason}), retrying in {delay:.1f} s", url=url,
             reason=self.last_error, delay=delay)
        self._retry_call = self.reactor.callLater(delay, self._connect)
        if refused:  # those waiting for the link learn it will not come by itself
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(LoginRefused(f"{url.masked()} refused the login: {self.last_error}"))

    def _connection_lost(self, protocol: _AMQPProtocol, reason: Failure) -> None:
        """Called by the protocol: its connection is gone. Reconnect at once if it was the link in use."""
        current = protocol is self._protocol
        self._link_lost(protocol, current)
        if not current:
            return  # a link that never came up: the attempt's errback deals with it
        self._protocol = None
        self.connected = False
        if not self._stopping:
            why = protocol.close_reason or describe(reason)
            self.log.warn("link to broker {url} lost ({reason}); reconnecting", url=protocol.url, reason=why)
        self._notify(False)
        if self._running and not self._stopping:
            self._retry_call = self.reactor.callLater(0, self._connect)

    def _notify(self, up: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:
                self.log.failure("link listener {listener!r} raised", listener=listener)

    # -- stopping

    def stop(self) -> Deferred:
        """Close the link cleanly and stop reconnecting; fires within a bound."""
        if self._stopped_d is not None:
            d: Deferred = Deferred()
            self._stopped_d.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        self._stopping = True
        self._running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(NotConnected("the transport was stopped"))
        self._stopped_d = self._close_link()
        return self._stopped_d

    @defer.inlineCallbacks
    def _close_link(self) -> Any:
        """connection.close, close-ok awaited at most C{close_timeout}; the socket gone within 2 s more."""
        if self._connecting is not None:
            self._connecting.cancel()
        attempt = self._attempt_protocol
        if attempt is not None and attempt.transport is not None and not attempt.lost:
            attempt.transport.abortConnection()
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return None
        lost = protocol.disconnected.wait()
        try:
            channel0 = yield protocol.channel(0)
            close = channel0.connection_close(reply_code=200, reply_text="magnet stopping")
            yield close.addTimeout(self.close_timeout, self.reactor)
        except Exception:
            pass
        if not protocol.lost:
            protocol.transport.loseConnection()
        try:
            yield lost.addTimeout(2.0, self.reactor)
        except Exception:
            if not protocol.lost:
                protocol.transport.abortConnection()
        return None

    # -- waiting for the link

    def when_connected(self, timeout: Optional[float] = None) -> Deferred:
        """Fires (with None) once the link is up, at once if it is; L{NotConnected} after C{timeout}."""
        if self.connected:
            return succeed(None)
        return self._wait_link(timeout).addCallback(lambda _: None)

    def add_link_listener(self, listener: LinkListener) -> None:
        """C{listener(True)} after every (re)connect and replay, C{listener(False)} on every loss."""
        self._listeners.append(listener)

    def _wait_link(self, timeout: Optional[float]) -> Deferred:
        """Fires with the protocol once the link is up; L{NotConnected} after C{timeout}."""
        if self.connected and self._protocol is not None and not self._protocol.going:
            return succeed(self._protocol)
        if self._stopping:
            return defer.fail(NotConnected("the transport is stopped"))

        def forget(d: Deferred) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred = Deferred(forget)
        self._waiters.append(waiter)
        if timeout is not None:
            def expired(result: Failure, seconds: float) -> Failure:
                return Failure(NotConnected(
                    f"no link to the broker ({', '.join(u.masked() for u in self.urls)}) within {seconds:.1f} s"
                    f"{self._last_error_note()}"))

            waiter.addTimeout(timeout, self.reactor, onTimeoutCancel=expired)
        return waiter

    def _last_error_note(self) -> str:
        return f"; last attempt: {self.last_error}" if self.last_error else ""

    @defer.inlineCallbacks
    def _operation(self, what: str, run: Callable[[_AMQPProtocol], Deferred]) -> Any:
        """Run C{run(protocol)} on the link, waiting for it and retrying after a link loss."""
        deadline = self.reactor.seconds() + self.operation_timeout
        while True:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise NotConnected(f"{what}: no broker link within {self.operation_timeout:.1f} s"
                                   f"{self._last_error_note()}")
            protocol = yield self._wait_link(remaining)
            try:
                result = yield run(protocol)
            except Closed as e:
                # ConnectionClosed: the broker's connection.close failed the channel's waiters
                # before txAMQP marked the protocol closed; the link is going, not the operation
                if protocol.going or protocol is not self._protocol or isinstance(e, ConnectionClosed):
                    # the link went down under it (or the broker closed it: a node that stops or
                    # pauses closes with 320 CONNECTION_FORCED): try again on the next one, after a
                    # pause, so that this never spins while the old link is going
                    yield deferLater(self.reactor, 0.05, lambda: None)
                    continue
                raise channel_error(e) from None
            return result
