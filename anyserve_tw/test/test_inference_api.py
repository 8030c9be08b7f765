"""Tests for anyserve_tw.ingress.inference.InferenceAPI's Triton extensions,
over a real Router and registry (workers are stand-ins: nothing is forwarded).

Responses are also read back with tritonclient's own message classes, which
is what a client sees on the wire.
"""
import grpc
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.inference import EXTENSIONS, InferenceAPI
from anyserve_tw.ingress.router import Router
from anyserve_tw.test.test_registry import FakeWorker
from anyserve_tw.wire import protos, rpc
from anyserve_tw.wire.errors import InferenceError, not_found
from anyserve_tw.wire.payloads import Region, Timing

_v2 = protos.inference


def theirs(message, name):
    """``message`` as tritonclient's class ``name`` parses its bytes."""
    from tritonclient.grpc import service_pb2

    return getattr(service_pb2, name).FromString(message.SerializeToString())


class APITestCase(SynchronousTestCase):
    def setUp(self):
        self.router = Router(MemoryReactorClock())
        self.router.running = True  # serving, as far as ServerReady goes
        self.registry = self.router.registry
        self.api = InferenceAPI(self.router)

    def error(self, method, request):
        with self.assertRaises(InferenceError) as caught:
            getattr(self.api, method)(request, 5.0)
        return caught.exception.code, caught.exception.message


class ServedMethodsTests(APITestCase):
    def test_every_rpc_but_streaming_is_served(self):
        """Both fronts serve what the API has: every unary RPC of the proto
        (ModelStreamInfer is the streaming path's)."""
        everything = rpc.method_names(protos.INFERENCE_SERVICE)
        served = rpc.method_names(protos.INFERENCE_SERVICE, self.api)
        self.assertLessEqual(set(everything) - set(served), {"ModelStreamInfer"})

    def test_quick_rpcs_stay_quick(self):
        api = InferenceAPI(self.router, request_timeout=600.0, quick_timeout=5.0)
        for method in ("ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelUnload",
                       "SystemSharedMemoryRegister", "CudaSharedMemoryStatus"):
            self.assertEqual(api.default_timeout(method), 5.0)
        self.assertEqual(api.default_timeout("ModelInfer"), 600.0)

    def test_reactor_free_methods_exist_and_touch_no_router(self):
        """The thread front answers these off the reactor: they must not
        read the router."""
        api = InferenceAPI(router=None)
        for method in api.reactor_free:
            try:
                getattr(api, method)(protos.inference.ServerLiveRequest(), 1.0)
            except InferenceError as e:
                self.assertEqual(e.code, grpc.StatusCode.UNIMPLEMENTED)


class ServerMetadataTests(APITestCase):
    def test_extensions(self):
        response = self.api.ServerMetadata(_v2.ServerMetadataRequest(), 5.0)
        self.assertEqual(list(response.extensions), list(EXTENSIONS))
        for served in ("model_repository", "model_configuration", "statistics", "classification",
                       "binary_tensor_data"):
            self.assertIn(served, response.extensions)
        for unserved in ("system_shared_memory", "cuda_shared_memory", "sequence", "trace", "logging"):
            self.assertNotIn(unserved, response.extensions)

    def test_extensions_with_shared_memory(self):
        api = InferenceAPI(self.router, shared_memory=FakeSharedMemory())
        response = api.ServerMetadata(_v2.ServerMetadataRequest(), 5.0)
        self.assertIn("system_shared_memory", response.extensions)
        self.assertNotIn("cuda_shared_memory", response.extensions)


