"""The hop to a worker on another host, on loopback: mutual TLS with
certificates made by each test (``trustme``), real worker processes, and
several ingresses sharing one worker.

The handshake cases drive the ingress's :class:`WorkerHandle` in this
process against a real worker process, so each refusal is seen with its
reason and its log line on both sides; the cases through ``twistd`` show
the same hop from registration to a client's call.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.ingress.workerlink import WorkerHandle
from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.tlsconfig import MutualTls
from tests.harness import (
    KSERVE_SERVER, PROBE_SERVER, BackgroundInfer, Ingress, Worker, free_port, infer_inputs, status_of,
    wait_for,
)
from tests.tlscerts import Pki


def add_request(a, b):
    """A serialized ModelInfer of ``add`` (INT32 vectors), as a client sends it."""
    request = protos.inference.ModelInferRequest(model_name="add")
    for name, values in (("a", a), ("b", b)):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "INT32"
        tensor.shape.extend([len(values)])
        request.raw_input_contents.append(np.asarray(values, dtype=np.int32).tobytes())
    return request.SerializeToString()


def add_result(payload):
    response = protos.inference.ModelInferResponse.FromString(payload)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.int32).tolist()


def port_open(port):
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class TlsWorker:
    """``examples/kserve_server.py`` listening on tls://127.0.0.1:PORT."""

    def __init__(self, directory, env, ingress=None, script=KSERVE_SERVER):
        self.port = free_port()
        self.address = "tls://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(directory, "worker-%d.log" % self.port)
        environ = dict(os.environ, ANYSERVE_LISTEN=self.address, ANYSERVE_HEARTBEAT_INTERVAL="0.5",
                       # Nothing answers there: the handshake cases need no ingress.
                       ANYSERVE_INGRESS=ingress or "127.0.0.1:%d" % free_port(), **env)
        if ingress is None:
            environ["ANYSERVE_TOKEN"] = "t" * 32
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, script], env=environ, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log)

    def wait_listening(self):
        wait_for(lambda: port_open(self.port) or self.process.poll() is not None, 20,
                 what="worker listening on %s" % self.address)
        if self.process.poll() is not None:
            raise AssertionError("worker exited: %s" % self.log())

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


class TlsHopTests(TestCase):
    """The ingress's side of the hop, in this process, to a worker process."""

    timeout = 60

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="as-tls-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.pki = Pki(self.directory)
        cert, key = self.pki.issue("ingress", "127.0.0.1", "ingress.test")
        self.ingress_tls = MutualTls.from_files(self.pki.ca_path, cert, key)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def start_worker(self, cert, key):
        worker = TlsWorker(self.directory, self.pki.worker_env(cert, key))
        self.addCleanup(worker.stop)
        worker.wait_listening()
        return worker

    def handle(self, worker, tls=None):
        handle = WorkerHandle(reactor, "w1", worker.address, lambda h: None, tls=tls or self.ingress_tls)
        self.addCleanup(handle.close, "test over")
        return handle

    def log_lines(self, level_name):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if e.get("log_level") and e["log_level"].name == level_name]

    async def refused(self, worker, tls=None):
        """Connect; return the UNAVAILABLE message the attempt fails with."""
        try:
            await self.handle(worker, tls).connect()
        except InferenceError as e:
            self.assertEqual(e.code.name, "UNAVAILABLE")
            return e.message
        self.fail("the connection was accepted")

    def test_requests_multiplexed_over_mutual_tls(self):
        """Forty requests at once over the pool's two TLS connections, each
        answered with its own sum; the worker's certificate names 127.0.0.1."""
        worker = self.start_worker(*self.pki.issue("worker", "127.0.0.1"))
        handle = self.handle(worker)

        async def run():
            await handle.connect()
            self.assertEqual(len(handle._connections), 2)
            answers = await gatherResults([handle.forward(add_request([i, 1], [i, 2]), timeout=10)
                                           for i in range(40)])
            self.assertEqual([add_result(a) for a in answers], [[2 * i, 3] for i in range(40)])
        return ensureDeferred(run())

    def test_worker_signed_by_another_ca_is_refused(self):
        other = Pki(self.directory, "other")
        worker = self.start_worker(*other.issue("worker", "127.0.0.1"))

        async def run():
            message = await self.refused(worker)
            self.assertIn("the worker's certificate is refused: unable to get local issuer certificate",
                          message)
            [line] = [l for l in self.log_lines("error") if worker.address in l]
            self.assertIn("unable to get local issuer certificate", line)
        return ensureDeferred(run())

    def test_expired_worker_certificate_is_refused(self):
        worker = self.start_worker(*self.pki.issue("worker", "127.0.0.1", expired=True))

        async def run():
            message = await self.refused(worker)
            self.assertIn("certificate has expired", message)
            self.assertTrue(any("certificate has expired" in l for l in self.log_lines("error")))
        return ensureDeferred(run())

    def test_worker_certificate_for_another_host_is_refused(self):
        worker = self.start_worker(*self.pki.issue("worker", "worker-b.test", "10.9.9.9"))

        async def run():
            message = await self.refused(worker)
            self.assertIn("it does not name 127.0.0.1", message)
            self.assertIn("worker-b.test", message)
        return ensureDeferred(run())

    def test_ingress_signed_by_another_ca_is_refused_by_the_worker(self):
        """The worker's listener wants a client certificate its CA signed:
        an ingress with another is refused before any request (under TLS 1.3
        too, where the client's handshake ends first), and the worker logs
        the refusal once."""
        worker = self.start_worker(*self.pki.issue("worker", "127.0.0.1"))
        other = Pki(self.directory, "other")
        foreign = MutualTls.from_files(self.pki.ca_path, *other.issue("ingress", "127.0.0.1"))

        async def run():
            message = await self.refused(worker, foreign)
            self.assertIn("the worker refused this ingress's certificate", message)
            wait_for(lambda: "refused a connection from 127.0.0.1" in worker.log(), 10,
                     what="the worker's log line")
            self.assertEqual(worker.log().count("refused a connection from 127.0.0.1"), 1)
        return ensureDeferred(run())


