"""The ingress core: the registry, the links to workers, and heartbeat eviction.

Everything here runs on the reactor thread, called by the APIs either front
serves (:mod:`anyserve_tw.ingress.interfaces`); nothing here blocks.
"""
import grpc
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, TimeoutError, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.payloads import encode_shm_table
from anyserve_tw.wire.errors import InferenceError, brief, unavailable
from anyserve_tw.ingress.registry import ModelRegistry
from anyserve_tw.ingress.workerlink import WorkerHandle


class Router(Service):
    """Routes each inference request to a live worker of its model.

    A worker is dropped from routing at once when a connection to it drops, and
    after ``heartbeat_timeout`` seconds without a heartbeat (a hung or stopped
    process keeps its sockets open, so only silence reveals it).  A model
    left by its last lost worker is forgotten ``forget_after`` seconds later
    (see :mod:`anyserve_tw.ingress.registry`).

    ``max_inflight_per_model`` (0: no cap) bounds the requests in flight to
    one model: past it a request gets RESOURCE_EXHAUSTED at once, so a slow
    model cannot take every slot of the ingress from the others.

    For ``startup_window`` seconds after the router starts, and while a
    supervised worker has yet to register, a request for an unknown model
    gets UNAVAILABLE ("workers are registering", which clients retry)
    rather than NOT_FOUND (which looks permanent).

    Each worker handle counts the requests routed to it (``requests``: one
    increment on the request path).  When one reaches
    ``max_requests_per_worker`` (0: never), ``on_request_limit(worker_id,
    address, count)`` is told, once, so that the supervisor can recycle
    it; :meth:`drain` then takes the worker out of routing while its
    requests in flight finish.
    """

    log = Logger()

    def __init__(self, reactor, pool_size=2, heartbeat_timeout=6.0,
                 max_payload=defaults.MAX_MESSAGE_SIZE, connect_timeout=5.0,
                 forget_after=60.0, max_inflight_per_model=1024, startup_window=10.0):
        self.reactor = reactor
        self.registry = ModelRegistry(reactor, forget_after)
        self.max_inflight_per_model = max_inflight_per_model
        self.startup_window = startup_window
        self._registering_until = None
        self.workers = {}  # worker_id -> WorkerHandle
        self.pool_size = pool_size
        self.heartbeat_timeout = heartbeat_timeout
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        #: A :class:`~anyserve_tw.wire.tlsconfig.MutualTls` to reach tls://
        #: workers with (--tls-ca), and whether tcp:// ones are accepted.
        self.worker_tls = None
        self.insecure_workers = False
        #: :class:`~anyserve_tw.ingress.metrics.Metrics` and
        #: :class:`~anyserve_tw.ingress.accesslog.AccessLog`, when the
        #: service tree gives them.
        self.metrics = None
        self.access_log = None
        #: The SHM_TABLE payload every worker gets (b"": no region).
        self.shm_table = b""
        #: ``on_evicted(worker_id, address, why)``: a worker went silent and
        #: was dropped (the supervisor replaces it if it is one of its own).
        self.on_evicted = None
        #: ``()`` -> bool: whether every supervised worker has registered
        #: (None: no supervisor), part of what ServerReady means.
        self.workers_registered = None
        #: ``on_registered(worker_id)``: a worker's model was just routed.
        self.on_registered = None
        #: Requests after which a worker is reported to ``on_request_limit``.
        self.max_requests_per_worker = 0
        #: ``on_request_limit(worker_id, address, count)``: see the class docstring.
        self.on_request_limit = None
        self._draining = set()  # ids of workers taken out of routing by drain()
        self._reaper = None

    def startService(self):
        super().startService()
        self._registering_until = self.reactor.seconds() + self.startup_window
        self._reaper = LoopingCall(self.evict_silent_workers)
        self._reaper.clock = self.reactor
        self._reaper.start(max(self.heartbeat_timeout / 4.0, 0.05), now=False).addErrback(
            lambda f: self.log.failure("heartbeat reaper stopped", f)
        )

    def stopService(self):
        super().stopService()
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        for handle in list(self.workers.values()):
            handle.close("ingress shutting down")
        self.registry.close()

    # -- management -----------------------------------------------------

    def register_model(self, worker_id, address, name, version="", platform="",
                       inputs=(), outputs=(), **config):
        """Add (name, version) for a worker, connecting to it first if new;
        ``config`` (decoupled, max_batch_size, ...) goes to the registry.

        A Deferred that fires once the worker is reachable and the model routed
        to it; UNAVAILABLE if its socket can't be reached.
        """
        handle = self.workers.get(worker_id)
        if handle is not None and worker_id in self._draining and not handle.closed:
            # Being recycled: it withdraws and exits; never route to it again.
            return succeed(True)
        if handle is not None and handle.closed:
            self._forget(handle, "re-registered")
            handle = None
        if handle is not None and handle.address != address:
            # A restarted worker has lost its connections (and so its handle)
            # already; a live one at another address is a different process.
            raise InferenceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "worker id %r is already in use by the worker at %s" % (worker_id, handle.address),
            )
        if handle is None:
            handle = WorkerHandle(
                self.reactor, worker_id, address, self._worker_lost,
                pool_size=self.pool_size, max_payload=self.max_payload,
                connect_timeout=self.connect_timeout, tls=self.worker_tls,
                insecure_tcp=self.insecure_workers,
            )
            handle.shm_table = self.shm_table
            handle.requests = 0  # routed to it so far (see the class docstring)
            self.workers[worker_id] = handle
            self.log.info("worker {worker} at {address}: connecting", worker=worker_id, address=address)

        def connected(handle):
            if self.workers.get(worker_id) is not handle:
                raise unavailable("worker %s went away while registering" % worker_id)
            handle.last_heartbeat = self.reactor.seconds()
            self.registry.register(handle, name, version, platform, inputs, outputs, **config)
            if self.on_registered is not None:
                self.on_registered(worker_id)
            self.log.info(
                "model {name}:{version} served by worker {worker}",
                name=name, version=version or "-", worker=worker_id,
            )
            return True

        def failed(failure):
            if self.workers.get(worker_id) is handle:
                del self.workers[worker_id]
            return failure

        return handle.connect().addCallbacks(connected, failed)

    def unregister_model(self, worker_id, name, version=""):
        if worker_id in self._draining:
            return True  # drain() withdrew it already
        removed = self.registry.unregister(worker_id, name, version)
        if removed:
            self.log.info("model {name}:{version} withdrawn by worker {worker}",
                          name=name, version=version or "-", worker=worker_id)
        return removed

    def heartbeat(self, worker_id, model_names=()):
        """Note a worker's heartbeat.  False (register again) if the worker is
        unknown here or does not serve every model it names."""
        handle = self.workers.get(worker_id)
        if handle is None or handle.closed:
            return False
        handle.last_heartbeat = self.reactor.seconds()
        if worker_id in self._draining:
            return True  # withdrawn on purpose: it must not register again
        served = self.registry.names_served_by(worker_id)
        return all(name in served for name in model_names)

    def drain(self, worker_id):
        """Stop routing new requests to ``worker_id``, as if it had
        withdrawn every model, while its requests in flight finish and its
        heartbeats keep it from eviction; it is forgotten when its
        connections close.  Its registrations from now on are ignored.
        False if the worker is unknown here.

        The supervisor calls it to recycle a worker once the replacement
        has registered, so every model keeps a live worker throughout.
        """
        handle = self.workers.get(worker_id)
        if handle is None or handle.closed:
            return False
        self._draining.add(worker_id)
        for model in self.registry.models():
            if handle in model.workers:
                self.registry.unregister(worker_id, model.name, model.version)
        self.log.info("worker {worker} draining: no new requests routed to it", worker=worker_id)
        return True

    def draining(self, worker_id):
        """Whether ``worker_id`` was taken out of routing by :meth:`drain`."""
        return worker_id in self._draining

    def requests_served(self, worker_id):
        """Requests routed to ``worker_id`` so far (0 if unknown)."""
        handle = self.workers.get(worker_id)
        return 0 if handle is None else handle.requests

    def evict_silent_workers(self):
        """Drop every worker whose last heartbeat is older than the timeout."""
        now = self.reactor.seconds()
        for handle in list(self.workers.values()):
            silent = now - handle.last_heartbeat
            if silent > self.heartbeat_timeout:
                self.log.warn("worker {worker} missed heartbeats for {silent:.1f}s: evicting",
                              worker=handle.worker_id, silent=silent)
                self.evict(handle.worker_id, "no heartbeat for %.1fs" % silent)

    def evict(self, worker_id, reason):
        """Drop worker ``worker_id`` (its requests in flight fail), and have
        it replaced if it is supervised (:attr:`on_evicted`); False if it
        is not known here."""
        handle = self.workers.get(worker_id)
        if handle is None:
            return False
        if self.metrics is not None:
            self.metrics.worker_evicted()
        self._forget(handle, reason)
        if self.on_evicted is not None:
            self.on_evicted(handle.worker_id, handle.address, reason)
        return True

    def _forget(self, handle, reason):
        if self.workers.get(handle.worker_id) is handle:
            del self.workers[handle.worker_id]
            self._draining.discard(handle.worker_id)
        self.registry.remove_worker(handle.worker_id)
        handle.close(reason)

    def _worker_lost(self, handle):
        if self.workers.get(handle.worker_id) is handle:
            if handle.worker_id in self._draining:  # the end of a drain, as expected
                self._draining.discard(handle.worker_id)
                self.log.info("drained worker {worker} disconnected", worker=handle.worker_id)
            else:
                self.log.warn("worker {worker} disconnected ({reason})",
                              worker=handle.worker_id, reason=handle.lost_reason)
            del self.workers[handle.worker_id]
            self.registry.remove_worker(handle.worker_id)

    # -- inference --------------------------------------------------------

    def infer(self, name, version, payload, timeout=None, kind=framing.REQUEST,
              on_partial=None, request_id=""):
        """Forward a request of ``kind`` to a worker of (name, version); a
        Deferred of the worker's answer (see :meth:`WorkerConnection.forward`).

        Fails at once with NOT_FOUND for an unknown model and UNAVAILABLE for a
        model with no live worker; no worker is touched in either case.  A
        stream's responses before its last go to ``on_partial(bytes)``.  The
        outcome is counted in the model's statistics and metrics, and logged
        to the access log if there is one.
        """
        try:
            try:
                model = self.registry.resolve(name, version)
            except InferenceError as e:
                raise self._while_registering(e, name) from None
            cap = self.max_inflight_per_model
            if cap and model.outstanding >= cap:
                raise InferenceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "model '%s' has %d requests in flight" % (brief(model.name), model.outstanding))
            worker = self.registry.pick_worker(model)
            worker.requests += 1
            if worker.requests == self.max_requests_per_worker:
                self._request_limit(worker)
            call = _Call(self, model, worker, on_partial, request_id)
            d = worker.forward(payload, timeout, kind, call)
        except Exception:
            return fail()
        model.outstanding += 1
        return d.addBoth(call.finished)

    def _request_limit(self, worker):
        """``worker`` just reached ``max_requests_per_worker``: tell the
        supervisor (on the next turn: never inside a request)."""
        if self.on_request_limit is not None:
            self.reactor.callLater(0, self.on_request_limit, worker.worker_id, worker.address,
                                   worker.requests)

    def shared_memory_changed(self, table):
        """Send the shared-memory regions (``{name: Region}``) to every worker,
        and to each one that connects later."""
        self.shm_table = encode_shm_table(table) if table else b""
        for handle in self.workers.values():
            handle.send_shm_table(self.shm_table)

    def registering(self):
        """Whether workers may still be registering: within the startup
        window, unless every supervised worker has registered already."""
        until = self._registering_until
        if until is None or self.reactor.seconds() >= until:
            return False
        return self.workers_registered is None or not self.workers_registered()

    def _while_registering(self, error, name):
        """The error to answer a failed lookup with: an unknown model is
        UNAVAILABLE rather than NOT_FOUND while workers are registering."""
        if error.code is grpc.StatusCode.NOT_FOUND and self.registering():
            return unavailable("model '%s' is not registered yet: workers are registering" % brief(name))
        return error

    def model_ready(self, name, version=""):
        return self.registry.is_ready(name, version)

    def server_ready(self):
        """Running, every known model has a live worker, and every
        supervised worker has registered (one crash-looping before its first
        registration leaves the server not ready)."""
        return (self.running and self.registry.all_ready()
                and (self.workers_registered is None or self.workers_registered()))

    def model_metadata(self, name, version=""):
        """(ModelVersion, every version of its name); NOT_FOUND if unknown."""
        try:
            model = self.registry.resolve(name, version)
        except InferenceError as e:
            raise self._while_registering(e, name) from None
        return model, self.registry.versions(name)


