"""The worker's standing with the ingress, over its management gRPC API.

:class:`Registration` registers every model, heartbeats, and registers again
whenever the ingress says it does not know this worker (it evicted us, or it
restarted).  :class:`Withdrawal` unregisters them first thing on shutdown.

A restarted ingress must see its standalone workers again within about a
second, so the management channel does not use gRPC's default reconnect
back-off (1 s doubling up to 120 s, so 3-52 s measured): it reconnects at
most :data:`MAX_RECONNECT_BACKOFF_MS` apart, and while the ingress cannot
be reached the worker tries again every :data:`RETRY_INTERVAL` seconds
instead of waiting for its next heartbeat.

Every call carries the ingress's token (:mod:`anyserve_tw.wire.credentials`;
read again before each registration, so a restarted ingress with a new token
is joined again) and this process's worker key, drawn at random here, which
binds our worker id to us at the ingress.

With ``tls`` (ANYSERVE_TLS_CA/CERT/KEY) the management channel is mutual
TLS: the ingress's certificate must chain to the CA and name the host in
ANYSERVE_INGRESS, and the worker presents its own.  A worker given several
ingresses (``ANYSERVE_INGRESS=a:9000,b:9000``) keeps one
:class:`Registration` per ingress under :class:`Registrations`, each with its
own channel, schedule and retries, so losing one ingress leaves the others'
registrations untouched.
"""
import os
import secrets

import grpc
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from anyserve_tw.wire import credentials, protos, rpc
from anyserve_tw.wire.rpc import channel_options

log = Logger()

#: Longest wait between registrations while the ingress address answers as
#: something other than a management API.
MAX_MISDIRECTED_BACKOFF = 30.0

#: The management channel's reconnect schedule (milliseconds): first retry,
#: longest wait between attempts, and the shortest time a connection
#: attempt is given (gRPC's ``min_reconnect_backoff``, 20 s by default).
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000
MIN_CONNECT_TIMEOUT_MS = 1000

#: Seconds between attempts while the ingress cannot be reached (when that is
#: shorter than the heartbeat interval).
RETRY_INTERVAL = 0.25

#: gRPC calls one registration has in flight at once (each holds a thread
#: of the reactor's pool, ten by default, until it is answered): an ingress
#: that stops answering holds at most these, so heartbeats to the other
#: ingresses of a worker with many models still get threads.
CALLS_AT_ONCE = 2

#: Status codes meaning the ingress could not be reached (or answer) at all.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def management_channel_options():
    """Options of the worker's channel to the management API: the message
    caps and a reconnect back-off capped at about a second."""
    return channel_options(4 * 1024 * 1024) + [
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_TIMEOUT_MS),
    ]


def _rpc_code(failure):
    """The gRPC status code a failed call ended with (None if it was not a
    gRPC error), through gatherResults' FirstError."""
    error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
    code = getattr(error, "code", None)
    return code() if isinstance(error, grpc.RpcError) and callable(code) else None


