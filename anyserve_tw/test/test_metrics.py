"""Tests for anyserve_tw.ingress.metrics, and the supervisor's restart count."""
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from anyserve_tw.ingress.metrics import LATENCY_BUCKETS, Metrics
from anyserve_tw.ingress.registry import ModelRegistry
from anyserve_tw.ingress.supervisor import WorkerSupervisor
from anyserve_tw.wire.payloads import Timing


class FakeWorker:
    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.outstanding = 0


class FakeRouter:
    def __init__(self):
        self.registry = ModelRegistry()


def scrape(metrics, accept=None):
    """{(sample name, frozenset(labels)): value} from the resource's answer."""
    request = DummyRequest([b""])
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    body = metrics.resource().render(request)
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, request


def labels(**kv):
    return frozenset(kv.items())


class RequestMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.router = FakeRouter()
        self.metrics = Metrics(self.router)

    def test_counts_by_model_version_and_code(self):
        m = self.metrics
        for _ in range(3):
            m.request_finished("add", "", "OK", 0.002)
        m.request_finished("add", "", "INTERNAL", 0.0001)
        m.request_finished("cls", "v2", "DEADLINE_EXCEEDED", 7.0)
        samples, _ = scrape(m)
        self.assertEqual(samples[("anyserve_requests_total", labels(model="add", version="", code="OK"))], 3)
        self.assertEqual(samples[("anyserve_requests_total", labels(model="add", version="", code="INTERNAL"))], 1)
        self.assertEqual(
            samples[("anyserve_requests_total", labels(model="cls", version="v2", code="DEADLINE_EXCEEDED"))], 1)
        self.assertNotIn(("anyserve_requests_total", labels(model="cls", version="v2", code="OK")), samples)
        add = labels(model="add", version="")
        self.assertEqual(samples[("anyserve_request_duration_seconds_count", add)], 4)
        self.assertAlmostEqual(samples[("anyserve_request_duration_seconds_sum", add)], 0.0061)
        self.assertEqual(samples[("anyserve_request_duration_seconds_bucket", add | {("le", "0.00025")})], 1)
        self.assertEqual(samples[("anyserve_request_duration_seconds_bucket", add | {("le", "0.0025")})], 4)
        cls = labels(model="cls", version="v2")
        self.assertEqual(samples[("anyserve_request_duration_seconds_bucket", cls | {("le", "5.0")})], 0)
        self.assertEqual(samples[("anyserve_request_duration_seconds_bucket", cls | {("le", "10.0")})], 1)

    def test_in_flight_read_at_scrape_time(self):
        """The router's own count of a model's requests in flight."""
        model = self.router.registry.register(FakeWorker("w1"), "add")
        model.outstanding = 2
        samples, _ = scrape(self.metrics)
        self.assertEqual(samples[("anyserve_requests_in_flight", labels(model="add", version=""))], 2)
        model.outstanding = 0
        samples, _ = scrape(self.metrics)
        self.assertEqual(samples[("anyserve_requests_in_flight", labels(model="add", version=""))], 0)

    def test_worker_timing(self):
        m = self.metrics
        m.worker_timing("add", "v1", Timing(queue_ns=3_000_000, input_ns=1_000_000, infer_ns=20_000_000,
                                            output_ns=2_000_000, batch_size=1))
        m.worker_timing("add", "v1", Timing(queue_ns=0, input_ns=0, infer_ns=100, output_ns=0, batch_size=4))
        samples, _ = scrape(m)
        key = labels(model="add", version="v1")
        self.assertEqual(samples[("anyserve_worker_queue_seconds_count", key)], 2)
        self.assertAlmostEqual(samples[("anyserve_worker_queue_seconds_sum", key)], 0.003)
        self.assertEqual(samples[("anyserve_worker_compute_seconds_count", key)], 2)
        self.assertAlmostEqual(samples[("anyserve_worker_compute_seconds_sum", key)], 0.0230001)
        self.assertEqual(samples[("anyserve_worker_compute_seconds_bucket", key | {("le", "0.025")})], 2)
        self.assertEqual(samples[("anyserve_worker_compute_seconds_bucket", key | {("le", "0.01")})], 1)

    def test_nothing_recorded_nothing_labelled(self):
        """No model appears until the router reports a request for it."""
        samples, _ = scrape(self.metrics)
        self.assertEqual([k for k in samples if dict(k[1]).get("model")], [])

    def test_live_workers_read_at_scrape_time(self):
        registry = self.router.registry
        a, b = FakeWorker("w1"), FakeWorker("w2")
        registry.register(a, "add")
        registry.register(b, "add")
        registry.register(a, "cls", "v1")
        samples, _ = scrape(self.metrics)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="add", version=""))], 2)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="cls", version="v1"))], 1)
        registry.remove_worker("w1")
        samples, _ = scrape(self.metrics)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="add", version=""))], 1)
        self.assertEqual(samples[("anyserve_live_workers", labels(model="cls", version="v1"))], 0)

    def test_restarts_and_evictions(self):
        m = self.metrics
        samples, _ = scrape(m)
        self.assertEqual(samples[("anyserve_worker_evictions_total", frozenset())], 0)
        m.worker_restarted("kserve_server-0")
        m.worker_restarted("kserve_server-0")
        m.worker_restarted("other-1")
        m.worker_evicted()
        m.worker_recycled("kserve_server-0", "rss")
        samples, _ = scrape(m)
        self.assertEqual(samples[("anyserve_worker_recycles_total", labels(worker="kserve_server-0", limit="rss"))], 1)
        self.assertEqual(samples[("anyserve_worker_restarts_total", labels(worker="kserve_server-0"))], 2)
        self.assertEqual(samples[("anyserve_worker_restarts_total", labels(worker="other-1"))], 1)
        self.assertEqual(samples[("anyserve_worker_evictions_total", frozenset())], 1)

    def test_each_ingress_has_its_own_registry(self):
        """Two Metrics in one process neither collide nor share counts."""
        other = Metrics(FakeRouter())
        self.metrics.request_finished("add", "", "OK", 0.01)
        samples, _ = scrape(other)
        self.assertNotIn(("anyserve_requests_total", labels(model="add", version="", code="OK")), samples)
        self.assertIsNot(other.registry, self.metrics.registry)

    def test_buckets_cover_sub_millisecond_to_request_timeout(self):
        self.assertLessEqual(LATENCY_BUCKETS[0], 0.0005)
        self.assertGreaterEqual(LATENCY_BUCKETS[-1], 600.0)
        self.assertEqual(list(LATENCY_BUCKETS), sorted(LATENCY_BUCKETS))


