"""End to end: gRPC health checking, Prometheus ``/metrics`` and the access
log of a real ingress (twistd) with the example worker, on both fronts."""
import os
import signal
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, Ingress, Worker, infer_inputs, pid_alive, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "inference.GRPCInferenceService"


class Watch:
    """One Watch stream read in a thread: the statuses seen, how it ended."""

    def __init__(self, stub, service):
        self.statuses = []
        self.ended = None
        self._changed = threading.Condition()
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=120)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for response in self._call:
                with self._changed:
                    self.statuses.append(response.status)
                    self._changed.notify_all()
            ended = grpc.StatusCode.OK
        except grpc.RpcError as e:
            ended = e.code()
        with self._changed:
            self.ended = ended
            self._changed.notify_all()

    def wait(self, predicate, what, timeout=20):
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError("watch never saw %s: statuses %r, ended %r" % (what, self.statuses, self.ended))

    def cancel(self):
        self._call.cancel()


class HealthTests(SynchronousTestCase):
    front = "aio"

    def setUp(self):
        # A worker of its own, not supervised: one that is killed stays dead
        # until the test starts another (a supervised one would be back
        # before the model's status could be seen to change).
        self.ingress = Ingress(args=("--front", self.front, "--grace", "60"))
        self.addCleanup(self.ingress.cleanup)
        self.worker = self.start_worker()
        self.ingress.wait_ready("add", "echo")
        self.channel = grpc.insecure_channel(self.ingress.address)
        self.addCleanup(self.channel.close)
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    def start_worker(self):
        worker = Worker(KSERVE_SERVER, self.ingress.mgmt_address,
                        os.path.join(self.ingress.tmp, "w%d.sock" % time.monotonic_ns()))
        self.addCleanup(worker.stop, signal.SIGKILL)
        return worker

    def check(self, service):
        try:
            return self.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError as e:
            return e.code()

    def test_check(self):
        """The server, readiness and each model are SERVING; an unknown name
        is NOT_FOUND."""
        wait_for(lambda: self.check("add") == SERVING and self.check("echo") == SERVING
                 and self.check(READINESS) == SERVING, what="add, echo and readiness SERVING")
        self.assertEqual(self.check(""), SERVING)
        self.assertEqual(self.check("no-such-model"), grpc.StatusCode.NOT_FOUND)

    def test_watch_follows_a_killed_worker_and_shutdown_ends_it(self):
        wait_for(lambda: self.check("add") == SERVING, what="add SERVING")
        add = Watch(self.stub, "add")
        self.addCleanup(add.cancel)
        server = Watch(self.stub, "")
        self.addCleanup(server.cancel)
        add.wait(lambda w: w.statuses == [SERVING], "SERVING")
        server.wait(lambda w: w.statuses == [SERVING], "SERVING")

        self.worker.stop(signal.SIGKILL)
        add.wait(lambda w: NOT_SERVING in w.statuses, "NOT_SERVING after its worker was killed")
        # Readiness is published in the same poll, possibly just after.
        wait_for(lambda: self.check(READINESS) == NOT_SERVING, timeout=5, what="readiness NOT_SERVING")
        self.start_worker()
        add.wait(lambda w: len(w.statuses) >= 3, "SERVING again with a new worker")
        self.assertEqual(add.statuses, [SERVING, NOT_SERVING, SERVING])
        wait_for(lambda: self.check(READINESS) == SERVING, timeout=5, what="readiness SERVING again")
        # The server itself stayed SERVING throughout (liveness, not readiness).
        self.assertEqual(server.statuses, [SERVING])

        # On SIGTERM both streams hear NOT_SERVING and end; they don't hold
        # the inference server's drain open for its 60 s grace.
        self.ingress.process.send_signal(signal.SIGTERM)
        for watch in (add, server):
            watch.wait(lambda w: w.ended is not None, "the end of the stream")
            self.assertEqual((watch.statuses[-1], watch.ended), (NOT_SERVING, grpc.StatusCode.OK))
        self.assertEqual(self.ingress.process.wait(30), -signal.SIGTERM)


class HealthTestsOnThreads(HealthTests):
    front = "threads"


def scrape(ingress):
    """{(name, frozenset(labels)): value} of every sample at /metrics."""
    status, headers, body = ingress.http_get("/metrics")
    if status != 200:
        raise AssertionError("/metrics answered %d: %r" % (status, body[:200]))
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def labels(**kv):
    return frozenset(kv.items())


