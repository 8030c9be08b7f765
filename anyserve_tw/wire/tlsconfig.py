"""Mutual TLS between an ingress and its workers on other hosts.

Both processes hold the same three things: the operator's CA (the only
issuer either side trusts for the other), their own certificate chain and
its key.  :class:`MutualTls` turns them into what each connection needs:

* the ingress connects to a ``tls://host:port`` worker with Twisted's client
  TLS (:meth:`MutualTls.client_options`): the worker's certificate must be
  signed by the CA and name ``host`` (checked by ``service_identity``), and
  the ingress presents its own certificate as a client certificate;
* the worker's listener (:meth:`MutualTls.server_options`) requires a client
  certificate signed by the CA, so only an ingress can send it requests;
* the worker's management channel (:meth:`MutualTls.grpc_channel_credentials`)
  checks the ingress's certificate against the host name in
  ``ANYSERVE_INGRESS`` and presents the worker's own, which the ingress's
  management server requires (:meth:`MutualTls.grpc_server_credentials`).

Files are read once, at start; anything unusable raises :class:`TlsError`
with the reason, so a misconfigured process stops before it listens.
"""
import os
import re
from urllib.parse import urlsplit

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from anyserve_tw.wire import defaults

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)

# Environment of a worker on another host (see README's "Across hosts").
#: Where the worker listens instead of its Unix socket: tls://HOST:PORT, or
#: tcp://HOST:PORT (only accepted by an ingress run with --insecure-workers).
ENV_LISTEN = "ANYSERVE_LISTEN"
#: The address it registers (default: ENV_LISTEN; needed when that binds 0.0.0.0).
ENV_ADVERTISE = "ANYSERVE_ADVERTISE"
#: PEM files: the CA both sides trust, the worker's certificate and its key.
ENV_TLS_CA = "ANYSERVE_TLS_CA"
ENV_TLS_CERT = "ANYSERVE_TLS_CERT"
ENV_TLS_KEY = "ANYSERVE_TLS_KEY"

#: How a network worker's address starts: ``tls://host:port`` (mutual TLS)
#: or ``tcp://host:port`` (plain, only with the ingress's --insecure-workers).
TLS_SCHEME = "tls"
TCP_SCHEME = "tcp"


def set_no_delay(transport):
    """Send small frames at once on a TCP connection (through TLS too):
    with Nagle's algorithm a request written while another is still
    unacknowledged waits for that ACK, which the peer may delay 40 ms."""
    set_it = getattr(transport, "setTcpNoDelay", None)
    if set_it is not None:
        try:
            set_it(True)
        except OSError:
            pass


class TlsError(Exception):
    """A certificate, key or CA file can't be used."""


def parse_network_address(address):
    """``(scheme, host, port)`` of a ``tls://host:port`` or ``tcp://host:port``
    address (IPv6 hosts in brackets); None for anything else (a Unix path).
    Raises ValueError for a network address without a host or a port."""
    if address.startswith(defaults.UNIX_PREFIX):
        return None
    scheme, sep, _ = address.partition("://")
    if not sep or scheme not in (TLS_SCHEME, TCP_SCHEME):
        return None
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError("%r is not %s://HOST:PORT" % (address, scheme))
    return scheme, parts.hostname, port


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsError("%s %s: %s" % (what, e.filename, e.strerror))


def _certificates(pem, what):
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise TlsError("no PEM certificate in the %s" % what)
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error as e:
        raise TlsError("unreadable %s: %s" % (what, e))


