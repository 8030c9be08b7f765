"""The ``anyserve.management.WorkerManagement`` service workers call.

Like :class:`anyserve_tw.ingress.inference.InferenceAPI`, answered on the
reactor by either front.  Errors are gRPC statuses: INVALID_ARGUMENT for a
malformed or oversized registration (checked before anything reaches the
router: names, datatypes, batch sizes, the size caps below),
RESOURCE_EXHAUSTED past the worker, per-worker and rate caps,
FAILED_PRECONDITION for a signature that conflicts with the live workers of
the same (name, version), PERMISSION_DENIED for a call about a worker id
bound to another worker's key, UNAVAILABLE when the worker's socket can't be
reached.  (UNAUTHENTICATED, without the token, comes earlier:
:mod:`anyserve_tw.ingress.authentication`.)

Scoping: each worker process draws a random key at start and sends it with
every call.  The first registration of a worker id binds the id to that key
for as long as the worker is known here; registering, withdrawing or
heartbeating for that id with another key is PERMISSION_DENIED.  So even a
process holding the token cannot withdraw, take over or keep alive another
worker's models, and worker ids no longer need to be unguessable.

Any local process can reach the management port, so a registration is not
trusted to be sane: the caps below bound what one can cost the ingress
(memory for names, file descriptors for the connections to a new worker id,
reactor time for a flood), and a registration never silently replaces what
live workers of the same model declared: that refusal is FAILED_PRECONDITION
rather than ALREADY_EXISTS because it is a state of the server, not of the
request: the same registration succeeds once those workers are gone.  A
refused registration is logged once per (worker id, reason), since workers
retry it on every tick.
"""
import collections
import hmac

import grpc
from twisted.logger import Logger

from anyserve_tw.wire import protos
from anyserve_tw.wire.defaults import DATATYPE_NAMES
from anyserve_tw.wire.errors import InferenceError, brief, invalid_argument

_m = protos.management

#: Longest model name, version, platform, worker id and tensor name (UTF-8 bytes).
MAX_NAME_BYTES = 256
#: Longest worker address (a unix:// path is at most 108 bytes; a host:port less).
MAX_ADDRESS_BYTES = 1024
#: Most input tensors, and most output tensors, in one registration.
MAX_TENSORS = 256
#: Most dimensions in one tensor's shape, and most preferred batch sizes.
MAX_DIMS = 64
#: Most (name, version) one worker id may serve.
MAX_MODELS_PER_WORKER = 256
#: Most workers the ingress connects to (each costs it a pool of sockets).
MAX_WORKERS = 256
#: Registrations per second from all workers together (a token bucket) ...
REGISTRATIONS_PER_SECOND = 200.0
#: ... and the burst it allows (a restart of many workers at once).
REGISTRATION_BURST = 400
#: How many (worker id, reason) refusals are remembered so as to be logged once.
MAX_REMEMBERED_REFUSALS = 1024


def _size(text):
    return len(text.encode("utf-8", "surrogatepass"))


def _check_length(what, text, limit=MAX_NAME_BYTES):
    size = _size(text)
    if size > limit:
        raise invalid_argument("%s is %d bytes, more than the %d allowed: %s"
                               % (what, size, limit, brief(text, 40)))


def _specs(specs, kind):
    if len(specs) > MAX_TENSORS:
        raise invalid_argument("%d %ss, more than the %d allowed" % (len(specs), kind, MAX_TENSORS))
    out = []
    for spec in specs:
        if not spec.name:
            raise invalid_argument("%s tensor without a name" % kind)
        _check_length("%s tensor name" % kind, spec.name)
        if spec.datatype not in DATATYPE_NAMES:
            raise invalid_argument(
                "%s '%s': unknown datatype %r" % (kind, spec.name, brief(spec.datatype, 40))
            )
        if len(spec.shape) > MAX_DIMS:
            raise invalid_argument("%s '%s' has %d dimensions, more than the %d allowed"
                                   % (kind, spec.name, len(spec.shape), MAX_DIMS))
        out.append((spec.name, spec.datatype, tuple(spec.shape)))
    return out


def _config(request):
    """The model-configuration part of a registration, checked as Triton
    checks a config: no negative batch size, preferred sizes in 1..max."""
    if request.max_batch_size < 0:
        raise invalid_argument("max_batch_size must be >= 0, not %d" % request.max_batch_size)
    if len(request.preferred_batch_sizes) > MAX_DIMS:
        raise invalid_argument("%d preferred batch sizes, more than the %d allowed"
                               % (len(request.preferred_batch_sizes), MAX_DIMS))
    for size in request.preferred_batch_sizes:
        if size < 1 or (request.max_batch_size and size > request.max_batch_size):
            raise invalid_argument(
                "preferred batch size %d is not within 1..max_batch_size (%d)"
                % (size, request.max_batch_size)
            )
    return dict(
        decoupled=request.decoupled,
        max_batch_size=request.max_batch_size,
        preferred_batch_sizes=tuple(request.preferred_batch_sizes),
        max_queue_delay_us=request.max_queue_delay_us,
    )