class ModelConfigTests(APITestCase):
    def config(self, name, version=""):
        response = self.api.ModelConfig(_v2.ModelConfigRequest(name=name, version=version), 5.0)
        return theirs(response, "ModelConfigResponse").config

    def test_unbatched_model(self):
        """add: dims are the declared shapes, types TYPE_*, one CPU
        instance per live worker, the Python backend."""
        for worker in ("w1", "w2"):
            self.registry.register(FakeWorker(worker), "add", "", "python",
                                   [("a", "INT32", (-1,)), ("b", "INT32", (-1,))], [("sum", "INT32", (-1,))])
        config = self.config("add")
        from tritonclient.grpc import model_config_pb2 as mc

        self.assertEqual((config.name, config.platform, config.backend, config.max_batch_size),
                         ("add", "", "python", 0))
        self.assertEqual([(t.name, t.data_type, list(t.dims)) for t in config.input],
                         [("a", mc.TYPE_INT32, [-1]), ("b", mc.TYPE_INT32, [-1])])
        self.assertEqual([(t.name, t.data_type, list(t.dims)) for t in config.output],
                         [("sum", mc.TYPE_INT32, [-1])])
        self.assertEqual([(g.count, g.kind) for g in config.instance_group], [(2, mc.ModelInstanceGroup.KIND_CPU)])
        self.assertEqual(config.version_policy.WhichOneof("policy_choice"), "all")
        self.assertTrue(config.HasField("model_transaction_policy"))
        self.assertFalse(config.model_transaction_policy.decoupled)
        self.assertFalse(config.HasField("dynamic_batching"))

    def test_batched_model_drops_batch_dimension(self):
        """max_batch_size > 0: dims leave out the batch dimension, as Triton's
        do; dynamic batching carries the declared preferences."""
        self.registry.register(FakeWorker("w"), "cls", "v1", "python", [("x", "FP32", (-1, 4))],
                               [("label", "INT64", (-1,)), ("name", "BYTES", (-1, 1))], max_batch_size=8,
                               preferred_batch_sizes=(4, 8), max_queue_delay_us=500)
        from tritonclient.grpc import model_config_pb2 as mc

        config = self.config("cls", "v1")
        self.assertEqual(config.max_batch_size, 8)
        self.assertEqual([(t.name, t.data_type, list(t.dims)) for t in config.input], [("x", mc.TYPE_FP32, [4])])
        self.assertEqual([(t.name, t.data_type, list(t.dims)) for t in config.output],
                         [("label", mc.TYPE_INT64, []), ("name", mc.TYPE_STRING, [1])])
        self.assertEqual(list(config.dynamic_batching.preferred_batch_size), [4, 8])
        self.assertEqual(config.dynamic_batching.max_queue_delay_microseconds, 500)

    def test_batching_without_preferences(self):
        self.registry.register(FakeWorker("w"), "m", max_batch_size=4)
        config = self.config("m")
        self.assertTrue(config.HasField("dynamic_batching"))
        self.assertEqual(list(config.dynamic_batching.preferred_batch_size), [])

    def test_decoupled_model(self):
        self.registry.register(FakeWorker("w"), "stream", decoupled=True)
        self.assertTrue(self.config("stream").model_transaction_policy.decoupled)

    def test_every_datatype(self):
        """Every v2 datatype a registration may use has its TYPE_ name."""
        from anyserve_tw.wire.defaults import DATATYPE_NAMES
        from tritonclient.grpc import model_config_pb2 as mc

        specs = [(name.lower(), name, (1,)) for name in sorted(DATATYPE_NAMES)]
        self.registry.register(FakeWorker("w"), "all", inputs=specs)
        config = self.config("all")
        self.assertEqual(
            {t.name: mc.DataType.Name(t.data_type) for t in config.input},
            {name.lower(): "TYPE_STRING" if name == "BYTES" else "TYPE_" + name for name in DATATYPE_NAMES})

    def test_model_without_specs(self):
        """A model registered without tensor specs: no input or output."""
        self.registry.register(FakeWorker("w"), "echo")
        config = self.config("echo")
        self.assertEqual((list(config.input), list(config.output)), ([], []))

    def test_no_live_worker(self):
        self.registry.register(FakeWorker("w"), "m")
        self.registry.remove_worker("w")
        self.assertEqual(self.config("m").instance_group[0].count, 0)

    def test_default_version(self):
        self.registry.register(FakeWorker("w"), "cls", "v1", inputs=[("x", "FP32", (1,))])
        self.registry.register(FakeWorker("w"), "cls", "v2", inputs=[("y", "FP32", (1,))])
        self.assertEqual(self.config("cls").input[0].name, "y")

    def test_unknown(self):
        self.registry.register(FakeWorker("w"), "m", "1")
        for name, version in [("nope", ""), ("m", "2")]:
            code, message = self.error("ModelConfig", _v2.ModelConfigRequest(name=name, version=version))
            self.assertEqual((code, message), (grpc.StatusCode.NOT_FOUND, not_found(name, version).message))