class Registration(Service):
    """Keeps this worker's models registered with the ingress.

    Every ``interval`` seconds: register what is not registered yet, else send a
    heartbeat; an unhealthy answer means the ingress forgot us, so register
    again.  Failures are logged and retried on the next tick, which comes
    after :data:`RETRY_INTERVAL` instead while the ingress is unreachable: a
    worker started before its ingress, or outliving it, waits for it and is
    back within about a second of it.

    An address that answers RegisterModel UNIMPLEMENTED is a gRPC server
    without the management API, most likely the ingress's inference port:
    that is said once, as an error, and registration retried with a
    doubling wait (up to :data:`MAX_MISDIRECTED_BACKOFF`), not every tick.
    """

    def __init__(self, reactor, app, ingress, worker_address, worker_id, interval=2.0,
                 rpc_timeout=5.0, environ=None, tls=None, health=None):
        self.reactor = reactor
        #: A :class:`~anyserve_tw.wire.tlsconfig.MutualTls` for the channel, or None.
        self.tls = tls
        #: () -> (healthy, reason): what each heartbeat reports (e.g. every
        #: handler thread stuck); None: always healthy.
        self.health = health
        #: Where the token comes from (ANYSERVE_TOKEN, ANYSERVE_TOKEN_FILE).
        self.environ = os.environ if environ is None else environ
        #: Binds our worker id to this process at the ingress.
        self.worker_key = secrets.token_urlsafe(24)
        self._metadata = ()
        self._auth_said = None  # the last authentication problem logged
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
        self._calls = DeferredSemaphore(CALLS_AT_ONCE)
        self._ticking = False  # a registration or heartbeat is under way
        self._after_tick = []  # Deferreds fired when it is over
        self._attempted = False  # a registration was sent (some models may be registered)
        self._next_tick = None  # the IDelayedCall of the next tick
        self._unreachable = False  # the last attempt could not reach the ingress
        self._warned = False
        self._misdirected = False  # said that the address is not a management API
        self._backoff = 0.0  # current wait between registrations while misdirected
        self._next_register = 0.0  # reactor time before which no registration is tried

    def startService(self):
        super().startService()
        if self.tls is None:
            self._channel = grpc.insecure_channel(self.ingress, options=management_channel_options())
        else:
            self._channel = grpc.secure_channel(self.ingress, self.tls.grpc_channel_credentials(),
                                                options=management_channel_options())
        self._stub = rpc.Stub(self._channel, protos.MANAGEMENT_SERVICE)
        self._loop()

    def _loop(self):
        """Tick, then schedule the next tick once this one is over."""
        self._next_tick = None
        d = self._tick()
        if d is None:
            self._schedule()
        else:
            self._ticking = True
            d.addBoth(self._tick_over)

    def _tick_over(self, _):
        self._ticking = False
        waiting, self._after_tick = self._after_tick, []
        for d in waiting:
            d.callback(None)
        self._schedule()

    def _schedule(self, _=None):
        if self.running:
            delay = min(self.interval, RETRY_INTERVAL) if self._unreachable else self.interval
            self._next_tick = self.reactor.callLater(delay, self._loop)

    def _blocking(self, method, request):
        return self._calls.run(
            deferToThreadPool, self.reactor, self.reactor.getThreadPool(), method, request,
            timeout=self.rpc_timeout, metadata=self._metadata,
        )

    def _read_token(self):
        """Read the token again (it may have changed with the ingress)."""
        try:
            token = credentials.worker_token(self.environ, self.ingress)
        except credentials.TokenFileError as e:
            self._say_auth(str(e))
            token = None
        self._metadata = credentials.metadata(token)

    def _tick(self):
        if self.registered or self.withdrawn:
            d = self._heartbeat()
        elif self.reactor.seconds() < self._next_register:
            return None
        else:
            d = self._register()
        return d.addCallbacks(self._reached, self._failed)

    def _reached(self, _):
        self._unreachable = False

    def _register(self):
        self._attempted = True
        self._read_token()
        m = protos.management
        requests = [
            m.RegisterModelRequest(
                model_name=model.name, model_version=model.version,
                worker_address=self.worker_address, worker_id=self.worker_id,
                platform=model.platform,
                inputs=[m.TensorSpec(**spec._asdict()) for spec in model.inputs or ()],
                outputs=[m.TensorSpec(**spec._asdict()) for spec in model.outputs or ()],
                decoupled=model.decoupled,
                max_batch_size=model.max_batch_size,
                preferred_batch_sizes=model.preferred_batch_sizes,
                max_queue_delay_us=model.max_queue_delay_us,
                worker_key=self.worker_key,
            )
            for model in self.app.models.values()
        ]
        d = gatherResults([self._blocking(self._stub.RegisterModel, r) for r in requests],
                          consumeErrors=True)

        def registered(_):
            self.registered = True
            self._warned = self._misdirected = False
            self._auth_said = None
            self._backoff = self._next_register = 0.0
            log.info("registered {models} with the ingress at {ingress} as {worker}",
                     models=", ".join("%s:%s" % k if k[1] else k[0] for k in self.app.models),
                     ingress=self.ingress, worker=self.worker_id)

        return d.addCallback(registered)

    def _heartbeat(self):
        request = protos.management.HeartbeatRequest(
            worker_id=self.worker_id, model_names=sorted({m.name for m in self.app.models.values()}),
            worker_key=self.worker_key,
        )
        healthy, reason = self.health() if self.health is not None else (True, "")
        if not healthy:
            # The ingress evicts us (and a supervisor replaces us); while
            # unhealthy we do not register again.
            request.unhealthy = reason or "unhealthy"

        def answered(response):
            if not response.healthy and not self.withdrawn and healthy:
                log.warn("the ingress does not know worker {worker}: registering again",
                         worker=self.worker_id)
                self.registered = False
                return self._register()

        return self._blocking(self._stub.Heartbeat, request).addCallback(answered)

    def _failed(self, failure):
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
        code = _rpc_code(failure)
        self._unreachable = code in UNREACHABLE
        if not self.registered and code == grpc.StatusCode.UNIMPLEMENTED:
            self._misdirected_failure()
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            if not self.withdrawn:
                self.registered = False  # register again, with the token read anew
            self._say_auth("%s: %s" % (code.name, error.details() if hasattr(error, "details") else error))
        elif self.registered:
            log.warn("heartbeat to {ingress} failed: {error}", ingress=self.ingress, error=error)
        elif not self._warned:
            self._warned = True
            log.warn("cannot register with the ingress at {ingress} yet (retrying): {error}",
                     ingress=self.ingress, error=error)

    def _say_auth(self, problem):
        """Log an authentication problem once (until it changes): the
        worker retries every tick, and the ingress logs its side too."""
        if problem != self._auth_said:
            self._auth_said = problem
            log.error("the ingress at {ingress} refuses this worker: {problem}",
                      ingress=self.ingress, problem=problem)

    def _misdirected_failure(self):
        if not self._misdirected:
            self._misdirected = True
            log.error("ANYSERVE_INGRESS={ingress} answers as an inference server (UNIMPLEMENTED "
                      "RegisterModel): point it at the ingress's --mgmt port", ingress=self.ingress)
        self._backoff = min(MAX_MISDIRECTED_BACKOFF, max(self.interval, self._backoff * 2))
        self._next_register = self.reactor.seconds() + self._backoff

    def withdraw(self):
        """Unregister every model so the ingress stops routing here.

        Heartbeats go on while requests in flight drain, so the ingress does
        not evict this worker (and fail those requests) in the meantime.
        """
        self.withdrawn = True
        if self._ticking:  # a registration under way: withdraw what it registers, after it
            d = Deferred()
            self._after_tick.append(d)
        else:
            d = succeed(None)
        return d.addCallback(lambda _: self._unregister_all())

    def _unregister_all(self):
        # Also after a registration that failed part way: some models took.
        if not (self.registered or self._attempted):
            return None
        m = protos.management
        d = gatherResults(
            [self._blocking(self._stub.UnregisterModel,
                            m.UnregisterModelRequest(model_name=model.name, model_version=model.version,
                                                     worker_id=self.worker_id, worker_key=self.worker_key))
             for model in self.app.models.values()],
            consumeErrors=True,
        )
        return d.addErrback(self._unregister_failed)

    def _unregister_failed(self, failure):
        if self.registered or _rpc_code(failure) != grpc.StatusCode.NOT_FOUND:
            log.warn("unregistering failed: {error}", error=failure.value)

    def stopService(self):
        """Stop heartbeating and close the channel (after the drain)."""
        super().stopService()
        if self._next_tick is not None and self._next_tick.active():
            self._next_tick.cancel()
        self._next_tick = None
        self._channel.close()


