"""
Private RabbitMQ nodes for the test suite, and broker discovery.

A :class:`PrivateRabbitMQ` is a RabbitMQ node of its own: its own node name
(``magnet-test-<random>@localhost``), AMQP port, Erlang distribution port,
data, log, config and (empty) plugins files, and its own Erlang cookie, all
under one directory. It listens on 127.0.0.1 only and never touches the
shared node (``rabbit@localhost`` on 5672): the system's
``/etc/rabbitmq/rabbitmq-env.conf`` and ``rabbitmq.conf`` are replaced by
files of its own. Tests use it to stop, kill and restart a broker.

A node can also listen for AMQP over TLS (``amqps://``) on a port of its own,
with a certificate from a throwaway CA made at test time (:class:`TestCA`):
``PrivateRabbitMQ(tls=True)``, or ``node.enable_tls()`` before ``start()``.

Only the standard library is used here, so that this module works under
pytest and under trial alike, and before anything is installed; the TLS
certificates alone need the ``cryptography`` package (imported when a CA is
made).
"""

import atexit
import datetime
import ipaddress
import os
import random
import shutil
import signal
import socket
import ssl
import string
import subprocess
import time
import urllib.parse

__all__ = [
    "AMQP_HEADER",
    "BrokerUnavailable",
    "PrivateRabbitMQ",
    "TestCA",
    "amqp_answers",
    "amqps_answers",
    "ensure_rabbitmq_server",
    "find_rabbitmq_server",
    "pid_alive",
    "free_port",
    "url_host_port",
]

#: The protocol header a client sends first (AMQP 0-9-1).
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"

#: Where Debian's package puts the real scripts (the ones in /usr/sbin are
#: wrappers that ``su`` to the rabbitmq user and ``cd /var/lib/rabbitmq``).
_DEBIAN_RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"

INSTALL_HINT = (
    "No RabbitMQ broker for the tests. Do one of:\n"
    "  - set OOIDX_TEST_BROKER=amqp://user:pass@host:port/vhost to a running broker;\n"
    "  - start RabbitMQ on 127.0.0.1:5672 with the guest user;\n"
    "  - install RabbitMQ so that the tests can start a private node: on Debian or\n"
    "    Ubuntu `sudo apt-get install rabbitmq-server` (run as root, the tests do\n"
    "    this themselves), on Fedora `sudo dnf install rabbitmq-server`, on macOS\n"
    "    `brew install rabbitmq`; rabbitmq-server must then be on PATH or in\n"
    "    /usr/lib/rabbitmq/bin."
)


class BrokerUnavailable(RuntimeError):
    """No broker could be found, started or installed."""


def free_port(host="127.0.0.1"):
    """A TCP port that is free on *host* right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_host_port(url):
    """(host, port) of an amqp:// or amqps:// URL, with the default ports."""
    parts = urllib.parse.urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "localhost", parts.port or default