class ModelStatisticsTests(APITestCase):
    def setUp(self):
        super().setUp()
        w = FakeWorker("w")
        self.cls_v1 = self.registry.register(w, "cls", "v1")
        self.cls_v2 = self.registry.register(w, "cls", "v2")
        self.add = self.registry.register(w, "add")

    def stats(self, name="", version=""):
        response = self.api.ModelStatistics(_v2.ModelStatisticsRequest(name=name, version=version), 5.0)
        return theirs(response, "ModelStatisticsResponse").model_stats

    def test_counts(self):
        self.cls_v1.stats.success(1000, 5000000)
        self.cls_v1.stats.failure(10, 6000000)
        self.cls_v1.stats.timing(Timing(1, 2, 3, 4, 1))
        [stats] = self.stats("cls", "v1")
        self.assertEqual((stats.name, stats.version, stats.inference_count, stats.execution_count,
                          stats.last_inference), ("cls", "v1", 1, 1, 5))
        self.assertEqual((stats.inference_stats.success.count, stats.inference_stats.success.ns), (1, 1000))
        self.assertEqual(stats.inference_stats.fail.count, 1)
        self.assertEqual(stats.inference_stats.compute_infer.ns, 3)

    def test_selection(self):
        """No name: everything; a name: all its versions; both: one."""
        keys = lambda stats: [(s.name, s.version) for s in stats]
        self.assertEqual(keys(self.stats()), [("add", "1"), ("cls", "v1"), ("cls", "v2")])
        self.assertEqual(keys(self.stats("cls")), [("cls", "v1"), ("cls", "v2")])
        self.assertEqual(keys(self.stats("cls", "v2")), [("cls", "v2")])
        self.assertEqual(keys(self.stats("add")), [("add", "1")])
        self.assertEqual(keys(self.stats("", "v2")), keys(self.stats()))  # a version alone: ignored

    def test_unversioned_reads_as_a_number(self):
        """perf_analyzer parses every version of a model's statistics as an
        integer (and aborts on ""): an unversioned model reports "1"."""
        self.add.stats.success(7, 0)
        [stats] = self.stats("add")
        self.assertEqual((stats.version, stats.inference_stats.success.ns), ("1", 7))
        self.assertEqual(int(stats.version), 1)

    def test_unready_models_reported(self):
        self.registry.remove_worker("w")
        self.registry.unload("cls")
        self.assertEqual(len(self.stats()), 3)

    def test_unknown(self):
        for name, version in [("nope", ""), ("cls", "v3")]:
            code, _ = self.error("ModelStatistics", _v2.ModelStatisticsRequest(name=name, version=version))
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND)


