"""The ``anyserve.management.WorkerManagement`` service workers call.

Like :class:`anyserve_tw.ingress.inference.InferenceAPI`, answered on the
reactor by either front.  Errors are gRPC statuses: INVALID_ARGUMENT for a
malformed registration (checked before anything reaches the router: names,
datatypes, batch sizes),
UNAVAILABLE when the worker's socket can't be reached.
"""
import grpc

from anyserve_tw.wire import protos
from anyserve_tw.wire.defaults import DATATYPE_NAMES
from anyserve_tw.wire.errors import InferenceError, invalid_argument

_m = protos.management


def _specs(specs, kind):
    out = []
    for spec in specs:
        if not spec.name:
            raise invalid_argument("%s tensor without a name" % kind)
        if spec.datatype not in DATATYPE_NAMES:
            raise invalid_argument(
                "%s '%s': unknown datatype %r" % (kind, spec.name, spec.datatype)
            )
        out.append((spec.name, spec.datatype, tuple(spec.shape)))
    return out


def _config(request):
    """The model-configuration part of a registration, checked as Triton
    checks a config: no negative batch size, preferred sizes in 1..max."""
    if request.max_batch_size < 0:
        raise invalid_argument("max_batch_size must be >= 0, not %d" % request.max_batch_size)
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


class ManagementAPI:
    """WorkerManagement over the router; runs on the reactor thread."""

    service_name = protos.MANAGEMENT_SERVICE
    raw_methods = ()
    reactor_free = ()

    def __init__(self, router, timeout=10.0):
        self.router = router
        self.timeout = timeout

    def default_timeout(self, method):
        return self.timeout

    def RegisterModel(self, request, timeout):
        if not request.model_name:
            raise invalid_argument("model_name is required")
        if not request.worker_id:
            raise invalid_argument("worker_id is required")
        inputs = _specs(request.inputs, "input")
        outputs = _specs(request.outputs, "output")
        config = _config(request)
        d = self.router.register_model(
            request.worker_id, request.worker_address, request.model_name,
            request.model_version, request.platform, inputs, outputs, **config,
        )
        return d.addCallback(lambda _: _m.RegisterModelResponse(success=True, message="registered"))

    def UnregisterModel(self, request, timeout):
        if not self.router.unregister_model(request.worker_id, request.model_name, request.model_version):
            raise InferenceError(
                grpc.StatusCode.NOT_FOUND,
                "worker %r does not serve %s:%s"
                % (request.worker_id, request.model_name, request.model_version or "-"),
            )
        return _m.UnregisterModelResponse(success=True, message="unregistered")

    def Heartbeat(self, request, timeout):
        healthy = self.router.heartbeat(request.worker_id, list(request.model_names))
        return _m.HeartbeatResponse(healthy=healthy)
