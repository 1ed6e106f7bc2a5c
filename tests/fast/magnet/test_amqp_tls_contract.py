"""magnet.amqp.tls's contract, in-process: the TLS options of an amqps:// URL
become a connection creator (or a L{BadURL} at once), and a refused TLS link
is explained in words that say what to change. Certificates come from a
throwaway CA (tests/rabbitmq.py's TestCA); no handshake is made.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, List, Optional

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.error import ConnectionDone
from twisted.internet.error import ConnectionLost as TwistedConnectionLost
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from magnet.amqp import AMQPTransport, _AMQPProtocol
from magnet.amqp.tls import tls_creator, tls_failure, trust_description
from magnet.amqp.wire import parse_url
from magnet.errors import BadURL, ConnectionLost
from tests.fast.magnet.test_amqp_protocol_contract import SPEC, _Owner
from tests.fast.magnet.test_amqp_transport_contract import Harness
from tests.rabbitmq import TestCA


def _url(**options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"amqps://guest:guest@broker.example:5671/?{query}"


class _Handle:
    def __init__(self, chain: Optional[List[Any]]) -> None:
        self.chain = chain

    def get_peer_cert_chain(self, as_cryptography: bool = False) -> Optional[List[Any]]:
        if self.chain is None:
            return None
        if as_cryptography:
            return [c.to_cryptography() for c in self.chain]
        return self.chain


class _TLSTransport(StringTransport):
    """A transport whose TLS handle shows the broker's certificate chain."""

    def __init__(self, chain: Optional[List[Any]] = None) -> None:
        super().__init__()
        self.handle = _Handle(chain)

    def getHandle(self) -> _Handle:
        return self.handle


def _ssl_error(*reasons: str) -> Failure:
    return Failure(SSL.Error([("SSL routines", "", r) for r in reasons]))


class _CA(SynchronousTestCase):
    ca: TestCA

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="magnet-tls-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = TestCA(self.dir)
        self.server_cert, self.server_key = self.ca.issue("server", ["broker.example"])
        self.client_cert, self.client_key = self.ca.issue("client", ["client"], client=True)

    def chain(self, cert_file: str) -> List[Any]:
        with open(cert_file, "rb") as f:
            return [crypto.load_certificate(crypto.FILETYPE_PEM, f.read())]


