"""The KServe v2 ``inference.GRPCInferenceService`` the ingress serves.

Everything but ModelInfer is answered from the registry.  ModelInfer is
handled as raw bytes: the ingress reads the model name and version
(:func:`anyserve_tw.wire.protowire.peek_request`) and forwards the request untouched;
the worker's response bytes go back to the client untouched.
"""
from anyserve_tw.wire import protos, rpc
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.protowire import peek_request

_v2 = protos.inference
_NO_DEADLINE = 1e9  # seconds; grpcio's "no deadline" is ~9.2e18


class InferenceServicer:
    """Runs in gRPC threads; reaches the reactor-owned router through the bridge."""

    def __init__(self, bridge, router, request_timeout=600.0, server_version=""):
        self.bridge = bridge
        self.router = router
        self.request_timeout = request_timeout
        self.server_version = server_version
        self._quick = 5.0  # bound for registry-only calls

    def _timeout(self, context, default):
        """The RPC's remaining time, or ``default`` when the client set no
        deadline (grpcio then reports a practically infinite remainder)."""
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE:
            return default
        return remaining

    def ServerLive(self, request, context):
        return _v2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        ready = self.bridge.call_for_rpc(context, self._timeout(context, self._quick), self.router.server_ready)
        return _v2.ServerReadyResponse(ready=ready)

    def ModelReady(self, request, context):
        ready = self.bridge.call_for_rpc(
            context, self._timeout(context, self._quick),
            self.router.model_ready, request.name, request.version,
        )
        return _v2.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request, context):
        return _v2.ServerMetadataResponse(
            name="anyserve", version=self.server_version, extensions=[]
        )

    def ModelMetadata(self, request, context):
        model, versions = self.bridge.call_for_rpc(
            context, self._timeout(context, self._quick),
            self.router.model_metadata, request.name, request.version,
        )
        tensor = _v2.ModelMetadataResponse.TensorMetadata
        return _v2.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform=model.platform,
            inputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in model.inputs],
            outputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in model.outputs],
        )

    def ModelInfer(self, request_bytes, context):
        try:
            name, version, _ = peek_request(request_bytes)
        except InferenceError as e:
            context.abort(e.code, e.message)
        timeout = self._timeout(context, self.request_timeout)
        return self.bridge.call_for_rpc(context, timeout, self.router.infer, name, version, request_bytes, timeout)


def inference_handler(servicer):
    return rpc.generic_handler(protos.INFERENCE_SERVICE, servicer, raw_methods=("ModelInfer",))
