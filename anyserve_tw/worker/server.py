"""The worker process: a Unix-socket frame server and its ingress registration.

:class:`ModelServer` answers REQUEST frames from the ingress.  Plain handlers run
in a thread pool, so a slow model never stalls the event loop that answers
frames and sends heartbeats; asynchronous handlers run on the loop.  A CANCEL
frame, or the deadline carried in the REQUEST, drops work not yet started.

:class:`Registration` registers every model with the ingress, heartbeats, and
registers again whenever the ingress says it does not know this worker (it
evicted us, or it restarted).
"""
import functools
import inspect
import os
import signal
import sys
import threading
import uuid

import grpc
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError, ensureDeferred, fail, gatherResults, maybeDeferred, succeed,
)
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import FileLogObserver, Logger, eventAsText, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from anyserve_tw.allocator import keep_freed_memory
from anyserve_tw.wire import defaults, framing, protos, rpc
from anyserve_tw.wire.errors import InferenceError, as_inference_error
from anyserve_tw.wire.rpc import channel_options
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.worker.app import handler_error

log = Logger()


class WorkerProtocol(framing.FramedProtocol):
    """One ingress connection; requests on it are tracked by id."""

    def __init__(self, server):
        self.server = server
        self.max_payload = server.max_payload
        self.inflight = {}
        self.closed = Deferred()

    def connectionMade(self):
        super().connectionMade()
        self.server.connections.add(self)

    def frameReceived(self, kind, request_id, aux, payload):
        if kind == framing.REQUEST:
            self.server.dispatch(self, request_id, payload, aux / 1000.0 if aux else None)
        elif kind == framing.CANCEL:
            d = self.inflight.pop(request_id, None)
            if d is not None:
                d.cancel()
        else:
            log.warn("unexpected frame type {kind} from the ingress", kind=kind)

    def frameTooLong(self, kind, request_id, length):
        self.sendFrame(
            framing.ERROR, request_id,
            ("request of %d bytes exceeds the worker's %d-byte limit" % (length, self.max_payload)).encode(),
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        )

    def connectionLost(self, reason):
        self.server.connections.discard(self)
        inflight, self.inflight = self.inflight, {}
        for d in inflight.values():
            d.cancel()
        self.closed.callback(None)


