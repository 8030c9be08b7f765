"""The KServe v2 ``inference.GRPCInferenceService``, answered on the reactor.

:class:`InferenceAPI` is what either front
(:class:`~anyserve_tw.ingress.interfaces.IGrpcFront`) serves: each method takes the request and the time the RPC may still take and
returns the response, a Deferred of it, or raises :class:`InferenceError`.
Everything but ModelInfer is answered from the registry.  ModelInfer is
handled as raw bytes: the ingress reads the model name and version
(:func:`anyserve_tw.wire.protowire.peek_request`) and forwards the request
untouched; the worker's response bytes go back to the client untouched.
"""
from anyserve_tw.wire import protos
from anyserve_tw.wire.protowire import peek_request

_v2 = protos.inference


class InferenceAPI:
    """GRPCInferenceService over the router; runs on the reactor thread."""

    service_name = protos.INFERENCE_SERVICE
    #: Methods that take and return serialized bytes, never parsed here.
    raw_methods = ("ModelInfer",)
    #: Methods that read no reactor-owned state: the thread front answers them
    #: in its own thread, without a hop to the reactor.
    reactor_free = ("ServerLive", "ServerMetadata")

    def __init__(self, router, request_timeout=600.0, server_version="", quick_timeout=5.0):
        self.router = router
        self.request_timeout = request_timeout
        self.server_version = server_version
        self.quick_timeout = quick_timeout

    def default_timeout(self, method):
        """How long ``method`` may take when the client sets no deadline."""
        return self.request_timeout if method == "ModelInfer" else self.quick_timeout

    def ServerLive(self, request, timeout):
        return _v2.ServerLiveResponse(live=True)

    def ServerReady(self, request, timeout):
        return _v2.ServerReadyResponse(ready=self.router.server_ready())

    def ModelReady(self, request, timeout):
        return _v2.ModelReadyResponse(ready=self.router.model_ready(request.name, request.version))

    def ServerMetadata(self, request, timeout):
        return _v2.ServerMetadataResponse(name="anyserve", version=self.server_version, extensions=[])

    def ModelMetadata(self, request, timeout):
        model, versions = self.router.model_metadata(request.name, request.version)
        tensor = _v2.ModelMetadataResponse.TensorMetadata
        return _v2.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform=model.platform,
            inputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in model.inputs],
            outputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in model.outputs],
        )

    def ModelInfer(self, request_bytes, timeout):
        name, version, _ = peek_request(request_bytes)
        return self.router.infer(name, version, request_bytes, timeout)
