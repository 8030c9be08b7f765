"""TLS for the inference ports (``--tls-cert``, ``--tls-key``).

One certificate chain and key serve both the gRPC port (grpc's own TLS) and
the REST port (Twisted's, through pyOpenSSL), so a client sees the same
identity on either.  Read once at start: a file that is missing or does not
hold a matching certificate and key stops twistd with the reason.
"""
import re

from OpenSSL import SSL, crypto

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class TlsError(Exception):
    """The certificate or key can't serve TLS."""


class ServerTls:
    """A certificate chain (leaf first) and its private key, as PEM bytes."""

    def __init__(self, chain_pem, key_pem):
        self.chain_pem = chain_pem
        self.key_pem = key_pem
        blocks = _PEM_CERTIFICATE.findall(chain_pem)
        if not blocks:
            raise TlsError("no PEM certificate in the certificate file")
        try:
            self.chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
            self.key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        except crypto.Error as e:
            raise TlsError("unreadable certificate or key: %s" % (e,))
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(self.chain[0])
        context.use_privatekey(self.key)
        try:
            context.check_privatekey()
        except SSL.Error:
            raise TlsError("the private key does not match the certificate")

    @classmethod
    def from_files(cls, cert_path, key_path):
        try:
            with open(cert_path, "rb") as f:
                chain = f.read()
            with open(key_path, "rb") as f:
                key = f.read()
        except OSError as e:
            raise TlsError("%s: %s" % (e.filename, e.strerror))
        return cls(chain, key)

    def grpc_credentials(self):
        """grpc.ServerCredentials serving this chain (no client certificates)."""
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)])

    def twisted_options(self):
        """An IOpenSSLServerConnectionCreator for Twisted's TLS."""
        from twisted.internet import ssl

        return ssl.CertificateOptions(
            privateKey=self.key, certificate=self.chain[0], extraCertChain=self.chain[1:],
        )