def amqp_answers(host="127.0.0.1", port=5672, timeout=2.0):
    """
    True if an AMQP 0-9-1 broker answers on host:port: it replies to the
    protocol header with a ``connection.start`` method frame. A plain TCP
    listener, or a closed port, gives False.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = _greet(s, timeout)
    except OSError:
        return False
    return _is_connection_start(data)


def _greet(s, timeout):
    """Send the AMQP protocol header on socket *s*; the first bytes of the answer."""
    s.sendall(AMQP_HEADER)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < 11 and time.monotonic() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _is_connection_start(data):
    # frame type 1 (method), channel 0, then size (4 bytes), class 10, method 10
    return (
        len(data) >= 11
        and data[0] == 1
        and data[1:3] == b"\x00\x00"
        and data[7:11] == b"\x00\x0a\x00\x0a"
    )


def amqps_answers(host="127.0.0.1", port=5671, cafile=None, timeout=2.0,
                  server_hostname=None, certfile=None, keyfile=None):
    """
    True if an AMQP 0-9-1 broker answers over TLS on host:port: the TLS
    handshake succeeds with the broker's certificate verified against
    *cafile* (and its name against *server_hostname*, by default *host*),
    and the broker replies to the protocol header with ``connection.start``.
    *certfile* / *keyfile*: a client certificate to present.
    """
    context = ssl.create_default_context(cafile=cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            with context.wrap_socket(
                    raw, server_hostname=server_hostname or host) as s:
                data = _greet(s, timeout)
    except (OSError, ssl.SSLError):
        return False
    return _is_connection_start(data)


def find_rabbitmq_server():
    """
    The directory that holds runnable ``rabbitmq-server`` and ``rabbitmqctl``
    scripts, or None. Debian's /usr/sbin ones are wrappers that switch user
    and ignore our environment, so the real ones are preferred.
    """
    candidates = [os.environ.get("OOIDX_RABBITMQ_BIN"), _DEBIAN_RABBITMQ_BIN]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    candidates += [
        "/usr/local/sbin",
        "/opt/homebrew/sbin",
        "/usr/lib/rabbitmq/sbin",
    ]
    for d in candidates:
        if not d:
            continue
        server = os.path.join(d, "rabbitmq-server")
        ctl = os.path.join(d, "rabbitmqctl")
        if os.access(server, os.X_OK) and os.access(ctl, os.X_OK):
            if _is_wrapper(server):
                continue
            return d
    return None


def _is_wrapper(path):
    """Debian's rabbitmq-script-wrapper (su + cd), not the real script."""
    try:
        with open(os.path.realpath(path), "rb") as f:
            head = f.read(4096)
    except OSError:
        return True
    return b"su rabbitmq" in head


def _is_debian_like():
    return os.path.exists("/etc/debian_version") and shutil.which("apt-get")


def ensure_rabbitmq_server(log=print):
    """
    The directory of an installed rabbitmq-server, installing Debian's
    package first when run as root on a Debian-like system. Raises
    BrokerUnavailable with installation advice otherwise.
    """
    found = find_rabbitmq_server()
    if found:
        return found
    if os.geteuid() == 0 and _is_debian_like():
        log("rabbitmq-server is not installed: installing it with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # The package's postinst may start the system's own node; on a
        # container without an init system that step fails harmlessly.
        cmds = [
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends",
             "rabbitmq-server"],
        ]
        for cmd in cmds:
            r = subprocess.run(
                cmd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=900,
            )
            if r.returncode != 0 and cmd[1] == "install" and find_rabbitmq_server():
                # Unpacked, but its postinst could not start the system's
                # service (no init system): the scripts are all we need.
                log("apt-get install exited %d, but rabbitmq-server is "
                    "there: going on" % r.returncode)
            elif r.returncode != 0:
                tail = r.stdout.decode("utf-8", "replace")[-3000:]
                raise BrokerUnavailable(
                    "%s failed (exit %d):\n%s\n\n%s"
                    % (" ".join(cmd), r.returncode, tail, INSTALL_HINT))
        found = find_rabbitmq_server()
        if found:
            return found
        raise BrokerUnavailable(
            "apt-get installed rabbitmq-server, but no runnable "
            "rabbitmq-server script was found.\n\n" + INSTALL_HINT)
    raise BrokerUnavailable(INSTALL_HINT)


