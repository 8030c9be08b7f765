"""Tests for anyserve_tw.wire.tlsconfig: addresses, files, and the
certificate checks behind the refusal messages (certificates from trustme)."""
import datetime
import os
import shutil
import tempfile

from OpenSSL import crypto
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import tlsconfig
from anyserve_tw.wire.tlsconfig import MutualTls, TlsError, identity_problem, parse_network_address


class AddressTests(SynchronousTestCase):
    def test_network_addresses(self):
        self.assertEqual(parse_network_address("tls://w1.example:7001"), ("tls", "w1.example", 7001))
        self.assertEqual(parse_network_address("tcp://10.0.0.5:7001"), ("tcp", "10.0.0.5", 7001))
        self.assertEqual(parse_network_address("tls://[::1]:7001"), ("tls", "::1", 7001))
        self.assertIsNone(parse_network_address("unix:///tmp/w.sock"))
        self.assertIsNone(parse_network_address("http://h:1"))
        for bad in ("tls://h", "tls://:1", "tls://h:x", "tls://h:1/p", "tls://h:70000"):
            self.assertRaises(ValueError, parse_network_address, bad)


class MutualTlsTests(SynchronousTestCase):
    def setUp(self):
        import trustme

        self.directory = tempfile.mkdtemp(prefix="as-tlsconf-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = trustme.CA()
        self.other = trustme.CA()

    def write(self, name, blob):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(blob)
        return path

    def identity(self, ca, *names, **kwargs):
        leaf = ca.issue_cert(*names, **kwargs)
        return (self.write("ca.pem", self.ca.cert_pem.bytes()),
                self.write("cert.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems)),
                self.write("key.pem", leaf.private_key_pem.bytes()))

    def x509(self, ca, *names, **kwargs):
        return crypto.load_certificate(crypto.FILETYPE_PEM, ca.issue_cert(*names, **kwargs).cert_chain_pems[0].bytes())

    def test_files_read_and_handed_on(self):
        paths = self.identity(self.ca, "ingress.test")
        tls = MutualTls.from_files(*paths)
        self.assertEqual(tls.environ(), {"ANYSERVE_TLS_CA": paths[0], "ANYSERVE_TLS_CERT": paths[1],
                                         "ANYSERVE_TLS_KEY": paths[2]})
        self.assertEqual(MutualTls.from_environ(tls.environ()).chain_pem, tls.chain_pem)
        self.assertIsNone(MutualTls.from_environ({}))

    def test_unusable_files_refused_with_the_reason(self):
        ca, cert, key = self.identity(self.ca, "ingress.test")
        other_key = self.write("other.key", self.other.issue_cert("x").private_key_pem.bytes())
        cases = [((ca, cert, other_key), "does not match"),
                 ((ca, cert, os.path.join(self.directory, "missing")), "No such file"),
                 ((key, cert, key), "no PEM certificate in the CA file")]
        for paths, reason in cases:
            e = self.assertRaises(TlsError, MutualTls.from_files, *paths)
            self.assertIn(reason, str(e))
        e = self.assertRaises(TlsError, MutualTls.from_environ, {"ANYSERVE_TLS_CA": ca})
        self.assertIn("go together", str(e))

    def test_check_peer_names_the_problem(self):
        tls = MutualTls.from_files(*self.identity(self.ca, "ingress.test"))
        self.assertIsNone(tls.check_peer(self.x509(self.ca, "w1.test")))
        self.assertEqual(tls.check_peer(self.x509(self.other, "w1.test")), "unable to get local issuer certificate")
        now = datetime.datetime.now(datetime.timezone.utc)
        expired = self.x509(self.ca, "w1.test", not_before=now - datetime.timedelta(days=2),
                            not_after=now - datetime.timedelta(days=1))
        self.assertEqual(tls.check_peer(expired), "certificate has expired")

    def test_identity_by_name_or_address(self):
        certificate = self.x509(self.ca, "w1.test", "10.77.2.2")
        self.assertIsNone(identity_problem(certificate, "w1.test"))
        self.assertIsNone(identity_problem(certificate, "10.77.2.2"))
        self.assertEqual(identity_problem(certificate, "w2.test"), "it does not name w2.test")
        self.assertEqual(identity_problem(certificate, "10.77.3.2"), "it does not name 10.77.3.2")
        self.assertIn("w1.test, 10.77.2.2", tlsconfig.describe_certificate(certificate))