class CreatorTests(_CA):
    def test_a_ca_file_and_a_client_certificate(self) -> None:
        url = parse_url(_url(cacertfile=self.ca.cert_file, certfile=self.client_cert, keyfile=self.client_key,
                             server_name_indication="other.example"))
        creator = tls_creator(url)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))
        self.assertEqual(creator._hostnameASCII, "other.example")

    def test_the_system_trust_store_by_default(self) -> None:
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(tls_creator(parse_url("amqps://h/"))))

    def test_the_key_may_be_in_the_certificate_file_with_the_chain(self) -> None:
        both = os.path.join(self.dir, "both.pem")
        with open(both, "wb") as out:
            for path in (self.client_cert, self.ca.cert_file, self.client_key):
                with open(path, "rb") as f:
                    out.write(f.read() + b"\n")
        tls_creator(parse_url(_url(certfile=both)))

    def test_unusable_files_are_badurl_at_once(self) -> None:
        empty = os.path.join(self.dir, "empty.pem")
        with open(empty, "wb") as f:
            f.write(b"nothing here")
        broken = os.path.join(self.dir, "broken.pem")
        with open(broken, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        broken_key = os.path.join(self.dir, "broken.key")
        with open(broken_key, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        missing = os.path.join(self.dir, "missing.pem")
        for options, words in [
            ({"cacertfile": missing}, "cannot read it"),
            ({"cacertfile": empty}, "no PEM CERTIFICATE in it"),
            ({"cacertfile": broken}, "not a usable CA certificate"),
            ({"certfile": broken, "keyfile": self.client_key}, "not a usable certificate"),
            ({"certfile": self.client_cert, "keyfile": broken_key}, "not a usable private key"),
            ({"certfile": self.client_cert, "keyfile": self.server_key}, "does not belong to the certificate"),
            ({"certfile": self.client_cert}, "no PEM PRIVATE KEY"),
        ]:
            with self.assertRaises(BadURL, msg=str(options)) as caught:
                tls_creator(parse_url(_url(**options)))
            self.assertIn(words, str(caught.exception), options)

    def test_the_transport_makes_each_creator_once_and_refuses_options_given_twice(self) -> None:
        transport = AMQPTransport([_url(cacertfile=self.ca.cert_file), "amqp://plain/"], reactor=Clock())
        self.assertEqual(list(transport._tls), [transport.urls[0]])
        with self.assertRaises(BadURL) as caught:
            AMQPTransport(_url(cacertfile=self.ca.cert_file), reactor=Clock(), tls_options=object())
        self.assertIn("give them one way", str(caught.exception))
        mine = object()
        transport = AMQPTransport("amqps://h/", reactor=Clock(), tls_options=mine)
        self.assertIs(transport._tls[transport.urls[0]], mine)
        self.assertEqual(transport._tls_trust_description(transport.urls[0]), ("the tls_options given", None))

    def test_the_endpoint_of_an_amqps_url_wraps_tls(self) -> None:
        # a memory reactor: nothing connects, and HostnameEndpoint gets the name resolver it wants
        transport = AMQPTransport(_url(cacertfile=self.ca.cert_file), reactor=MemoryReactorClock())
        endpoint = transport._endpoint(transport.urls[0])
        self.assertEqual(type(endpoint).__name__, "_WrapperEndpoint")
        self.assertEqual(type(transport._endpoint(parse_url("amqp://h/"))).__name__, "HostnameEndpoint")

    def test_trust_description(self) -> None:
        self.assertEqual(trust_description(parse_url(_url(cafile="/ca.pem")), None), ("the CA file /ca.pem", "/ca.pem"))
        self.assertEqual(trust_description(parse_url("amqps://h/"), None), ("the system's trust store", ""))
        self.assertEqual(trust_description(parse_url("amqps://h/"), object()), ("the tls_options given", None))


class DiagnosisTests(_CA):
    def diagnose(self, failure: Failure, *, done: bool = False, url: Optional[str] = None,
                 trust: Any = ("the system's trust store", ""), chain: Optional[List[Any]] = None) -> Optional[str]:
        return tls_failure(failure, parse_url(url or _url()), done, trust, _TLSTransport(chain))

    def test_a_hostname_mismatch_names_what_the_certificate_is_for(self) -> None:
        words = self.diagnose(Failure(VerificationError(errors=[])), chain=self.chain(self.client_cert))
        assert words is not None
        self.assertIn("does not name 'broker.example'", words)
        self.assertIn("(for DNS:client)", words)
        self.assertIn("server_name_indication=", words)
        # no chain to show: the words still say what failed
        self.assertIn("hostname mismatch", self.diagnose(Failure(VerificationError(errors=[]))) or "")

    def test_an_untrusted_certificate_says_which_ca_to_give(self) -> None:
        stranger = TestCA(os.path.join(self.dir, "other"), name="stranger CA")
        cert, _ = stranger.issue("server2", ["broker.example"])
        words = self.diagnose(_ssl_error("certificate verify failed"), chain=self.chain(cert))
        assert words is not None
        self.assertIn("is not trusted", words)
        self.assertIn("issued by CN=stranger CA", words)
        self.assertIn("checked against the system's trust store", words)
        self.assertIn("cacertfile=PATH", words)
        # against a CA file that does not hold its issuer: OpenSSL's reason, no hint
        words = self.diagnose(_ssl_error("certificate verify failed"), chain=self.chain(cert),
                              trust=(f"the CA file {self.ca.cert_file}", self.ca.cert_file))
        assert words is not None
        self.assertIn(f"checked against the CA file {self.ca.cert_file}", words)
        self.assertIn("unable to get local issuer certificate", words)
        self.assertNotIn("cacertfile=PATH", words)
        # a chain that does verify now (say, the CA file changed since): the names only
        words = self.diagnose(_ssl_error("certificate verify failed"), chain=self.chain(self.server_cert),
                              trust=("the CA file", self.ca.cert_file))
        self.assertIn("CN=broker.example, issued by CN=magnet test CA", words or "")
        # the caller's own options: nothing to check again
        words = self.diagnose(_ssl_error("certificate verify failed"), trust=("the tls_options given", None))
        self.assertIn("certificate verify failed", words or "")

    def test_a_port_that_does_not_speak_tls(self) -> None:
        words = self.diagnose(_ssl_error("wrong version number"))
        self.assertIn("the port does not speak TLS", words or "")

    def test_client_certificates_wanted_or_refused(self) -> None:
        words = self.diagnose(_ssl_error("tlsv13 alert certificate required"))
        self.assertIn("requires a client certificate", words or "")
        words = self.diagnose(_ssl_error("tlsv1 alert unknown ca"), url=_url(certfile="/c.pem"))
        self.assertIn("does not accept the client certificate /c.pem", words or "")

    def test_other_tls_errors_before_and_after_the_handshake(self) -> None:
        self.assertEqual(self.diagnose(_ssl_error("bad mac")), "TLS handshake failed at broker.example:5671: bad mac")
        self.assertEqual(self.diagnose(_ssl_error("bad mac"), done=True),
                         "TLS error on the link to broker.example:5671: bad mac")
        self.assertIn("TLS error", self.diagnose(Failure(SSL.Error())) or "")

    def test_a_link_closed_before_the_handshake_finished(self) -> None:
        self.assertIn("the broker closed the connection before the handshake finished",
                      self.diagnose(Failure(ConnectionDone())) or "")
        self.assertIn("reset. before the handshake finished",
                      self.diagnose(Failure(TwistedConnectionLost("reset"))) or "")
        self.assertIsNone(self.diagnose(Failure(ConnectionDone()), done=True))


class ProtocolTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.owner = _Owner()
        self.proto = _AMQPProtocol(self.owner, parse_url("amqps://broker.example/"), SPEC, self.clock, 0)
        self.wire = _TLSTransport()
        self.proto.makeConnection(self.wire)

    def test_a_handshake_not_finished_in_time_aborts_the_link(self) -> None:
        self.clock.advance(self.owner.connect_timeout)
        self.assertTrue(self.wire.disconnecting)
        self.assertIn("not finished within 5.0 s (is it the broker's TLS port?)", self.proto.tls_error or "")
        self.assertEqual(self.proto.close_reason, self.proto.tls_error)

    def test_a_finished_handshake_stops_the_timer(self) -> None:
        self.proto.handshakeCompleted()
        self.assertTrue(self.proto.tls_done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_refused_link_says_why_in_words(self) -> None:
        self.proto.connectionLost(_ssl_error("wrong version number"))
        self.assertIn("does not speak TLS", self.proto.tls_error or "")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_transport_names_the_tls_reason_in_its_notconnected(self) -> None:
        h = Harness(_url())
        h.transport.start()
        h.broker.drop(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        self.assertIn("TLS verification failed", h.transport.last_error or "")
        self.assertIn("checked against the system's trust store", h.transport.last_error or "")
        waiter = h.transport.when_connected(timeout=0.5)
        h.clock.advance(0.5)
        self.assertIn("last attempt: TLS verification failed", str(self.failureResultOf(waiter).value))
        h.transport.stop()
        self.flushLoggedErrors(ConnectionLost)
