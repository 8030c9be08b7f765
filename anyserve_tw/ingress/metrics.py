"""Prometheus metrics of the ingress, served at ``/metrics`` by the HTTP front.

Everything is recorded on the reactor thread, by the router as requests start
and finish and by the supervisor as it restarts workers.  The series live in
a :class:`prometheus_client.CollectorRegistry` of their own rather than the
process-wide one, so several ingresses in one process (tests) don't collide.

Labels stay bounded: the router reports only requests it resolved to a
registered (model, version), never a name a client merely asked for, and a
``code`` is one of gRPC's status names; unknown models show up nowhere but in
their NOT_FOUND answers.  Live workers and requests in flight per model are
read from the registry at scrape time (the router keeps both for routing
anyway), so they cannot go stale and cost the request path nothing.
"""
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource

#: Seconds; requests here take from well under a millisecond (a small
#: tensor) to minutes (a slow model), so the buckets start at 250 us.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The ingress's series, and the calls that feed them.

    ``request_finished`` / ``worker_timing`` are on the request path: each looks up the model's labelled children in a dict (one
    tuple per (model, version), made on first use), so a request costs a few
    increments and two bucket searches, no label formatting.
    """

    def __init__(self, router, registry=None):
        self.router = router
        self.registry = CollectorRegistry() if registry is None else registry
        labels = ("model", "version")
        self.requests = Counter(
            "anyserve_requests", "Inference requests the ingress answered, by gRPC status.",
            labels + ("code",), registry=self.registry)
        self.duration = Histogram(
            "anyserve_request_duration_seconds",
            "Time from forwarding a request to a worker until its answer (or failure) came back.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.worker_queue = Histogram(
            "anyserve_worker_queue_seconds",
            "Time a request waited in its worker for a thread or a batch, as the worker measured it.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.worker_compute = Histogram(
            "anyserve_worker_compute_seconds",
            "Time a worker spent decoding inputs, running the handler and encoding outputs.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.restarts = Counter(
            "anyserve_worker_restarts", "Supervised worker processes started again after they exited.",
            ("worker",), registry=self.registry)
        self.recycles = Counter(
            "anyserve_worker_recycles", "Supervised workers replaced gracefully past a limit.",
            ("worker", "limit"), registry=self.registry)
        self.evictions = Counter(
            "anyserve_worker_evictions", "Workers dropped for missing their heartbeats.",
            registry=self.registry)
        self.registry.register(RegistryGauges(router))
        self._models = {}  # (name, version) -> (duration, queue, compute)
        self._codes = {}  # (name, version, code) -> requests child

    def _children(self, name, version):
        key = (name, version)
        children = self._models.get(key)
        if children is None:
            children = self._models[key] = (
                self.duration.labels(name, version), self.worker_queue.labels(name, version),
                self.worker_compute.labels(name, version),
            )
        return children

    def request_finished(self, name, version, code_name, seconds):
        """It ended with gRPC status ``code_name`` ("OK", "UNAVAILABLE", ...)
        after ``seconds``."""
        self._children(name, version)[0].observe(seconds)
        key = (name, version, code_name)
        counter = self._codes.get(key)
        if counter is None:
            counter = self._codes[key] = self.requests.labels(name, version, code_name)
        counter.inc()

    def worker_timing(self, name, version, timing):
        """The worker's own times for one request
        (:class:`anyserve_tw.wire.payloads.Timing`, nanoseconds)."""
        _, queue, compute = self._children(name, version)
        queue.observe(timing.queue_ns * 1e-9)
        compute.observe((timing.input_ns + timing.infer_ns + timing.output_ns) * 1e-9)

    def worker_restarted(self, worker):
        """The supervisor started worker process ``worker`` (its slot name,
        ``kserve_server-0``) again after it exited."""
        self.restarts.labels(worker).inc()

    def worker_recycled(self, worker, limit):
        """The supervisor began recycling worker ``worker`` (its slot name)
        past ``limit``: ``"requests"`` or ``"rss"``."""
        self.recycles.labels(worker, limit).inc()

    def worker_evicted(self):
        """The router dropped a worker that stopped heartbeating."""
        self.evictions.inc()

    def resource(self):
        """A twisted.web resource answering with the exposition format."""
        return MetricsResource(self.registry)


class RegistryGauges:
    """``anyserve_live_workers`` and ``anyserve_requests_in_flight``: read
    from the router's registry when scraped (on the reactor thread, which
    owns the registry)."""

    def __init__(self, router):
        self.router = router

    def _families(self):
        return (GaugeMetricFamily("anyserve_live_workers", "Workers serving each registered model.",
                                  labels=("model", "version")),
                GaugeMetricFamily("anyserve_requests_in_flight",
                                  "Requests forwarded to a worker and not yet answered.",
                                  labels=("model", "version")))

    def describe(self):
        return list(self._families())

    def collect(self):
        workers, in_flight = self._families()
        for model in self.router.registry.models():
            key = (model.name, model.version)
            workers.add_metric(key, len(model.workers))
            in_flight.add_metric(key, model.outstanding)
        yield workers
        yield in_flight


class MetricsResource(Resource):
    """Renders ``registry`` on the reactor thread, where the live-worker
    collector may read the router (prometheus_client's own Twisted resource
    renders in a thread, from the global reactor)."""

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self.registry)
