"""TLS for C{amqps://}: the client's TLS options, and why a TLS link was refused.

Two things live here, both about the broker's certificate and nothing about AMQP:

  - L{tls_creator}: the C{IOpenSSLClientConnectionCreator} of an C{amqps://}
    URL (its C{cacertfile=}, C{certfile=}, C{keyfile=},
    C{server_name_indication=} options), made once when the transport is
    built, so an unreadable file is a L{BadURL} at once and not an error of
    every reconnect attempt;
  - L{tls_failure}: the words for a refused or broken TLS link (an untrusted
    or misnamed certificate, a port that does not speak TLS, a client
    certificate the broker wants or refuses), because OpenSSL's own reasons
    ("certificate verify failed") do not say what to change. The transport
    logs them and names them in the L{NotConnected} of callers waiting for
    the link.
"""
from __future__ import annotations

import re
import ssl as _stdlib_ssl
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from magnet.amqp.wire import BrokerURL
from magnet.errors import BadURL


def trust_description(url: BrokerURL, tls_options: Any) -> Tuple[str, Optional[str]]:
    """What the broker's certificate is checked against, for messages, and
    where to find those CAs again: the CA file, "" for the system's trust
    store, None when unknown (the caller's own C{tls_options})."""
    if tls_options is not None:
        return "the tls_options given", None
    if url.cafile:
        return f"the CA file {url.cafile}", url.cafile
    return "the system's trust store", ""


def tls_creator(url: BrokerURL) -> Any:
    """The client connection creator of an C{amqps://} URL: the broker's
    certificate verified against the URL's CA file (else the system's trust
    store) and its name against the URL's host (or C{server_name_indication});
    a client certificate if the URL names one. L{BadURL} if a file is unusable."""
    try:
        from twisted.internet import ssl
    except ImportError as e:  # pragma: no cover - pyOpenSSL missing
        raise BadURL(f"amqps:// needs pyOpenSSL and service_identity (pip install 'twisted[tls]'): {e}") from None
    trust = None
    if url.cafile:
        blocks = _pem_blocks(url.cafile, "cacertfile", "CERTIFICATE")
        try:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in blocks])
        except Exception as e:
            raise BadURL(f"cacertfile {url.cafile}: not a usable CA certificate ({e})") from None
    extra: Dict[str, Any] = {}
    if url.certfile:
        extra = _client_certificate(url)
    try:
        return ssl.optionsForClientTLS(url.tls_name, trustRoot=trust, extraCertificateOptions=extra)
    except Exception as e:
        raise BadURL(f"TLS options for {url.masked()}: {e}") from None


def _client_certificate(url: BrokerURL) -> Dict[str, Any]:
    """The client certificate (and the rest of its chain) and key of the URL's
    C{certfile} / C{keyfile} (the key may be in C{certfile}), as options of
    Twisted's C{CertificateOptions}; L{BadURL} if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    assert url.certfile is not None
    key_option, key_path = ("keyfile", url.keyfile) if url.keyfile else ("certfile", url.certfile)
    try:
        chain = x509.load_pem_x509_certificates(b"\n".join(_pem_blocks(url.certfile, "certfile", "CERTIFICATE")))
    except ValueError as e:
        raise BadURL(f"certfile {url.certfile}: not a usable certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(_pem_blocks(key_path, key_option, "PRIVATE KEY")[0], password=None)
    except (ValueError, TypeError) as e:
        raise BadURL(f"{key_option} {key_path}: not a usable private key (an unencrypted PEM key is needed: "
                     f"{e})") from None

    def public(k: Any) -> bytes:
        return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    if public(chain[0].public_key()) != public(key.public_key()):
        raise BadURL(f"{key_option} {key_path}: the key does not belong to the certificate in {url.certfile}")
    options: Dict[str, Any] = {"certificate": chain[0], "privateKey": key}
    if len(chain) > 1:
        options["extraCertChain"] = chain[1:]
    try:
        from OpenSSL import __version__ as pyopenssl_version
        if tuple(int(p) for p in pyopenssl_version.split(".")[:2]) < (24, 3):  # pragma: no cover
            # older pyOpenSSL takes only its own wrappers
            from OpenSSL import crypto
            options = {"certificate": crypto.X509.from_cryptography(chain[0]),
                       "privateKey": crypto.PKey.from_cryptography_key(key),
                       **({"extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]]}
                          if len(chain) > 1 else {})}
    except ValueError:  # pragma: no cover - an unusual version string
        pass
    return options


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)


def _pem_blocks(path: str, option: str, kind: str) -> List[bytes]:
    """The PEM blocks of C{kind} (C{CERTIFICATE}; C{PRIVATE KEY} also matches
    C{EC PRIVATE KEY}, C{RSA PRIVATE KEY}) in the file; L{BadURL} if none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadURL(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)
              if m.group(1) == kind.encode() or (kind == "PRIVATE KEY" and m.group(1).endswith(b"PRIVATE KEY"))]
    if not blocks:
        raise BadURL(f"{option} {path}: no PEM {kind} in it")
    return blocks


