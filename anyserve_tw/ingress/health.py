"""gRPC's standard health service (``grpc.health.v1.Health``: Check, Watch)
on the inference port, kept in step with the router.

Service names answered, so one port serves every kind of probe:

* ``""`` (the whole server): SERVING from start until shutdown begins.  It is
  *liveness*: Kubernetes' gRPC probes ask ``""`` unless told otherwise, and an
  ingress whose worker died must not be restarted for it (it restarts the
  worker itself), so it does not follow the models.
* ``inference.GRPCInferenceService``: *readiness*, SERVING exactly when
  ServerReady would say true (every known model has a live worker).  Point a
  readiness probe here (``grpc: {port: 8000, service:
  inference.GRPCInferenceService}``).
* a model's name: SERVING when its default version is ready (ModelReady with
  no version); ``name/version`` for each version it registered with one.

Any other name is NOT_FOUND for Check and SERVICE_UNKNOWN for Watch, as
grpcio-health-checking's servicers answer.  A model that leaves the registry
stays NOT_SERVING.  On shutdown every status goes NOT_SERVING; open Watch
streams hear it and are then ended (status OK), so they do not hold the
inference server's drain open for its whole grace period.

The statuses are compared with the router every ``interval`` seconds on the
reactor (O(models) a tick) and only changes are published.  The servicers
are grpcio-health-checking's: the asyncio one for the asyncio front (its
``set`` is a coroutine, run on the reactor's own loop) and the thread-safe one
for the thread front (its ``set`` writes to watchers and waits for them, so it
runs in the reactor's thread pool, never on the reactor thread).
"""
import asyncio
import threading

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from anyserve_tw.wire.errors import InferenceError, brief

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

#: The whole server: liveness.
SERVER = grpc_health.OVERALL_HEALTH
#: Readiness: ServerReady.  The inference API's own gRPC service name.
READINESS = "inference.GRPCInferenceService"

#: Seconds between comparisons with the router.
INTERVAL = 0.5
#: Longest wait on shutdown for watchers to hear NOT_SERVING.
SHUTDOWN_TIMEOUT = 1.0


def health_statuses(router):
    """{service name: serving?} for the router's current state."""
    statuses = {SERVER: True, READINESS: router.server_ready()}
    for model in router.registry.models():
        if model.name not in statuses:
            statuses[model.name] = router.model_ready(model.name)
        if model.version:
            statuses["%s/%s" % (model.name, model.version)] = router.model_ready(model.name, model.version)
    return statuses


def _generic_handler(check, watch):
    request = health_pb2.HealthCheckRequest.FromString
    response = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(grpc_health.SERVICE_NAME, {
        "Check": grpc.unary_unary_rpc_method_handler(check, request, response),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, request, response),
    })


class HealthReporter(Service):
    """Publishes :func:`health_statuses` to a health servicer
    (:class:`AioHealth` or :class:`ThreadHealth`) as they change."""

    log = Logger()

    def __init__(self, clock, router, health, interval=INTERVAL):
        self.clock = clock
        self.router = router
        self.health = health
        self.interval = interval
        self.published = {}  # service -> status last handed to the servicer
        self._setting = set()  # services whose set() has not finished yet
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("health status refresh stopped", f))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.health.shutdown()

    def refresh(self):
        statuses = health_statuses(self.router)
        for service in self.published:
            statuses.setdefault(service, False)  # a model that left the registry
        for service, serving in statuses.items():
            status = SERVING if serving else NOT_SERVING
            if self.published.get(service) != status:
                self.published[service] = status
                if service not in self._setting:
                    self._set(service)

    def _set(self, service):
        """Hand ``service``'s latest status to the servicer, one set() at a
        time per service, so a slow one can't land after a newer one."""
        status = self.published[service]
        self._setting.add(service)

        def done(_):
            if self.published[service] != status:
                self._set(service)
            else:
                self._setting.discard(service)

        self.health.set(service, status).addErrback(
            lambda f: self.log.failure("setting health of {service!r}", f, service=service)
        ).addCallback(done)


class AioHealth:
    """grpcio-health-checking's asyncio servicer, for the asyncio front on
    ``loop`` (the reactor's)."""

    def __init__(self, loop, clock):
        self.loop = loop
        self.clock = clock
        self.servicer = grpc_health.aio.HealthServicer()
        self.handler = _generic_handler(self.servicer.Check, self._watch)
        self._watches = set()
        self._closing = False

    def set(self, service, status):
        return Deferred.fromFuture(asyncio.ensure_future(self.servicer.set(service, status), loop=self.loop))

    async def _watch(self, request, context):
        watch = _AioWatch(context, self._closing)
        watch.task = asyncio.ensure_future(self.servicer.Watch(request, watch))
        self._watches.add(watch)
        try:
            await watch.task  # cancelling this RPC (the client left) cancels it too
        except (_WatchEnded, asyncio.CancelledError):
            if not watch.closing:
                raise
        finally:
            self._watches.discard(watch)

    def shutdown(self, timeout=SHUTDOWN_TIMEOUT):
        """Every status NOT_SERVING; each Watch ends once it has said so (or
        after ``timeout``)."""
        self._closing = True
        d = Deferred.fromFuture(asyncio.ensure_future(self._close(), loop=self.loop))
        return d.addTimeout(timeout, self.clock).addErrback(lambda _: self._end_all())

    async def _close(self):
        for watch in self._watches:
            watch.closing = True
        await self.servicer.enter_graceful_shutdown()
        waiting = []
        for watch in list(self._watches):
            if watch.last == SERVING:
                waiting.append(watch.task)  # told NOT_SERVING: ends after writing it
            else:
                watch.task.cancel()  # nothing left to tell it
        if waiting:
            await asyncio.wait(waiting)

    def _end_all(self):
        for watch in list(self._watches):
            watch.task.cancel()