class ResourceTests(SynchronousTestCase):
    def test_text_format(self):
        metrics = Metrics(FakeRouter())
        metrics.worker_evicted()
        samples, request = scrape(metrics)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIn(("anyserve_worker_evictions_total", frozenset()), samples)

    def test_openmetrics_when_asked(self):
        metrics = Metrics(FakeRouter())
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text; version=1.0.0"])
        body = metrics.resource().render(request)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
            b"application/openmetrics-text"))
        self.assertTrue(body.rstrip().endswith(b"# EOF"))


class FakeProcessReactor(Clock):
    """Enough of a reactor for ProcessMonitor: spawned processes are recorded."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None, **kw):
        self.spawned.append(protocol.name)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport


class SupervisorRestartCountTests(SynchronousTestCase):
    def test_restarts_are_counted_per_slot_first_starts_are_not(self):
        reactor = FakeProcessReactor()
        metrics = Metrics(FakeRouter())
        sup = WorkerSupervisor(reactor, ["/x/kserve_server.py"], 2, "127.0.0.1:1", 0.5,
                               socket_dir="/nonexistent", metrics=metrics)
        sup.startService()
        self.assertEqual(sorted(reactor.spawned), ["kserve_server-0", "kserve_server-1"])

        def restarts():
            samples, _ = scrape(metrics)
            return {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "anyserve_worker_restarts_total"}

        self.assertEqual(restarts(), {})
        # kserve_server-0 exits; ProcessMonitor starts it again after its delay.
        sup.protocols["kserve_server-0"].processEnded(Failure(error.ProcessTerminated(signal=9)))
        self.assertEqual(restarts(), {})  # not until it is started again
        reactor.advance(sup.maxRestartDelay)
        self.assertEqual(reactor.spawned.count("kserve_server-0"), 2)
        self.assertEqual(restarts(), {"kserve_server-0": 1})
        sup.startProcess("kserve_server-0")  # already running: no restart
        self.assertEqual(restarts(), {"kserve_server-0": 1})