class _Call:
    """One forwarded request, as the router accounts for it: hears the
    worker's timing (and a stream's partial responses), then records the
    outcome in the model's statistics, the metrics and the access log."""

    __slots__ = ("router", "model", "worker", "on_partial", "request_id", "started")

    def __init__(self, router, model, worker, on_partial, request_id):
        self.router = router
        self.model = model
        self.worker = worker
        self.on_partial = on_partial
        self.request_id = request_id
        self.started = router.reactor.seconds()

    def timing(self, timing):
        self.model.stats.timing(timing)
        metrics = self.router.metrics
        if metrics is not None:
            metrics.worker_timing(self.model.name, self.model.version, timing)

    def partial(self, payload):
        if self.on_partial is not None:
            self.on_partial(payload)

    def finished(self, result):
        router = self.router
        now = router.reactor.seconds()
        elapsed = now - self.started
        model = self.model
        model.outstanding -= 1
        if isinstance(result, Failure):
            model.stats.failure(int(elapsed * 1e9), int(now * 1e9))
            code = status_name(result)
        else:
            model.stats.success(int(elapsed * 1e9), int(now * 1e9))
            code = "OK"
        if router.metrics is not None:
            router.metrics.request_finished(model.name, model.version, code, elapsed)
        if router.access_log is not None:
            router.access_log.record(model.name, model.version, code, elapsed,
                                     self.worker.worker_id, self.request_id)
        return result


def status_name(failure):
    """The gRPC status name a failed request ends with, without logging it
    (the front does that once)."""
    if failure.check(InferenceError):
        return failure.value.code.name
    if failure.check(TimeoutError):
        return "DEADLINE_EXCEEDED"
    if failure.check(CancelledError):
        return "CANCELLED"
    return "INTERNAL"