def ingress_addresses(value):
    """The ingresses in ANYSERVE_INGRESS: ``host:port`` entries separated by
    commas (blanks ignored, duplicates once, in order)."""
    seen = []
    for entry in value.split(","):
        entry = entry.strip()
        if entry and entry not in seen:
            seen.append(entry)
    if not seen:
        raise ValueError("no ingress address in %r" % (value,))
    return seen


class Registrations(MultiService):
    """One :class:`Registration` per ingress, each kept alive on its own.

    ``registered`` once any ingress has taken the models (the worker is then
    serving); :meth:`withdraw` withdraws from every ingress at once."""

    def __init__(self, reactor, app, ingresses, worker_address, worker_id, interval=2.0,
                 rpc_timeout=5.0, environ=None, tls=None, health=None):
        super().__init__()
        for ingress in ingresses:
            Registration(reactor, app, ingress, worker_address, worker_id, interval, rpc_timeout,
                         environ, tls, health).setServiceParent(self)

    @property
    def registrations(self):
        return list(self)

    @property
    def registered(self):
        return any(r.registered for r in self)

    def withdraw(self):
        return gatherResults([r.withdraw() for r in self])


class Withdrawal(Service):
    """First step of a worker's shutdown: its models leave the ingress."""

    def __init__(self, registration):
        self.registration = registration

    def stopService(self):
        super().stopService()
        return self.registration.withdraw()
