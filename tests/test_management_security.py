"""Management security and TLS (issue 8, point 2), attacked by a rogue
process on the ingress's host, with real processes: the ingress under
twistd serving examples/kserve_server.py, and this test as the rogue.

- Without the token (an outsider: another user, or a process that can't
  read the token file) nothing can be registered, withdrawn or heartbeaten.
- With the token (an insider), a process still can't withdraw, keep alive
  or take over another worker's id: the worker key scopes every call.
- The token file is private, and a public one stops the ingress.
- ``--tls-cert``/``--tls-key`` serve gRPC and REST over TLS.
"""
import os
import ssl
import stat
import subprocess
import sys

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import credentials, protos, rpc
from tests.harness import KSERVE_SERVER, TWISTD, Ingress, Worker, free_port, infer_inputs, wait_for

_m = protos.management


def add(client, a=(1, 2), b=(3, 4), **kwargs):
    result = client.infer("add", infer_inputs(a=np.array(a, np.int32), b=np.array(b, np.int32)), **kwargs)
    return result.as_numpy("sum").tolist()


class ManagementSecurityTests(SynchronousTestCase):
    def setUp(self):
        self.ingress = Ingress([KSERVE_SERVER])
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("add")
        self.client = self.ingress.client()
        self.channel = grpc.insecure_channel(self.ingress.mgmt_address)
        self.addCleanup(self.channel.close)
        self.stub = rpc.Stub(self.channel, protos.MANAGEMENT_SERVICE)

    def call_status(self, method, request, metadata=()):
        with self.assertRaises(grpc.RpcError) as caught:
            getattr(self.stub, method)(request, timeout=10, metadata=metadata)
        return caught.exception.code(), caught.exception.details()

    def test_token_file_is_private(self):
        st = os.stat(self.ingress.token_path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(st.st_uid, os.getuid())
        self.assertIn("management calls need the token in %s" % self.ingress.token_path, self.ingress.log())

    def test_outsider_can_do_nothing(self):
        """No token, or a wrong one: UNAUTHENTICATED for every call, the
        registry untouched, and one log line for all the refusals."""
        register = _m.RegisterModelRequest(
            model_name="add", worker_id="rogue", worker_address="unix:///tmp/rogue.sock",
            worker_key="rogue-key", platform="python")
        worker_id = self.supervised_worker_id()
        withdraw = _m.UnregisterModelRequest(model_name="add", worker_id=worker_id, worker_key="guess")
        beat = _m.HeartbeatRequest(worker_id=worker_id, worker_key="guess")
        wrong = credentials.metadata("x" * 43)
        for metadata in ((), wrong, (("authorization", "Basic abc"),)):
            for method, request in (("RegisterModel", register), ("UnregisterModel", withdraw),
                                    ("Heartbeat", beat)):
                code, details = self.call_status(method, request, metadata)
                self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, (method, metadata))
                self.assertIn("need the ingress's token", details)
        for _ in range(10):
            self.assertEqual(add(self.client), [4, 6])
        self.assertEqual(self.ingress.log().count("management call refused"), 1)

    def supervised_worker_id(self):
        """The id of the supervised worker serving ``add``."""
        index = self.client.get_model_repository_index(as_json=True)
        return [m for m in index["models"] if m["name"] == "add"][0]["reason"].split()[-1]

    def test_insider_cannot_touch_another_workers_id(self):
        """With the token but not the worker's key: withdrawing, heartbeating
        or re-registering the live worker's id is PERMISSION_DENIED, and
        ``add`` keeps being served by the real worker."""
        metadata = self.ingress.mgmt_metadata()
        worker_id = self.supervised_worker_id()
        self.assertTrue(worker_id.startswith("kserve_server-0"), worker_id)
        calls = [
            ("UnregisterModel", _m.UnregisterModelRequest(model_name="add", worker_id=worker_id,
                                                          worker_key="guess")),
            ("Heartbeat", _m.HeartbeatRequest(worker_id=worker_id, model_names=["add"], worker_key="guess")),
            ("RegisterModel", _m.RegisterModelRequest(
                model_name="add", worker_id=worker_id, worker_address="unix:///tmp/rogue.sock",
                worker_key="guess", platform="python")),
        ]
        for _ in range(20):
            for method, request in calls:
                code, details = self.call_status(method, request, metadata)
                self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED, method)
                self.assertIn("belongs to another live worker process", details)
            self.assertEqual(add(self.client), [4, 6])
        self.assertTrue(self.client.is_model_ready("add"))
        self.assertEqual(self.ingress.log().count("refused (PERMISSION_DENIED)"), 1)

    def test_standalone_worker_finds_the_token_file(self):
        """A standalone worker of the same user needs nothing but
        ANYSERVE_INGRESS: it reads the default token file for that port."""
        path = os.path.join(self.ingress.tmp, "standalone.sock")
        worker = Worker(os.path.join(os.path.dirname(KSERVE_SERVER), "kserve_server.py"),
                        self.ingress.mgmt_address, path)
        self.addCleanup(worker.stop)
        wait_for(lambda: "standalone" in str(self.client.get_model_repository_index(as_json=True)),
                 what="standalone worker registered")


