"""Certificates for the cross-host tests, made by each test with ``trustme``:
a CA the ingress and its workers trust, and leaves it (or another CA)
signed, written as PEM files in a directory of the test's."""
import datetime
import os


class Pki:
    """A CA and the files of the leaves issued so far, under ``directory``."""

    def __init__(self, directory, name="ca"):
        import trustme

        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = os.path.join(directory, name + ".pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.name = name

    def issue(self, label, *identities, expired=False):
        """(cert path, key path) of a leaf naming ``identities`` (host
        names or IP addresses); ``expired``: its validity ended yesterday."""
        kwargs = {}
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            kwargs = dict(not_before=now - datetime.timedelta(days=10),
                          not_after=now - datetime.timedelta(days=1))
        leaf = self.ca.issue_cert(*identities, **kwargs)
        cert = os.path.join(self.directory, "%s-%s.crt" % (self.name, label))
        key = os.path.join(self.directory, "%s-%s.key" % (self.name, label))
        with open(cert, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        leaf.private_key_pem.write_to_path(key)
        os.chmod(key, 0o600)
        return cert, key

    def worker_env(self, cert, key):
        """The environment handing a worker this CA and its certificate."""
        return {"ANYSERVE_TLS_CA": self.ca_path, "ANYSERVE_TLS_CERT": cert, "ANYSERVE_TLS_KEY": key}