class MetricsTests(SynchronousTestCase):
    """The router counts for the metrics, whichever front: one front is enough."""

    front = "aio"

    def setUp(self):
        ingress = Ingress([KSERVE_SERVER], http=True, args=("--front", self.front, "--heartbeat-timeout", "1"))
        self.addCleanup(ingress.cleanup)
        self.ingress = ingress
        ingress.wait_ready("add", "echo")
        wait_for(lambda: ingress.http_get("/metrics")[0] == 200, what="/metrics")
        self.client = ingress.client()

    def add(self, a, b):
        return self.client.infer("add", infer_inputs(a=a, b=b)).as_numpy("sum")

    def test_requests_are_counted(self):
        from tritonclient.utils import InferenceServerException

        a = np.arange(4, dtype=np.int32)
        for _ in range(7):
            self.add(a, a)
        with self.assertRaises(InferenceServerException):  # the worker refuses it
            self.add(a, np.arange(3, dtype=np.int32))
        with self.assertRaises(InferenceServerException):  # the ingress alone answers it
            self.client.infer("no-such-model", infer_inputs(a=a))

        samples = scrape(self.ingress)
        add = labels(model="add", version="")
        self.assertEqual(samples[("anyserve_requests_total", add | {("code", "OK")})], 7)
        self.assertEqual(samples[("anyserve_requests_total", add | {("code", "INVALID_ARGUMENT")})], 1)
        self.assertEqual(samples[("anyserve_request_duration_seconds_count", add)], 8)
        self.assertEqual(samples[("anyserve_requests_in_flight", add)], 0)
        self.assertGreaterEqual(samples[("anyserve_worker_compute_seconds_count", add)], 7)
        self.assertEqual(samples[("anyserve_live_workers", add)], 1)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="echo", version=""))], 1)
        # An unknown model's name is no label anywhere.
        self.assertEqual([k for k in samples if ("model", "no-such-model") in k[1]], [])

    def test_restarts_and_live_workers(self):
        samples = scrape(self.ingress)
        self.assertNotIn(("anyserve_worker_restarts_total", labels(worker="kserve_server-0")), samples)
        [worker] = self.ingress.worker_pids(KSERVE_SERVER)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not pid_alive(worker), what="the worker to die")
        wait_for(lambda: scrape(self.ingress).get(
            ("anyserve_worker_restarts_total", labels(worker="kserve_server-0"))) == 1, what="a restart counted")
        self.ingress.wait_ready("add")
        samples = scrape(self.ingress)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="add", version=""))], 1)
        self.assertEqual(samples[("anyserve_worker_restarts_total", labels(worker="kserve_server-0"))], 1)


    def test_evictions(self):
        """A worker that stops heartbeating (SIGSTOP) is evicted and counted."""
        samples = scrape(self.ingress)
        self.assertEqual(samples[("anyserve_worker_evictions_total", frozenset())], 0)
        [worker] = self.ingress.worker_pids(KSERVE_SERVER)
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_for(lambda: scrape(self.ingress)[("anyserve_worker_evictions_total", frozenset())] == 1,
                     what="an eviction counted")
            self.assertEqual(scrape(self.ingress)[("anyserve_live_workers", labels(model="add", version=""))], 0)
        finally:
            os.kill(worker, signal.SIGCONT)
        self.ingress.wait_ready("add")  # it registers again
        self.assertEqual(scrape(self.ingress)[("anyserve_live_workers", labels(model="add", version=""))], 1)


class AccessLogTests(SynchronousTestCase):
    def start(self, access_log):
        ingress = Ingress([KSERVE_SERVER], args=("--access-log", access_log))
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready("add")
        return ingress

    def send(self, ingress):
        from tritonclient.utils import InferenceServerException

        a = np.arange(3, dtype=np.int32)
        client = ingress.client()
        client.infer("add", infer_inputs(a=a, b=a), request_id="first")
        client.infer("echo", infer_inputs(x=a))
        with self.assertRaises(InferenceServerException):
            client.infer("add", infer_inputs(a=a, b=np.arange(2, dtype=np.int32)))
        with self.assertRaises(InferenceServerException):
            client.infer("no-such-model", infer_inputs(a=a))

    def test_a_line_per_forwarded_request(self):
        path = os.path.join("/tmp", "as-access-%d-%d.log" % (os.getpid(), time.monotonic_ns()))
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        ingress = self.start(path)
        self.send(ingress)
        ingress.stop()  # flushed on shutdown
        with open(path) as f:
            lines = [line.split(" ") for line in f.read().splitlines()]
        self.assertEqual([(line[1], line[2], line[3]) for line in lines],
                         [("add", "-", "OK"), ("echo", "-", "OK"), ("add", "-", "INVALID_ARGUMENT")])
        self.assertEqual([line[6] for line in lines], ["first", "-", "-"])  # the client's request id
        for line in lines:
            self.assertEqual(len(line), 7, line)
            self.assertRegex(line[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertGreater(float(line[4]), 0)
            self.assertTrue(line[5].startswith("kserve_server-0"), line)

    def test_dash_is_the_twistd_log(self):
        ingress = self.start("-")
        self.send(ingress)
        wait_for(lambda: ingress.log().count("[anyserve.access#info]") == 3, what="three access lines")
        lines = [line for line in ingress.log().splitlines() if "[anyserve.access#info]" in line]
        self.assertIn(" add - OK ", lines[0])
        self.assertIn(" add - INVALID_ARGUMENT ", lines[2])
