"""The KServe v2 ``inference.GRPCInferenceService``, answered on the reactor.

:class:`InferenceAPI` is what either front
(:class:`~anyserve_tw.ingress.interfaces.IGrpcFront`) serves: each method takes the request and the time the RPC may still take and
returns the response, a Deferred of it, or raises :class:`InferenceError`.
Everything but ModelInfer is answered from the registry.  ModelInfer is
handled as raw bytes: the ingress reads the model name and version
(:func:`anyserve_tw.wire.protowire.peek_request`) and forwards the request
untouched; the worker's response bytes go back to the client untouched.

Triton's extensions served here: model configuration (built from what the
workers declared), statistics, the model repository (index, load, unload:
see :mod:`anyserve_tw.ingress.registry`) and, when the ingress has a
shared-memory registry, system shared memory.  CUDA shared memory, trace and
log settings are answered UNIMPLEMENTED with the reason.
"""
import grpc
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError, brief
from anyserve_tw.wire.protowire import peek_request
from anyserve_tw.ingress.streaming import InferStream

_v2 = protos.inference

#: Triton's extension names this server answers for, whatever the front
#: (``binary_tensor_data`` is the HTTP front's; ``classification`` and
#: ``parameters`` are the workers': a requested output's ``classification``
#: parameter, request and response parameters handed to and from handlers).  ``system_shared_memory`` is added
#: when the ingress has a shared-memory registry.  Not served: ``sequence``,
#: ``schedule_policy``, ``cuda_shared_memory``, ``trace``, ``logging`` and
#: ``model_repository(unload_dependents)`` (no model depends on another, so
#: there is nothing for it to do).
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics",
              "binary_tensor_data", "parameters")

#: The version ModelStatistics reports for a model registered without one.
UNVERSIONED_STATISTICS = "1"

_UNLOAD_PARAMETERS = frozenset(["unload_dependents"])

#: v2 datatype name -> the model configuration's DataType: ``TYPE_`` and the
#: name, but BYTES is TYPE_STRING.
_CONFIG_TYPES = {
    ("BYTES" if value.name == "TYPE_STRING" else value.name[len("TYPE_"):]): value.number
    for value in protos.POOL.FindEnumTypeByName("inference.DataType").values if value.number
}


def unimplemented(message):
    return InferenceError(grpc.StatusCode.UNIMPLEMENTED, message)