class RepositoryTests(APITestCase):
    def setUp(self):
        super().setUp()
        self.registry.register(FakeWorker("w1"), "cls", "v1")
        self.registry.register(FakeWorker("w2"), "cls", "v1")
        self.registry.register(FakeWorker("w1"), "cls", "v2")
        self.registry.register(FakeWorker("w3"), "add")
        self.registry.register(FakeWorker("gone"), "old")
        self.registry.remove_worker("gone")

    def index(self, ready=False):
        response = self.api.RepositoryIndex(_v2.RepositoryIndexRequest(ready=ready), 5.0)
        return [(m.name, m.version, m.state, m.reason)
                for m in theirs(response, "RepositoryIndexResponse").models]

    def unload(self, name, **parameters):
        request = _v2.RepositoryModelUnloadRequest(model_name=name)
        for key, value in parameters.items():
            request.parameters[key].bool_param = value
        return self.api.RepositoryModelUnload(request, 5.0)

    def load(self, name):
        return self.api.RepositoryModelLoad(_v2.RepositoryModelLoadRequest(model_name=name), 5.0)

    def ready(self, name, version=""):
        return self.api.ModelReady(_v2.ModelReadyRequest(name=name, version=version), 5.0).ready

    def test_index(self):
        self.assertEqual(self.index(), [
            ("add", "", "READY", "1 worker: w3"),
            ("cls", "v1", "READY", "2 workers: w1, w2"),
            ("cls", "v2", "READY", "1 worker: w1"),
            ("old", "", "UNAVAILABLE", "no live worker"),
        ])
        self.assertEqual([m[:2] for m in self.index(ready=True)], [("add", ""), ("cls", "v1"), ("cls", "v2")])

    def test_unload_then_load(self):
        """Unloaded: not ready, requests UNAVAILABLE, listed as such, server
        still ready; loaded: back to normal."""
        self.assertIsInstance(self.unload("cls", unload_dependents=True), _v2.RepositoryModelUnloadResponse)
        for version in ("", "v1", "v2"):
            self.assertFalse(self.ready("cls", version))
            failure = self.failureResultOf(self.router.infer("cls", version, b"", 5.0), InferenceError)
            self.assertEqual((failure.value.code, failure.value.message),
                             (grpc.StatusCode.UNAVAILABLE, "model 'cls' is unloaded"))
        self.assertTrue(self.ready("add"))
        self.assertEqual([m for m in self.index() if m[0] == "cls"], [
            ("cls", "v1", "UNAVAILABLE", "unloaded; 2 workers registered: w1, w2"),
            ("cls", "v2", "UNAVAILABLE", "unloaded; 1 worker registered: w1"),
        ])
        self.registry.register(FakeWorker("gone"), "old")
        self.assertTrue(self.api.ServerReady(_v2.ServerReadyRequest(), 5.0).ready)
        # Its metadata and configuration still answer.
        self.api.ModelMetadata(_v2.ModelMetadataRequest(name="cls"), 5.0)
        self.api.ModelConfig(_v2.ModelConfigRequest(name="cls"), 5.0)

        self.assertIsInstance(self.load("cls"), _v2.RepositoryModelLoadResponse)
        for version in ("", "v1", "v2"):
            self.assertTrue(self.ready("cls", version))
        self.assertEqual(self.index(ready=True)[1], ("cls", "v1", "READY", "2 workers: w1, w2"))

    def test_unknown_model(self):
        for method, request in [("RepositoryModelUnload", _v2.RepositoryModelUnloadRequest(model_name="nope")),
                                ("RepositoryModelLoad", _v2.RepositoryModelLoadRequest(model_name="nope"))]:
            code, message = self.error(method, request)
            self.assertEqual((code, message), (grpc.StatusCode.NOT_FOUND,
                                               "Request for unknown model: 'nope' is not found"))

    def test_load_with_config_or_files_refused(self):
        """Workers define models: a config or files can't be loaded."""
        request = _v2.RepositoryModelLoadRequest(model_name="cls")
        request.parameters["config"].string_param = "{}"
        code, message = self.error("RepositoryModelLoad", request)
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("'config'", message)
        request = _v2.RepositoryModelLoadRequest(model_name="cls")
        request.parameters["file:1/model.py"].bytes_param = b"x"
        self.assertEqual(self.error("RepositoryModelLoad", request)[0], grpc.StatusCode.UNIMPLEMENTED)

    def test_unknown_unload_parameter_refused(self):
        request = _v2.RepositoryModelUnloadRequest(model_name="cls")
        request.parameters["sometime"].bool_param = True
        self.assertEqual(self.error("RepositoryModelUnload", request)[0], grpc.StatusCode.UNIMPLEMENTED)
        self.assertTrue(self.ready("cls"))

    def test_named_repository_refused(self):
        for method, request in [
            ("RepositoryIndex", _v2.RepositoryIndexRequest(repository_name="elsewhere")),
            ("RepositoryModelLoad", _v2.RepositoryModelLoadRequest(repository_name="elsewhere", model_name="cls")),
            ("RepositoryModelUnload", _v2.RepositoryModelUnloadRequest(repository_name="elsewhere",
                                                                       model_name="cls")),
        ]:
            code, message = self.error(method, request)
            self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
            self.assertIn("repository_name", message)
        self.assertTrue(self.ready("cls"))


class FakeSharedMemory:
    """The SharedMemoryRegistry interface the API delegates to."""

    def __init__(self, result=None):
        self.regions = {}
        self.calls = []
        self.result = result  # what register/unregister return

    def register(self, name, key, offset, byte_size):
        self.calls.append(("register", name, key, offset, byte_size))
        if name in self.regions:
            raise InferenceError(grpc.StatusCode.ALREADY_EXISTS, "region '%s' already exists" % name)
        self.regions[name] = Region(key, offset, byte_size)
        return self.result

    def unregister(self, name):
        self.calls.append(("unregister", name))
        if name:
            self.regions.pop(name, None)
        else:
            self.regions.clear()
        return self.result

    def status(self, name=""):
        if not name:
            return dict(self.regions)
        if name not in self.regions:
            raise InferenceError(grpc.StatusCode.NOT_FOUND, "Unable to find system shared memory region: '%s'" % name)
        return {name: self.regions[name]}