def pid_alive(pid):
    """True if process *pid* exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _random_suffix(n=8):
    return "".join(random.choice(string.ascii_lowercase + string.digits)
                   for _ in range(n))


class TestCA:
    """
    A throwaway certificate authority for TLS tests, made in *directory*.

    ``cert_file`` is the CA certificate (PEM) a client is given to trust;
    ``issue(name, hostnames)`` makes a certificate and key signed by this CA
    for a server (or, with ``client=True``, a client) and returns their
    paths. Keys are EC P-256 (fast to make); certificates are valid from an
    hour ago for *days* days. Needs the ``cryptography`` package.
    """

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, directory, name="magnet test CA", days=2):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.name = name
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        self.cert_file = os.path.join(self.directory, slug + ".ca.pem")
        self.key_file = os.path.join(self.directory, slug + ".ca.key")
        self._write(self.cert_file, self._cert_pem(self._cert))
        self._write(self.key_file, self._key_pem(self._key), private=True)

    @staticmethod
    def _cert_pem(cert):
        from cryptography.hazmat.primitives import serialization
        return cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _key_pem(key):
        from cryptography.hazmat.primitives import serialization
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    @staticmethod
    def _write(path, data, private=False):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def issue(self, name, hostnames=("localhost", "127.0.0.1"), client=False,
              directory=None):
        """
        A certificate for *hostnames* (DNS names and IP addresses, as the
        subject alternative names; the first is also the common name),
        signed by this CA, written as NAME.pem and NAME.key in *directory*
        (the CA's by default). Returns ``(cert_file, key_file)``.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        alt_names = []
        for h in hostnames:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt_names.append(x509.DNSName(h))
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(
                NameOID.COMMON_NAME, hostnames[0] if hostnames else name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client
                 else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if alt_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        directory = os.path.abspath(os.fspath(directory or self.directory))
        os.makedirs(directory, exist_ok=True)
        cert_file = os.path.join(directory, name + ".pem")
        key_file = os.path.join(directory, name + ".key")
        self._write(cert_file, self._cert_pem(cert))
        self._write(key_file, self._key_pem(key), private=True)
        return cert_file, key_file

    def __repr__(self):
        return "<TestCA %r %s>" % (self.name, self.cert_file)


class PrivateRabbitMQ:
    """
    A RabbitMQ node of its own, under *tmpdir*.

    ``start()`` runs ``rabbitmq-server`` in the background (its own process
    group) and returns once the AMQP port answers; ``stop()`` stops it
    cleanly; ``kill()`` kills it with SIGKILL, as a crash would;
    ``restart()`` is stop (or kill) and start. The node keeps its name, ports
    and data across restarts, so durable queues and persistent messages
    survive them. ``url`` is its amqp:// URL (guest over loopback).

    With *tls* (True, or a dict of :meth:`enable_tls` options) the node also
    listens for AMQP over TLS on ``tls_port``: ``amqps_url`` is that URL,
    ``ca`` the :class:`TestCA` that signed its certificate (``ca.cert_file``
    is what a client must trust). The plain port stays open as well.
    """

    def __init__(self, name=None, tmpdir=None, bindir=None, port=None,
                 dist_port=None, tls=None):
        self.name = name or ("magnet-test-" + _random_suffix())
        if "@" in self.name:
            raise ValueError("give the node name without @host: %r" % name)
        self.nodename = self.name + "@localhost"
        if tmpdir is None:
            import tempfile
            tmpdir = tempfile.mkdtemp(prefix=self.name + "-")
        self.basedir = os.path.abspath(os.fspath(tmpdir))
        self.bindir = bindir or find_rabbitmq_server()
        if self.bindir is None:
            raise BrokerUnavailable(INSTALL_HINT)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.process = None
        self._logfile = None
        #: more ``erl`` arguments for the node and its rabbitmqctl (e.g.
        #: ``-kernel net_ticktime 6``: both ends of a link should agree)
        self.extra_erl_flags = ""
        self.tls_port = None
        self.ca = None
        self.tls_cert_file = None
        self.tls_key_file = None
        self.tls_verify = None
        self.tls_fail_if_no_peer_cert = None
        self.tls_hostnames = ()
        self.tls_client_cert = None
        self._prepare()
        if tls:
            self.enable_tls(**(tls if isinstance(tls, dict) else {}))

    def enable_tls(self, port=None, ca=None, hostnames=("localhost", "127.0.0.1"),
                   cert_file=None, key_file=None, verify="verify_peer",
                   fail_if_no_peer_cert=False):
        """
        Add a TLS listener (``listeners.ssl.default``) on 127.0.0.1:*port*
        (a free port by default), with a server certificate for *hostnames*
        issued by *ca* (a :class:`TestCA`; a new one under the node's
        directory by default), or the given *cert_file* / *key_file* (then
        *ca* must be the CA that signed them). *verify* and
        *fail_if_no_peer_cert* are RabbitMQ's ``ssl_options`` of those
        names: by default the node asks a client for a certificate (and
        checks one against the CA) but does not require it; if it does, the
        helper's own checks present ``tls_client_cert`` (issued by *ca*).
        Call before ``start()`` (or restart the node). Returns the node.
        """
        if verify not in ("verify_peer", "verify_none"):
            raise ValueError("verify must be verify_peer or verify_none")
        if ca is None:
            ca = TestCA(self._path("tls"), name=self.name + " CA")
        if cert_file is None:
            cert_file, key_file = ca.issue(
                "server", hostnames, directory=self._path("tls"))
        elif key_file is None:
            raise ValueError("cert_file needs its key_file")
        self.ca = ca
        self.tls_hostnames = tuple(hostnames)
        self.tls_cert_file = os.path.abspath(cert_file)
        self.tls_key_file = os.path.abspath(key_file)
        self.tls_verify = verify
        self.tls_fail_if_no_peer_cert = bool(fail_if_no_peer_cert)
        self.tls_port = port or self.tls_port or free_port()
        # a node that requires client certificates accepts the helper's own
        self.tls_client_cert = ca.issue(
            "helper-client", ["magnet test helper"], client=True,
            directory=self._path("tls")) if fail_if_no_peer_cert else None
        self._write_config()
        return self

    # -- paths and environment ------------------------------------------

    @property
    def url(self):
        return "amqp://guest:guest@%s:%d/" % (self.host, self.port)

    @property
    def amqps_url(self):
        """The amqps:// URL of the TLS listener (guest over loopback)."""
        if self.tls_port is None:
            raise RuntimeError("%s has no TLS listener (enable_tls)" % self.nodename)
        return "amqps://guest:guest@%s:%d/" % (self.host, self.tls_port)

    def _path(self, *parts):
        return os.path.join(self.basedir, *parts)

    @property
    def pid_file(self):
        return self._path(self.name + ".pid")

    @property
    def log_dir(self):
        return self._path("log")

    @property
    def console_log(self):
        return self._path("log", "console.log")

    def _prepare(self):
        for d in ("home", "mnesia", "log"):
            os.makedirs(self._path(d), exist_ok=True)
        cookie = self._path("home", ".erlang.cookie")
        if not os.path.exists(cookie):
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(_random_suffix(20).upper())
        self._write_config()
        # An env file of our own, so /etc/rabbitmq/rabbitmq-env.conf (which
        # names the shared node) is not read.
        with open(self._path("rabbitmq-env.conf"), "w") as f:
            f.write("# private test node %s\n" % self.nodename)
        with open(self._path("enabled_plugins"), "w") as f:
            f.write("[].\n")

    def _write_config(self):
        lines = [
            "listeners.tcp.default = 127.0.0.1:%d" % self.port,
            "loopback_users.guest = true",
            "disk_free_limit.absolute = 10MB",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls_port is not None:
            lines += [
                "listeners.ssl.default = 127.0.0.1:%d" % self.tls_port,
                "ssl_options.cacertfile = %s" % self.ca.cert_file,
                "ssl_options.certfile = %s" % self.tls_cert_file,
                "ssl_options.keyfile = %s" % self.tls_key_file,
                "ssl_options.verify = %s" % self.tls_verify,
                "ssl_options.fail_if_no_peer_cert = %s"
                % ("true" if self.tls_fail_if_no_peer_cert else "false"),
            ]
        with open(self._path("rabbitmq.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def env(self):
        """The environment for rabbitmq-server and rabbitmqctl."""
        env = {
            k: v for k, v in os.environ.items()
            if not (k.startswith("RABBITMQ_") or k in (
                "NODENAME", "NODE_PORT", "CONFIG_FILE", "ERL_FLAGS",
                "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_EPMD_PORT"))
        }
        env.update({
            "HOME": self._path("home"),  # its own .erlang.cookie
            "RABBITMQ_CONF_ENV_FILE": self._path("rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": self._path("mnesia"),
            "RABBITMQ_LOG_BASE": self.log_dir,
            "RABBITMQ_LOGS": self._path("log", self.name + ".log"),
            "RABBITMQ_CONFIG_FILE": self._path("rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": self._path("conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": self._path("advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": self._path("enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "RABBITMQ_PID_FILE": self.pid_file,
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": ("-kernel inet_dist_use_interface {127,0,0,1} "
                          + self.extra_erl_flags).strip(),
        })
        env.setdefault("LANG", "C.UTF-8")
        env.setdefault("LC_ALL", "C.UTF-8")
        return env

    # -- life cycle -----------------------------------------------------

    def answers(self, timeout=1.0):
        """True if the plain AMQP port answers (and, with TLS, the TLS one)."""
        if not amqp_answers(self.host, self.port, timeout=timeout):
            return False
        return self.tls_port is None or self.tls_answers(timeout=timeout)

    def tls_answers(self, timeout=1.0):
        """True if the TLS port answers AMQP with a certificate the CA signed
        (for the first of the node's TLS host names)."""
        certfile, keyfile = self.tls_client_cert or (None, None)
        return self.tls_port is not None and amqps_answers(
            self.host, self.tls_port, cafile=self.ca.cert_file,
            timeout=timeout,
            server_hostname=(self.tls_hostnames or (self.host,))[0],
            certfile=certfile, keyfile=keyfile)

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self, timeout=90.0):
        """Start the node; return once its AMQP port answers."""
        if self.running:
            raise RuntimeError("%s is already running" % self.nodename)
        if amqp_answers(self.host, self.port, timeout=0.5):
            raise RuntimeError(
                "port %d already answers AMQP: not starting %s there"
                % (self.port, self.nodename))
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)
        self._logfile = open(self.console_log, "ab")
        self._logfile.write(b"\n=== start %s ===\n" % time.ctime().encode())
        self._logfile.flush()
        if not getattr(self, "_atexit_registered", False):
            # A node must not outlive the test run, even an interrupted one.
            atexit.register(self.kill)
            self._atexit_registered = True
        self.process = subprocess.Popen(
            [os.path.join(self.bindir, "rabbitmq-server")],
            cwd=self.basedir, env=self.env(),
            stdin=subprocess.DEVNULL, stdout=self._logfile,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close_log()
                raise BrokerUnavailable(
                    "RabbitMQ node %s exited with %s while starting.\n%s"
                    % (self.nodename, code, self.log_tail()))
            if self.answers(timeout=1.0):
                # A node that fails late in boot can open its port and
                # then halt: make sure it is still up a moment later.
                time.sleep(0.3)
                if self.process.poll() is None and self.answers(timeout=1.0):
                    self.start_seconds = time.monotonic() - started
                    return self
            time.sleep(0.2)
        self.kill()
        raise BrokerUnavailable(
            "RabbitMQ node %s did not answer on 127.0.0.1:%d%s within %.0f s.\n%s"
            % (self.nodename, self.port,
               "" if self.tls_port is None else " (TLS: %d)" % self.tls_port,
               timeout, self.log_tail()))

    def ctl(self, *args, timeout=30.0):
        """Run rabbitmqctl against this node; return the CompletedProcess."""
        return subprocess.run(
            [os.path.join(self.bindir, "rabbitmqctl"), "-n", self.nodename]
            + list(args),
            cwd=self.basedir, env=self.env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=timeout,
        )

    def stop(self, timeout=30.0):
        """
        Stop the node cleanly (``rabbitmqctl stop``), then SIGTERM, then
        SIGKILL, each bounded in time. Does nothing if it is not running.
        """
        if not self.running:
            self._close_log()
            return
        deadline = time.monotonic() + timeout
        try:
            self.ctl("stop", timeout=max(1.0, timeout / 2))
        except subprocess.TimeoutExpired:
            pass
        if not self._wait(deadline):
            self._signal(signal.SIGTERM)
            if not self._wait(time.monotonic() + 10):
                self.kill()
                return
        self._reap_group()
        self._close_log()

    def kill(self):
        """Kill the node with SIGKILL (beam and its helpers), as a crash."""
        if self.process is None:
            return
        pid = self.beam_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._signal(signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # SIGKILL is delivered asynchronously: wait until the VM is gone
        # (or a zombie), so that "killed" means its port is closed.
        deadline = time.monotonic() + 10
        while pid and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._close_log()

    def restart(self, timeout=90.0, kill=False):
        """Stop (or kill) the node, then start it again with the same data."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout=timeout)

    def remove(self):
        """Stop the node if needed and delete its directory."""
        self.stop()
        shutil.rmtree(self.basedir, ignore_errors=True)

    # Deferred-returning variants, for tests running in the reactor: the
    # blocking work happens in a thread so the reactor keeps turning.

    def start_async(self, timeout=90.0):
        from twisted.internet.threads import deferToThread
        return deferToThread(self.start, timeout)

    def stop_async(self, timeout=30.0):
        from twisted.internet.threads import deferToThread
        return deferToThread(self.stop, timeout)

    def restart_async(self, timeout=90.0, kill=False):
        from twisted.internet.threads import deferToThread
        return deferToThread(self.restart, timeout, kill)

    # -- helpers --------------------------------------------------------

    def beam_pid(self):
        """The Erlang VM's pid, from the pid file, or None."""
        try:
            with open(self.pid_file) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def _signal(self, sig):
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait(self, deadline):
        try:
            self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def _reap_group(self):
        # Helpers (erl_child_setup, inet_gethost) left in the group after
        # a clean stop are ended too; epmd runs detached and stays.
        self._signal(signal.SIGKILL)

    def _close_log(self):
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    def log_tail(self, lines=40):
        """The last lines of the node's logs, for error messages."""
        out = []
        paths = [self.console_log, self._path("log", self.name + ".log")]
        for p in paths:
            try:
                with open(p, "rb") as f:
                    text = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                continue
            out.append("--- %s (last %d lines) ---" % (p, lines))
            out.extend(text[-lines:])
        return "\n".join(out) or "(no log written in %s)" % self.log_dir

    def __repr__(self):
        tls = "" if self.tls_port is None else " " + self.amqps_url
        return "<PrivateRabbitMQ %s %s%s>" % (self.nodename, self.url, tls)


# -- broker selection ------------------------------------------------------

#: The shared broker that the machine (or a developer) runs.
LOCAL_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def redact(url):
    """The URL with its password replaced by ***, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = "%s:***@%s" % (parts.username or "", parts.hostname or "")
    if parts.port:
        netloc += ":%d" % parts.port
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def reachable(url, timeout=3.0):
    """True if the broker of *url* answers (AMQP handshake; TCP for amqps)."""
    host, port = url_host_port(url)
    if urllib.parse.urlsplit(url).scheme == "amqps":
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return True
        except OSError:
            return False
    return amqp_answers(host, port, timeout=timeout)


def select_broker(tmpdir_factory, env=None, log=print):
    """
    Find or start the broker for the test run. Returns ``(url, how, node)``:
    *node* is a started PrivateRabbitMQ that the caller must stop, or None.

    Order: ``OOIDX_TEST_BROKER`` (``private`` forces a private node); a broker
    on 127.0.0.1:5672; a private node from an installed rabbitmq-server; as
    root on a Debian-like system, apt-get install rabbitmq-server and a
    private node. Raises BrokerUnavailable, with what to do, otherwise.
    *tmpdir_factory* is a callable returning a fresh directory.
    """
    env = os.environ if env is None else env
    wanted = env.get("OOIDX_TEST_BROKER", "").strip()
    if wanted and wanted != "private":
        if not reachable(wanted):
            raise BrokerUnavailable(
                "OOIDX_TEST_BROKER=%s does not answer an AMQP handshake."
                % redact(wanted))
        return wanted, "OOIDX_TEST_BROKER", None
    if not wanted and amqp_answers("127.0.0.1", 5672):
        return LOCAL_BROKER_URL, "local broker on 127.0.0.1:5672", None
    bindir = ensure_rabbitmq_server(log=log)
    node = PrivateRabbitMQ(tmpdir=tmpdir_factory(), bindir=bindir)
    node.start()
    return node.url, "private node %s (started in %.1f s)" % (
        node.nodename, node.start_seconds), node