#: What must agree between the workers of one (name, version): what a client
#: sees in ModelMetadata and ModelConfig and what its requests must match.
SIGNATURE_FIELDS = ("platform", "inputs", "outputs", "decoupled", "max_batch_size")


def _signature(platform, inputs, outputs, config):
    return (platform, tuple(inputs), tuple(outputs), bool(config["decoupled"]), config["max_batch_size"])


def _model_signature(model):
    return (model.platform, tuple(model.inputs), tuple(model.outputs), bool(model.decoupled),
            model.max_batch_size)


def _differences(mine, theirs):
    return [field for field, a, b in zip(SIGNATURE_FIELDS, mine, theirs) if a != b]


class TokenBucket:
    """``rate`` tokens a second up to ``burst``, on ``clock`` (an IReactorTime)."""

    def __init__(self, clock, rate, burst):
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = None

    def take(self):
        """Take a token; False when none is left."""
        now = self.clock.seconds()
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class ManagementAPI:
    """WorkerManagement over the router; runs on the reactor thread."""

    service_name = protos.MANAGEMENT_SERVICE
    raw_methods = ()
    reactor_free = ()
    log = Logger()

    def __init__(self, router, timeout=10.0):
        self.router = router
        self.timeout = timeout
        self._bucket = None
        #: (name, version) -> {worker_id: signature} of registrations whose
        #: worker is still being connected to, so that two concurrent ones
        #: cannot both pass the signature check.
        self._pending = {}
        #: worker_id -> registrations in flight, counted against its cap.
        self._pending_per_worker = collections.Counter()
        self._refusals = collections.OrderedDict()
        #: worker_id -> the worker key its first registration bound.
        self._keys = {}

    def default_timeout(self, method):
        return self.timeout

    def _refuse(self, worker_id, reason, error):
        """Log ``error`` once per (worker id, reason); return it to raise."""
        key = (brief(worker_id, MAX_NAME_BYTES), reason)
        if key in self._refusals:
            self._refusals.move_to_end(key)
        else:
            self._refusals[key] = None
            if len(self._refusals) > MAX_REMEMBERED_REFUSALS:
                self._refusals.popitem(last=False)
            self.log.warn("registration from worker {worker} refused ({status}): {message}"
                          " (logged once per worker and reason)",
                          worker=key[0], status=error.code.name, message=error.message)
        return error

    def RegisterModel(self, request, timeout):
        if not request.model_name:
            raise invalid_argument("model_name is required")
        if not request.worker_id:
            raise invalid_argument("worker_id is required")
        worker_id = request.worker_id
        try:
            _check_length("worker_id", worker_id)
            _check_length("model name", request.model_name)
            _check_length("model version", request.model_version)
            _check_length("platform", request.platform)
            _check_length("worker_address", request.worker_address, MAX_ADDRESS_BYTES)
            inputs = _specs(request.inputs, "input")
            outputs = _specs(request.outputs, "output")
            config = _config(request)
        except InferenceError as e:
            raise self._refuse(worker_id, "invalid", e)
        name, version = request.model_name, request.model_version
        self._claim(worker_id, request.worker_key)
        self._admit(worker_id, name, version)
        signature = _signature(request.platform, inputs, outputs, config)
        self._check_signature(worker_id, name, version, signature)

        key = (name, version)
        pending = self._pending.setdefault(key, {})
        pending[worker_id] = signature
        self._pending_per_worker[worker_id] += 1

        def done(result):
            entry = self._pending.get(key)
            if entry is not None:
                entry.pop(worker_id, None)
                if not entry:
                    del self._pending[key]
            self._pending_per_worker[worker_id] -= 1
            if self._pending_per_worker[worker_id] <= 0:
                del self._pending_per_worker[worker_id]
            return result

        try:
            d = self.router.register_model(
                worker_id, request.worker_address, name, version, request.platform,
                inputs, outputs, **config,
            )
        except BaseException:
            done(None)
            raise
        d.addBoth(done)
        return d.addCallback(lambda _: _m.RegisterModelResponse(success=True, message="registered"))

    def _live(self, worker_id):
        handle = self.router.workers.get(worker_id)
        return (handle is not None and not handle.closed) or self._pending_per_worker[worker_id] > 0

    def _check_key(self, worker_id, key):
        """PERMISSION_DENIED unless ``key`` is the one bound to the live
        worker ``worker_id``; True if such a binding exists."""
        bound = self._keys.get(worker_id)
        if bound is None or not self._live(worker_id):
            return False
        if not hmac.compare_digest(bound.encode("utf-8"), key.encode("utf-8")):
            raise self._refuse(worker_id, "key", InferenceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "worker id %s belongs to another live worker process (its worker_key differs); "
                "give each worker its own ANYSERVE_WORKER_ID" % brief(worker_id)))
        return True

    def _claim(self, worker_id, key):
        """Bind ``worker_id`` to ``key``, unless a live worker holds it with another."""
        if not key:
            raise self._refuse(worker_id, "invalid", invalid_argument("worker_key is required"))
        _check_length("worker_key", key)
        if not self._check_key(worker_id, key):
            if len(self._keys) >= 2 * MAX_WORKERS:
                for stale in [w for w in self._keys if not self._live(w)]:
                    del self._keys[stale]
            self._keys[worker_id] = key

    def _admit(self, worker_id, name, version):
        """The rate, worker-count and per-worker caps."""
        router = self.router
        if self._bucket is None:
            self._bucket = TokenBucket(router.reactor, REGISTRATIONS_PER_SECOND, REGISTRATION_BURST)
        if not self._bucket.take():
            raise self._refuse(worker_id, "rate", InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "more than %g registrations a second: try again later" % REGISTRATIONS_PER_SECOND))
        if (worker_id not in router.workers and len(router.workers) >= MAX_WORKERS
                and sum(1 for h in router.workers.values() if not h.closed) >= MAX_WORKERS):
            raise self._refuse(worker_id, "workers", InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the ingress already has %d workers, the most it accepts" % MAX_WORKERS))
        model = router.registry.get(name, version)
        if model is not None and any(w.worker_id == worker_id for w in model.workers):
            return  # already served by this worker: a re-registration
        served = router.registry.served_count(worker_id) + self._pending_per_worker[worker_id]
        if served >= MAX_MODELS_PER_WORKER:
            raise self._refuse(worker_id, "models", InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "worker %s already serves %d models, the most one worker may"
                % (brief(worker_id), MAX_MODELS_PER_WORKER)))

    def _check_signature(self, worker_id, name, version, signature):
        """FAILED_PRECONDITION if other live (or registering) workers of
        (name, version) declared another signature."""
        model = self.router.registry.get(name, version)
        others = []
        if model is not None:
            others = [w.worker_id for w in model.workers if w.worker_id != worker_id]
            differs = _differences(signature, _model_signature(model)) if others else []
        if not others:
            pending = self._pending.get((name, version), {})
            others = [w for w, s in pending.items() if w != worker_id and s != signature]
            differs = _differences(signature, pending[others[0]]) if others else []
        if others and differs:
            label = "'%s'%s" % (brief(name), " version '%s'" % brief(version) if version else "")
            raise self._refuse(worker_id, "signature", InferenceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "model %s has %d live or registering worker%s (%s) whose %s differ%s from this "
                "registration's; withdraw them first or register another name or version"
                % (label, len(others), "" if len(others) == 1 else "s",
                   ", ".join(brief(w, 40) for w in others[:3]) + (", ..." if len(others) > 3 else ""),
                   ", ".join(differs), "s" if len(differs) == 1 else "")))

    def UnregisterModel(self, request, timeout):
        self._check_key(request.worker_id, request.worker_key)
        if not self.router.unregister_model(request.worker_id, request.model_name, request.model_version):
            raise InferenceError(
                grpc.StatusCode.NOT_FOUND,
                "worker %r does not serve %s:%s"
                % (brief(request.worker_id), brief(request.model_name), brief(request.model_version) or "-"),
            )
        return _m.UnregisterModelResponse(success=True, message="unregistered")

    def Heartbeat(self, request, timeout):
        if not self._check_key(request.worker_id, request.worker_key):
            return _m.HeartbeatResponse(healthy=False)  # unknown here: register again
        if request.unhealthy:
            reason = "unhealthy: %s" % brief(request.unhealthy, 200)
            self.log.warn("worker {worker} reports itself {reason}: evicting",
                          worker=brief(request.worker_id), reason=reason)
            self.router.evict(request.worker_id, reason)
            return _m.HeartbeatResponse(healthy=False)
        healthy = self.router.heartbeat(request.worker_id, list(request.model_names))
        return _m.HeartbeatResponse(healthy=healthy)