class SharedMemoryTests(APITestCase):
    def setUp(self):
        super().setUp()
        self.shm = FakeSharedMemory()
        self.api = InferenceAPI(self.router, shared_memory=self.shm)

    def register(self, name, key, offset=0, byte_size=64):
        return self.api.SystemSharedMemoryRegister(
            _v2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size), 5.0)

    def status(self, name=""):
        response = self.api.SystemSharedMemoryStatus(_v2.SystemSharedMemoryStatusRequest(name=name), 5.0)
        return {name: (r.name, r.key, r.offset, r.byte_size)
                for name, r in theirs(response, "SystemSharedMemoryStatusResponse").regions.items()}

    def test_register_status_unregister(self):
        self.assertIsInstance(self.register("in", "/in0", 16, 128), _v2.SystemSharedMemoryRegisterResponse)
        self.register("out", "/out0")
        self.assertEqual(self.shm.calls[0], ("register", "in", "/in0", 16, 128))
        self.assertEqual(self.status(), {"in": ("in", "/in0", 16, 128), "out": ("out", "/out0", 0, 64)})
        self.assertEqual(self.status("out"), {"out": ("out", "/out0", 0, 64)})
        self.api.SystemSharedMemoryUnregister(_v2.SystemSharedMemoryUnregisterRequest(name="in"), 5.0)
        self.assertEqual(list(self.status()), ["out"])
        self.api.SystemSharedMemoryUnregister(_v2.SystemSharedMemoryUnregisterRequest(), 5.0)
        self.assertEqual(self.shm.calls[-1], ("unregister", ""))
        self.assertEqual(self.status(), {})

    def test_errors_pass_through(self):
        self.register("in", "/in0")
        self.assertEqual(self.error("SystemSharedMemoryRegister",
                                    _v2.SystemSharedMemoryRegisterRequest(name="in", key="/x"))[0],
                         grpc.StatusCode.ALREADY_EXISTS)
        self.assertEqual(self.error("SystemSharedMemoryStatus", _v2.SystemSharedMemoryStatusRequest(name="nope")),
                         (grpc.StatusCode.NOT_FOUND, "Unable to find system shared memory region: 'nope'"))

    def test_deferred_results(self):
        """A registry that answers later (telling workers first) is waited for."""
        pending = Deferred()
        self.api = InferenceAPI(self.router, shared_memory=FakeSharedMemory(result=pending))
        d = self.register("in", "/in0")
        self.assertNoResult(d)
        pending.callback(None)
        self.assertIsInstance(self.successResultOf(d), _v2.SystemSharedMemoryRegisterResponse)
        self.api.shared_memory.result = succeed(None)
        d = self.api.SystemSharedMemoryUnregister(_v2.SystemSharedMemoryUnregisterRequest(name="in"), 5.0)
        self.assertIsInstance(self.successResultOf(d), _v2.SystemSharedMemoryUnregisterResponse)

    def test_without_registry(self):
        api = InferenceAPI(self.router)
        self.api = api
        for method, request in [
            ("SystemSharedMemoryStatus", _v2.SystemSharedMemoryStatusRequest()),
            ("SystemSharedMemoryRegister", _v2.SystemSharedMemoryRegisterRequest(name="a", key="/a")),
            ("SystemSharedMemoryUnregister", _v2.SystemSharedMemoryUnregisterRequest()),
        ]:
            self.assertEqual(self.error(method, request),
                             (grpc.StatusCode.UNIMPLEMENTED, "system shared memory is not enabled on this server"))


class UnsupportedTests(APITestCase):
    def test_cuda_shared_memory(self):
        for method, request in [
            ("CudaSharedMemoryStatus", _v2.CudaSharedMemoryStatusRequest()),
            ("CudaSharedMemoryRegister", _v2.CudaSharedMemoryRegisterRequest(name="g")),
            ("CudaSharedMemoryUnregister", _v2.CudaSharedMemoryUnregisterRequest(name="g")),
        ]:
            code, message = self.error(method, request)
            self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
            self.assertIn("no GPU memory support", message)

    def test_trace_and_log_settings(self):
        code, message = self.error("TraceSetting", _v2.TraceSettingRequest(model_name="add"))
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("--access-log", message)
        code, message = self.error("LogSettings", _v2.LogSettingsRequest())
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("--access-log", message)