def describe_certificate(certificate):
    """Who a pyOpenSSL X509 names and who issued it, for log lines."""
    from cryptography import x509

    cert = certificate.to_cryptography()
    try:
        names = [getattr(n, "value", n) for n in
                 cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        names = []
    return "names %s, issued by %s, valid until %s" % (
        ", ".join(str(n) for n in names) or cert.subject.rfc4514_string() or "none",
        cert.issuer.rfc4514_string() or "?", cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"))


@implementer(IOpenSSLClientConnectionCreator)
class _NotingRefusals:
    """Client TLS options (from ``optionsForClientTLS``) whose certificate
    check also notes why a server's certificate was refused
    (``connection.refusal``): OpenSSL's handshake error only says
    "certificate verify failed", whether the certificate expired, another
    CA signed it or it names another host.

    The check is OpenSSL's chain verification against the CA, then, on the
    leaf, ``service_identity``'s host name or IP address check: what
    Twisted's own callback does, which this one replaces since a
    connection has one verify callback."""

    def __init__(self, options, tls, hostname):
        self._options = options
        self._tls = tls
        self._hostname = hostname

    def clientConnectionForTLS(self, protocol):
        connection = self._options.clientConnectionForTLS(protocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, connection, certificate, error, depth, ok):
        if getattr(connection, "refusal", None) is not None:
            return False
        problem = None
        if not ok:
            problem = self._tls.check_peer(certificate) or "certificate verify failed"
        elif depth == 0:
            problem = identity_problem(certificate, self._hostname)
        if problem is None:
            return bool(ok)
        connection.refusal = "%s (%s)" % (problem, describe_certificate(certificate))
        return False


def identity_problem(certificate, hostname):
    """Why ``certificate`` does not name ``hostname`` (a DNS name or an IP
    address), per ``service_identity``; None if it does."""
    import ipaddress

    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

    cert = certificate.to_cryptography()
    try:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            verify_certificate_hostname(cert, hostname)
        else:
            verify_certificate_ip_address(cert, address)
    except (VerificationError, CertificateError):
        return "it does not name %s" % hostname
    return None


class MutualTls:
    """The CA (PEM, one or more certificates), this process's certificate
    chain (leaf first) and its private key."""

    def __init__(self, ca_pem, chain_pem, key_pem):
        self.ca_pem = ca_pem
        self.chain_pem = chain_pem
        self.key_pem = key_pem
        self.ca = _certificates(ca_pem, "CA file")
        self.chain = _certificates(chain_pem, "certificate file")
        try:
            self.key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        except crypto.Error as e:
            raise TlsError("unreadable private key: %s" % (e,))
        context = SSL.Context(SSL.TLS_METHOD)
        try:
            context.use_certificate(self.chain[0])
            context.use_privatekey(self.key)
            context.check_privatekey()
        except SSL.Error:
            raise TlsError("the private key does not match the certificate")

    #: The files read, if it was read from files: (CA, certificate, key).
    paths = None

    @classmethod
    def from_files(cls, ca_path, cert_path, key_path):
        tls = cls(_read(ca_path, "CA file"), _read(cert_path, "certificate file"),
                  _read(key_path, "key file"))
        tls.paths = tuple(os.path.abspath(p) for p in (ca_path, cert_path, key_path))
        return tls

    def environ(self):
        """The environment handing these files to a worker (how a
        supervising ingress gives its own workers its identity); empty if
        not read from files."""
        if self.paths is None:
            return {}
        return dict(zip((ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY), self.paths))

    @classmethod
    def from_environ(cls, environ):
        """From ANYSERVE_TLS_CA/CERT/KEY; None if none is set, TlsError if
        only some are."""
        paths = [environ.get(name) for name in (ENV_TLS_CA, ENV_TLS_CERT,
                                                  ENV_TLS_KEY)]
        if not any(paths):
            return None
        if not all(paths):
            raise TlsError("%s, %s and %s go together" % (
                ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY))
        return cls.from_files(*paths)

    def check_peer(self, certificate):
        """Why ``certificate`` (a pyOpenSSL X509) does not chain to the CA
        (OpenSSL's words: "certificate has expired", "unable to get local
        issuer certificate"), or None if it does."""
        store = crypto.X509Store()
        for ca in self.ca:
            store.add_cert(ca)
        try:
            crypto.X509StoreContext(store, certificate).verify_certificate()
        except crypto.X509StoreContextError as e:
            return str(e.args[0] if e.args else e)
        return None

    def _trust_root(self):
        from twisted.internet import ssl

        return ssl.trustRootFromCertificates([ssl.Certificate(c) for c in self.ca])

    def client_options(self, hostname):
        """Twisted client TLS to ``hostname``: its certificate must chain to
        the CA and name it; ours goes along as the client certificate."""
        from twisted.internet import ssl

        own = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(self.chain[0]), ssl.KeyPair(self.key))
        options = ssl.optionsForClientTLS(hostname, trustRoot=self._trust_root(), clientCertificate=own,
                                          extraCertificateOptions={"extraCertChain": self.chain[1:]})
        return _NotingRefusals(options, self, hostname)

    def server_options(self):
        """Twisted server TLS that requires a client certificate signed by the CA."""
        from twisted.internet import ssl

        return ssl.CertificateOptions(
            privateKey=self.key, certificate=self.chain[0], extraCertChain=self.chain[1:],
            trustRoot=self._trust_root(),  # implies requiring a client certificate
        )

    def grpc_server_credentials(self):
        """grpc server credentials that require a client certificate signed by the CA."""
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def grpc_channel_credentials(self):
        """grpc channel credentials: the server must chain to the CA; ours is
        the client certificate."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.chain_pem)