class ReactorHealth:
    """The health service answered on the reactor, for the HTTP/2 front
    (:mod:`anyserve_tw.ingress.h2front`): ``Check(request, timeout)`` and
    ``Watch(send, timeout)``, a stream as the front opens them, with
    grpcio-health-checking's answers (NOT_FOUND for Check, SERVICE_UNKNOWN
    for Watch, of a name never set)."""

    service_name = grpc_health.SERVICE_NAME
    #: No grpc handler: the front serves it (:func:`~anyserve_tw.ingress.h2front.health_methods`).
    handler = None

    def __init__(self):
        self.statuses = {}
        self._watches = {}  # service -> {_Watch}
        self.closed = False

    def set(self, service, status):
        self.statuses[service] = status
        for watch in list(self._watches.get(service, ())):
            watch.tell(status)
        return succeed(None)

    def Check(self, request, timeout):
        status = self.statuses.get(request.service)
        if status is None:
            raise InferenceError(grpc.StatusCode.NOT_FOUND, "unknown service %r" % brief(request.service))
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, send, timeout):
        return _Watch(self, send)

    def shutdown(self, timeout=SHUTDOWN_TIMEOUT):
        """Every status NOT_SERVING; each Watch, told so, ends."""
        self.closed = True
        for service in list(self.statuses):
            self.set(service, NOT_SERVING)
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.end()
        return succeed(None)


class _Watch:
    """One Watch stream: its request names the service; every change is sent."""

    def __init__(self, health, send):
        self.health = health
        self.send = send
        self.service = None
        self.last = None

    def request(self, request):
        if self.service is not None:
            return
        self.service = request.service
        self.health._watches.setdefault(self.service, set()).add(self)
        self.tell(self.health.statuses.get(self.service, SERVICE_UNKNOWN))
        if self.health.closed:  # its request came after shutdown: nothing more to tell
            self.end()

    def tell(self, status):
        if status != self.last:
            self.last = status
            self.send(health_pb2.HealthCheckResponse(status=status))

    def half_close(self):
        pass

    def full(self, queued):
        return False

    def cancel(self):
        watches = self.health._watches.get(self.service)
        if watches is not None:
            watches.discard(self)

    def end(self):
        self.cancel()
        self.send(None)


class _WatchEnded(Exception):
    """The servicer's Watch loop is done: shutdown, NOT_SERVING written."""


class _AioWatch:
    """The RPC context the servicer's Watch writes to: remembers what it
    wrote last, and ends the loop once shutdown's NOT_SERVING is out."""

    def __init__(self, context, closing):
        self.context = context
        self.closing = closing
        self.last = None
        self.task = None

    async def write(self, response):
        await self.context.write(response)
        self.last = response.status
        if self.closing and response.status != SERVING:
            raise _WatchEnded()

    def __getattr__(self, name):
        return getattr(self.context, name)


class ThreadHealth:
    """grpcio-health-checking's thread-safe servicer, for the thread front.
    Its Watch is non-blocking (holds no server thread while it waits)."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.servicer = grpc_health.HealthServicer(experimental_non_blocking=True)

        def watch(request, context, send_response_callback=None):
            return self._watch(request, context, send_response_callback)

        watch.experimental_non_blocking = True  # grpc passes send_response_callback
        self.handler = _generic_handler(self.servicer.Check, watch)
        self._lock = threading.Lock()
        self._watches = set()

    def _in_thread(self, f, *args):
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def set(self, service, status):
        return self._in_thread(self.servicer.set, service, status)

    def _watch(self, request, context, send_response_callback):
        watch = _ThreadWatch(send_response_callback)
        with self._lock:
            self._watches.add(watch)
        context.add_callback(lambda: self._forget(watch))
        return self.servicer.Watch(request, context, watch.send)

    def _forget(self, watch):
        with self._lock:
            self._watches.discard(watch)

    def shutdown(self, timeout=SHUTDOWN_TIMEOUT):
        """Every status NOT_SERVING, sent to the watchers, then their streams
        ended; given up on after ``timeout`` (the server's stop ends them)."""
        d = self._in_thread(self._close)
        return d.addTimeout(timeout, self.reactor).addErrback(lambda _: None)

    def _close(self):
        self.servicer.enter_graceful_shutdown()  # returns once each watcher was sent it
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.end()


class _ThreadWatch:
    """One Watch stream's send callback, which shutdown can end (once)."""

    def __init__(self, send):
        self._send = send
        self._lock = threading.Lock()
        self.ended = False

    def send(self, response):
        with self._lock:
            if self.ended:
                return
            if response is None:
                self.ended = True
            self._send(response)

    def end(self):
        self.send(None)