def model_config(model):
    """Triton's ``ModelConfig`` for a ModelVersion, from what its workers
    declared.

    It reads as a Python-backend model's: ``backend: "python"`` and an empty
    ``platform`` (the declared platform is in ModelMetadata).  ``dims`` are
    the declared shapes, without their first (batch) dimension when
    ``max_batch_size`` > 0, as Triton's are.  A model registered without
    tensor specs has no ``input`` / ``output``.  ``version_policy`` is
    ``all``: every version a worker registers is served.  ``dynamic_batching``
    is there when the worker batches (``max_batch_size`` > 0) or declared
    preferred sizes or a queue delay.  ``instance_group``: one group of
    KIND_CPU instances, one per live worker.
    """
    skip = 1 if model.max_batch_size > 0 else 0

    def dims(shape):
        return list(shape[skip:])

    config = _v2.ModelConfig(
        name=model.name,
        platform="",
        backend="python",
        version_policy=_v2.ModelVersionPolicy(all=_v2.ModelVersionPolicy.All()),
        max_batch_size=model.max_batch_size,
        input=[_v2.ModelInput(name=n, data_type=_CONFIG_TYPES[t], dims=dims(s)) for n, t, s in model.inputs],
        output=[_v2.ModelOutput(name=n, data_type=_CONFIG_TYPES[t], dims=dims(s)) for n, t, s in model.outputs],
        instance_group=[_v2.ModelInstanceGroup(
            name="%s_0" % model.name, count=len(model.workers), kind=_v2.ModelInstanceGroup.KIND_CPU)],
        model_transaction_policy=_v2.ModelTransactionPolicy(decoupled=model.decoupled),
    )
    if model.max_batch_size > 0 or model.preferred_batch_sizes or model.max_queue_delay_us:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.preferred_batch_size.extend(model.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = model.max_queue_delay_us
    return config


def _answer(result, response):
    """``response`` once ``result`` (a value, or a Deferred of one) is done."""
    if isinstance(result, Deferred):
        return result.addCallback(lambda _: response)
    return response


class InferenceAPI:
    """GRPCInferenceService over the router; runs on the reactor thread.

    ``shared_memory``: the ingress's
    :class:`~anyserve_tw.ingress.sharedmemory.SharedMemoryRegistry`, or None
    (the SystemSharedMemory RPCs then answer UNIMPLEMENTED).
    """

    log = Logger()

    service_name = protos.INFERENCE_SERVICE
    #: Methods that take and return serialized bytes, never parsed here.
    raw_methods = ("ModelInfer", "ModelStreamInfer")
    #: Bidirectional streams: ``Method(send, timeout)`` opens one
    #: (:class:`~anyserve_tw.ingress.streaming.InferStream`).
    stream_methods = ("ModelStreamInfer",)
    #: Methods that read no reactor-owned state: the thread front answers them
    #: in its own thread, without a hop to the reactor.
    reactor_free = ("ServerLive", "ServerMetadata", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
                    "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")

    def __init__(self, router, request_timeout=600.0, server_version="", quick_timeout=5.0,
                 shared_memory=None):
        self.router = router
        self.request_timeout = request_timeout
        self.server_version = server_version
        self.quick_timeout = quick_timeout
        self.shared_memory = shared_memory
        self.extensions = EXTENSIONS + (("system_shared_memory",) if shared_memory is not None else ())

    def default_timeout(self, method):
        """How long ``method`` may take when the client sets no deadline."""
        return self.request_timeout if method in ("ModelInfer", "ModelStreamInfer") else self.quick_timeout

    def ServerLive(self, request, timeout):
        return _v2.ServerLiveResponse(live=True)

    def ServerReady(self, request, timeout):
        return _v2.ServerReadyResponse(ready=self.router.server_ready())

    def ModelReady(self, request, timeout):
        return _v2.ModelReadyResponse(ready=self.router.model_ready(request.name, request.version))

    def ServerMetadata(self, request, timeout):
        return _v2.ServerMetadataResponse(name="anyserve", version=self.server_version,
                                          extensions=self.extensions)

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
        name, version, request_id = peek_request(request_bytes)
        return self.router.infer(name, version, request_bytes, timeout, request_id=request_id)

    def ModelStreamInfer(self, send, timeout):
        """Open a stream; each request on it is bounded by ``timeout``."""
        return InferStream(self.router, self.router.reactor, send, timeout)

    # -- Triton's extensions -----------------------------------------------

    def ModelConfig(self, request, timeout):
        """See :func:`model_config`; NOT_FOUND for an unknown model or
        version (UNAVAILABLE while workers are still registering), as
        ModelMetadata (an unloaded model still has its config)."""
        model, _ = self.router.model_metadata(request.name, request.version)
        return _v2.ModelConfigResponse(config=model_config(model))

    def ModelStatistics(self, request, timeout):
        """Every known model and version (no name), every version of a
        model (no version), or one; NOT_FOUND for an unknown one.  Unlike
        Triton, versions without a live worker or unloaded are reported too:
        their counts stay meaningful.

        A model registered without a version is reported as version
        :data:`UNVERSIONED_STATISTICS`: Triton's versions are numbers, and
        perf_analyzer reads each version here as one (it aborts on ``""``,
        and on names like ``v1``, which no answer can fix)."""
        models = self.router.registry.select(request.name, request.version if request.name else "")
        return _v2.ModelStatisticsResponse(model_stats=[
            model.stats.to_proto(model.name, model.version or UNVERSIONED_STATISTICS) for model in models])

    def RepositoryIndex(self, request, timeout):
        """Every known (name, version), READY or UNAVAILABLE; the reason
        names the workers serving it (``2 workers: w1, w2``), or says why it
        is unavailable (``no live worker``, ``unloaded``).  ``ready``: only
        READY ones."""
        self._one_repository(request)
        entry = _v2.RepositoryIndexResponse.ModelIndex
        return _v2.RepositoryIndexResponse(models=[
            entry(name=m.name, version=m.version, state=m.state, reason=m.reason)
            for m in self.router.registry.index(request.ready)
        ])

    def RepositoryModelLoad(self, request, timeout):
        """Route a model unloaded by RepositoryModelUnload again.  Workers
        define models, so a config or files can't be given here."""
        self._one_repository(request)
        for key in request.parameters:
            if key == "config" or key.startswith("file:"):
                raise unimplemented(
                    "load parameter '%s' is not supported: AnyServe's models are defined by the "
                    "workers that register them" % brief(key))
        self.router.registry.load(request.model_name)
        self.log.info("model {name} loaded by a client", name=request.model_name)
        return _v2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, timeout):
        """Stop routing every version of a model: see
        :mod:`anyserve_tw.ingress.registry`."""
        self._one_repository(request)
        for key in request.parameters:
            if key not in _UNLOAD_PARAMETERS:
                raise unimplemented("unload parameter '%s' is not supported" % brief(key))
        self.router.registry.unload(request.model_name)
        self.log.info("model {name} unloaded by a client: its requests get UNAVAILABLE until it is loaded",
                      name=request.model_name)
        return _v2.RepositoryModelUnloadResponse()

    def _one_repository(self, request):
        if request.repository_name:
            raise unimplemented(
                "repository_name is not supported: AnyServe has one model repository, which its "
                "workers fill")

    def SystemSharedMemoryStatus(self, request, timeout):
        regions = self._shared_memory().status(request.name)
        status = _v2.SystemSharedMemoryStatusResponse.RegionStatus
        return _v2.SystemSharedMemoryStatusResponse(regions={
            name: status(name=name, key=region.key, offset=region.offset, byte_size=region.byte_size)
            for name, region in regions.items()
        })

    def SystemSharedMemoryRegister(self, request, timeout):
        result = self._shared_memory().register(request.name, request.key, request.offset, request.byte_size)
        return _answer(result, _v2.SystemSharedMemoryRegisterResponse())

    def SystemSharedMemoryUnregister(self, request, timeout):
        result = self._shared_memory().unregister(request.name)
        return _answer(result, _v2.SystemSharedMemoryUnregisterResponse())

    def _shared_memory(self):
        if self.shared_memory is None:
            raise unimplemented("system shared memory is not enabled on this server")
        return self.shared_memory

    def CudaSharedMemoryStatus(self, request, timeout):
        raise unimplemented(_NO_CUDA)

    def CudaSharedMemoryRegister(self, request, timeout):
        raise unimplemented(_NO_CUDA)

    def CudaSharedMemoryUnregister(self, request, timeout):
        raise unimplemented(_NO_CUDA)

    def TraceSetting(self, request, timeout):
        raise unimplemented(
            "trace settings are not supported: AnyServe does not trace requests "
            "(the ingress's --access-log logs one line per request)")

    def LogSettings(self, request, timeout):
        raise unimplemented(
            "log settings are not supported: the ingress logs through twistd (--logfile); "
            "--access-log adds one line per request")


_NO_CUDA = ("CUDA shared memory is not supported: AnyServe has no GPU memory support "
            "(use system shared memory, or send tensors in the request)")