#: OpenSSL's reasons that mean the other end does not speak TLS at all
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure", "http request",
            "unknown protocol", "record too long")

#: the broker's alerts about the client's certificate
_CLIENT_CERT_REFUSED = ("alert unknown ca", "alert bad certificate", "alert certificate unknown",
                        "alert certificate expired", "alert unsupported certificate", "alert certificate revoked")


def tls_failure(reason: Failure, url: BrokerURL, handshake_done: bool, trust: Tuple[str, Optional[str]],
                 transport: Any) -> Optional[str]:
    """Why a TLS link was lost, in words for the log and L{NotConnected}, or
    None when the loss had nothing to do with TLS (then AMQP says why)."""
    value = reason.value
    where = f"{url.host}:{url.port}"
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, VerificationError):
        names = _peer_names(transport)
        return (f"TLS verification failed: the broker's certificate{names} does not name "
                f"{url.tls_name!r} (hostname mismatch at {where}; server_name_indication= names the "
                f"host the certificate is for, if it is not the URL's)")
    if isinstance(value, SSL.Error):
        reasons = _openssl_reasons(value)
        text = "; ".join(reasons) or str(value) or "TLS error"
        if any("certificate verify failed" in r for r in reasons):
            what, cas = trust
            detail = _diagnose_chain(transport, cas) if cas is not None else ""
            unknown_ca = not detail or "issuer" in detail or "self-signed" in detail or "self signed" in detail
            hint = ("; give the CA that signed it with cacertfile=PATH in the amqps:// URL"
                    if cas == "" and unknown_ca else "")
            return (f"TLS verification failed: the broker's certificate at {where} is not trusted "
                    f"({detail or text}), checked against {what}{hint}")
        if any(n in r for r in reasons for n in _NOT_TLS):
            return (f"TLS handshake failed at {where} ({text}): the port does not speak TLS; amqps:// needs the "
                    f"broker's TLS listener (5671 by default), amqp:// its plain one")
        if any("alert certificate required" in r for r in reasons):
            return (f"TLS refused by the broker at {where} ({text}): it requires a client certificate "
                    f"(certfile= and keyfile= in the amqps:// URL)")
        if any(n in r for r in reasons for n in _CLIENT_CERT_REFUSED):
            return (f"TLS refused by the broker at {where} ({text}): it does not accept the client "
                    f"certificate{' ' + url.certfile if url.certfile else ''}")
        if handshake_done:
            return f"TLS error on the link to {where}: {text}"
        return f"TLS handshake failed at {where}: {text}"
    if not handshake_done:
        why = ("the broker closed the connection" if isinstance(value, ConnectionDone)
               else str(value) or type(value).__name__)
        return f"TLS handshake failed at {where}: {why} before the handshake finished"
    return None


def _openssl_reasons(error: Exception) -> List[str]:
    out = []
    for entry in (error.args[0] if error.args and isinstance(error.args[0], list) else []):
        if isinstance(entry, tuple) and entry:
            out.append(str(entry[-1]))
        else:
            out.append(str(entry))
    return [r for r in out if r]


def _peer_names(transport: Any) -> str:
    """C{" (for DNS:a, IP:b)"}: the names in the broker's certificate, if it can be had."""
    try:
        from cryptography import x509
        # the chain, not get_peer_certificate(): a certificate refused during
        # the handshake never becomes the session's peer certificate
        chain = transport.getHandle().get_peer_cert_chain(as_cryptography=True)
        if not chain:
            return ""
        cert = chain[0]
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            names += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = [cert.subject.rfc4514_string()]
        return f" (for {', '.join(names)})"
    except Exception:
        return ""


def _diagnose_chain(transport: Any, cafile: str) -> str:
    """Check the broker's certificate chain again, after the handshake
    refused it, against C{cafile} (or the system's CAs if empty), for
    OpenSSL's own reason (unable to get local issuer certificate, certificate
    has expired, ...) and the certificate's names; empty if that cannot be had."""
    try:
        from OpenSSL import crypto
        chain = transport.getHandle().get_peer_cert_chain()
        if not chain:
            return ""
        leaf, rest = chain[0], chain[1:]
        store = crypto.X509Store()
        if cafile:
            store.load_locations(cafile)
        else:
            paths = _stdlib_ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        leaf_c = leaf.to_cryptography()
        names = f"{leaf_c.subject.rfc4514_string()}, issued by {leaf_c.issuer.rfc4514_string()}"
        try:
            crypto.X509StoreContext(store, leaf, chain=rest).verify_certificate()
        except crypto.X509StoreContextError as e:
            return f"{names}: {e}"
        return names
    except Exception:
        return ""
