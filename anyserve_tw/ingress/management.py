"""The ``anyserve.management.WorkerManagement`` service workers call.

Requests are checked here (in the gRPC thread) and applied to the router on the
reactor thread.  Errors are gRPC statuses: INVALID_ARGUMENT for a malformed
registration, UNAVAILABLE when the worker's socket can't be reached.
"""
import grpc

from anyserve_tw.wire import protos, rpc
from anyserve_tw.wire.errors import InferenceError, invalid_argument
from anyserve_tw.wire.defaults import DATATYPE_NAMES

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


class ManagementServicer:
    def __init__(self, bridge, router, timeout=10.0):
        self.bridge = bridge
        self.router = router
        self.timeout = timeout

    def _call(self, context, f, *args):
        return self.bridge.call_for_rpc(context, self.timeout, f, *args)

    def RegisterModel(self, request, context):
        try:
            if not request.model_name:
                raise invalid_argument("model_name is required")
            if not request.worker_id:
                raise invalid_argument("worker_id is required")
            inputs = _specs(request.inputs, "input")
            outputs = _specs(request.outputs, "output")
        except InferenceError as e:
            context.abort(e.code, e.message)
        self._call(
            context, self.router.register_model, request.worker_id, request.worker_address,
            request.model_name, request.model_version, request.platform, inputs, outputs,
        )
        return _m.RegisterModelResponse(success=True, message="registered")

    def UnregisterModel(self, request, context):
        removed = self._call(
            context, self.router.unregister_model,
            request.worker_id, request.model_name, request.model_version,
        )
        if not removed:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                "worker %r does not serve %s:%s"
                % (request.worker_id, request.model_name, request.model_version or "-"),
            )
        return _m.UnregisterModelResponse(success=True, message="unregistered")

    def Heartbeat(self, request, context):
        healthy = self._call(context, self.router.heartbeat, request.worker_id, list(request.model_names))
        return _m.HeartbeatResponse(healthy=healthy)


def management_handler(servicer):
    return rpc.generic_handler(protos.MANAGEMENT_SERVICE, servicer)