class ModelServer(Service):
    """Serves an app's models on a Unix socket."""

    def __init__(self, reactor, app, socket_path, threads=4,
                 max_payload=defaults.MAX_MESSAGE_SIZE, grace=10.0):
        self.reactor = reactor
        self.app = app
        self.socket_path = socket_path
        self.max_payload = max_payload
        self.grace = grace
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="anyserve-model")
        # A handler stuck past the grace period must not keep the process alive.
        self.pool.threadFactory = functools.partial(threading.Thread, daemon=True)
        self._port = None
        self._active = set()
        self._idle = None
        self.connections = set()

    @property
    def address(self):
        return "unix://" + self.socket_path

    def startService(self):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # left behind by a killed predecessor
        self.pool.start()
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, mode=0o600)
        factory = Factory.forProtocol(lambda: WorkerProtocol(self))
        factory.noisy = False
        #: Fires once listening; fails if the socket can't be bound.
        self.listening = endpoint.listen(factory)
        self.listening.addCallback(self._listening)
        super().startService()

    def _listening(self, port):
        self._port = port
        log.info("worker listening on {path}", path=self.socket_path)

    def stopService(self):
        """Stop accepting, let requests in flight finish (up to ``grace``), clean up."""
        super().stopService()
        d = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        d.addCallback(lambda _: self._drained())
        d.addCallback(lambda _: self._close_connections())
        d.addBoth(self._cleanup)
        return d

    def _close_connections(self):
        """Close every connection once its last answers are written: the
        reactor's own shutdown would drop unsent bytes."""
        closing = [c.closed for c in self.connections]
        for connection in list(self.connections):
            connection.transport.loseConnection()
        return gatherResults(closing).addTimeout(5, self.reactor).addErrback(lambda _: None)

    def _drained(self):
        if not self._active:
            return None
        self._idle = Deferred()
        return self._idle.addTimeout(self.grace, self.reactor).addErrback(lambda _: None)

    def _cleanup(self, result):
        if self._active:
            log.warn("{count} request(s) still running after {grace}s: exiting without them",
                     count=len(self._active), grace=self.grace)
        else:
            self.pool.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        return result

    def dispatch(self, protocol, request_id, payload, timeout):
        d = self._run(payload)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        protocol.inflight[request_id] = d
        self._active.add(d)
        d.addBoth(self._answer, protocol, request_id, d)

    def _answer(self, result, protocol, request_id, d):
        self._active.discard(d)
        # Not in flight any more: the ingress cancelled it and wants no answer.
        if protocol.inflight.pop(request_id, None) is not None:
            try:
                self._send_answer(protocol, request_id, result)
            except Exception:
                log.failure("answering request {id}", id=request_id)
                protocol.sendFrame(framing.ERROR, request_id, b"worker failed to answer",
                                   grpc.StatusCode.INTERNAL.value[0])
        if not self._active and self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)

    def _send_answer(self, protocol, request_id, result):
        if isinstance(result, Failure):
            e = as_inference_error(result)
            protocol.sendFrame(framing.ERROR, request_id, e.message.encode("utf-8"), e.code.value[0])
        elif len(result) > self.max_payload:
            message = "response of %d bytes exceeds the %d-byte limit" % (len(result), self.max_payload)
            protocol.sendFrame(framing.ERROR, request_id, message.encode("utf-8"),
                               grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        else:
            protocol.sendFrame(framing.RESPONSE, request_id, result)

    def _run(self, payload):
        """A Deferred of response bytes for request bytes."""
        try:
            model = self.app.route(payload)
        except InferenceError:
            return fail()
        if model.asynchronous:
            return maybeDeferred(self._run_async, model, payload)
        return self._run_in_thread(model, payload)

    def _run_in_thread(self, model, payload):
        """Run a plain handler in the pool.  Cancelling drops a request no thread
        has picked up yet; a handler already running finishes unheard."""
        cancelled = []

        def work():
            if cancelled:
                raise InferenceError(grpc.StatusCode.CANCELLED, "cancelled before it started")
            return self.app.handle(payload, model)

        d = Deferred(lambda _: cancelled.append(True))

        def relay(result):
            if not d.called:
                (d.errback if isinstance(result, Failure) else d.callback)(result)

        deferToThreadPool(self.reactor, self.pool, work).addBoth(relay)
        return d

    def _run_async(self, model, payload):
        request = model.decode(payload)

        def call():
            result = model.handler(request)
            return ensureDeferred(result) if inspect.isawaitable(result) else result

        def failed(failure):
            if failure.check(InferenceError, CancelledError, TimeoutError):
                return failure
            raise handler_error(model, failure.value)

        d = maybeDeferred(call)
        d.addCallback(lambda result: model.encode(request, result))
        d.addErrback(failed)
        return d


class Registration(Service):
    """Keeps this worker's models registered with the ingress.

    Every ``interval`` seconds: register what is not registered yet, else send a
    heartbeat; an unhealthy answer means the ingress forgot us, so register
    again.  Failures are logged and retried on the next tick: a worker started
    before its ingress simply waits for it.
    """

    def __init__(self, reactor, app, ingress, worker_address, worker_id, interval=2.0,
                 rpc_timeout=5.0):
        self.reactor = reactor
        self.app = app
        self.ingress = ingress
        self.worker_address = worker_address
        self.worker_id = worker_id
        self.interval = interval
        self.rpc_timeout = rpc_timeout
        self.registered = False
        self.withdrawn = False  # shutting down: keep heartbeating, never register again
        self._channel = None
        self._stub = None
        self._loop = None
        self._warned = False

    def startService(self):
        super().startService()
        self._channel = grpc.insecure_channel(self.ingress, options=channel_options(4 * 1024 * 1024))
        self._stub = rpc.Stub(self._channel, protos.MANAGEMENT_SERVICE)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def _blocking(self, method, request):
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), method, request, timeout=self.rpc_timeout
        )

    def _tick(self):
        d = self._heartbeat() if self.registered or self.withdrawn else self._register()
        return d.addErrback(self._failed)

    def _register(self):
        m = protos.management
        requests = [
            m.RegisterModelRequest(
                model_name=model.name, model_version=model.version,
                worker_address=self.worker_address, worker_id=self.worker_id,
                platform=model.platform,
                inputs=[m.TensorSpec(**spec._asdict()) for spec in model.inputs or ()],
                outputs=[m.TensorSpec(**spec._asdict()) for spec in model.outputs or ()],
            )
            for model in self.app.models.values()
        ]
        d = gatherResults([self._blocking(self._stub.RegisterModel, r) for r in requests],
                          consumeErrors=True)

        def registered(_):
            self.registered = True
            self._warned = False
            log.info("registered {models} with the ingress at {ingress} as {worker}",
                     models=", ".join("%s:%s" % k if k[1] else k[0] for k in self.app.models),
                     ingress=self.ingress, worker=self.worker_id)

        return d.addCallback(registered)

    def _heartbeat(self):
        request = protos.management.HeartbeatRequest(
            worker_id=self.worker_id, model_names=sorted({m.name for m in self.app.models.values()})
        )

        def answered(response):
            if not response.healthy and not self.withdrawn:
                log.warn("the ingress does not know worker {worker}: registering again",
                         worker=self.worker_id)
                self.registered = False
                return self._register()

        return self._blocking(self._stub.Heartbeat, request).addCallback(answered)

    def _failed(self, failure):
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
        if self.registered:
            log.warn("heartbeat to {ingress} failed: {error}", ingress=self.ingress, error=error)
        elif not self._warned:
            self._warned = True
            log.warn("cannot register with the ingress at {ingress} yet (retrying): {error}",
                     ingress=self.ingress, error=error)

    def withdraw(self):
        """Unregister every model so the ingress stops routing here.

        Heartbeats go on while requests in flight drain, so the ingress does
        not evict this worker (and fail those requests) in the meantime.
        """
        self.withdrawn = True
        m = protos.management
        d = gatherResults(
            [self._blocking(self._stub.UnregisterModel,
                            m.UnregisterModelRequest(model_name=model.name, model_version=model.version,
                                                     worker_id=self.worker_id))
             for model in self.app.models.values()] if self.registered else [],
            consumeErrors=True,
        )
        return d.addErrback(lambda f: log.warn("unregistering failed: {error}", error=f.value))

    def stopService(self):
        """Stop heartbeating and close the channel (after the drain)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._channel.close()


class Withdrawal(Service):
    """First step of a worker's shutdown: its models leave the ingress."""

    def __init__(self, registration):
        self.registration = registration

    def stopService(self):
        super().stopService()
        return self.registration.withdraw()