#: nginx in front of two ingresses: gRPC over cleartext HTTP/2 both ways
#: (``grpcs://`` upstreams when the ingresses serve TLS).
NGINX_CONF = """
daemon off;
worker_processes 1;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %(prefix)s/body;
    upstream anyserve { server %(a)s; server %(b)s; }
    server {
        listen 127.0.0.1:%(port)d http2;
        location / { grpc_pass grpc://anyserve; }
    }
}
"""


def tls_client(ingress, ca_path):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(ingress.address, ssl=True, root_certificates=ca_path)


class IngressOverTlsTests(SynchronousTestCase):
    """``twistd anyserve --tls-ca`` and a worker registering a tls:// address."""

    def setUp(self):
        from anyserve_tw.ingress import router

        import inspect

        if "worker_tls" not in inspect.getsource(router.Router.register_model):
            raise self.skipTest("the router does not hand --tls-ca to its WorkerHandles yet "
                                "(the change to anyserve_tw/ingress/router.py in H7's report)")
        self.directory = tempfile.mkdtemp(prefix="as-tls-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.pki = Pki(self.directory)
        cert, key = self.pki.issue("ingress", "127.0.0.1")
        self.ingress = Ingress(args=("--tls-ca", self.pki.ca_path, "--tls-cert", cert, "--tls-key", key))
        self.addCleanup(self.ingress.cleanup)
        self.client = tls_client(self.ingress, self.pki.ca_path)
        self.addCleanup(self.client.close)
        wait_for(self.client.is_server_live, 20, what="ingress live")

    def start_worker(self, pki, *names, **kwargs):
        worker = TlsWorker(self.directory, pki.worker_env(*pki.issue("worker", *names, **kwargs)),
                           ingress=self.ingress.mgmt_address)
        self.addCleanup(worker.stop)
        return worker

    def test_add_served_by_a_tls_worker(self):
        worker = self.start_worker(self.pki, "127.0.0.1")
        wait_for(lambda: self.client.is_model_ready("add"), 20, what="add ready")
        result = self.client.infer("add", infer_inputs(a=np.array([1, 2], np.int32),
                                                       b=np.array([3, 4], np.int32)))
        self.assertEqual(result.as_numpy("sum").tolist(), [4, 6])
        self.assertIn("worker listening on %s" % worker.address, worker.log())

    def test_worker_without_a_certificate_of_the_ca_cannot_register(self):
        """Its management channel is refused at the handshake (mutual TLS
        on --mgmt), whatever token it has; the worker says so."""
        worker = self.start_worker(Pki(self.directory, "other"), "127.0.0.1")
        wait_for(lambda: "cannot register with the ingress" in worker.log(), 20, what="the worker's log line")
        self.assertFalse(self.client.is_model_ready("add"))
        self.assertEqual(self.ingress.process.poll(), None)

    def test_expired_worker_cannot_register(self):
        worker = self.start_worker(self.pki, "127.0.0.1", expired=True)
        wait_for(lambda: "cannot register with the ingress" in worker.log(), 20, what="the worker's log line")
        self.assertFalse(self.client.is_model_ready("add"))

    def test_worker_named_otherwise_is_refused_and_logged_by_the_ingress(self):
        """A certificate of the CA, good for the management channel, that
        does not name the host the worker registers: the ingress refuses
        to connect, says why in its log, and the worker hears why."""
        worker = self.start_worker(self.pki, "worker-b.test")
        wait_for(lambda: "does not name 127.0.0.1" in self.ingress.log(), 20, what="the ingress's log line")
        wait_for(lambda: "does not name 127.0.0.1" in worker.log(), 20, what="the worker's log line")
        self.assertFalse(self.client.is_model_ready("add"))
        lines = [l for l in self.ingress.log().splitlines() if "does not name" in l]
        self.assertEqual(len(lines), 1, lines)  # one line, however often the worker retries


class PlainTcpWorkerTests(SynchronousTestCase):
    """A tcp:// worker is refused unless the ingress runs with --insecure-workers."""

    def start_tcp_worker(self):
        port = free_port()
        self.log_path = os.path.join(self.directory, "worker.log")
        env = dict(os.environ, ANYSERVE_LISTEN="tcp://127.0.0.1:%d" % port, ANYSERVE_HEARTBEAT_INTERVAL="0.5",
                   ANYSERVE_INGRESS=self.ingress.mgmt_address)
        with open(self.log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, KSERVE_SERVER], env=env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        return "tcp://127.0.0.1:%d" % port

    def worker_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def test_refused_without_insecure_workers(self):
        self.directory = tempfile.mkdtemp(prefix="as-tcp-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ingress = Ingress()
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready()
        address = self.start_tcp_worker()
        wait_for(lambda: "--insecure-workers" in self.worker_log(), 20, what="the worker told why")
        refusal = "refused worker"
        wait_for(lambda: refusal in self.ingress.log(), 5, what="the ingress's log line")
        self.assertIn(address, self.ingress.log())
        self.assertFalse(self.ingress.client().is_model_ready("add"))


    def test_accepted_with_insecure_workers(self):
        from anyserve_tw.ingress import router

        import inspect

        if "insecure_workers" not in inspect.getsource(router.Router.register_model):
            raise self.skipTest("the router does not hand --insecure-workers to its WorkerHandles yet "
                                "(the change to anyserve_tw/ingress/router.py in H7's report)")
        self.directory = tempfile.mkdtemp(prefix="as-tcp-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ingress = Ingress(args=("--insecure-workers",))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready()
        self.start_tcp_worker()
        self.ingress.wait_ready("add")
        result = self.ingress.client().infer("add", infer_inputs(a=np.array([5], np.int32), b=np.array([6], np.int32)))
        self.assertEqual(result.as_numpy("sum").tolist(), [11])


class WorkerConfigurationTests(SynchronousTestCase):
    def test_tls_listener_without_certificates_exits_with_the_reason(self):
        env = dict(os.environ, ANYSERVE_LISTEN="tls://127.0.0.1:%d" % free_port(),
                   ANYSERVE_INGRESS="127.0.0.1:%d" % free_port(), ANYSERVE_TOKEN="t" * 32)
        for name in ("ANYSERVE_TLS_CA", "ANYSERVE_TLS_CERT", "ANYSERVE_TLS_KEY"):
            env.pop(name, None)
        result = subprocess.run([sys.executable, KSERVE_SERVER], env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("worker not started: ANYSERVE_LISTEN=tls://127.0.0.1", result.stderr)
        self.assertIn("needs ANYSERVE_TLS_CA", result.stderr)


class SupervisedUnderTlsCaTests(SynchronousTestCase):
    def test_supervised_workers_present_the_ingress_certificate(self):
        """With --tls-ca the management port takes only certificates of the
        CA, local workers' too: the ingress hands its own to the workers it
        supervises (its certificate must then name its --mgmt-host)."""
        directory = tempfile.mkdtemp(prefix="as-tls-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        pki = Pki(directory)
        cert, key = pki.issue("ingress", "127.0.0.1")
        ingress = Ingress(workers=(KSERVE_SERVER,),
                          args=("--tls-ca", pki.ca_path, "--tls-cert", cert, "--tls-key", key))
        self.addCleanup(ingress.cleanup)
        client = tls_client(ingress, pki.ca_path)
        self.addCleanup(client.close)
        wait_for(lambda: client.is_model_ready("add"), 30, what="add ready")
        result = client.infer("add", infer_inputs(a=np.array([1], np.int32), b=np.array([2], np.int32)))
        self.assertEqual(result.as_numpy("sum").tolist(), [3])


class SeveralIngressesTests(SynchronousTestCase):
    """One worker, ANYSERVE_INGRESS=a,b: both ingresses serve its models."""

    def setUp(self):
        # No startup window: a withdrawn model is NOT_FOUND at once.
        self.a, self.b = Ingress(args=("--startup-window", "0")), Ingress(args=("--startup-window", "0"))
        self.addCleanup(self.a.cleanup)
        self.addCleanup(self.b.cleanup)
        self.worker = Worker(PROBE_SERVER, "%s,%s" % (self.a.mgmt_address, self.b.mgmt_address),
                             os.path.join(self.a.tmp, "shared.sock"))
        self.addCleanup(self.worker.stop, signal.SIGKILL)
        self.a.wait_ready("whoami", "slow")
        self.b.wait_ready("whoami", "slow")

    def whoami(self, ingress):
        return int(ingress.client().infer("whoami", []).as_numpy("pid")[0])

    def test_losing_one_ingress_loses_only_its_requests(self):
        """Both answer from the same worker process; with a request in
        flight through each, SIGKILL one ingress: its request fails, the
        other's finishes, and the other keeps serving."""
        pid = self.worker.process.pid
        self.assertEqual((self.whoami(self.a), self.whoami(self.b)), (pid, pid))
        before = self.seen()
        through_a = BackgroundInfer(self.a.address, "slow", seconds=np.array([1.5]))
        through_b = BackgroundInfer(self.b.address, "slow", seconds=np.array([1.5]))
        polls = []

        def both_reached():
            polls.append(1)
            return self.seen() - before - len(polls) >= 2
        wait_for(both_reached, 10, what="both requests in the worker")
        self.a.process.send_signal(signal.SIGKILL)
        self.a.process.wait(10)
        self.assertEqual(through_a.join()[0], "StatusCode.UNAVAILABLE")
        outcome = through_b.join()
        self.assertEqual(outcome[0], "ok", outcome)
        self.assertEqual(self.whoami(self.b), pid)

    def seen(self):
        """Requests that reached the worker so far, this one included."""
        return int(self.b.client().infer("seen", []).as_numpy("count")[0])

    def test_behind_nginx_grpc_pass(self):
        """Debian's nginx in front of both ingresses (the config README
        shows): calls through it reach the worker, and go on once one
        ingress is killed."""
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if nginx is None:
            raise self.skipTest("no nginx (Debian: apt-get install nginx-light)")
        prefix = tempfile.mkdtemp(prefix="as-nginx-", dir="/tmp")
        self.addCleanup(shutil.rmtree, prefix, True)
        port = free_port()
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF % dict(prefix=prefix, port=port, a=self.a.address, b=self.b.address))
        process = subprocess.Popen([nginx, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: process.poll() is None and (process.terminate(), process.wait(10)))
        import tritonclient.grpc as grpcclient

        wait_for(lambda: port_open(port), 10, what="nginx listening")
        client = grpcclient.InferenceServerClient("127.0.0.1:%d" % port)
        self.addCleanup(client.close)
        pid = self.worker.process.pid
        self.assertEqual({int(client.infer("whoami", []).as_numpy("pid")[0]) for _ in range(8)}, {pid})
        self.a.process.send_signal(signal.SIGKILL)
        self.a.process.wait(10)
        self.assertEqual({int(client.infer("whoami", []).as_numpy("pid")[0]) for _ in range(8)}, {pid})

    def test_shutdown_withdraws_from_every_ingress(self):
        self.assertEqual(self.worker.stop(signal.SIGTERM), 0)
        for ingress in (self.a, self.b):
            status, message = status_of(lambda: ingress.client().infer("whoami", []))
            self.assertEqual(status, "StatusCode.NOT_FOUND", "%s\n%s" % (message, ingress.log()[-3000:]))