class TokenFileTests(SynchronousTestCase):
    def start(self, *args):
        ingress = Ingress(args=list(args))
        self.addCleanup(ingress.cleanup)
        return ingress

    def test_readable_token_file_stops_the_ingress(self):
        """A token file others can read is refused with the reason, before
        anything listens."""
        path = os.path.abspath(self.mktemp() + ".token")
        with open(path, "w") as f:
            f.write("t" * 43 + "\n")
        os.chmod(path, 0o644)
        ingress = self.start("--mgmt-token-file", path)
        self.assertNotEqual(ingress.process.wait(30), 0)
        output = subprocess.run([TWISTD, "-n", "--pidfile=", "anyserve", "--mgmt-token-file", path,
                                 "--port", str(free_port()), "--mgmt", str(free_port())],
                                capture_output=True, text=True, timeout=60)
        self.assertIn("can be read or written by others (mode 644)", output.stdout + output.stderr)

    def test_given_token_is_used_and_handed_to_workers(self):
        """An operator's token file is used as is: a standalone worker given
        ANYSERVE_TOKEN_FILE registers; one without any token is refused and
        says why."""
        path = os.path.abspath(self.mktemp() + ".token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"operator-chosen-token-0123456789\n")
        os.close(fd)
        ingress = self.start("--mgmt-token-file", path)
        ingress.wait_ready()
        good = subprocess.Popen(
            [sys.executable, KSERVE_SERVER],
            env=dict(os.environ, ANYSERVE_INGRESS=ingress.mgmt_address, ANYSERVE_TOKEN_FILE=path,
                     ANYSERVE_SOCKET=os.path.join(ingress.tmp, "good.sock")),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (good.terminate(), good.wait(20)))
        ingress.wait_ready("add")
        bad = subprocess.Popen(
            [sys.executable, KSERVE_SERVER],
            env=dict(os.environ, ANYSERVE_INGRESS=ingress.mgmt_address, ANYSERVE_TOKEN="wrong-token-000000000",
                     ANYSERVE_SOCKET=os.path.join(ingress.tmp, "bad.sock")),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: "management call refused: a wrong token" in ingress.log(), what="refusal logged")
        finally:
            bad.terminate()
            _, err = bad.communicate(timeout=20)
        self.assertIn("refuses this worker: UNAUTHENTICATED", err)
        self.assertEqual(err.count("refuses this worker"), 1)

    def test_insecure_mgmt_needs_no_token(self):
        ingress = self.start("--insecure-mgmt")
        ingress.wait_ready()
        self.assertFalse(os.path.exists(ingress.token_path))
        self.assertIn("--insecure-mgmt: any local process may register", ingress.log())
        channel = grpc.insecure_channel(ingress.mgmt_address)
        self.addCleanup(channel.close)
        beat = rpc.Stub(channel, protos.MANAGEMENT_SERVICE).Heartbeat(
            _m.HeartbeatRequest(worker_id="nobody", worker_key="k"), timeout=10)
        self.assertFalse(beat.healthy)


class InferenceTlsTests(SynchronousTestCase):
    def setUp(self):
        import trustme

        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        self.ca_path = os.path.join(tmp, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.cert_path = os.path.join(tmp, "cert.pem")
        self.key_path = os.path.join(tmp, "key.pem")
        cert.private_key_pem.write_to_path(self.key_path)
        cert.cert_chain_pems[0].write_to_path(self.cert_path)
        self.ingress = Ingress([KSERVE_SERVER], http=True,
                               args=["--tls-cert", self.cert_path, "--tls-key", self.key_path])
        self.addCleanup(self.ingress.cleanup)

    def test_grpc_and_rest_over_tls(self):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        client = grpcclient.InferenceServerClient(
            "localhost:%d" % self.ingress.port, ssl=True, root_certificates=self.ca_path)
        self.addCleanup(client.close)
        wait_for(lambda: client.is_model_ready("add"), what="add ready over TLS")
        self.assertEqual(add(client), [4, 6])

        context = ssl.create_default_context(cadata=self.ca.cert_pem.bytes().decode())
        rest = httpclient.InferenceServerClient(
            "localhost:%d" % self.ingress.http_port, ssl=True, ssl_context_factory=lambda: context)
        self.addCleanup(rest.close)
        self.assertTrue(rest.is_model_ready("add"))
        inputs = []
        for name, value in (("a", [1, 2]), ("b", [3, 4])):
            tensor = httpclient.InferInput(name, [2], "INT32")
            tensor.set_data_from_numpy(np.array(value, np.int32))
            inputs.append(tensor)
        self.assertEqual(rest.infer("add", inputs).as_numpy("sum").tolist(), [4, 6])

        # A plaintext client gets nowhere on either port.
        plain = grpcclient.InferenceServerClient(self.ingress.address)
        self.addCleanup(plain.close)
        with self.assertRaises(Exception):
            plain.is_server_live(client_timeout=3)
        self.assertIn("(TLS)", self.ingress.log())