def make_worker_service(reactor, app, ingress, socket_path, worker_id, threads=4,
                        heartbeat_interval=2.0, max_payload=defaults.MAX_MESSAGE_SIZE):
    """The worker's service tree: serve, then register.  Shutdown withdraws the
    models, drains the requests in flight (heartbeats going on), then stops."""
    top = SequentialMultiService(stop_order=["withdrawal", "models", "registration"])
    server = ModelServer(reactor, app, socket_path, threads=threads, max_payload=max_payload)
    server.setName("models")
    server.setServiceParent(top)
    registration = Registration(reactor, app, ingress, server.address, worker_id, heartbeat_interval)
    registration.setName("registration")
    registration.setServiceParent(top)
    withdrawal = Withdrawal(registration)
    withdrawal.setName("withdrawal")
    withdrawal.setServiceParent(top)
    return top


def _untimed_log_line(event):
    """Twisted's classic log line, without its timestamp."""
    text = eventAsText(event, includeTimestamp=False)
    return text.replace("\n", "\n\t") + "\n" if text else None


def log_observer(out, environ):
    """Where the worker logs: timestamped lines on its own; without a
    timestamp under a supervising ingress, which stamps every line it relays."""
    if environ.get(defaults.ENV_SUPERVISED):
        return FileLogObserver(out, _untimed_log_line)
    return textFileLogObserver(out)


def run(app, ingress=None, socket_path=None, worker_id=None, threads=None, heartbeat_interval=None):
    """Serve ``app`` until SIGTERM/SIGINT.  Unset options come from the
    environment (ANYSERVE_INGRESS, ANYSERVE_SOCKET, ANYSERVE_WORKER_ID,
    ANYSERVE_THREADS, ANYSERVE_HEARTBEAT_INTERVAL, ANYSERVE_MAX_MESSAGE_SIZE), which is how a supervising
    ingress configures the workers it starts."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    env = os.environ
    ingress = ingress or env.get(defaults.ENV_INGRESS, defaults.DEFAULT_INGRESS)
    socket_path = socket_path or env.get(defaults.ENV_SOCKET) or "/tmp/anyserve-worker-%s.sock" % uuid.uuid4().hex[:12]
    worker_id = worker_id or env.get(defaults.ENV_WORKER_ID) or "%s-%d" % (
        os.path.splitext(os.path.basename(socket_path))[0], os.getpid())
    threads = threads or int(env.get(defaults.ENV_THREADS, defaults.DEFAULT_WORKER_THREADS))
    heartbeat_interval = heartbeat_interval or float(
        env.get(defaults.ENV_HEARTBEAT_INTERVAL, defaults.DEFAULT_HEARTBEAT_INTERVAL))

    globalLogBeginner.beginLoggingTo([log_observer(sys.stderr, env)])
    keep_freed_memory()
    max_payload = int(env.get(defaults.ENV_MAX_MESSAGE_SIZE, defaults.MAX_MESSAGE_SIZE))
    top = make_worker_service(reactor, app, ingress, socket_path, worker_id, threads,
                              heartbeat_interval, max_payload)
    exit_code = []

    def failed(failure):
        log.failure("worker failed to start", failure)
        exit_code.append(1)
        reactor.stop()

    def start():
        d = maybeDeferred(top.startService)
        d.addCallback(lambda _: top.getServiceNamed("models").listening)
        d.addErrback(failed)

    if env.get(defaults.ENV_SUPERVISED):
        # A terminal's Ctrl-C reaches the whole process group; a supervised
        # worker leaves SIGINT to its ingress, which stops it with SIGTERM in
        # the right order (after draining).
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: top.running and top.stopService())
    reactor.run()
    sys.exit(exit_code[0] if exit_code else 0)
